"""The typed batch every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Batch"]


@dataclass
class Batch:
    """One collated batch of studies.

    Lightning moves the tensor fields to the device (``apply_to_collection`` walks dataclasses).

    Attributes:
        ids: study ids, length B.
        images: normalised RGB views, [B, V, 3, H, W]; missing views are filled as the dataset's
            ``fill_missing_view`` says and marked False in ``view_mask``.
        view_mask: which views are real, [B, V] bool.
        reports: cleaned reports, length B.
        labels: raw CheXpert codes in CheXbert order, [B, 14] float: 1 positive, 0 negative,
            -1 uncertain, NaN not mentioned. Policies (uncertain as positive/negative/ignored,
            missing as negative/ignored) are applied by the consumer, never here.
    """

    ids: list[str]
    images: Tensor
    view_mask: Tensor
    reports: list[str]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)
