"""``ReportDataset``: studies -> per-study tensors; ``collate_studies`` -> :class:`Batch`.

Building a dataset reads no image: files are opened only when an item is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from amrg.data.batch import Batch
from amrg.data.cleaning import CleaningStyle, get_cleaner
from amrg.data.images import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    ImageTooLargeError,
    OutsideRootError,
    leaves_root,
    load_image,
)
from amrg.data.schema import Study
from amrg.labels import NUM_LABELS

__all__ = ["FillMissingView", "OnBadImage", "ReportDataset", "collate_studies", "outside_root_problems"]

log = logging.getLogger(__name__)

FillMissingView = Literal["zeros", "repeat"]
OnBadImage = Literal["error", "skip"]


class ReportDataset(Dataset):
    """Studies with up to ``max_views`` views each, read lazily.

    Args:
        studies: validated studies (see :func:`amrg.data.schema.load_annotation`).
        image_root: folder the studies' relative image paths start from.
        image_size: square side the views are resized to.
        max_views: V; a study with more views keeps its first V (R2Gen uses the first MIMIC view).
        fill_missing_view: how a study with fewer than V views is padded: "zeros" (the dataset
            mean after normalisation) or "repeat" (copies of its last real view). Padded views are
            False in the view mask either way.
        cleaning: report cleaning rules ("iu_xray", "mimic_cxr" or "none").
        augment: optional transform on each [1, H, W] view in [0, 1] (training only).
        on_bad_image: "error" raises naming the study and file; "skip" drops the study from its
            batch, logs it and counts it in ``skipped`` (per worker process). A missing, corrupt or
            over-``max_pixels`` file is a bad image.
        split: split name, used in messages.
        max_pixels: refuse (or, with "skip", skip) an image file with more pixels than this, checked
            from its header before decoding; None for no cap (PIL's own bomb limit still applies).
        allow_outside_root: read image paths that are absolute or climb out of ``image_root`` with
            ``..``; by default such a path is refused when the dataset is built, in either
            ``on_bad_image`` mode.

    Raises:
        OutsideRootError: an image path leaves ``image_root`` and ``allow_outside_root`` is False.
    """

    def __init__(
        self,
        studies: Sequence[Study],
        image_root: Path,
        image_size: int = 224,
        max_views: int = 2,
        fill_missing_view: FillMissingView = "zeros",
        cleaning: CleaningStyle = "none",
        augment: Callable[[Tensor], Tensor] | None = None,
        on_bad_image: OnBadImage = "error",
        split: str = "",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        allow_outside_root: bool = False,
    ) -> None:
        if max_views < 1:
            raise ValueError(f"max_views must be >= 1, got {max_views}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if fill_missing_view not in ("zeros", "repeat"):
            raise ValueError(f"fill_missing_view must be 'zeros' or 'repeat', got {fill_missing_view!r}")
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
        self.studies = list(studies)
        self.image_root = Path(image_root)
        if not allow_outside_root:
            problems = outside_root_problems(self.studies, split or "dataset")
            if problems:
                more = f"; and {len(problems) - 1} more such path(s)" if len(problems) > 1 else ""
                raise OutsideRootError(
                    f"{problems[0]} leaves the image root {self.image_root}{more} "
                    "(set data.init_args.allow_outside_root=true to read such paths)"
                )
        self.max_pixels = max_pixels
        self.image_size = image_size
        self.max_views = max_views
        self.fill_missing_view = fill_missing_view
        self.clean = get_cleaner(cleaning)
        self.augment = augment
        self.on_bad_image = on_bad_image
        self.split = split
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.studies)

    def _labels(self, study: Study) -> Tensor:
        if study.labels is None:
            return torch.full((NUM_LABELS,), float("nan"))
        return torch.tensor([float("nan") if v is None else float(v) for v in study.labels])

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """One study: ``images`` [V, 3, H, W], ``view_mask`` [V], ``labels`` [14], id and report.

        Returns None for a study with a bad image when ``on_bad_image="skip"``.
        """
        study = self.studies[index]
        views = []
        for rel in study.image_paths[: self.max_views]:
            try:
                views.append(
                    load_image(self.image_root / rel, self.image_size, self.augment, self.max_pixels)
                )
            except BadImageError as e:
                flag = "max_pixels" if isinstance(e, ImageTooLargeError) else "image_root"
                msg = f"{self.split or 'dataset'} id={study.id!r}: {e} (set data.init_args.{flag})"
                if self.on_bad_image == "error":
                    raise type(e)(msg) from None
                self.skipped += 1
                log.warning("skipping study (on_bad_image=skip), %d skipped so far: %s", self.skipped, msg)
                return None
        n_real = len(views)
        pad = self.max_views - n_real
        if pad:
            filler = views[-1] if self.fill_missing_view == "repeat" else torch.zeros_like(views[0])
            views.extend([filler] * pad)
        view_mask = torch.zeros(self.max_views, dtype=torch.bool)
        view_mask[:n_real] = True
        return {
            "id": study.id,
            "images": torch.stack(views),  # [V, 3, H, W]
            "view_mask": view_mask,
            "report": self.clean(study.report),
            "labels": self._labels(study),
        }


def outside_root_problems(studies: Sequence[Study], split: str) -> list[str]:
    """``"<split> id='x': image path '../y.png'"`` for every image path that leaves its root (see
    :func:`amrg.data.images.leaves_root`), in annotation order."""
    return [
        f"{split} id={study.id!r}: image path {rel!r}"
        for study in studies
        for rel in study.image_paths
        if leaves_root(rel)
    ]


def collate_studies(items: Sequence[dict[str, Any] | None]) -> Batch | None:
    """Stack dataset items into a :class:`Batch`; skipped (None) items are dropped and logged.

    Returns None when every item of the batch was skipped.
    """
    kept = [it for it in items if it is not None]
    if len(kept) < len(items):
        log.warning("batch: %d of %d studies skipped for bad images", len(items) - len(kept), len(items))
    if not kept:
        return None
    return Batch(
        ids=[it["id"] for it in kept],
        images=torch.stack([it["images"] for it in kept]),  # [B, V, 3, H, W]
        view_mask=torch.stack([it["view_mask"] for it in kept]),  # [B, V]
        reports=[it["report"] for it in kept],
        labels=torch.stack([it["labels"] for it in kept]),  # [B, 14]
    )
