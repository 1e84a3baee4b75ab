"""Score any model's reports from files (``amrg eval``): NLG + CE with bootstrap intervals, and A vs B.

Predictions are JSONL, one object per line: ``{"id", "report"}`` as ``amrg predict-images`` writes
it, or ``{"id", "hypothesis", "reference", ...}`` as :class:`~amrg.metrics.callback.ReportMetricsCallback`
writes it (``hypothesis`` is read as the report; other keys are ignored, so the callback's stored
labels are not reused: every report is labelled again by the labeler named here). Blank lines are
skipped. References come from the lines' ``reference`` strings, scored as written (amrg's files hold
the cleaned text), or from an annotation file's split cleaned with the dataset's rules
(:func:`~amrg.data.cleaning.get_cleaner`, as the data modules do); then the lines' ``reference`` is
ignored and every study of the split needs a prediction.

Studies are scored in id order, so a file's line order does not change any number, and a callback
file scores exactly what the callback logged. Every bad input raises :class:`EvalInputError` with
a one-line message naming the file and the line or id.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from amrg.errors import InputError

if (
    TYPE_CHECKING
):  # the scoring modules import torch(metrics): loaded once the inputs have passed their checks
    from amrg.metrics.bootstrap import Difference, Interval
    from amrg.metrics.clinical import ReportLabeler
    from amrg.metrics.study_stats import StudyStats

__all__ = [
    "EvalInputError",
    "EvalResult",
    "PredictionFile",
    "SystemResult",
    "evaluate_files",
    "read_predictions",
    "read_references",
]

log = logging.getLogger(__name__)

_REPORT_KEYS = ("report", "hypothesis")


class EvalInputError(InputError):
    """A predictions, annotation or option problem; the message is one line naming the file and record."""


@dataclass(frozen=True)
class PredictionFile:
    """One predictions JSONL, read and checked."""

    path: Path
    reports: dict[str, str]
    """id -> generated report."""
    references: dict[str, str]
    """id -> the line's ``reference``, for the lines that have one."""
    lines: dict[str, int]
    """id -> 1-based line number."""


@dataclass(frozen=True)
class SystemResult:
    """One system's scores: the full-set values with their bootstrap intervals."""

    path: Path
    intervals: dict[str, Interval]


@dataclass(frozen=True)
class EvalResult:
    """Everything ``amrg eval`` reports."""

    ids: tuple[str, ...]
    """The scored study ids, in scoring order."""
    systems: dict[str, SystemResult]
    """``"A"`` (the predictions) and, with a comparison, ``"B"``."""
    difference: dict[str, Difference] | None
    """A - B per score, with ``compare``; else None."""
    labeler: str | None
    """The labeler's name (``ce`` on), else None."""
    meteor: bool
    references: dict[str, Any]
    """Where the references came from: ``{"source": "inline"}`` or the annotation, split and cleaning."""
    resamples: int
    seed: int
    confidence: float
    stats: dict[str, StudyStats] = field(default_factory=dict, repr=False)
    """The per-study statistics per system (for callers that want more resamples or other tests)."""


def _where(path: Path, line: int, sid: str | None = None) -> str:
    return f"{path}:{line}" + (f" id={sid!r}" if sid is not None else "")


def read_predictions(path: Path) -> PredictionFile:
    """Read a predictions JSONL (format in the module docstring).

    Raises:
        EvalInputError: a missing or unreadable file, an empty file, a line that is not a JSON object,
            a missing or empty id, a line without a ``report``/``hypothesis`` string, a ``reference``
            that is not a non-empty string, or a repeated id.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(
            f"{path}: predictions file not found" if not path.exists() else f"{path}: not a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise EvalInputError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    reports: dict[str, str] = {}
    references: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalInputError(
                f"{_where(path, number)}: not JSON ({err.msg} at column {err.colno})"
            ) from None
        if not isinstance(record, dict):
            raise EvalInputError(
                f"{_where(path, number)}: expected a JSON object with 'id' and 'report', found {type(record).__name__}"
            )
        sid = record.get("id")
        if isinstance(sid, int) and not isinstance(sid, bool):
            sid = str(sid)
        if not isinstance(sid, str) or not sid.strip():
            raise EvalInputError(f"{_where(path, number)}: 'id' is missing or not a non-empty string")
        given = {k: record[k] for k in _REPORT_KEYS if k in record}
        report = given.get("report", given.get("hypothesis"))
        if not isinstance(report, str) or any(not isinstance(v, str) or v != report for v in given.values()):
            found = ", ".join(f"{k}={v!r:.40}" for k, v in given.items()) or "neither"
            raise EvalInputError(
                f"{_where(path, number, sid)}: expected a 'report' (or 'hypothesis') string, found {found}"
            )
        if sid in reports:
            raise EvalInputError(f"{_where(path, number, sid)}: duplicate id (first on line {lines[sid]})")
        if "reference" in record:
            ref = record["reference"]
            if not isinstance(ref, str) or not ref.strip():
                raise EvalInputError(
                    f"{_where(path, number, sid)}: 'reference' must be a non-empty string, found {ref!r:.40}"
                )
            references[sid] = ref
        reports[sid] = report
        lines[sid] = number
    if not reports:
        raise EvalInputError(f"{path}: empty file; expected one JSON object per line with 'id' and 'report'")
    return PredictionFile(path, reports, references, lines)


def read_references(annotation: Path, split: str, cleaning: str) -> dict[str, str]:
    """The cleaned reference report of every study of one split of an annotation file.

    Args:
        annotation: an R2Gen ``annotation.json`` (:mod:`amrg.data.schema`).
        split: ``train``, ``val`` or ``test``.
        cleaning: ``iu_xray``, ``mimic_cxr`` or ``none`` (the data module's rules for that dataset).

    Raises:
        EvalInputError: the file is missing or invalid (the first problem and how many more), or has
            no such split, or the cleaning is unknown.
    """
    from amrg.data.cleaning import get_cleaner
    from amrg.data.schema import AnnotationError, load_annotation

    try:
        clean = get_cleaner(cleaning)  # type: ignore[arg-type]
    except ValueError as err:
        raise EvalInputError(f"--cleaning: {err}") from None
    try:
        studies = load_annotation(annotation, splits=[split])[split]
    except FileNotFoundError:
        raise EvalInputError(f"{annotation}: annotation file not found (--annotation)") from None
    except AnnotationError as err:
        more = (
            f" (and {len(err.problems) - 1} more; see `amrg data check {annotation}`)"
            if len(err.problems) > 1
            else ""
        )
        raise EvalInputError(f"{annotation}: {err.problems[0]}{more}") from None
    if not studies:
        raise EvalInputError(f"{annotation}: split {split!r} holds no studies")
    return {s.id: clean(s.report) for s in studies}


def _references_for(pred: PredictionFile, annotated: Mapping[str, str] | None, source: str) -> dict[str, str]:
    """Each prediction id's reference, checking that ids and references line up."""
    if annotated is None:
        for sid, line in pred.lines.items():
            if sid not in pred.references:
                raise EvalInputError(
                    f"{_where(pred.path, line, sid)}: no 'reference' (put one in every line, or give --annotation)"
                )
        return dict(pred.references)
    for sid, line in pred.lines.items():
        if sid not in annotated:
            raise EvalInputError(
                f"{_where(pred.path, line, sid)}: id not in {source}; no reference to score against"
            )
    missing = [sid for sid in annotated if sid not in pred.reports]
    if missing:
        raise EvalInputError(
            f"{pred.path}: {len(missing)} of the {len(annotated)} studies of {source} have no prediction "
            f"(e.g. id={missing[0]!r}); scores on part of a split are not comparable"
        )
    return {sid: annotated[sid] for sid in pred.reports}


def _check_pair(a: PredictionFile, b: PredictionFile, refs_a: Mapping[str, str], inline: bool) -> None:
    """B must hold the same studies as A, with the same references where both files carry them."""
    for sid, line in b.lines.items():
        if sid not in a.reports:
            raise EvalInputError(
                f"{_where(b.path, line, sid)}: id not in {a.path}; a paired comparison needs the same studies"
            )
    for sid in a.reports:
        if sid not in b.reports:
            raise EvalInputError(
                f"{b.path}: no prediction for id={sid!r} (line {a.lines[sid]} of {a.path}); "
                "a paired comparison needs the same studies"
            )
        if inline and sid in b.references and b.references[sid] != refs_a[sid]:
            raise EvalInputError(
                f"{_where(b.path, b.lines[sid], sid)}: 'reference' differs from line {a.lines[sid]} of {a.path}; "
                "both systems must be scored against the same references"
            )


def _build_labeler(name: str, weights: Path | None, tokenizer: Path | None) -> ReportLabeler:
    from amrg.labeling import build_labeler

    try:
        return build_labeler(name, chexbert_weights=weights, chexbert_tokenizer=tokenizer)  # type: ignore[arg-type]
    except (OSError, ValueError) as err:
        raise EvalInputError(f"--labeler {name}: {' '.join(str(err).split())}") from None


def _labeler_name(labeler: Any) -> str:
    return str(getattr(labeler, "name", type(labeler).__name__))


def evaluate_files(
    predictions: Path,
    compare: Path | None = None,
    annotation: Path | None = None,
    split: Literal["train", "val", "test"] = "test",
    cleaning: Literal["iu_xray", "mimic_cxr", "none"] | None = None,
    meteor: bool = True,
    ce: bool = True,
    labeler: Literal["chexpert", "chexbert"] | ReportLabeler = "chexpert",
    chexbert_weights: Path | None = None,
    chexbert_tokenizer: Path | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> EvalResult:
    """Score a predictions file (and compare it with another) with bootstrap intervals.

    Args:
        predictions: system A's predictions JSONL.
        compare: system B's predictions JSONL for the paired comparison A - B.
        annotation: take references from this annotation file instead of the lines' ``reference``.
        split: the annotation's split.
        cleaning: the report cleaning of the annotation's dataset (needed with ``annotation``).
        meteor: score METEOR (needs Java).
        ce: score clinical efficacy.
        labeler: ``chexpert`` (rule-based, offline), ``chexbert`` (needs ``chexbert_weights``), or a
            labeler object (anything with ``label_batch``; its ``name``, else its class name, is reported).
        chexbert_weights: CheXbert ``chexbert.pth``.
        chexbert_tokenizer: bert-base-uncased's ``vocab.txt`` or tokenizer folder (default: beside the weights).
        resamples: bootstrap resamples.
        seed: seed of the resampled study indices.
        confidence: interval coverage.

    Raises:
        EvalInputError: any bad input or option (one line).
    """
    if resamples < 1:
        raise EvalInputError(f"--resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise EvalInputError(f"--confidence must be in (0, 1), got {confidence}")
    if annotation is not None and cleaning is None:
        raise EvalInputError(
            "--annotation needs --cleaning, the data module's rules for that dataset: iu_xray (IU X-ray), "
            "mimic_cxr (MIMIC-CXR, CheXpert Plus, synthetic) or none"
        )
    if annotation is None and cleaning is not None:
        raise EvalInputError(
            "--cleaning applies to --annotation references; inline references are scored as written"
        )
    named = isinstance(labeler, str)
    if labeler != "chexbert" and (chexbert_weights is not None or chexbert_tokenizer is not None):
        raise EvalInputError("--chexbert_weights/--chexbert_tokenizer need --labeler chexbert")
    if labeler == "chexbert" and chexbert_weights is None:
        raise EvalInputError(
            "--labeler chexbert needs --chexbert_weights PATH (the chexbert.pth of stanfordmlgroup/CheXbert)"
        )
    if meteor and shutil.which("java") is None:
        raise EvalInputError(
            "METEOR needs a Java runtime ('java' on PATH) for pycocoevalcap's meteor-1.5.jar; install Java 8+ "
            "or pass --no_meteor"
        )

    a = read_predictions(predictions)
    b = read_predictions(compare) if compare is not None else None
    if annotation is not None:
        source = f"{annotation} split {split!r}"
        annotated = read_references(annotation, split, cleaning)  # type: ignore[arg-type]
        references_info: dict[str, Any] = {
            "source": "annotation",
            "annotation": str(annotation),
            "split": split,
            "cleaning": cleaning,
        }
    else:
        source, annotated = "", None
        references_info = {"source": "inline", "field": "reference"}
    refs = _references_for(a, annotated, source)
    if b is not None:
        _check_pair(a, b, refs, inline=annotated is None)

    from amrg.metrics.bootstrap import bootstrap_intervals, paired_bootstrap
    from amrg.metrics.study_stats import study_stats

    ids = tuple(sorted(refs))
    ref_texts = [refs[i] for i in ids]
    files = {"A": a} if b is None else {"A": a, "B": b}
    hyps = {name: [f.reports[i] for i in ids] for name, f in files.items()}
    labels: dict[str, Any] = {}
    labeler_name = None
    if ce:
        reader = _build_labeler(labeler, chexbert_weights, chexbert_tokenizer) if named else labeler
        labeler_name = _labeler_name(reader)
        # each distinct text once: a labeler reads every report on its own
        texts = list(dict.fromkeys([*ref_texts, *(h for name in files for h in hyps[name])]))
        log.info("labelling %d distinct reports with %s", len(texts), labeler_name)
        read = reader.label_batch(texts)
        if len(read) != len(texts):
            raise ValueError(f"labeler {labeler_name} returned {len(read)} rows for {len(texts)} reports")
        rows = dict(zip(texts, read))
        labels["ref"] = [rows[t] for t in ref_texts]
        for name in files:
            labels[name] = [rows[t] for t in hyps[name]]

    stats = {
        name: study_stats(
            hyps[name],
            ref_texts,
            hyp_labels=labels.get(name),
            ref_labels=labels.get("ref"),
            meteor=meteor,
        )
        for name in files
    }
    systems = {
        name: SystemResult(files[name].path, bootstrap_intervals(stats[name], resamples, seed, confidence))
        for name in files
    }
    difference = (
        paired_bootstrap(stats["A"], stats["B"], resamples, seed, confidence) if b is not None else None
    )
    return EvalResult(
        ids=ids,
        systems=systems,
        difference=difference,
        labeler=labeler_name,
        meteor=meteor,
        references=references_info,
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        stats=stats,
    )
