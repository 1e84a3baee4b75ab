"""Lightning callback that scores generated reports on validation and test, logs and saves them.

The LightningModule's ``validation_step`` / ``test_step`` returns
``{"ids": list[str], "hypotheses": list[str], "references": list[str], ...}``; this callback feeds
those strings to one :class:`~amrg.metrics.nlg.NLGScores` and one
:class:`~amrg.metrics.clinical.ClinicalEfficacy` per stage and, at the end of the epoch, computes
them once over all ranks (gathered, deduplicated, scored on rank 0, shared with every rank), logs
``{stage}/{name}`` (``val/bleu4``, ``test/ce/micro_f1/14/u0``) and, on rank 0, writes
``{stage}_predictions_epoch{N}.jsonl`` and ``{stage}_metrics_epoch{N}.json``. The headline numbers
(BLEU-4, CIDEr, CE micro-F1) go to the console once per scored run, on rank 0.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Literal

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from amrg.files import atomic_write, atomic_write_text
from amrg.metrics.clinical import ClinicalEfficacy, ReportLabeler
from amrg.metrics.nlg import NLGScores

__all__ = ["ReportMetricsCallback"]

log = logging.getLogger(__name__)

Stage = Literal["val", "test"]
_OUTPUT_KEYS = ("ids", "hypotheses", "references")
_HOOK = {"val": "validation_step", "test": "test_step"}
_HEADLINE = (("BLEU-4", "bleu4"), ("CIDEr", "cider"), ("CE micro-F1", "ce/micro_f1/14/u0"))

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
    ``{stage}_metrics_epoch{N}.json`` with ``{"stage", "epoch", "global_step", "num_reports", "labeler",
    "checkpoint", "metrics"}``, where ``metrics`` maps the logged names to values, ``labeler`` is the
    labeler's name (``"chexpert-rules"``, ``"chexbert:chexbert.pth"``; null when CE is off) and
    ``checkpoint`` says which weights were scored: ``ckpt_path`` is ``trainer.ckpt_path`` (under
    ``validate``/``test`` the checkpoint scored, with its ``ckpt_epoch``/``ckpt_global_step``, null for
    the in-memory model; under ``fit`` the one resumed from), ``epoch``/``global_step`` are the
    trainer's counters, ``fitting`` is true for the weights being trained (a ``ModelCheckpoint`` saves
    them right after this validation), and ``checkpoint_callbacks`` gives for
    each ``ModelCheckpoint`` the newest file it had written when scoring (``last_saved``) and its
    ``best_model_path``. N is
    ``trainer.current_epoch``; when fitting validates more than once per epoch (``val_check_interval <
    1``, or step-based with ``check_val_every_n_epoch=None``), the names also carry the step
    (``..._epoch{N}_step{S}...``) so no run overwrites another's files.

    Values are logged with ``pl_module.log_dict`` at epoch end, so
    ``ModelCheckpoint(monitor="val/bleu4", mode="max")`` and ``EarlyStopping`` can use them. The
    sanity-check run is not scored. Each scored run prints one line on rank 0 with BLEU-4, CIDEr and
    CE micro-F1 (14 labels, uncertain as negative), through Lightning's console logger.

    Args:
        dirpath: folder for the prediction and metric files; ``None`` uses ``trainer.log_dir``
            (the logger's version folder, or ``default_root_dir`` without a logger).
        meteor: score METEOR (one JVM per epoch on rank 0; needs Java on PATH).
        ce: score clinical efficacy with ``labeler``.
        labeler: reads the 14 CheXpert labels off reports: ``"chexpert"`` (rule-based, offline),
            ``"chexbert"`` (CheXbert from ``chexbert_weights``), or any object with ``label_batch``
            (a config's ``class_path``). ``None`` builds ``amrg.labeling.CheXpertLabeler()`` when first
            needed. Named labelers are built by :func:`amrg.labeling.build_labeler` on rank 0 at setup.
        every_n_val_epochs: while fitting, score every n-th validation run only (the others generate
            reports but are not scored or logged). With n > 1 a ``ModelCheckpoint`` monitoring one of
            these names needs ``every_n_epochs=n`` too. ``trainer.validate`` and ``trainer.test``
            always score.
        chexbert_weights: CheXbert weights (``chexbert.pth`` of stanfordmlgroup/CheXbert) for
            ``labeler="chexbert"``.
        chexbert_tokenizer: bert-base-uncased's ``vocab.txt`` or tokenizer folder for
            ``labeler="chexbert"``; ``None`` looks next to the weights.
    """

    def __init__(
        self,
        dirpath: Path | str | None = None,
        meteor: bool = True,
        ce: bool = True,
        labeler: ReportLabeler | Literal["chexpert", "chexbert"] | None = None,
        every_n_val_epochs: int = 1,
        chexbert_weights: Path | str | None = None,
        chexbert_tokenizer: Path | str | None = None,
    ) -> None:
        super().__init__()
        if every_n_val_epochs < 1:
            raise ValueError(
                f"ReportMetricsCallback: every_n_val_epochs must be >= 1, found {every_n_val_epochs}"
            )
        if isinstance(labeler, str):
            labeler = _NamedLabeler(labeler, chexbert_weights, chexbert_tokenizer)
        elif chexbert_weights is not None or chexbert_tokenizer is not None:
            raise ValueError(
                "ReportMetricsCallback: chexbert_weights/chexbert_tokenizer need labeler='chexbert'"
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
        self._loaded: dict[str, Any] = {}  # epoch and global step of the checkpoint the trainer loaded
        self._active: dict[str, bool] = {"val": False, "test": False}

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Validation runs seen, so ``every_n_val_epochs`` keeps its rhythm across a resume."""
        return {"val_runs": self._val_runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._val_runs = int(state_dict.get("val_runs", 0))

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Note the loaded checkpoint's epoch and global step (validate/test keep the trainer's own)."""
        self._loaded = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}

    def _metrics(self, stage: Stage) -> tuple[NLGScores, ClinicalEfficacy | None]:
        return (self.val_nlg, self.val_ce) if stage == "val" else (self.test_nlg, self.test_ce)

    # --- hooks ---------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before any generation if METEOR is asked for and Java is missing, or a named labeler
        cannot be built (it is built here, on rank 0, the only rank that labels)."""
        if self.meteor and shutil.which("java") is None:
            raise RuntimeError(
                "ReportMetricsCallback(meteor=True) needs a Java runtime ('java' on PATH) for METEOR; "
                "install Java 8+ or set the callback's init_args.meteor: false"
            )
        labeler = self.val_ce.labeler if self.val_ce is not None else None
        if isinstance(labeler, _NamedLabeler) and trainer.is_global_zero:
            labeler.build()

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
        record = _checkpoint_record(trainer, self._loaded)
        rank_zero_info(_headline(stage, record, values, len(nlg.last_rows), _labeler_name(ce)))
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
        epoch, step = trainer.current_epoch, trainer.global_step
        tag = f"epoch{epoch}_step{step}" if _validates_within_epochs(trainer) else f"epoch{epoch}"
        pred_path = dirpath / f"{stage}_predictions_{tag}.jsonl"

        def write_predictions(f: IO[bytes]) -> None:
            for sid, hyp, ref in nlg.last_rows:
                labels = ce.last_labels.get(sid) if ce is not None else None
                record = {
                    "id": sid,
                    "hypothesis": hyp,
                    "reference": ref,
                    "hyp_labels": labels["hyp"] if labels else None,
                    "ref_labels": labels["ref"] if labels else None,
                }
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

        # Each file is whole or absent: a temp file in dirpath, renamed (amrg.checkpoints.atomic_io).
        atomic_write(pred_path, write_predictions, "predictions")
        metrics_path = dirpath / f"{stage}_metrics_{tag}.json"
        summary = {
            "stage": stage,
            "epoch": epoch,
            "global_step": step,
            "num_reports": len(nlg.last_rows),
            "labeler": _labeler_name(ce),
            "checkpoint": _checkpoint_record(trainer, self._loaded),
            "metrics": logged,
        }
        atomic_write_text(metrics_path, json.dumps(summary, indent=2) + "\n", "metrics")
        log.info("%s epoch %d: wrote %s and %s", stage, epoch, pred_path, metrics_path)


def _validates_within_epochs(trainer: L.Trainer) -> bool:
    """Whether fitting validates more than once per epoch or on a step schedule across epochs."""
    if trainer.state.fn != "fit":  # trainer.validate / trainer.test: one run per call
        return False
    if trainer.check_val_every_n_epoch is None:
        return True
    return trainer.val_check_batch < trainer.num_training_batches  # either may be inf (iterable data)


class _NamedLabeler:
    """A labeler named ``"chexpert"`` or ``"chexbert"``, built by :func:`amrg.labeling.build_labeler` on
    first use (the callback builds it at setup on rank 0; the other ranks never label)."""

    def __init__(self, name: str, weights: Path | str | None, tokenizer: Path | str | None) -> None:
        if name not in ("chexpert", "chexbert"):
            raise ValueError(
                f"ReportMetricsCallback: labeler={name!r}; expected 'chexpert', 'chexbert' or an object"
            )
        if name == "chexbert" and weights is None:
            raise ValueError(
                "ReportMetricsCallback(labeler='chexbert') needs chexbert_weights (a local chexbert.pth)"
            )
        if name != "chexbert" and (weights is not None or tokenizer is not None):
            raise ValueError(
                "ReportMetricsCallback: chexbert_weights/chexbert_tokenizer need labeler='chexbert'"
            )
        self.requested = name
        self.weights = weights
        self.tokenizer = tokenizer
        self._labeler: Any = None

    @property
    def name(self) -> str:
        return self._labeler.name if self._labeler is not None else self.requested

    def build(self) -> Any:
        if self._labeler is None:
            from amrg.labeling import build_labeler

            self._labeler = build_labeler(
                self.requested,  # type: ignore[arg-type]
                chexbert_weights=self.weights,
                chexbert_tokenizer=self.tokenizer,
            )
        return self._labeler

    def label_batch(self, reports: Any) -> Any:
        """Label reports (14 values per report, ``amrg.labels.LABELS`` order)."""
        return self.build().label_batch(reports)


def _labeler_name(ce: ClinicalEfficacy | None) -> str | None:
    if ce is None or ce.labeler is None:
        return None
    return str(getattr(ce.labeler, "name", type(ce.labeler).__name__))


def _checkpoint_record(trainer: L.Trainer, loaded: Mapping[str, Any]) -> dict[str, Any]:
    """Which weights were scored (see the class docstring)."""
    ckpt_path = getattr(trainer, "ckpt_path", None)
    fitting = trainer.state.fn == TrainerFn.FITTING
    from_file = bool(ckpt_path) and not fitting
    return {
        "ckpt_path": str(ckpt_path) if ckpt_path else None,
        "fitting": fitting,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "ckpt_epoch": loaded.get("epoch") if from_file else None,
        "ckpt_global_step": loaded.get("global_step") if from_file else None,
        "checkpoint_callbacks": [
            {
                "dirpath": str(cb.dirpath) if cb.dirpath else None,
                "last_saved": _last_saved(cb),
                "best_model_path": cb.best_model_path or None,
            }
            for cb in trainer.checkpoint_callbacks
        ],
    }


def _last_saved(cb: Any) -> str | None:
    """The newest file a ModelCheckpoint knows it wrote (its last, best and top-k paths), or None."""
    known = {p for p in (cb.last_model_path, cb.best_model_path, *cb.best_k_models) if p}
    files = [p for p in known if Path(p).is_file()]
    return max(files, key=lambda p: Path(p).stat().st_mtime_ns) if files else None


def _headline(
    stage: str, record: Mapping[str, Any], values: Mapping[str, float], n: int, labeler: str | None
) -> str:
    """One console line: the headline scores and which weights they belong to."""
    scores = "  ".join(f"{label} {values[key]:.4f}" for label, key in _HEADLINE if key in values)
    if record["ckpt_path"] and not record["fitting"]:
        name = Path(record["ckpt_path"]).name
        where = f"{name} (epoch {record['ckpt_epoch']}, step {record['ckpt_global_step']})"
    else:
        where = f"epoch {record['epoch']}, step {record['global_step']}"
    about = f"{n} reports" + (f", labeler {labeler}" if labeler else "")
    return f"[{stage} {where}] {scores}  ({about})"
