"""A contact sheet of studies with their sign boxes and labels, for eyeballing a dataset.

Used by ``amrg data preview``. Works on any annotation file: studies without boxes or labels are
shown as plain images.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from amrg.data.images import BadImageError, read_grayscale
from amrg.data.schema import load_annotation
from amrg.labels import LABELS

__all__ = ["LABEL_COLOURS", "LABEL_SHORT", "preview_grid"]

logger = logging.getLogger(__name__)

TILE = 256  # tile side in pixels; every first view is resized to it
_LEGEND_H = 40  # text band under each tile (three lines of the default font)

LABEL_SHORT: dict[str, str] = {
    "Enlarged Cardiomediastinum": "EnlCM",
    "Cardiomegaly": "Cardiomeg",
    "Lung Opacity": "Opacity",
    "Lung Lesion": "Lesion",
    "Edema": "Edema",
    "Consolidation": "Consol",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelect",
    "Pneumothorax": "PTX",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "PleurOth",
    "Fracture": "Fracture",
    "Support Devices": "Devices",
    "No Finding": "NoFinding",
}
# One distinct colour per label (tab20-like), same order as LABELS.
LABEL_COLOURS: dict[str, tuple[int, int, int]] = dict(
    zip(
        LABELS,
        (
            (255, 127, 14),
            (214, 39, 40),
            (255, 215, 0),
            (148, 103, 189),
            (23, 190, 207),
            (44, 160, 44),
            (227, 119, 194),
            (188, 189, 34),
            (31, 119, 255),
            (0, 255, 170),
            (255, 152, 150),
            (255, 60, 255),
            (140, 86, 75),
            (200, 200, 200),
        ),
    )
)


def _legend(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont,
    x0: int,
    y0: int,
    study_id: str,
    items: list[tuple[str, tuple[int, int, int]]],
) -> None:
    """Write the study id, then the label words in their colours, wrapping within the tile width."""
    line_h = _LEGEND_H // 3
    draw.text((x0 + 2, y0 + 1), study_id, fill=(255, 255, 255), font=font)
    x, y = x0 + 2, y0 + 1 + line_h
    for word, colour in items:
        w = int(draw.textlength(word + " ", font=font))
        if x + w > x0 + TILE and x > x0 + 2:
            x, y = x0 + 2, y + line_h
        if y + line_h > y0 + _LEGEND_H + 2:
            draw.text((x, y - line_h), "...", fill=(255, 255, 255), font=font)
            break
        draw.text((x, y), word, fill=colour, font=font)
        x += w


def preview_grid(
    annotation: Path, image_root: Path, out: Path, n: int = 16, split: str = "train", seed: int = 0
) -> Path:
    """Write a PNG grid of the first view of n studies with their sign boxes and label legend.

    Args:
        annotation: the ``annotation.json``.
        image_root: the folder the image paths are relative to.
        out: the PNG to write (parent folders are created).
        n: number of studies (fewer if the split is smaller); the grid is ceil(sqrt(n)) tiles wide.
        split: which split to draw from.
        seed: picks which studies are shown.

    Returns:
        The written path. Each tile is 256 px wide with a 40 px legend under it: the study id, then
        each positive label (uncertain ones with a "?") in its box colour, or "NoFinding".

    Raises:
        ValueError: n < 1 or the split is empty.
        FileNotFoundError: the annotation or an image is missing.
    """
    if n < 1:
        raise ValueError(f"preview_grid: n must be >= 1, got {n}")
    studies = load_annotation(annotation, splits=[split])[split]
    if not studies:
        raise ValueError(f"{annotation}: split {split!r} has no studies to preview")
    pick = np.random.default_rng(seed).permutation(len(studies))[: min(n, len(studies))]
    chosen = [studies[i] for i in sorted(int(i) for i in pick)]
    cols = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / cols)
    sheet = Image.new("RGB", (cols * TILE, rows * (TILE + _LEGEND_H)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, study in enumerate(chosen):
        x0, y0 = (k % cols) * TILE, (k // cols) * (TILE + _LEGEND_H)
        path = Path(image_root) / study.image_paths[0]
        try:
            gray = read_grayscale(path)
        except BadImageError as e:
            raise FileNotFoundError(
                f"{annotation}: {split} id={study.id!r}: {e} (check image_root)"
            ) from None
        w, h = gray.size
        tile = Image.fromarray((np.asarray(gray) * 255 + 0.5).astype(np.uint8)).resize(
            (TILE, TILE), Image.Resampling.BILINEAR
        )
        sheet.paste(tile.convert("RGB"), (x0, y0))
        for b in study.boxes:
            if b.view != 0:
                continue
            bx0, by0, bx1, by1 = b.box
            rect = (
                x0 + bx0 * TILE / w,
                y0 + by0 * TILE / h,
                x0 + bx1 * TILE / w - 1,
                y0 + by1 * TILE / h - 1,
            )
            draw.rectangle(rect, outline=LABEL_COLOURS[b.label], width=2)
        items = []
        if study.labels is not None:
            for name, code in zip(LABELS, study.labels):
                if code in (1, -1):
                    items.append((LABEL_SHORT[name] + ("?" if code == -1 else ""), LABEL_COLOURS[name]))
        _legend(draw, font, x0, y0 + TILE, study.id, items)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    logger.info("wrote a %dx%d preview of %s/%s to %s", cols, rows, annotation, split, out)
    return out
