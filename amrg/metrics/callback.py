"""Lightning callback that scores generated reports on validation and test, logs and saves them.

The LightningModule's ``validation_step`` / ``test_step`` returns
``{"ids": list[str], "hypotheses": list[str], "references": list[str], ...}``; this callback feeds
those strings to one :class:`~amrg.metrics.nlg.NLGScores` and one
:class:`~amrg.metrics.clinical.ClinicalEfficacy` per stage and, at the end of the epoch, computes
them once over all ranks (gathered, deduplicated, scored on rank 0, shared with every rank), logs
``{stage}/{name}`` (``val/bleu4``, ``test/ce/micro_f1/14/u0``) and, on rank 0, writes
``{stage}_predictions_epoch{N}.jsonl`` and ``{stage}_metrics_epoch{N}.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from amrg.metrics.clinical import ClinicalEfficacy, ReportLabeler
from amrg.metrics.nlg import NLGScores

__all__ = ["ReportMetricsCallback"]

log = logging.getLogger(__name__)

Stage = Literal["val", "test"]
_OUTPUT_KEYS = ("ids", "hypotheses", "references")
_HOOK = {"val": "validation_step", "test": "test_step"}

# Our logged values are computed from all ranks' gathered reports and are identical on every rank,
# so Lightning's advice to pass sync_dist=True for epoch-level logs under DDP does not apply to them.
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self\.log\('(val|test)/(bleu[1-4]|meteor|rouge_l|cider|ce/)",
    category=PossibleUserWarning,
)


class ReportMetricsCallback(L.Callback):
    """Score generated reports (NLG + CE) at the end of validation and test epochs.

    Files (rank 0 only) go to ``dirpath``: ``{stage}_predictions_epoch{N}.jsonl`` with one
    ``{"id", "hypothesis", "reference", "hyp_labels", "ref_labels"}`` object per report (sorted by id;
    labels are 14 values 1/0/-1/null in ``amrg.labels.LABELS`` order, null when CE is off) and
    ``{stage}_metrics_epoch{N}.json`` with ``{"stage", "epoch", "num_reports", "metrics"}``, where
    ``metrics`` maps the logged names to values. N is ``trainer.current_epoch``; when fitting validates
    more than once per epoch (``val_check_interval < 1``, or step-based with
    ``check_val_every_n_epoch=None``), the names also carry the step (``..._epoch{N}_step{S}...``) so no
    run overwrites another's files.

    Values are logged with ``pl_module.log_dict`` at epoch end, so
    ``ModelCheckpoint(monitor="val/bleu4", mode="max")`` and ``EarlyStopping`` can use them. The
    sanity-check run is not scored.

    Args:
        dirpath: folder for the prediction and metric files; ``None`` uses ``trainer.log_dir``
            (the logger's version folder, or ``default_root_dir`` without a logger).
        meteor: score METEOR (one JVM per epoch on rank 0; needs Java on PATH).
        ce: score clinical efficacy with ``labeler``.
        labeler: reads the 14 CheXpert labels off reports; ``None`` builds
            ``amrg.labeling.CheXpertLabeler()`` when first needed.
        every_n_val_epochs: while fitting, score every n-th validation run only (the others generate
            reports but are not scored or logged). With n > 1 a ``ModelCheckpoint`` monitoring one of
            these names needs ``every_n_epochs=n`` too. ``trainer.validate`` and ``trainer.test``
            always score.
    """

    def __init__(
        self,
        dirpath: Path | str | None = None,
        meteor: bool = True,
        ce: bool = True,
        labeler: ReportLabeler | None = None,
        every_n_val_epochs: int = 1,
    ) -> None:
        super().__init__()
        if every_n_val_epochs < 1:
            raise ValueError(
                f"ReportMetricsCallback: every_n_val_epochs must be >= 1, found {every_n_val_epochs}"
            )
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.meteor = meteor
        self.ce = ce
        self.every_n_val_epochs = every_n_val_epochs
        self.val_nlg = NLGScores(meteor=meteor)
        self.test_nlg = NLGScores(meteor=meteor)
        self.val_ce = ClinicalEfficacy(labeler=labeler) if ce else None
        self.test_ce = ClinicalEfficacy(labeler=labeler) if ce else None
        self._val_runs = 0  # validation runs seen while fitting (sanity check excluded)
        self._active: dict[str, bool] = {"val": False, "test": False}

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Validation runs seen, so ``every_n_val_epochs`` keeps its rhythm across a resume."""
        return {"val_runs": self._val_runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._val_runs = int(state_dict.get("val_runs", 0))

    def _metrics(self, stage: Stage) -> tuple[NLGScores, ClinicalEfficacy | None]:
        return (self.val_nlg, self.val_ce) if stage == "val" else (self.test_nlg, self.test_ce)

    # --- hooks ---------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before any generation if METEOR is asked for and Java is missing."""
        if self.meteor and shutil.which("java") is None:
            raise RuntimeError(
                "ReportMetricsCallback(meteor=True) needs a Java runtime ('java' on PATH) for METEOR; "
                "install Java 8+ or set the callback's init_args.meteor: false"
            )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            active = False
        elif trainer.state.fn == TrainerFn.FITTING:
            self._val_runs += 1
            active = self._val_runs % self.every_n_val_epochs == 0
        else:
            active = True
        self._start("val", pl_module, active)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test", pl_module, True)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update("val", outputs, batch_idx)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update("test", outputs, batch_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("test", trainer, pl_module)

    # --- work ----------------------------------------------------------------------------------

    def _start(self, stage: Stage, pl_module: L.LightningModule, active: bool) -> None:
        self._active[stage] = active
        for metric in self._metrics(stage):
            if metric is not None:
                metric.reset()
                # pl_module is on its device by now (not yet in `setup`); NCCL gathers need it.
                metric.to(pl_module.device)

    def _update(self, stage: Stage, outputs: Any, batch_idx: int) -> None:
        if not self._active[stage]:
            return
        hook = _HOOK[stage]
        if not isinstance(outputs, Mapping) or any(k not in outputs for k in _OUTPUT_KEYS):
            found = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                f"ReportMetricsCallback: {hook} (batch {batch_idx}) must return a dict with keys "
                f"{list(_OUTPUT_KEYS)} (lists of str); found {found}"
            )
        for metric in self._metrics(stage):
            if metric is not None:
                metric.update(outputs["ids"], outputs["hypotheses"], outputs["references"])

    def _finish(self, stage: Stage, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active[stage]:
            return
        self._active[stage] = False
        nlg, ce = self._metrics(stage)
        values = {k: float(v) for k, v in nlg.compute().items()}
        if ce is not None:
            values.update({k: float(v) for k, v in ce.compute().items()})
            self._share_labeler(ce)
        logged = {f"{stage}/{k}": v for k, v in values.items()}
        # Already gathered over ranks and identical on each, so no sync_dist.
        pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=False)

        dirpath = self._resolve_dirpath(trainer)  # on every rank: trainer.log_dir is a collective
        if trainer.is_global_zero:
            self._write(stage, trainer, dirpath, nlg, ce, logged)
        nlg.reset()
        if ce is not None:
            ce.reset()

    def _share_labeler(self, ce: ClinicalEfficacy) -> None:
        # A default labeler is built once, by whichever stage computes first.
        for other in (self.val_ce, self.test_ce):
            if other is not None and other.labeler is None:
                other.labeler = ce.labeler

    def _resolve_dirpath(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write(
        self,
        stage: Stage,
        trainer: L.Trainer,
        dirpath: Path,
        nlg: NLGScores,
        ce: ClinicalEfficacy | None,
        logged: dict[str, float],
    ) -> None:
        dirpath.mkdir(parents=True, exist_ok=True)
        epoch, step = trainer.current_epoch, trainer.global_step
        tag = f"epoch{epoch}_step{step}" if _validates_within_epochs(trainer) else f"epoch{epoch}"
        pred_path = dirpath / f"{stage}_predictions_{tag}.jsonl"
        with pred_path.open("w", encoding="utf-8") as f:
            for sid, hyp, ref in nlg.last_rows:
                labels = ce.last_labels.get(sid) if ce is not None else None
                record = {
                    "id": sid,
                    "hypothesis": hyp,
                    "reference": ref,
                    "hyp_labels": labels["hyp"] if labels else None,
                    "ref_labels": labels["ref"] if labels else None,
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        metrics_path = dirpath / f"{stage}_metrics_{tag}.json"
        summary = {
            "stage": stage,
            "epoch": epoch,
            "global_step": step,
            "num_reports": len(nlg.last_rows),
            "metrics": logged,
        }
        metrics_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        headline = ", ".join(
            f"{k}={logged[k]:.4f}" for k in (f"{stage}/bleu4", f"{stage}/cider") if k in logged
        )
        log.info(
            "%s epoch %d: %d reports, %s; wrote %s and %s",
            stage,
            epoch,
            len(nlg.last_rows),
            headline,
            pred_path,
            metrics_path,
        )


def _validates_within_epochs(trainer: L.Trainer) -> bool:
    """Whether fitting validates more than once per epoch or on a step schedule across epochs."""
    if trainer.state.fn != "fit":  # trainer.validate / trainer.test: one run per call
        return False
    if trainer.check_val_every_n_epoch is None:
        return True
    return trainer.val_check_batch < trainer.num_training_batches  # either may be inf (iterable data)
