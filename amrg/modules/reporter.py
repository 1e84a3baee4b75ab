"""Stage-2 training: :class:`ReporterModule` trains a :class:`~amrg.models.reporter.ReportGenerator`
(Wang et al., 2025, AM-MRG, https://arxiv.org/abs/2501.03458).

The network is assembled outside Lightning by :func:`amrg.checkpoints.stage2.build_report_generator`
(the recipe's ``net``) and handed in, as :class:`~amrg.modules.classifier.ClassifierModule` takes its
network. This module holds only training, evaluation and checkpoint hooks. Its checkpoints are whole
models: :func:`amrg.checkpoints.stage2.load_stage2` (or :meth:`ReporterModule.load_from_checkpoint`)
rebuilds the network from the ``.ckpt`` alone, plus the base LLM folder when one was used.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from amrg._plain import is_plain
from amrg.checkpoints.safety import MODULE_KEY, check_written_by
from amrg.checkpoints.stage1 import read_checkpoint
from amrg.checkpoints.stage2 import RECORD_KEY, base_llm_keys, checkpoint_record, generator_from_checkpoint
from amrg.data.batch import Batch
from amrg.labels import NUM_LABELS
from amrg.models.reporter import ReportGenerator
from amrg.modules._checks import (
    check_image_size,
    evaluation_ids,
    lightning_load_options,
    save_plain_hyperparameters,
)
from amrg.modules._optim import configure_optimizer

__all__ = ["ReporterModule"]

_logger = logging.getLogger(__name__)


def _ignore_eval_mode_warning() -> None:
    """Stage 2 keeps the frozen stage-1 network (and a frozen LLM) in eval mode on purpose (no dropout in
    parts that do not train); Lightning >= 2.5 warns about every module in eval mode when fitting starts."""
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=UserWarning,
        module="lightning.pytorch.loops.fit_loop",
    )


_ignore_eval_mode_warning()


class ReporterModule(LightningModule):
    """Trains the stage-2 :class:`ReportGenerator` (teacher-forced report loss) and generates reports.

    Logs ``train/loss``, ``val/loss`` and ``test/loss``. ``validation_step`` and ``test_step`` generate
    reports and return ``{"ids", "hypotheses", "references"}`` for
    :class:`amrg.metrics.callback.ReportMetricsCallback`; ``predict_step`` returns ``{"ids", "reports",
    "probabilities", "explanations", "references"}`` for
    :class:`amrg.modules.prediction_writer.PredictionWriter`.

    Args:
        net: the stage-2 network, from :func:`amrg.checkpoints.stage2.build_report_generator`.
        optimizer: optimiser factory, called with the trainable parameter groups (no weight decay on
            parameters with fewer than 2 dimensions); paper: AdamW, lr 1e-4.
        scheduler: LR-scheduler factory called with the optimiser (e.g.
            ``amrg.modules._optim.WarmupCosineLR``; paper: cosine); None keeps the LR constant.
        scheduler_interval: step the scheduler every optimiser ``"step"`` or every ``"epoch"``.
        explain_top_k: recalled items per memory that ``predict_step`` returns per study.
        association_weight: weight of the auxiliary association loss
            (:meth:`~amrg.models.reporter.ReportGenerator.association_loss`: the memories' recall should
            fall on items stored under the study's positive labels) added to the report loss; 0 is the
            paper (report loss only). Logged as ``train/association_loss`` whenever it is on.
    """

    def __init__(
        self,
        net: ReportGenerator,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        explain_top_k: int = 5,
        association_weight: float = 0.0,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self, {"net": net, "optimizer": optimizer, "scheduler": scheduler})
        if explain_top_k < 0:
            raise ValueError(f"explain_top_k must be >= 0, got {explain_top_k}")
        if not association_weight >= 0:
            raise ValueError(f"association_weight must be >= 0, got {association_weight}")
        if not isinstance(net, ReportGenerator):
            raise ValueError(f"net must be a ReportGenerator, got {type(net).__name__}")
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.explain_top_k = explain_top_k
        self.association_weight = float(association_weight)

    # ------------------------------------------------------------------ run start
    def setup(self, stage: str) -> None:
        """Check the datamodule against the network: no val/test id in the memories, same image size."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self._check_leakage(evaluation_ids(datamodule))
        if datamodule is not None:
            check_image_size(datamodule, self.net.image_size)
        if self.global_rank == 0:
            self._log_built(stage)

    def _check_leakage(self, forbidden: set[str]) -> None:
        for kind, provenance in (
            ("visual", self.net.visual_provenance),
            ("report", self.net.report_provenance),
        ):
            leaked = sorted({str(r.get("source_id")) for r in provenance} & forbidden)
            if leaked:
                shown = ", ".join(repr(x) for x in leaked[:10])
                raise ValueError(
                    f"the {kind} memory of this stage-2 model holds {len(leaked)} id(s) of the datamodule's "
                    f"val/test splits ({shown}); memories must come from the train split only: rebuild the "
                    "memory with `amrg memory build` on the same data block"
                )

    def _log_built(self, stage: str) -> None:
        net = self.net

        def counts(module: nn.Module) -> str:
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            return f"{trainable} trainable, {sum(p.numel() for p in module.parameters()) - trainable} frozen"

        parts = {
            "classifier": net.classifier,
            "visual_retriever": net.visual_retriever,
            "report_retriever": net.report_retriever,
            "llm": net.llm,
        }
        rank_zero_info(
            f"stage 2 ({getattr(stage, 'value', stage)}): "
            + "; ".join(f"{name}={type(m).__name__} ({counts(m)})" for name, m in parts.items())
            + f"; total {counts(net)}; memories: {len(net.visual_provenance)} visual and "
            f"{len(net.report_provenance)} report patterns"
        )

    def on_fit_start(self) -> None:
        _ignore_eval_mode_warning()  # again here: test runners and notebooks reset warning filters

    # ------------------------------------------------------------------ steps
    def forward(
        self, images: Tensor, view_mask: Tensor | None, reports: Sequence[str], labels: Tensor | None = None
    ) -> Tensor:
        """Training loss, [B, V, 3, H, W] + [B, V] + B reports (+ [B, 14] labels) -> scalar."""
        return self.net(images, view_mask, reports, labels)

    def training_step(self, batch: Batch | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every study of the batch was skipped (on_bad_image="skip")
            return None
        size = len(batch)
        if self.association_weight == 0:
            loss = self(batch.images, batch.view_mask, batch.reports, batch.labels)
        else:
            visual = self.net.encode(batch.images, batch.view_mask, return_attention=True)
            report_loss = self.net.loss_from_prefix(visual, batch.reports, batch.labels)
            association = self.net.association_loss(visual, batch.labels)
            loss = report_loss + self.association_weight * association
            self.log("train/report_loss", report_loss, on_step=False, on_epoch=True, batch_size=size)
            self.log("train/association_loss", association, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        return loss

    def _eval_step(self, stage: str, batch: Batch | None) -> dict[str, list[str]]:
        if batch is None:
            return {"ids": [], "hypotheses": [], "references": []}
        association = self.association_weight > 0
        visual = self.net.encode(batch.images, batch.view_mask, return_attention=association)
        loss = self.net.loss_from_prefix(visual, batch.reports)
        if association:
            self.log(
                f"{stage}/association_loss",
                self.net.association_loss(visual, batch.labels),
                on_epoch=True,
                batch_size=len(batch),
                sync_dist=True,
            )
        self.log(
            f"{stage}/loss",
            loss,
            on_epoch=True,
            prog_bar=stage == "val",
            batch_size=len(batch),
            sync_dist=True,
        )
        hypotheses = self.net.generate_from_prefix(visual)
        return {"ids": list(batch.ids), "hypotheses": hypotheses, "references": list(batch.reports)}

    def validation_step(self, batch: Batch | None, batch_idx: int) -> dict[str, list[str]]:
        return self._eval_step("val", batch)

    def test_step(self, batch: Batch | None, batch_idx: int) -> dict[str, list[str]]:
        return self._eval_step("test", batch)

    def predict_step(self, batch: Batch | None, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"ids", "reports", "probabilities" [B, 14] (CheXbert order), "explanations", "references"}``;
        each explanation is a list of ``{"memory", "source_id", "label", "text"?, "weight"}``, each
        reference the dataset's cleaned report ("" where it has none)."""
        if batch is None:
            return {
                "ids": [],
                "reports": [],
                "probabilities": torch.zeros(0, NUM_LABELS),
                "explanations": [],
                "references": [],
            }
        prediction = self.net.predict(batch.images, batch.view_mask, top_k=self.explain_top_k)
        return {
            "ids": list(batch.ids),
            "reports": prediction.reports,
            "probabilities": prediction.probabilities,
            "explanations": [[item.as_dict() for item in items] for items in prediction.explanations],
            "references": list(batch.reports),
        }

    def configure_optimizers(self) -> Any:
        model = self.trainer.model if self._trainer is not None else self
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        total_steps = int(total) if total is not None and math.isfinite(total) else None
        return configure_optimizer(
            model, self.optimizer_factory, self.scheduler_factory, total_steps, self.scheduler_interval
        )

    # ------------------------------------------------------------------ checkpoints
    def _class_path(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the network's build record; leave out only the frozen base LLM loaded from a folder."""
        checkpoint[MODULE_KEY] = self._class_path()
        checkpoint[RECORD_KEY] = checkpoint_record(self.net)
        dropped = {f"net.{k}" for k in base_llm_keys(self.net)}
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = type(state)((k, v) for k, v in state.items() if k not in dropped)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another module, or one trained on another stage-1 model or memory."""
        check_written_by(checkpoint, self._class_path(), "the checkpoint")
        record = checkpoint.get(RECORD_KEY) or {}
        own = self.net.build_record or {}
        shas = [r.get("stage1_checkpoint_sha256") for r in (record, own)]
        if all(shas) and shas[0] != shas[1]:
            raise ValueError(
                f"the checkpoint was trained on another stage-1 checkpoint (sha256 {shas[0][:12]}…) than this "
                f"run's ({shas[1][:12]}…); resume with the recipe it was trained with"
            )
        tokenizers = [r.get("tokenizer_files") for r in (record, own)]
        if all(tokenizers) and tokenizers[0] != tokenizers[1]:
            raise ValueError(
                "the checkpoint was trained with another tokenizer than the one this run built; resume with the "
                "recipe (LLM, tokenizer_path, memory) it was trained with"
            )
        ids = [((r.get("memory") or {}).get("manifest") or {}).get("build_id") for r in (record, own)]
        if all(ids) and ids[0] != ids[1]:
            raise ValueError(
                f"the checkpoint was trained on memory build {ids[0]}, this run's memory folder is build {ids[1]}; "
                "resume with the memory it was trained with"
            )

    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load a stage-2 state dict; the frozen base LLM (rebuilt from its folder) may be absent."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        optional = {f"net.{k}" for k in base_llm_keys(self.net)}
        missing = [k for k in result.missing_keys if k not in optional]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        return _IncompatibleKeys(missing, unexpected)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        llm_path: str | Path | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> ReporterModule:
        """Rebuild the module from a stage-2 checkpoint alone (no YAML, no other file of the run).

        Only the network's own record is read (class paths checked before any import); hyper-parameters
        stored in the checkpoint never choose code, paths or ``trust_remote_code``.

        Args:
            checkpoint_path: the stage-2 ``.ckpt``.
            map_location: where to put the tensors (default: the CPU).
            llm_path: the base LLM's folder on this machine, when it moved (same model, checked by hash).
            trust_remote_code: allow model code in the LLM folder (yours to turn on, never the checkpoint's).
            **kwargs: other constructor arguments (``optimizer``, ``scheduler``, ``explain_top_k``, ...).
        """
        source = f"stage-2 checkpoint '{checkpoint_path}'"
        lightning_load_options(kwargs)
        ckpt = read_checkpoint(checkpoint_path, "stage-2 checkpoint", map_location or "cpu")
        check_written_by(ckpt, f"{cls.__module__}.{cls.__qualname__}", source)
        net = generator_from_checkpoint(ckpt, source, llm_path=llm_path, trust_remote_code=trust_remote_code)
        stored = ckpt.get("hyper_parameters") or {}
        for name in ("explain_top_k", "scheduler_interval"):
            if name in stored and name not in kwargs and is_plain(stored[name]):
                kwargs[name] = stored[name]
        return cls(net=net, **kwargs).eval()
