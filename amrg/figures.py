"""Pictures of the evidence behind a prediction: Grad-CAM overlays, probabilities, recalled memory, reports.

:func:`study_figure` draws one study (a :class:`~amrg.inference.StudyPrediction`) on one page: the views
with the Grad-CAM maps of the top predicted labels, a bar chart of every label's probability, the recalled
visual-memory patches cut from their source images with their boxes, the recalled reports with their
weights, and the generated report beside the reference when one is known. ``amrg predict-images
--figures DIR`` writes one such PNG per study; ``amrg serve`` and the notebook reuse the pieces.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, so web-app threads do
not share figures). A figure never fails for want of a memory's source image: a patch whose image is
missing or unreadable (memories built before images were recorded, a moved dataset) is drawn as its box
on a grey placeholder labelled "source image not found".
"""

from __future__ import annotations

import functools
import logging
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from amrg.labels import LABELS

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from amrg.inference import StudyPrediction
    from amrg.models.reporter import RecalledItem

__all__ = [
    "MemoryPatch",
    "cam_overlay",
    "draw_memory_patch",
    "memory_patch",
    "patch_picture",
    "save_study_figure",
    "study_figure",
]

_logger = logging.getLogger(__name__)

NOT_FOUND = "source image not found"
_BOX_COLOUR = "#ff3030"
_WRAP = 72  # characters per line of report text


# ---------------------------------------------------------------------------------------------- pieces
def cam_overlay(view: np.ndarray, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a CAM map over a grayscale view.

    Args:
        view: grayscale view, [H, W] in [0, 1].
        cam: the map at any resolution, [h, w] in [0, 1] (stretched over the whole view, as the views are
            resized whole for the encoder).
        alpha: opacity of the map.
        cmap: matplotlib colour map of the map.

    Returns:
        RGB image, [H, W, 3] uint8.
    """
    import matplotlib

    height, width = view.shape
    resized = np.asarray(
        Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )
    heat = matplotlib.colormaps[cmap](np.clip(resized, 0.0, 1.0))[..., :3]  # [H, W, 3]
    gray = np.repeat(np.clip(view, 0.0, 1.0)[..., None], 3, axis=2)  # [H, W, 3]
    return (255 * ((1 - alpha) * gray + alpha * heat)).round().astype(np.uint8)


class MemoryPatch:
    """A recalled (or stored) visual-memory patch and the picture it is drawn on.

    Attributes:
        image: the source view, grayscale [H, W] in [0, 1], or a grey placeholder when not found.
        box: the patch box ``[x0, y0, x1, y1]`` in pixels of ``image``, or None when the record has none.
        found: whether ``image`` is the real source view.
        reason: why it was not found (empty when found).
    """

    def __init__(
        self, image: np.ndarray, box: tuple[float, ...] | None, found: bool, reason: str = ""
    ) -> None:
        self.image, self.box, self.found, self.reason = image, box, found, reason


def _field(item: RecalledItem | Mapping[str, Any], name: str) -> Any:
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


@functools.lru_cache(maxsize=64)
def _read_source(path: str) -> np.ndarray:
    from amrg.data.images import read_grayscale

    return np.asarray(read_grayscale(path), dtype=np.float32)


def memory_patch(item: RecalledItem | Mapping[str, Any], root: str | os.PathLike | None) -> MemoryPatch:
    """The source view of a visual-memory item, or a placeholder with its box when it cannot be read.

    Args:
        item: a :class:`~amrg.models.reporter.RecalledItem` or a visual provenance record (``image``,
            ``box``, ``image_size``).
        root: the folder the memory's image paths are relative to (the memory build records it).

    Returns:
        The :class:`MemoryPatch`; never raises for a missing or unreadable image.
    """
    box = _field(item, "box")
    box = tuple(float(v) for v in box) if isinstance(box, (list, tuple)) and len(box) == 4 else None
    image = _field(item, "image")
    if not isinstance(image, str):
        reason = "the memory records no image path (built before amrg recorded them)"
    elif root is None and not Path(image).is_absolute():
        reason = "the memory's image root is unknown"
    else:
        path = Path(image) if Path(image).is_absolute() else Path(root) / image
        try:
            return MemoryPatch(_read_source(str(path)), box, True)
        except (OSError, ValueError) as err:  # BadImageError is a ValueError
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    size = _field(item, "image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        width, height = int(size[0]), int(size[1])
    else:  # no recorded size: a canvas a little larger than the box
        side = int(max(box[2], box[3]) * 1.25) + 1 if box else 64
        width = height = max(side, 16)
    return MemoryPatch(np.full((max(height, 1), max(width, 1)), 0.5, dtype=np.float32), box, False, reason)


def patch_picture(
    item: RecalledItem | Mapping[str, Any], root: str | os.PathLike | None, min_side: int = 256
) -> np.ndarray:
    """A memory patch as an RGB picture: its source view with the box drawn (for galleries).

    Args:
        item: a recalled item or a visual provenance record.
        root: the memory's image root.
        min_side: small views are enlarged to at least this many pixels on their shorter side.

    Returns:
        RGB image, [H, W, 3] uint8; a placeholder says "source image not found".
    """
    patch = memory_patch(item, root)
    height, width = patch.image.shape
    scale = max(1.0, min_side / max(1, min(height, width)))
    picture = Image.fromarray((255 * np.clip(patch.image, 0, 1)).astype(np.uint8), mode="L").convert("RGB")
    if scale > 1:
        picture = picture.resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    if patch.box is not None:
        x0, y0, x1, y1 = (v * scale for v in patch.box)
        draw.rectangle([x0, y0, x1, y1], outline=_BOX_COLOUR, width=max(2, round(scale)))
    if not patch.found:
        draw.text((6, 6), NOT_FOUND, fill="white")
    return np.asarray(picture)


def draw_memory_patch(
    ax: Axes, item: RecalledItem | Mapping[str, Any], root: str | os.PathLike | None, title: str | None = None
) -> MemoryPatch:
    """Draw a memory patch's source view and box on ``ax`` (a placeholder when the view is missing)."""
    from matplotlib.patches import Rectangle

    patch = memory_patch(item, root)
    ax.imshow(patch.image, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    if patch.box is not None:
        x0, y0, x1, y1 = patch.box
        # imshow puts pixel centres on integers: pixel edges are at -0.5
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=_BOX_COLOUR, linewidth=1.8
            )
        )
    if not patch.found:
        box_style = {"facecolor": "white", "alpha": 0.8, "edgecolor": "none"}
        ax.text(
            0.5, 0.5, NOT_FOUND, transform=ax.transAxes, ha="center", va="center", fontsize=8, bbox=box_style
        )
    if title is not None:
        ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return patch


def _wrap(text: str, width: int = _WRAP) -> str:
    # an undertrained LLM can write control characters, which no font draws
    text = "".join(c if c.isprintable() or c == "\n" else " " for c in text)
    return "\n".join(textwrap.fill(part, width) for part in text.splitlines() or [""])


def _text_panel(ax: Axes, title: str, body: str) -> None:
    ax.set_axis_off()
    ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
    ax.text(0.0, 1.0, body, va="top", ha="left", fontsize=8.5, family="monospace", transform=ax.transAxes)


# ---------------------------------------------------------------------------------------------- figure
def study_figure(
    prediction: StudyPrediction,
    memory_root: str | os.PathLike | None = None,
    top_labels: int = 3,
    max_patches: int = 5,
    max_reports: int = 3,
    threshold: float = 0.5,
) -> Figure:
    """One page of evidence for one study.

    Args:
        prediction: what :meth:`amrg.inference.Predictor.predict` returned (with CAMs for the overlays).
        memory_root: the folder the visual memory's image paths are relative to (pass the predictor's
            ``memory_image_root``); None finds only absolute paths, the rest become placeholders.
        top_labels: CAM overlays for at most this many labels (those of ``prediction.cams``, in order).
        max_patches: recalled visual patches drawn.
        max_reports: recalled reports listed.
        threshold: the probability at which a bar counts as predicted (coloured).

    Returns:
        A matplotlib :class:`~matplotlib.figure.Figure` (Agg canvas; ``fig.savefig(path)`` writes it).
    """
    from matplotlib.figure import Figure

    cam_labels = list(prediction.cams)[:top_labels]
    views = prediction.views or []
    visual = [item for item in prediction.recalled if item.memory == "visual"][:max_patches]
    reports = [item for item in prediction.recalled if item.memory == "report"][:max_reports]
    text = prediction.report is not None or prediction.reference is not None or reports

    left, right = _report_texts(prediction), _recalled_texts(reports)
    text_lines = max(left.count("\n"), right.count("\n")) + 2 if text else 0
    rows = max(1, len(views))
    heights = [2.3 * rows + 0.4]
    if visual:
        heights.append(2.5)
    if text:
        heights.append(0.6 + 0.16 * text_lines)
    fig = Figure(figsize=(15, sum(heights)), layout="constrained")
    outer = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    fig.suptitle(f"{prediction.id}", fontsize=12, fontweight="bold")

    # views, their overlays and the probabilities
    cols = 1 + len(cam_labels)
    top = outer[0].subgridspec(rows, cols + 2, width_ratios=[1] * cols + [0.15, 1.6])
    for v in range(rows):
        for c in range(cols):
            ax = fig.add_subplot(top[v, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if v >= len(views):
                ax.set_axis_off()
                continue
            if c == 0:
                ax.imshow(views[v], cmap="gray", vmin=0, vmax=1)
                source = prediction.sources[v] if v < len(prediction.sources) else None
                name = Path(source).name if source else "in memory"
                ax.set_title(f"view {v}: {name}", fontsize=8)
            else:
                label = cam_labels[c - 1]
                ax.imshow(cam_overlay(views[v], prediction.cams[label][v]))
                ax.set_title(f"Grad-CAM: {label} ({prediction.probabilities[label]:.2f})", fontsize=8)
    bars = fig.add_subplot(top[:, cols + 1])
    _probability_bars(bars, prediction.probabilities, threshold)

    # recalled visual patches
    row = 1
    if visual:
        grid = outer[row].subgridspec(1, max_patches)
        for i, item in enumerate(visual):
            title = f"{item.label}  w={item.weight:.3f}\n{item.source_id}" + (
                f" view {item.view}" if item.view is not None else ""
            )
            draw_memory_patch(fig.add_subplot(grid[0, i]), item, memory_root, title)
        for i in range(len(visual), max_patches):
            fig.add_subplot(grid[0, i]).set_axis_off()
        row += 1

    # reports
    if text:
        grid = outer[row].subgridspec(1, 2)
        _text_panel(fig.add_subplot(grid[0, 0]), "Report", left)
        _text_panel(fig.add_subplot(grid[0, 1]), "Recalled reports (report memory)", right)
    return fig


def _report_texts(prediction: StudyPrediction) -> str:
    parts = []
    if prediction.report is not None:
        parts.append("generated:\n" + _wrap(prediction.report or "(empty)"))
    if prediction.reference is not None:
        parts.append("reference:\n" + _wrap(prediction.reference))
    return "\n\n".join(parts) if parts else "(a stage-1 model writes no report)"


def _recalled_texts(reports: list[RecalledItem]) -> str:
    if not reports:
        return "(none)"
    return "\n\n".join(
        f"w={item.weight:.3f}  {', '.join(item.all_labels)}  ({item.source_id})\n"
        + _wrap(item.text or "(no text stored)")
        for item in reports
    )


def _probability_bars(ax: Axes, probabilities: dict[str, float], threshold: float) -> None:
    labels = [label for label in LABELS if label in probabilities]
    values = [probabilities[label] for label in labels]
    colours = ["#d62728" if p >= threshold else "#9ab3d5" for p in values]
    y = np.arange(len(labels))
    ax.barh(y, values, color=colours)
    ax.axvline(threshold, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()  # CheXbert order from the top
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (stage-1 head)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    for yi, p in zip(y, values, strict=True):
        ax.text(min(p + 0.02, 0.86), yi, f"{p:.2f}", va="center", fontsize=7)


def save_study_figure(
    prediction: StudyPrediction,
    path: str | os.PathLike,
    memory_root: str | os.PathLike | None = None,
    **kwargs,
) -> Path:
    """Write :func:`study_figure` as a PNG (through a temp file in the same folder, then renamed).

    Args:
        prediction: the study's prediction.
        path: the PNG to write (parent folders are created).
        memory_root: the visual memory's image root.
        **kwargs: options of :func:`study_figure`.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = study_figure(prediction, memory_root, **kwargs)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
