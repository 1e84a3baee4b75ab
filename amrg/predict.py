"""Write reports for radiographs on disk, without an annotation file (``amrg predict-images``).

Give image files and/or folders; each image is one single-view study, or, with ``group_views``, each
sub-folder of a given folder is one study whose images are its views (IU X-ray: frontal + lateral).
The output is JSONL, one line per study, sorted by id::

    {"id": "patient1/frontal", "report": "...", "probabilities": {"Enlarged Cardiomediastinum": 0.03, ...},
     "explanation": [{"memory": "visual", "source_id": "...", "label": "...", "weight": 0.04},
                     {"memory": "report", "source_id": "...", "label": "...", "text": "...", "weight": 0.1}]}

``probabilities`` come from the stage-1 head (CheXbert label order); ``explanation`` lists the memory
items the report's visual prefix recalled most (see :meth:`ReportGenerator.explain_from_prefix`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from amrg.data.dicom import DICOM_SUFFIXES, has_dicom_marker, is_dicom
from amrg.data.images import BadImageError, image_problem, load_image
from amrg.labels import LABELS

__all__ = ["IMAGE_SUFFIXES", "PredictInputError", "StudyFiles", "collect_studies", "predict_images"]

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
"""File suffixes read as radiographs (case-insensitive); a file with another name is read when it is
DICOM (the ``DICM`` marker at byte 128), e.g. extensionless PACS exports."""

_EXPECTED = (
    "a radiograph image file ("
    + ", ".join(s.lstrip(".").upper() for s in IMAGE_SUFFIXES)
    + ") or a folder of them"
)
_MAX_LISTED = 20


class PredictInputError(ValueError):
    """An input path is missing, not an image, or unreadable (every problem listed in one message)."""


@dataclass(frozen=True)
class StudyFiles:
    """One study to report on: its id and its view files (1..V)."""

    id: str
    paths: tuple[Path, ...]


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or has_dicom_marker(path)


def _image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image, or None when its header and structure are sound."""
    if is_dicom(path):
        return image_problem(path)  # the DICOM header check, which says what it expected
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"'{path}' is not a readable image ({type(err).__name__}: {err}); expected {_EXPECTED}"
    return None


def collect_studies(inputs: Sequence[Path | str], group_views: bool = False) -> list[StudyFiles]:
    """Turn files and folders into studies, checking every image up front.

    Args:
        inputs: image files and/or folders. A file's study id is its stem; inside a folder, images are
            found recursively and a study id is the image's path relative to the folder, without suffix.
        group_views: each sub-folder of a given folder is one study (id: the sub-folder's relative path)
            whose images, sorted by name, are its views; images directly in the folder stay single studies.

    Returns:
        The studies, sorted by id.

    Raises:
        PredictInputError: every missing path, non-image file, unreadable image, empty folder and
            duplicate id, in one message.
    """
    problems: list[str] = []
    studies: list[StudyFiles] = []
    if not inputs:
        raise PredictInputError(f"no input given: expected {_EXPECTED}")
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p))
            ignored = sum(1 for p in path.rglob("*") if p.is_file() and not _is_image_name(p))
            if ignored:
                _logger.info(
                    "%s: ignoring %d file(s) with no image suffix %s and no DICOM marker",
                    path,
                    ignored,
                    IMAGE_SUFFIXES,
                )
            if not images:
                problems.append(f"folder '{path}' holds no image files: expected {_EXPECTED}")
                continue
            if group_views:
                groups: dict[str, list[Path]] = {}
                for image in images:
                    rel = image.relative_to(path)
                    key = rel.parent.as_posix() if rel.parent != Path(".") else rel.with_suffix("").as_posix()
                    groups.setdefault(key, []).append(image)
                studies += [StudyFiles(key, tuple(paths)) for key, paths in groups.items()]
            else:
                studies += [
                    StudyFiles(image.relative_to(path).with_suffix("").as_posix(), (image,))
                    for image in images
                ]
        elif path.is_file():
            if not _is_image_name(path):
                problems.append(f"'{path}' is not an image file: expected {_EXPECTED}")
                continue
            studies.append(StudyFiles(path.stem, (path,)))
        else:
            problems.append(f"'{path}' not found: expected {_EXPECTED}")

    for study in studies:
        for image in study.paths:
            problem = _image_problem(image)
            if problem is not None:
                problems.append(problem)
    seen: dict[str, StudyFiles] = {}
    for study in studies:
        if study.id in seen:
            problems.append(
                f"study id {study.id!r} comes from both {[str(p) for p in seen[study.id].paths]} and "
                f"{[str(p) for p in study.paths]}; give the files in separate folders"
            )
        seen[study.id] = study
    if problems:
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise PredictInputError(
            f"cannot predict: {len(problems)} problem(s) with the inputs:\n  - " + "\n  - ".join(shown) + more
        )
    return sorted(studies, key=lambda s: s.id)


def _load_batch(
    studies: Sequence[StudyFiles], image_size: int, max_views: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a batch of studies: images [B, V, 3, H, W] and view_mask [B, V]."""
    views = min(max_views, max(len(s.paths) for s in studies))
    images = torch.zeros(len(studies), views, 3, image_size, image_size)
    view_mask = torch.zeros(len(studies), views, dtype=torch.bool)
    for b, study in enumerate(studies):
        for v, path in enumerate(study.paths[:views]):
            try:
                images[b, v] = load_image(path, image_size)  # [3, H, W]
            except BadImageError as err:
                raise PredictInputError(f"study {study.id!r}: {err}; expected {_EXPECTED}") from None
            view_mask[b, v] = True
    return images, view_mask


def predict_images(
    checkpoint: Path,
    inputs: Sequence[Path],
    out: Path,
    batch_size: int = 8,
    device: str = "cpu",
    top_k_explanations: int = 5,
    group_views: bool = False,
    max_views: int = 2,
    num_beams: int | None = None,
    min_new_tokens: int | None = None,
    max_new_tokens: int | None = None,
    llm_path: Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """Write one JSONL line per study with its report, label probabilities and recalled memory items.

    The image size and everything else come from the stage-2 checkpoint alone: it holds the stage-1
    network, the memories and the tokenizer. Only a base LLM loaded from a folder at training time is
    read from outside (its folder, or ``llm_path``; the same model, checked by hash).

    Args:
        checkpoint: a stage-2 ``.ckpt`` written by :class:`~amrg.modules.reporter.ReporterModule`.
        inputs: image files and/or folders of images (see :func:`collect_studies`).
        out: the JSONL file to write (parent folders are created).
        batch_size: studies per forward pass.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        top_k_explanations: recalled items per memory and study (0 for none).
        group_views: treat each sub-folder as one multi-view study.
        max_views: views per study kept (the first ones by file name).
        num_beams: override of the checkpoint's beam width.
        min_new_tokens: override of the checkpoint's minimum report length in tokens.
        max_new_tokens: override of the checkpoint's maximum report length in tokens.
        llm_path: the base LLM's folder on this machine, when it is not where it was at training time.
        trust_remote_code: allow model code shipped in the LLM folder (never taken from the checkpoint).
        progress: show a progress bar.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        PredictInputError: a missing, non-image or unreadable input (all listed in one message).
    """
    from amrg.checkpoints.stage2 import load_stage2  # heavy (transformers): import on use

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"stage-2 checkpoint '{checkpoint}' not found: expected the .ckpt that `amrg fit` wrote for "
            "stage 2"
        )
    if batch_size < 1 or max_views < 1 or top_k_explanations < 0:
        raise ValueError(
            f"need batch_size >= 1, max_views >= 1 and top_k_explanations >= 0, got {batch_size}, "
            f"{max_views}, "
            f"{top_k_explanations}"
        )
    studies = collect_studies(inputs, group_views=group_views)
    target = torch.device(device)
    net = load_stage2(checkpoint, llm_path=llm_path, trust_remote_code=trust_remote_code).to(target).eval()
    decoding = {"num_beams": num_beams, "min_new_tokens": min_new_tokens, "max_new_tokens": max_new_tokens}
    _logger.info("predicting %d studies from %s on %s", len(studies), checkpoint, target)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    batches = [studies[i : i + batch_size] for i in range(0, len(studies), batch_size)]
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress):
                images, view_mask = _load_batch(batch, net.image_size, max_views)
                prediction = net.predict(
                    images.to(target), view_mask.to(target), top_k=top_k_explanations, **decoding
                )
                probabilities = prediction.probabilities.float().cpu().tolist()
                for study, report, probs, items in zip(
                    batch, prediction.reports, probabilities, prediction.explanations, strict=True
                ):
                    line = {
                        "id": study.id,
                        "report": report,
                        "probabilities": {label: round(p, 6) for label, p in zip(LABELS, probs, strict=True)},
                        "explanation": [item.as_dict() for item in items],
                    }
                    handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _logger.info("wrote %d reports to %s", len(studies), out)
    return out
