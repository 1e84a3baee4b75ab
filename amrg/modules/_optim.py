"""Optimiser wiring shared by the stage modules: weight-decay groups and a warm-up + cosine schedule.

The decay split follows nanoGPT's ``configure_optimizers`` (MIT): parameters with fewer than 2 dimensions
(biases, norm scales) get no weight decay. The schedule is the usual linear warm-up then half-cosine decay
(Loshchilov & Hutter, 2017, https://arxiv.org/abs/1608.03983, without restarts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineLR", "configure_optimizer", "param_groups"]


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[dict[str, object]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    Parameters with ``requires_grad=False`` are left out, so a frozen encoder never reaches the optimiser.
    The decayed group keeps the optimiser's own ``weight_decay``; the other sets it to 0.

    Args:
        named_parameters: e.g. ``module.named_parameters()``.

    Returns:
        Parameter groups for any ``torch.optim`` optimiser (empty groups omitted).
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, object]] = []
    if decay:
        groups.append({"params": decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from ~0 to the base LR over ``warmup_steps``, then cosine decay to ``min_lr_ratio``.

    Step it once per optimiser step (Lightning ``interval: "step"``). ``total_steps=None`` is filled in by
    the stage modules from ``trainer.estimated_stepping_batches``; left None, the LR stays at its base
    value after warm-up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        """Create the schedule.

        Args:
            optimizer: the wrapped optimiser.
            warmup_steps: optimiser steps of linear warm-up.
            total_steps: optimiser steps of the whole run (warm-up included); None: the Lightning module
                sets it from the trainer.
            min_lr_ratio: final LR as a fraction of the base LR.
            last_epoch: index of the last step, for resuming (-1 starts fresh).
        """
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps) if total_steps is not None else None
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base LR at optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


def configure_optimizer(
    module: nn.Module,
    optimizer_factory: OptimizerCallable,
    scheduler_factory: LRSchedulerCallable | None,
    total_steps: int | None,
    interval: str = "step",
) -> dict[str, object] | Optimizer:
    """Build the optimiser (and scheduler) the way both stage modules want it.

    Args:
        module: the network whose trainable parameters are optimised (``self.trainer.model``).
        optimizer_factory: ``OptimizerCallable``, called with the parameter groups.
        scheduler_factory: ``LRSchedulerCallable`` or None, called with the optimiser.
        total_steps: the run's optimiser steps, given to a :class:`WarmupCosineLR` without one.
        interval: Lightning scheduler interval, ``"step"`` or ``"epoch"``.

    Returns:
        An optimiser, or Lightning's ``{"optimizer", "lr_scheduler"}`` dict.

    Raises:
        ValueError: nothing is trainable.
    """
    groups = param_groups(module.named_parameters())
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters (is everything frozen?)")
    optimizer = optimizer_factory(groups)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None and total_steps is not None:
        # The step-0 LR set by the constructor does not depend on total_steps, so setting it now is exact.
        scheduler.total_steps = int(total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
