"""Strict state-dict checks shared by every loader of foreign weights (backbones, CheXbert, stage-1).

``nn.Module.load_state_dict(strict=True)`` stops at the first kind of problem and its message does not
say which file was wrong; these helpers list every missing, unexpected and mis-shaped key at once so
the caller can name the file.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["StateMismatch", "load_state_strict", "state_dict_mismatch"]


@dataclass(frozen=True)
class StateMismatch:
    """How a state dict differs from a module's: sorted key names; mis-shaped ones as
    ``"key: checkpoint (..) vs model (..)"``."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [
            f"{name} keys {keys}"
            for name, keys in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("mis-shaped", self.mismatched),
            )
            if keys
        ]
        return "; ".join(parts)


def state_dict_mismatch(
    module: nn.Module, state: Mapping[str, Tensor], optional: Collection[str] = ()
) -> StateMismatch:
    """Compare ``state`` with ``module.state_dict()``; keys in ``optional`` may be absent on either side."""
    own = module.state_dict()
    return StateMismatch(
        missing=sorted(k for k in own if k not in state and k not in optional),
        unexpected=sorted(k for k in state if k not in own and k not in optional),
        mismatched=sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ),
    )


def load_state_strict(
    module: nn.Module, state: Mapping[str, Tensor], what: str, optional: Collection[str] = ()
) -> None:
    """Load ``state`` into ``module`` after :func:`state_dict_mismatch`.

    Raises:
        ValueError: ``"{what}: missing keys [...]; unexpected keys [...]; mis-shaped keys [...]"``
            (the non-empty parts).
    """
    mismatch = state_dict_mismatch(module, state, optional)
    if mismatch:
        raise ValueError(f"{what}: {mismatch}")
    own = module.state_dict()
    # Checked above: only optional keys can still be absent, and those are why strict is off.
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=not optional)
