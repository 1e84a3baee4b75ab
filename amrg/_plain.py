"""Helpers for hyperparameters that must stay plain data (checkpoints load with ``weights_only=True``)."""

from __future__ import annotations

from typing import Any


def is_plain(value: Any) -> bool:
    """Whether a value is plain data (what a YAML config holds), safe for ``weights_only`` loading."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False
