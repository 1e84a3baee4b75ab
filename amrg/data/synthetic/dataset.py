"""Synthetic datasets on disk: PNG views and an R2Gen ``annotation.json`` (``amrg data synth``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from amrg.data.synthetic.study import render_study

__all__ = ["PNG_LEVEL", "synthesize", "write_annotation", "write_views"]

logger = logging.getLogger(__name__)

# zlib level 3 encodes ~2x faster than PIL's default 6 for ~15% larger files (film noise barely compresses).
PNG_LEVEL = 3


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    problems = []
    if n < 1:
        problems.append(f"n must be >= 1, got {n}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            problems.append(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        total = val_fraction + test_fraction
        problems.append(f"val_fraction + test_fraction must be < 1 to leave a train split, got {total}")
    if problems:
        raise ValueError("synthesize: " + "; ".join(problems))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


def synthesize(
    out: Path,
    n: int,
    seed: int = 0,
    image_size: int = 224,
    two_view_prob: float = 0.5,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
) -> Path:
    """Write n synthetic studies under out/ (out/images/<id>/<view>.png + out/annotation.json);
    return the annotation path. Deterministic by seed (same seed -> byte-identical files).

    Args:
        out: output folder (created).
        n: number of studies.
        seed: master seed; study i is rendered from ``default_rng([seed, i])``, so the first k studies
            of a larger run equal a run with n=k.
        image_size: side of the square PNGs in pixels.
        two_view_prob: probability that a study has a second view.
        val_fraction: share of studies in the val split (rounded).
        test_fraction: share of studies in the test split (rounded).
        progress: show a tqdm progress bar.

    Raises:
        ValueError: bad n, fractions, probability or image size (all problems listed).
    """
    n_train, n_val, n_test = _split_sizes(n, val_fraction, test_fraction)
    if not 0.0 <= two_view_prob <= 1.0:
        raise ValueError(f"synthesize: two_view_prob must be in [0, 1], got {two_view_prob}")
    if image_size < 16:
        raise ValueError(f"synthesize: image_size must be >= 16 pixels, got {image_size}")
    out = Path(out)
    ann_path = out / "annotation.json"
    out.mkdir(parents=True, exist_ok=True)
    if ann_path.exists():
        # Drop the old index first: a run that dies half-way must not leave it pointing at mixed images.
        logger.info("removing the previous %s before writing new images", ann_path)
        ann_path.unlink()
    perm = np.random.default_rng([seed, n, 1]).permutation(n)
    split_of = {}
    for rank, i in enumerate(perm):
        split_of[int(i)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    width = max(6, len(str(n - 1)))
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i in tqdm(range(n), desc="synth", disable=not progress):
        rng = np.random.default_rng([seed, i])
        n_views = 2 if rng.random() < two_view_prob else 1
        study = render_study(rng, image_size, n_views)
        sid = f"synth_{i:0{width}d}"
        rel = write_views(out, sid, study.images)
        split = split_of[i]
        records[split].append(
            {
                "id": sid,
                "report": study.report,
                "image_path": rel,
                "split": split,
                "labels": study.labels,
                "boxes": study.boxes,
            }
        )
    write_annotation(records, ann_path)
    logger.info(
        "wrote %d synthetic studies (train %d, val %d, test %d) at %d px to %s",
        n,
        n_train,
        n_val,
        n_test,
        image_size,
        ann_path,
    )
    return ann_path


def write_views(out: Path, sid: str, images: list[np.ndarray]) -> list[str]:
    """Save a study's views as ``out/images/<sid>/<view>.png``; return those paths relative to ``out``."""
    rel = []
    (out / "images" / sid).mkdir(parents=True, exist_ok=True)
    for v, img in enumerate(images):
        path = f"images/{sid}/{v}.png"
        Image.fromarray(img).save(out / path, format="PNG", compress_level=PNG_LEVEL)
        rel.append(path)
    return rel


def write_annotation(records: dict[str, list[dict]], path: Path) -> None:
    """Write an R2Gen annotation (``{split: [record, ...]}``) to ``path`` through a temp file and a rename."""
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
