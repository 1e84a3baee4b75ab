"""Write reports for radiographs on disk, without an annotation file (``amrg predict-images``).

Give image files and/or folders; each image is one single-view study, or, with ``group_views``, each
sub-folder of a given folder is one study whose images are its views (IU X-ray: frontal + lateral).
The output is JSONL, one line per study, sorted by id::

    {"id": "patient1/frontal", "report": "...", "probabilities": {"Enlarged Cardiomediastinum": 0.03, ...},
     "explanation": [{"memory": "visual", "source_id": "...", "label": "...", "view": 0,
                      "box": [x0, y0, x1, y1], "image": "...", "weight": 0.04},
                     {"memory": "report", "source_id": "...", "label": "...", "text": "...", "weight": 0.1}]}

``probabilities`` come from the stage-1 head (CheXbert label order); ``explanation`` lists the memory
items the report's visual prefix recalled most (see :meth:`ReportGenerator.explain_from_prefix`), with the
source view, box and image of a visual patch where the memory recorded them. A stage-1 checkpoint gives
``{"id", "probabilities"}`` lines. With ``figures``, one PNG per study shows the evidence
(:mod:`amrg.figures`). Prediction goes through :class:`amrg.inference.Predictor`, as ``amrg.load`` does.

Outputs are checked before the model loads: an output path that is an input (an image, the checkpoint, the
references), an existing folder, or a folder that cannot be written is refused with one line. The JSONL is
written under a temp name beside it and renamed when whole. An image that passes the up-front header check
but fails to decode mid-run stops the run naming it, with the studies finished before it kept in
``<out stem>.partial<suffix>`` (``on_bad_image="error"``), or leaves its study out and lists it
(``on_bad_image="skip"``); a half-written file never has the final name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from amrg.data.dicom import DICOM_SUFFIXES, has_dicom_marker, is_dicom
from amrg.data.images import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    ImageTooLargeError,
    check_pixels,
    image_problem,
)
from amrg.errors import ConfigError, InputError, OutputError, writing
from amrg.models.decoding import CacheKind, CompileMode, check_fast_path

__all__ = [
    "IMAGE_SUFFIXES",
    "PredictInputError",
    "StudyFiles",
    "collect_studies",
    "partial_path",
    "predict_images",
]

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


class PredictInputError(InputError):
    """An input path is missing, not an image, or unreadable (every problem listed in one message)."""


@dataclass(frozen=True)
class StudyFiles:
    """One study to report on: its id and its view files (1..V)."""

    id: str
    paths: tuple[Path, ...]


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or has_dicom_marker(path)


def _image_problem(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be read as an image, or None when its header and structure are sound."""
    try:
        check_pixels(path, max_pixels)  # from the header: a huge image never reaches PIL's bomb error
    except ImageTooLargeError as err:
        return str(err)
    if is_dicom(path):
        return image_problem(path)  # the DICOM header check, which says what it expected
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"'{path}' is not a readable image ({type(err).__name__}: {err}); expected {_EXPECTED}"
    return None


def collect_studies(
    inputs: Path | str | Sequence[Path | str],
    group_views: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[StudyFiles]:
    """Turn files and folders into studies, checking every image up front.

    Args:
        inputs: an image file or folder, or a list of them. A file's study id is its stem; inside a
            folder, images are found recursively and a study id is the image's path relative to the
            folder, without suffix.
        group_views: each sub-folder of a given folder is one study (id: the sub-folder's relative path)
            whose images, sorted by name, are its views; images directly in the folder stay single studies.
        max_pixels: an image with more pixels (width x height, from its header) is refused; None for no
            cap (PIL's decompression-bomb limit still applies).

    Returns:
        The studies, sorted by id.

    Raises:
        PredictInputError: every missing path, non-image file, unreadable image, empty folder and
            duplicate id, in one message.
    """
    problems: list[str] = []
    studies: list[StudyFiles] = []
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
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
            problem = _image_problem(image, max_pixels)
            if problem is not None:
                problems.append(problem)
    seen: dict[str, StudyFiles] = {}
    for study in studies:
        if study.id in seen:
            problems.append(
                f"study id {study.id!r} comes from both {[str(p) for p in seen[study.id].paths]} and "
                f"{[str(p) for p in study.paths]}: ids are paths relative to the folder given, so give their "
                "common parent folder instead (ids keep the sub-folder), or rename one; --group_views true makes "
                "each sub-folder one study"
            )
        seen[study.id] = study
    if problems:
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise PredictInputError(
            f"cannot predict: {len(problems)} problem(s) with the inputs:\n  - " + "\n  - ".join(shown) + more
        )
    return sorted(studies, key=lambda s: s.id)


def _references(annotation: Path) -> dict[str, str]:
    """Study id -> raw report of every split of an annotation.json (references drawn in the figures)."""
    from amrg.data.schema import load_annotation

    return {study.id: study.report for study in load_annotation(annotation)}


def partial_path(out: Path | str) -> Path:
    """Where :func:`predict_images` keeps the finished studies of a run an unreadable image stopped."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def _check_output(out: Path, studies: Sequence[StudyFiles], others: dict[str, Path | None]) -> None:
    """Refuse an output path that is an input or a folder, before anything slow runs.

    Raises:
        OutputError: naming the output and the input it would overwrite.
    """
    target = out.resolve()
    if out.is_dir():
        raise OutputError(
            f"cannot write predictions '{out}': it is a folder; give a file name such as "
            f"'{out / 'predictions.jsonl'}'"
        )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"cannot write predictions '{out}': '{blocking}' is a file, not a folder")
    inputs = {image.resolve(): f"input image '{image}'" for study in studies for image in study.paths}
    inputs.update({Path(p).resolve(): f"{what} '{p}'" for what, p in others.items() if p is not None})
    if target in inputs:
        raise OutputError(
            f"cannot write predictions '{out}': it is the {inputs[target]} of this run; refusing to overwrite "
            "it (give another output file)"
        )
    if out.is_file() and not _is_predictions_file(out):
        raise OutputError(
            f"cannot write predictions '{out}': it exists and is not a predictions file amrg wrote (no JSON "
            "line with 'id' and 'report' first); refusing to overwrite it (give another output file)"
        )


def _is_predictions_file(path: Path) -> bool:
    """Whether ``path`` is empty or starts with a predictions line (a JSON object with ``id`` and ``report``)."""
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 20)
    except OSError:
        return False
    if not first.strip():
        return path.stat().st_size == 0
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "id" in record and "report" in record


def predict_images(
    checkpoint: Path,
    inputs: Path | Sequence[Path],
    out: Path,
    batch_size: int = 8,
    device: str = "cpu",
    top_k_explanations: int = 5,
    group_views: bool = False,
    max_views: int = 2,
    num_beams: int | None = None,
    min_new_tokens: int | None = None,
    max_new_tokens: int | None = None,
    cache: CacheKind | None = None,
    compile: CompileMode | None = None,
    llm_path: Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    figures: Path | None = None,
    references: Path | None = None,
    memory_image_root: Path | None = None,
    on_bad_image: Literal["error", "skip"] = "error",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Path:
    """Write one JSONL line per study with its report, label probabilities and recalled memory items.

    The image size and everything else come from the checkpoint alone: a stage-2 checkpoint holds the
    stage-1 network, the memories and the tokenizer. Only a base LLM loaded from a folder at training time
    is read from outside (its folder, or ``llm_path``; the same model, checked by hash). A stage-1
    checkpoint gives probabilities (and, with ``figures``, Grad-CAM pictures) only.

    Args:
        checkpoint: a stage-2 ``.ckpt`` written by :class:`~amrg.modules.reporter.ReporterModule`, or a
            stage-1 one (:class:`~amrg.modules.classifier.ClassifierModule`).
        inputs: an image file or a folder of images, or a list of them (see :func:`collect_studies`).
        out: the JSONL file to write (parent folders are created); never one of the inputs or a folder.
        batch_size: studies per forward pass.
        device: torch device, e.g. ``"cpu"``, ``"cuda"`` or ``"auto"``.
        top_k_explanations: recalled items per memory and study (0 for none).
        group_views: treat each sub-folder as one multi-view study.
        max_views: views per study kept (the first ones by file name).
        num_beams: override of the checkpoint's beam width.
        min_new_tokens: override of the checkpoint's minimum report length in tokens.
        max_new_tokens: override of the checkpoint's maximum report length in tokens.
        cache: override of the checkpoint's KV cache (``dynamic``/``static``); the same reports.
        compile: override of the checkpoint's ``torch.compile`` mode of the decode steps (needs ``static``
            cache; e.g. ``reduce-overhead`` on a GPU); the same reports.
        llm_path: the base LLM's folder on this machine, when it is not where it was at training time.
        trust_remote_code: allow model code shipped in the LLM folder (never taken from the checkpoint).
        progress: show a progress bar.
        figures: also write one PNG per study into this folder (``<id>.png``): the views with Grad-CAM
            overlays of the top predicted labels, the label probabilities, the recalled patches and
            reports, and the generated report beside the reference (see ``references``).
        references: an annotation.json whose reports are drawn beside the generated ones in the figures,
            matched by study id (any split).
        memory_image_root: the folder the visual memory's source images are relative to, when they moved
            since the memory was built (default: the folder the build recorded).
        on_bad_image: an image that passes the up-front header check but cannot be decoded: ``error`` stops
            naming it and keeps the studies finished before it in ``<out stem>.partial<suffix>`` (``out``
            is not written); ``skip`` leaves its study out, logs it and says how many were skipped.
        max_pixels: an input image with more pixels (width x height, from its header) is refused up front;
            None for no cap.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: the checkpoint (or the references file) does not exist.
        PredictInputError: a missing, non-image or unreadable input (all listed in one message), or an
            image that fails to decode mid-run (``on_bad_image="error"``; the message names the partial file).
        OutputError: ``out`` is an input or a folder, or its folder cannot be written.
        ConfigError: bad options.
    """
    from amrg.checkpoints.safety import check_checkpoint_file

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(
            f"checkpoint '{checkpoint}' not found: expected a .ckpt that `amrg fit` wrote for stage 2 (or "
            "stage 1)"
        )
    check_checkpoint_file(checkpoint, "checkpoint")  # its header: random bytes fail before the slow imports
    if batch_size < 1 or max_views < 1 or top_k_explanations < 0:
        raise ConfigError(
            f"need batch_size >= 1, max_views >= 1 and top_k_explanations >= 0, got {batch_size}, "
            f"{max_views}, "
            f"{top_k_explanations}"
        )
    if on_bad_image not in ("error", "skip"):
        raise ConfigError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    out = Path(out)
    studies = collect_studies(inputs, group_views=group_views, max_pixels=max_pixels)
    _check_output(out, studies, {"checkpoint": checkpoint, "references file": references})
    if figures is not None and Path(figures).exists() and not Path(figures).is_dir():
        raise OutputError(f"cannot write figures into '{figures}': it is a file, not a folder")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    # The output folder is made and a temp file opened in it now, so a read-only or missing folder fails
    # before the model loads rather than after the whole run.
    with writing(out, "predictions"):
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = tmp.open("w", encoding="utf-8")
    try:
        if figures is not None:
            with writing(figures, "figures"):
                Path(figures).mkdir(parents=True, exist_ok=True)
        known = _references(Path(references)) if references is not None else {}
        from amrg.inference import load  # heavy (transformers): imported once the inputs are checked

        predictor = load(
            checkpoint,
            device=device,
            llm_path=llm_path,
            trust_remote_code=trust_remote_code,
            memory_image_root=memory_image_root,
        )
        decoding = {
            "num_beams": num_beams,
            "min_new_tokens": min_new_tokens,
            "max_new_tokens": max_new_tokens,
            "cache": cache,
            "compile": compile,
        }
        if predictor.stage == 1 and any(v is not None for v in decoding.values()):
            raise ConfigError(
                f"checkpoint '{checkpoint}' is a stage-1 classifier: it writes no report, so --num_beams, "
                "--min_new_tokens, --max_new_tokens, --cache and --compile do not apply"
            )
        if predictor.stage == 2:
            fast = check_fast_path(cache or predictor.net.cache, compile or predictor.net.compile)
            if fast:
                raise ConfigError(
                    f"--cache/--compile: {'; '.join(fast)} (the checkpoint's own setting counts)"
                )
        _logger.info("predicting %d studies from %s on %s", len(studies), checkpoint, predictor.device)

        def predict(batch: list[StudyFiles]) -> list[Any]:
            return predictor.predict_many(
                [study.paths for study in batch],
                ids=[study.id for study in batch],
                references=[known.get(study.id) for study in batch],
                batch_size=len(batch),
                max_views=max_views,
                top_k=top_k_explanations if predictor.stage == 2 else 0,
                cam_labels=3 if figures is not None else 0,
                **decoding,
            )

        written, skipped = 0, []
        failed: tuple[StudyFiles, BadImageError] | None = None
        batches = [studies[i : i + batch_size] for i in range(0, len(studies), batch_size)]
        for batch in tqdm(batches, desc="predict", unit="batch", disable=not progress):
            predictions, bad = _predict_or_each(predict, batch, stop_at_first=on_bad_image == "error")
            for prediction in predictions:
                with writing(out, "predictions"):
                    handle.write(json.dumps(prediction.as_dict(), ensure_ascii=False) + "\n")
                written += 1
                if figures is not None:
                    from amrg.figures import save_study_figure

                    figure = Path(figures) / f"{prediction.id}.png"
                    with writing(figure, "figure"):
                        save_study_figure(prediction, figure, predictor.memory_image_root)
            for study, err in bad:
                _logger.warning("skipping study %r (on_bad_image=skip): %s", study.id, err)
            skipped += [study.id for study, _ in bad]
            if bad and on_bad_image == "error":
                failed = bad[0]
                break
        with writing(out, "predictions"):
            handle.close()
        if failed is not None:
            study, err = failed
            kept = f"'{out}' was not written"
            if written:
                partial = partial_path(out)
                with writing(partial, "partial predictions"):
                    os.replace(tmp, partial)
                kept = f"the {written} studies finished before it are in '{partial}'; {kept}"
            raise PredictInputError(
                f"study {study.id!r}: {err}; {kept} (--on_bad_image skip leaves such studies out)"
            )
        if not written:
            raise PredictInputError(
                f"cannot predict: every one of the {len(studies)} studies has an image that cannot be decoded "
                f"(on_bad_image=skip): {skipped[:_MAX_LISTED]}; '{out}' was not written"
            )
        with writing(out, "predictions"):
            os.replace(tmp, out)
    finally:
        handle.close()
        tmp.unlink(missing_ok=True)
    if skipped:
        shown = ", ".join(repr(s) for s in skipped[:_MAX_LISTED])
        more = f" and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        _logger.warning(
            "skipped %d of %d studies with an image that cannot be decoded (on_bad_image=skip): %s%s",
            len(skipped),
            len(studies),
            shown,
            more,
        )
    _logger.info("wrote %d %s to %s", written, "reports" if predictor.stage == 2 else "predictions", out)
    if figures is not None:
        _logger.info("wrote %d figures to %s", written, figures)
    return out


def _predict_or_each(
    predict: Any, batch: list[StudyFiles], stop_at_first: bool
) -> tuple[list[Any], list[tuple[StudyFiles, BadImageError]]]:
    """Predict a batch; when one of its images cannot be decoded, predict its studies one by one.

    Returns:
        The predictions of the studies that could be read (in order, up to the first bad one when
        ``stop_at_first``) and each bad study with its error.
    """
    try:
        return predict(batch), []
    except BadImageError as err:
        if len(batch) == 1:
            return [], [(batch[0], err)]
    done: list[Any] = []
    bad: list[tuple[StudyFiles, BadImageError]] = []
    for study in batch:
        try:
            done += predict([study])
        except BadImageError as err:
            bad.append((study, err))
            if stop_at_first:
                break
    return done, bad
