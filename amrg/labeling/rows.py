"""Label rows (14 values of 1, 0, -1 or None per report, LABELS order) as a float tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amrg.labels import NUM_LABELS

__all__ = ["rows_to_tensor"]


def rows_to_tensor(rows: Sequence[Sequence[int | None]]) -> Tensor:
    """Rows of labels as a float tensor, [N, 14], NaN where a label is not mentioned (None)."""
    out = torch.full((len(rows), NUM_LABELS), float("nan"))
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                out[i, j] = float(v)
    return out
