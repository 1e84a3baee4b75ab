"""Synthetic datasets on disk: PNG views and an R2Gen ``annotation.json`` (``amrg data synth``).

Several processes may write one folder at once (two ``amrg data synth`` runs, or the
``SyntheticDataModule`` of several nodes on one shared file system). :func:`synthesize` therefore
takes a lock in the folder (``.synth.lock``, an ``fcntl`` lock through ``filelock``: the OS drops it
when its holder dies), renders into a temp folder inside the target folder and renames the finished
parts into place, the annotation last. ``synth.json`` records the settings. A writer that finds the
folder already holding a finished dataset with the same settings reuses it; one with other
settings, or an ``annotation.json`` it did not write, is refused with one line and left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image
from tqdm import tqdm

from amrg.data.synthetic.study import render_study
from amrg.errors import ConfigError, OutputError, writing

__all__ = ["PNG_LEVEL", "PROVENANCE", "synthesize", "write_annotation", "write_views"]

logger = logging.getLogger(__name__)

# zlib level 3 encodes ~2x faster than PIL's default 6 for ~15% larger files (film noise barely compresses).
PNG_LEVEL = 3

PROVENANCE = "synth.json"
"""The settings a synthetic dataset folder was written with (and by whom), next to its annotation."""

_WRITER = "amrg data synth"
_LOCK = ".synth.lock"
_TMP_PREFIX = ".synth-tmp-"


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    problems = []
    if n < 1:
        problems.append(f"n must be >= 1, got {n}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            problems.append(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        total = val_fraction + test_fraction
        problems.append(f"val_fraction + test_fraction must be < 1 to leave a train split, got {total:g}")
    if problems:
        raise ConfigError("synthesize: " + "; ".join(problems))
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

    Safe to run from several processes into one folder: the first writes, the others wait for it and
    reuse its result when they asked for the same settings (see the module docstring).

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
        ConfigError: bad n, fractions, probability or image size (all problems listed).
        OutputError: ``out`` holds a different dataset (other settings, or an ``annotation.json`` this
            function did not write), or cannot be written (read-only, full); nothing in it is changed.
    """
    n_train, n_val, n_test = _split_sizes(n, val_fraction, test_fraction)
    if not 0.0 <= two_view_prob <= 1.0:
        raise ConfigError(f"synthesize: two_view_prob must be in [0, 1], got {two_view_prob}")
    if image_size < 16:
        raise ConfigError(f"synthesize: image_size must be >= 16 pixels, got {image_size}")
    out = Path(out)
    ann_path = out / "annotation.json"
    settings = {
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "two_view_prob": two_view_prob,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }
    with writing(out, "synthetic dataset"):
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(out / _LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("%s: another process is writing it; waiting for its lock %s", out, lock.lock_file)
            lock.acquire()
        try:
            if _finished_same(out, settings):
                logger.info("%s already holds this synthetic dataset (%s): reused", out, _describe(settings))
                return ann_path
            for stale in out.glob(f"{_TMP_PREFIX}*"):  # left by a writer that died; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = out / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                counts = _render(tmp, settings, (n_train, n_val, n_test), progress)
                _move_in(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()
    logger.info(
        "wrote %d synthetic studies (train %d, val %d, test %d) at %d px to %s",
        n,
        *counts,
        image_size,
        ann_path,
    )
    return ann_path


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _finished_same(out: Path, settings: dict) -> bool:
    """True when ``out`` holds a finished dataset written with ``settings``; False when it holds none.

    Raises:
        OutputError: it holds a different dataset, or an annotation or images folder without our
            provenance (someone else's files, never replaced).
    """
    ann_path = out / "annotation.json"
    if not ann_path.exists():
        if (out / "images").exists() and not (out / PROVENANCE).exists():
            raise OutputError(
                f"cannot write synthetic dataset '{out}': it holds an images folder without the "
                f"{PROVENANCE} that amrg data synth writes; delete it or choose another folder"
            )
        return False  # nothing finished: what a dead writer of ours left is replaced
    try:
        found = json.loads((out / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict) or found.get("written_by") != _WRITER:
        raise OutputError(
            f"cannot write synthetic dataset '{out}': it already holds an annotation.json without the "
            f"{PROVENANCE} that amrg data synth writes; delete it or choose another folder"
        )
    theirs = found.get("settings", {})
    if theirs != settings:
        diff = ", ".join(
            f"{k}={theirs.get(k)!r} (asked {v!r})" for k, v in settings.items() if theirs.get(k) != v
        )
        raise OutputError(
            f"cannot write synthetic dataset '{out}': it holds a different one ({diff}); "
            "delete it or choose another folder"
        )
    return True


def _render(tmp: Path, settings: dict, sizes: tuple[int, int, int], progress: bool) -> tuple[int, int, int]:
    """Write the whole dataset (images, annotation, provenance) into ``tmp``; return the split sizes."""
    n, seed = settings["n"], settings["seed"]
    n_train, n_val, _ = sizes
    perm = np.random.default_rng([seed, n, 1]).permutation(n)
    split_of = {}
    for rank, i in enumerate(perm):
        split_of[int(i)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    width = max(6, len(str(n - 1)))
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i in tqdm(range(n), desc="synth", disable=not progress):
        rng = np.random.default_rng([seed, i])
        n_views = 2 if rng.random() < settings["two_view_prob"] else 1
        study = render_study(rng, settings["image_size"], n_views)
        sid = f"synth_{i:0{width}d}"
        rel = write_views(tmp, sid, study.images)
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
    write_annotation(records, tmp / "annotation.json")
    provenance = {"written_by": _WRITER, "settings": settings}
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    return sizes


def _move_in(tmp: Path, out: Path) -> None:
    """Rename the finished parts of ``tmp`` into ``out``: provenance, images, then the annotation, which
    marks the dataset whole.

    Called under the lock after :func:`_finished_same` found no annotation, so an ``images`` folder
    there is a dead writer's (``synth.json`` says so): it is moved aside into ``tmp`` and deleted with it.
    """
    old = out / "images"
    if old.exists():
        os.replace(old, tmp / "old-images")
    os.replace(tmp / PROVENANCE, out / PROVENANCE)
    os.replace(tmp / "images", out / "images")
    os.replace(tmp / "annotation.json", out / "annotation.json")


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
    """Write an R2Gen annotation (``{split: [record, ...]}``) to ``path`` through a temp file in its
    folder, fsynced and renamed; a failure leaves the previous file whole and no temp file.

    Raises:
        OutputError: the folder cannot be written (read-only, full, missing), naming ``path``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with writing(path, "annotation"):
        try:
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(records, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
