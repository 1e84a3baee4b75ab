"""One synthetic study in memory: anatomy, signs, report and views put together.

Every study draws its parts from separate random streams split off its generator (anatomy, labels,
views, report words, textures, and one per finding for its sign), so changing one label leaves the
rest of the film unchanged, and ``render_views`` draws the very films ``render_study`` would for the
same labels, without writing a report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from amrg.data.synthetic.anatomy import Anatomy, sample_anatomy
from amrg.data.synthetic.labels import CARDIO, DEVICES, EC, FINDINGS, NO_FINDING, sample_codes
from amrg.data.synthetic.prose import write_report
from amrg.data.synthetic.render import (
    Canvas,
    expose_film,
    noise_texture,
    pixel_box,
    render_density,
    sample_view,
)
from amrg.data.synthetic.signs import Sign, sample_sign
from amrg.labels import LABELS, NUM_LABELS

__all__ = ["SyntheticStudy", "SyntheticViews", "render_study", "render_views"]


@dataclass
class SyntheticStudy:
    """One rendered study, without disk I/O.

    Attributes:
        images: one grayscale uint8 array [H, W] per view.
        labels: 14 CheXpert codes in CheXbert order: 1, 0, -1 (uncertain) or None (not mentioned).
        boxes: ``{"label": name, "view": int, "box": [x0, y0, x1, y1]}`` in pixel edges of that view
            (0 <= x0 < x1 <= W), one or more per positive or uncertain finding; none for No Finding.
        report: the radiology report; its sentences state exactly ``labels``.
    """

    images: list[np.ndarray]
    labels: list[int | None]
    boxes: list[dict]
    report: str


@dataclass
class SyntheticViews:
    """The views of one patient with given findings, without a report.

    Attributes:
        images: one grayscale uint8 array [H, W] per view.
        boxes: ``{"label": name, "view": int, "box": [x0, y0, x1, y1]}`` in pixel edges of that view,
            one or more per positive or uncertain finding, as in ``SyntheticStudy.boxes``.
    """

    images: list[np.ndarray]
    boxes: list[dict]


def render_study(
    rng: np.random.Generator, image_size: int, n_views: int, labels: Sequence[int | None] | None = None
) -> SyntheticStudy:
    """Render one study in memory.

    Args:
        rng: the study's random generator; the same generator state gives the same study.
        image_size: side of the square images in pixels.
        n_views: number of views (1 or more); every view shows the same findings.
        labels: optional 14 codes (CheXbert order: 1, 0, -1, None) to use instead of sampling them;
            the No Finding entry is ignored and derived from the others. Anatomy, each sign's
            placement and the noise come from separate streams of ``rng``, so changing one label
            leaves the rest of the film unchanged (tests compare such pairs); the one coupling is that
            lung signs are kept clear of a widened mediastinum or an enlarged heart.

    Returns:
        The study: views, labels, sign boxes (pixels) and report.
    """
    _check_request(image_size, n_views, labels)
    seeds = rng.integers(0, 2**63 - 1, size=5 + NUM_LABELS)
    anat_rng, label_rng, view_rng, text_rng, tex_rng = (np.random.default_rng(int(s)) for s in seeds[:5])
    anatomy = sample_anatomy(anat_rng)
    codes = sample_codes(label_rng) if labels is None else _finding_codes(labels)
    signs = _place_signs(codes, seeds, anatomy)
    report, stated = write_report(codes, signs, text_rng)
    # CheXpert rule: support devices do not count against No Finding.
    active = any(stated[j] in (1, -1) for j in FINDINGS if j != DEVICES)
    stated[NO_FINDING] = None if active else 1
    images, boxes = _draw_views(anatomy, signs, image_size, n_views, view_rng, tex_rng)
    return SyntheticStudy(images=images, labels=stated, boxes=boxes, report=report)


def render_views(
    rng: np.random.Generator, image_size: int, n_views: int, labels: Sequence[int | None]
) -> SyntheticViews:
    """Render the views of one study whose labels are given (e.g. from a real report), without prose.

    A sign is drawn, and boxed, for every finding coded 1 or -1, as ``synthesize`` does. The random
    streams are those of ``render_study``, so the images and boxes equal ``render_study(rng, image_size,
    n_views, labels)``'s; only the report is not written.

    Args:
        rng: the study's random generator; the same generator state gives the same views.
        image_size: side of the square images in pixels.
        n_views: number of views (1 or more); every view shows the same findings.
        labels: 14 codes in CheXbert order (1, 0, -1 or None); the No Finding entry is not drawn.

    Returns:
        The views and their sign boxes (pixels).

    Raises:
        ValueError: bad image size, view count or label codes.
    """
    _check_request(image_size, n_views, labels)
    seeds = rng.integers(0, 2**63 - 1, size=5 + NUM_LABELS)
    anat_rng, _, view_rng, _, tex_rng = (np.random.default_rng(int(s)) for s in seeds[:5])
    anatomy = sample_anatomy(anat_rng)
    signs = _place_signs(_finding_codes(labels), seeds, anatomy)
    images, boxes = _draw_views(anatomy, signs, image_size, n_views, view_rng, tex_rng)
    return SyntheticViews(images=images, boxes=boxes)


def _check_request(image_size: int, n_views: int, labels: Sequence[int | None] | None) -> None:
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if labels is not None and len(labels) != NUM_LABELS:
        raise ValueError(f"labels must have {NUM_LABELS} codes in CheXbert order, got {len(labels)}")


def _finding_codes(labels: Sequence[int | None]) -> list[int | None]:
    """The 13 finding codes of 14 given labels, checked."""
    codes = [labels[j] for j in FINDINGS]
    for j, c in enumerate(codes):
        if c not in (1, 0, -1, None):
            raise ValueError(f"labels[{j}] ({LABELS[j]}) is {c!r}; expected 1, 0, -1 or None")
    return codes


def _place_signs(codes: Sequence[int | None], seeds: np.ndarray, anatomy: Anatomy) -> dict[int, Sign]:
    """A sign for every finding coded 1 or -1, each from its own stream ``seeds[5 + label]``."""
    # Anatomy-changing signs first, so the others are placed around the enlarged heart/mediastinum.
    order = [EC, CARDIO, *(j for j in FINDINGS if j not in (EC, CARDIO))]
    return {
        j: sample_sign(j, np.random.default_rng(int(seeds[5 + j])), anatomy)
        for j in order
        if codes[j] in (1, -1)
    }


def _draw_views(
    anatomy: Anatomy,
    signs: dict[int, Sign],
    image_size: int,
    n_views: int,
    view_rng: np.random.Generator,
    tex_rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[dict]]:
    """Render the density once and expose it ``n_views`` times; the signs' boxes in each view's pixels."""
    cv = Canvas(image_size)
    tex, vessels = noise_texture(tex_rng, image_size, 12), noise_texture(tex_rng, image_size, 20)
    D = render_density(anatomy, list(signs.values()), cv, tex, vessels)
    images, boxes = [], []
    for v in range(n_views):
        view = sample_view(view_rng, v)
        images.append(expose_film(D, view, cv, view_rng))
        for j, sg in sorted(signs.items()):
            for b in sg.boxes:
                boxes.append({"label": LABELS[j], "view": v, "box": pixel_box(b, view, image_size)})
    return images, boxes
