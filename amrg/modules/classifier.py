"""Stage-1 training: :class:`ClassifierModule` wraps a :class:`~amrg.models.classifier.DiseaseClassifier`.

It holds the multi-label loss with explicit policies for uncertain and unmentioned labels, the AUROC/F1
metrics, optimiser wiring and checkpoint hygiene. :func:`amrg.checkpoints.stage1.load_stage1` rebuilds the
trained network from a checkpoint alone, which is how memory mining and stage 2 get the stage-1 model.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAUROC, MultilabelF1Score

from amrg._plain import is_plain
from amrg.checkpoints.safety import MODULE_KEY, check_written_by
from amrg.checkpoints.stage1 import clear_weight_sources, load_stage1, read_checkpoint
from amrg.data.batch import Batch
from amrg.labels import LABELS, NUM_LABELS
from amrg.models.classifier import DiseaseClassifier
from amrg.modules._checks import check_image_size, lightning_load_options, save_plain_hyperparameters
from amrg.modules._optim import configure_optimizer

__all__ = ["ClassifierModule", "label_targets"]

_logger = logging.getLogger(__name__)


def label_targets(
    labels: Tensor,
    uncertain: Literal["ignore", "positive", "negative"] = "ignore",
    missing: Literal["negative", "ignore"] = "negative",
) -> tuple[Tensor, Tensor]:
    """Apply the uncertain/missing policies to raw CheXpert codes.

    Args:
        labels: raw codes, [B, L] float: 1 positive, 0 negative, -1 uncertain, NaN not mentioned.
        uncertain: -1 is ignored (no loss, not scored), or counted as positive or negative.
        missing: NaN is counted as negative, or ignored.

    Returns:
        ``(targets, weights)``, both [B, L] float: targets in {0, 1}; weights 1 where the entry counts
        and 0 where it is ignored.

    Raises:
        ValueError: a code other than 1, 0, -1 or NaN.
    """
    missing_ = torch.isnan(labels)
    pos = labels == 1
    neg = labels == 0
    unc = labels == -1
    bad = ~(pos | neg | unc | missing_)
    if bool(bad.any()):
        rows, cols = bad.nonzero(as_tuple=True)
        found = sorted({float(v) for v in labels[rows, cols].tolist()})
        where = list(zip(rows.tolist(), cols.tolist()))[:10]
        raise ValueError(f"labels must be 1, 0, -1 or NaN; found {found} at (row, label) {where}")
    targets = pos.to(labels.dtype)
    weights = torch.ones_like(labels)
    if uncertain == "positive":
        targets = torch.where(unc, torch.ones_like(targets), targets)
    elif uncertain == "ignore":
        weights = torch.where(unc, torch.zeros_like(weights), weights)
    elif uncertain != "negative":
        raise ValueError(f"uncertain must be 'ignore', 'positive' or 'negative', got {uncertain!r}")
    if missing == "ignore":
        weights = torch.where(missing_, torch.zeros_like(weights), weights)
    elif missing != "negative":
        raise ValueError(f"missing must be 'negative' or 'ignore', got {missing!r}")
    return targets, weights


class _LabelCounts(Metric):
    """Positives and negatives seen per label (ignored entries, coded -1, excluded)."""

    full_state_update = False

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.add_state("pos", default=torch.zeros(num_labels), dist_reduce_fx="sum")
        self.add_state("neg", default=torch.zeros(num_labels), dist_reduce_fx="sum")

    def update(self, target: Tensor) -> None:
        self.pos += (target == 1).sum(0).to(self.pos.dtype)
        self.neg += (target == 0).sum(0).to(self.neg.dtype)

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.pos, self.neg


class _StageMetrics(nn.Module):
    """The metric objects of one stage (train, val or test)."""

    def __init__(self, num_labels: int, threshold: float) -> None:
        super().__init__()
        self.auroc = MultilabelAUROC(num_labels=num_labels, average=None, ignore_index=-1)
        self.counts = _LabelCounts(num_labels)
        self.f1_micro = MultilabelF1Score(
            num_labels=num_labels, threshold=threshold, average="micro", ignore_index=-1
        )
        self.f1_macro = MultilabelF1Score(
            num_labels=num_labels, threshold=threshold, average="macro", ignore_index=-1
        )

    def update(self, probs: Tensor, target: Tensor) -> None:
        for m in (self.auroc, self.f1_micro, self.f1_macro):
            m.update(probs, target)
        self.counts.update(target)

    def compute(self) -> dict[str, Tensor]:
        """Per-label AUROC (NaN where a label lacks positives or negatives), its mean over defined labels, F1."""
        with warnings.catch_warnings():
            # torchmetrics warns and returns 0 for a label without positives; we mask those labels instead.
            warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
            auroc = self.auroc.compute().float()
        pos, neg = self.counts.compute()
        defined = (pos > 0) & (neg > 0)
        auroc = torch.where(defined, auroc, torch.full_like(auroc, float("nan")))
        mean = auroc[defined].mean() if bool(defined.any()) else auroc.new_tensor(float("nan"))
        return {
            "auroc": auroc,
            "auroc_mean": mean,
            "f1_micro": self.f1_micro.compute(),
            "f1_macro": self.f1_macro.compute(),
        }

    def reset(self) -> None:
        for m in (self.auroc, self.counts, self.f1_micro, self.f1_macro):
            m.reset()


class ClassifierModule(LightningModule):
    """Trains the stage-1 :class:`DiseaseClassifier` with a masked multi-label BCE loss.

    Logs ``{stage}/loss``, ``{stage}/auroc_mean`` (mean over labels with both classes present),
    ``{stage}/auroc/<Label_Name>`` (spaces as underscores; NaN when undefined), ``{stage}/f1_micro`` and
    ``{stage}/f1_macro`` (threshold ``threshold``; ignored entries excluded) for stage in train/val/test.
    """

    def __init__(
        self,
        net: DiseaseClassifier,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        uncertain: Literal["ignore", "positive", "negative"] = "ignore",
        missing: Literal["negative", "ignore"] = "negative",
        label_smoothing: float = 0.0,
        pos_weight: list[float] | None = None,
        threshold: float = 0.5,
    ) -> None:
        """Wrap the network.

        Args:
            net: the stage-1 network (encoder + Q-Former + head).
            optimizer: optimiser factory, called with the trainable parameter groups (no weight decay on
                parameters with fewer than 2 dimensions).
            scheduler: LR-scheduler factory called with the optimiser, e.g.
                ``amrg.modules._optim.WarmupCosineLR`` (its ``total_steps`` defaults to the trainer's
                estimated optimiser steps); None keeps the LR constant.
            scheduler_interval: step the scheduler every optimiser ``"step"`` or every ``"epoch"``.
            uncertain: uncertain labels (-1) are ignored (no loss, not scored), or treated as positive or
                negative.
            missing: unmentioned labels (NaN) are treated as negative (CheXpert convention), or ignored.
            label_smoothing: BCE targets become ``t * (1 - eps) + eps / 2``.
            pos_weight: per-label weight of positive examples in the BCE loss (14 values, CheXbert order).
            threshold: probability threshold for the F1 metrics.
        """
        super().__init__()
        save_plain_hyperparameters(self, {"net": net, "optimizer": optimizer, "scheduler": scheduler})
        if net.num_labels != NUM_LABELS:
            raise ValueError(
                f"net predicts {net.num_labels} labels but the labels are the {NUM_LABELS} CheXpert ones"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if pos_weight is not None and len(pos_weight) != NUM_LABELS:
            raise ValueError(f"pos_weight needs {NUM_LABELS} values (CheXbert order), got {len(pos_weight)}")
        if uncertain not in ("ignore", "positive", "negative"):
            raise ValueError(f"uncertain must be 'ignore', 'positive' or 'negative', got {uncertain!r}")
        if missing not in ("negative", "ignore"):
            raise ValueError(f"missing must be 'negative' or 'ignore', got {missing!r}")
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.uncertain = uncertain
        self.missing = missing
        self.label_smoothing = label_smoothing
        self.threshold = threshold
        self.register_buffer(
            "pos_weight",
            torch.tensor(pos_weight, dtype=torch.float32) if pos_weight is not None else None,
            persistent=False,
        )
        self.train_metrics = _StageMetrics(NUM_LABELS, threshold)
        self.val_metrics = _StageMetrics(NUM_LABELS, threshold)
        self.test_metrics = _StageMetrics(NUM_LABELS, threshold)

    def forward(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """Logits, [B, V, 3, H, W] (+ [B, V] mask) -> [B, 14]."""
        return self.net(images, view_mask)

    # ------------------------------------------------------------------ loss
    def loss_fn(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Masked BCE-with-logits over the counted entries.

        Args:
            logits: [B, 14].
            labels: raw codes, [B, 14] (1/0/-1/NaN).

        Returns:
            ``(loss, metric_targets)``: the mean BCE over counted entries (0 if none), and integer
            targets [B, 14] with -1 where an entry is ignored.
        """
        targets, weights = label_targets(labels.float(), self.uncertain, self.missing)
        smooth = targets * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), smooth, pos_weight=self.pos_weight, reduction="none"
        )  # [B, 14]
        loss = (bce * weights).sum() / weights.sum().clamp_min(1.0)
        metric_targets = torch.where(weights > 0, targets, torch.full_like(targets, -1.0)).long()
        return loss, metric_targets

    def model_step(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Shared step: ``(loss, probabilities [B, 14], metric targets [B, 14])``."""
        logits = self(batch.images, batch.view_mask)
        loss, targets = self.loss_fn(logits, batch.labels)
        return loss, torch.sigmoid(logits.detach().float()), targets

    def training_step(self, batch: Batch | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every study of the batch was skipped (on_bad_image="skip"): no step
            return None
        loss, probs, targets = self.model_step(batch)
        self.train_metrics.update(probs, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch | None, batch_idx: int) -> None:
        if batch is None:
            return
        loss, probs, targets = self.model_step(batch)
        self.val_metrics.update(probs, targets)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch), sync_dist=True)

    def test_step(self, batch: Batch | None, batch_idx: int) -> None:
        if batch is None:
            return
        loss, probs, targets = self.model_step(batch)
        self.test_metrics.update(probs, targets)
        self.log("test/loss", loss, on_epoch=True, batch_size=len(batch), sync_dist=True)

    def predict_step(self, batch: Batch | None, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"ids": list[str], "probs": [B, 14]}`` in CheXbert label order (B = 0 for a skipped batch)."""
        if batch is None:
            return {"ids": [], "probs": torch.zeros(0, NUM_LABELS)}
        return {"ids": list(batch.ids), "probs": torch.sigmoid(self(batch.images, batch.view_mask).float())}

    # ------------------------------------------------------------------ metrics
    def _log_stage_metrics(self, stage: str, metrics: _StageMetrics) -> None:
        # AUROC needs every prediction of the epoch and per-label masking, so it is computed here (synced
        # across ranks by torchmetrics) and logged as values rather than as metric objects.
        if not metrics.counts.update_called:
            return
        values = metrics.compute()
        logged = {
            f"{stage}/f1_micro": values["f1_micro"],
            f"{stage}/f1_macro": values["f1_macro"],
        }
        for name, value in zip(LABELS, values["auroc"]):
            logged[f"{stage}/auroc/{name.replace(' ', '_')}"] = value
        self.log_dict(logged, prog_bar=False)
        self.log(f"{stage}/auroc_mean", values["auroc_mean"], prog_bar=True)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_stage_metrics("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_stage_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_stage_metrics("test", self.test_metrics)

    # ------------------------------------------------------------------ wiring
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            check_image_size(datamodule, self.net.encoder.img_size)
        if self.global_rank == 0:
            trainable = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
            frozen = sum(p.numel() for p in self.net.parameters() if not p.requires_grad)
            _logger.info(
                "stage 1 (%s): %s(encoder=%s %s, qformer=%s) — %d trainable, %d frozen parameters",
                stage,
                type(self.net).__name__,
                type(self.net.encoder).__name__,
                self.net.encoder.model_name,
                type(self.net.qformer).__name__,
                trainable,
                frozen,
            )

    def configure_optimizers(self) -> Any:
        model = self.trainer.model if self._trainer is not None else self
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        total_steps = int(total) if total is not None and math.isfinite(total) else None
        return configure_optimizer(
            model, self.optimizer_factory, self.scheduler_factory, total_steps, self.scheduler_interval
        )

    def _class_path(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Name the module class; clear pretrained-weight sources from the stored net config."""
        checkpoint[MODULE_KEY] = self._class_path()
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and isinstance(hparams.get("net"), dict):
            hparams = copy.deepcopy(hparams)
            hparams["net"] = clear_weight_sources(hparams["net"])
            checkpoint["hyper_parameters"] = hparams

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another module (e.g. a stage-2 one given to ``--ckpt_path``)."""
        check_written_by(checkpoint, self._class_path(), "the checkpoint")

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any
    ) -> ClassifierModule:
        """Rebuild the module from a stage-1 checkpoint alone, its stored class paths checked before import.

        Args:
            checkpoint_path: the stage-1 ``.ckpt``.
            map_location: where to put the tensors (default: the CPU).
            **kwargs: constructor arguments; ``net`` for checkpoints written by a module built in Python.
        """
        source = f"stage-1 checkpoint '{checkpoint_path}'"
        lightning_load_options(kwargs)
        ckpt = read_checkpoint(checkpoint_path, "stage-1 checkpoint", map_location or "cpu")
        check_written_by(ckpt, f"{cls.__module__}.{cls.__qualname__}", source)
        net = load_stage1(checkpoint_path, net=kwargs.pop("net", None), ckpt=ckpt)
        stored = ckpt.get("hyper_parameters") or {}
        for name in (
            "uncertain",
            "missing",
            "label_smoothing",
            "pos_weight",
            "threshold",
            "scheduler_interval",
        ):
            if name in stored and name not in kwargs and is_plain(stored[name]):
                kwargs[name] = stored[name]
        module = cls(net=net, **kwargs)
        return module.eval()
