"""Annotation loading and validation (R2Gen ``annotation.json`` schema).

``{"train"|"val"|"test": [{"id", "report", "image_path": [...], "split"?, "labels"?, "boxes"?}]}``

- ``image_path``: 1..V paths relative to the image root (a single string is read as one view).
- ``labels`` (optional): 14 values in CheXbert order (:data:`amrg.labels.LABELS`), each 1, 0, -1
  (uncertain) or null (not mentioned).
- ``boxes`` (optional, synthetic data): ``[{"label": name, "view": int, "box": [x0, y0, x1, y1]}]``
  in pixels of that view's image.

The whole file is validated up front and every problem is reported at once; each message names
the file, split, index, id and field.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from amrg.errors import InputError, reading
from amrg.labels import LABELS, NUM_LABELS

__all__ = ["SPLITS", "Annotation", "AnnotationError", "SignBox", "Study", "load_annotation"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
_LABEL_VALUES = {1, 0, -1}
_MAX_LISTED = 25
_OK_LABEL_TYPES = frozenset({int, type(None)})
_OK_LABEL_VALUES = frozenset({1, 0, -1, None})


class AnnotationError(InputError):
    """An annotation file failed validation; ``problems`` lists every message."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(
            f"{path}: {len(problems)} problem(s) in the annotation:\n  " + "\n  ".join(shown) + more
        )


@dataclass(frozen=True, slots=True)
class SignBox:
    """Where a label's sign is drawn (synthetic data): pixel box ``(x0, y0, x1, y1)`` in one view."""

    label: str
    view: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class Study:
    """One study: its views, raw report and optional labels and sign boxes."""

    id: str
    report: str
    image_paths: tuple[str, ...]
    split: str
    labels: tuple[int | None, ...] | None = None
    boxes: tuple[SignBox, ...] = ()


@dataclass
class Annotation:
    """A validated annotation file: studies per split."""

    path: Path
    splits: dict[str, list[Study]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Study]:
        if split not in self.splits:
            raise KeyError(f"{self.path}: no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]

    def __iter__(self) -> Iterator[Study]:
        for studies in self.splits.values():
            yield from studies

    def ids(self, splits: Iterable[str]) -> set[str]:
        """All study ids of the given splits (used by the memory leakage guard)."""
        return {s.id for name in splits for s in self.splits.get(name, [])}

    def counts(self) -> dict[str, int]:
        return {name: len(studies) for name, studies in self.splits.items()}


def _where(path: Path, split: str, index: int, rec_id: object) -> str:
    return f"{path.name}: {split}[{index}] id={rec_id!r}"


def _parse_labels(raw: object, where: str, problems: list[str]) -> tuple[int | None, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        problems.append(
            f"{where}: field 'labels' must be a list of {NUM_LABELS} values, got {type(raw).__name__}"
        )
        return None
    if len(raw) != NUM_LABELS:
        problems.append(
            f"{where}: field 'labels' has {len(raw)} values, expected {NUM_LABELS} (CheXbert order: "
            f"{', '.join(LABELS)})"
        )
        return None
    out: list[int | None] = []
    for j, v in enumerate(raw):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, int | float) or v not in _LABEL_VALUES:
            problems.append(
                f"{where}: field 'labels'[{j}] ({LABELS[j]}) is {v!r}; expected 1, 0, -1 (uncertain) or null"
            )
            return None
        else:
            out.append(int(v))
    return tuple(out)


def _parse_boxes(raw: object, n_views: int, where: str, problems: list[str]) -> tuple[SignBox, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"{where}: field 'boxes' must be a list, got {type(raw).__name__}")
        return ()
    boxes = []
    for j, b in enumerate(raw):
        ok = (
            isinstance(b, dict)
            and b.get("label") in LABELS
            and isinstance(b.get("view", 0), int)
            and 0 <= b.get("view", 0) < n_views
            and isinstance(b.get("box"), list)
            and len(b["box"]) == 4
            and all(isinstance(x, int | float) for x in b["box"])
            and b["box"][0] <= b["box"][2]
            and b["box"][1] <= b["box"][3]
        )
        if not ok:
            problems.append(
                f"{where}: field 'boxes'[{j}] is {b!r}; expected {{'label': one of the 14 labels, "
                f"'view': 0..{n_views - 1}, 'box': [x0, y0, x1, y1] with x0<=x1, y0<=y1}}"
            )
            continue
        boxes.append(SignBox(b["label"], int(b.get("view", 0)), tuple(float(x) for x in b["box"])))
    return tuple(boxes)


class _Compact(tuple):
    """A record that passed the fast checks while the JSON was parsed: (id, report, paths,
    split field, labels). Building these inside the JSON decoder keeps the raw dicts of a
    MIMIC-size file (~276k studies) from ever being in memory all at once."""


def _compact_hook(label_cache: dict):
    def hook(rec: dict) -> object:
        if "image_path" not in rec or "boxes" in rec:
            return rec
        rec_id, report, paths = rec.get("id"), rec.get("report"), rec.get("image_path")
        if not (type(rec_id) is str and rec_id and not rec_id.isspace()):
            return rec
        if not (type(report) is str and report and not report.isspace()):
            return rec
        if (
            type(paths) is not list
            or not paths
            or not all(type(p) is str and p and not p.isspace() for p in paths)
        ):
            return rec
        labels = rec.get("labels")
        if labels is not None:
            if (
                type(labels) is not list
                or len(labels) != NUM_LABELS
                or not _OK_LABEL_TYPES.issuperset(map(type, labels))
                or not _OK_LABEL_VALUES.issuperset(labels)
            ):
                return rec
            labels = tuple(labels)
            labels = label_cache.setdefault(labels, labels)  # identical label vectors share one tuple
        return _Compact((rec_id, report, tuple(paths), rec.get("split"), labels))

    return hook


def _expand(rec: _Compact) -> dict:
    rec_id, report, paths, rec_split, labels = rec
    return {
        "id": rec_id,
        "report": report,
        "image_path": list(paths),
        "split": rec_split,
        "labels": None if labels is None else list(labels),
    }


def _parse_record(rec: object, path: Path, split: str, index: int, problems: list[str]) -> Study | None:
    if not isinstance(rec, dict):
        problems.append(
            f"{path.name}: {split}[{index}]: a record must be an object, got {type(rec).__name__}"
        )
        return None
    rec_id = rec.get("id")
    where = _where(path, split, index, rec_id)
    before = len(problems)
    if not isinstance(rec_id, str | int) or isinstance(rec_id, bool) or str(rec_id).strip() == "":
        problems.append(f"{where}: field 'id' is missing or empty")
    report = rec.get("report")
    if not isinstance(report, str):
        problems.append(f"{where}: field 'report' is missing or not a string")
    elif not report.strip():
        problems.append(f"{where}: field 'report' is empty")
    paths = rec.get("image_path")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths:
        problems.append(
            f"{where}: field 'image_path' is missing or empty; expected a list of 1+ relative paths"
        )
        paths = []
    elif not all(isinstance(p, str) and p.strip() for p in paths):
        problems.append(f"{where}: field 'image_path' has a non-string or empty entry: {paths!r}")
    rec_split = rec.get("split")
    if rec_split is not None and rec_split != split:
        problems.append(f"{where}: field 'split' is {rec_split!r} but the record is listed under {split!r}")
    labels = _parse_labels(rec.get("labels"), where, problems)
    boxes = _parse_boxes(rec.get("boxes"), max(len(paths), 1), where, problems)
    if len(problems) > before:
        return None
    return Study(str(rec_id), report, tuple(paths), split, labels, boxes)


def _decode_problem(err: UnicodeDecodeError) -> str:
    """Where a non-UTF-8 byte sits: line and column, and the split and record id around it when found."""
    data = bytes(err.object)
    offset = err.start
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    where = f"line {line}, column {column}"
    before = data[:offset]
    # The record is the last "id" before the byte, unless a record has opened since ("{" after it); the
    # split is the last split key opening a list. Both read from the raw bytes: a cheap guess, said as one.
    splits = list(re.finditer(rb'"(train|val|test)"\s*:\s*\[', before))
    ids = list(re.finditer(rb'"id"\s*:\s*("(?:[^"\\\n]|\\.){0,200}"|-?\d+)', before))
    context = []
    if splits:
        context.append(f"split {splits[-1].group(1).decode()!r}")
    if ids and b"}" not in before[ids[-1].end() :]:
        context.append(f"record id={ids[-1].group(1).decode('utf-8', 'replace').strip(chr(34))!r}")
    inside = f" ({', '.join(context)})" if context else ""
    return (
        f"not UTF-8 text at {where}{inside}: byte {data[offset : offset + 1].hex()} ({err.reason}); "
        "save the file as UTF-8"
    )


def load_annotation(path: str | Path, splits: Iterable[str] | None = None) -> Annotation:
    """Read and validate an annotation file.

    Args:
        path: the ``annotation.json``.
        splits: splits to keep (default: all present). Leakage is checked over every split in the file.

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationError: malformed JSON, an unknown split name, a bad record, a duplicate id within
            a split or an id in two splits; the message lists every problem found.
    """
    path = Path(path)
    if path.is_dir():
        raise AnnotationError(
            path,
            [f"{path.name}: is a folder; expected the annotation.json file (set data.init_args.annotation)"],
        )
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found (set data.init_args.annotation)")
    # Hundreds of thousands of new objects would trigger repeated full cyclic-GC passes; none of
    # them can form a cycle, so collection is paused while they are built.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(path, splits)
    finally:
        if gc_was_enabled:
            gc.enable()


def _load(path: Path, splits: Iterable[str] | None) -> Annotation:
    try:
        with reading(path, "annotation"):  # a file that cannot be opened (permissions)
            f = path.open("rb")
        with f:
            raw = json.load(f, object_hook=_compact_hook({}))
    except json.JSONDecodeError as e:
        if not e.doc.strip():
            raise AnnotationError(
                path, [f"{path.name}: the file is empty; expected a JSON object of splits"]
            ) from None
        raise AnnotationError(
            path, [f"{path.name}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"]
        ) from None
    except UnicodeDecodeError as e:
        raise AnnotationError(path, [f"{path.name}: {_decode_problem(e)}"]) from None
    if not isinstance(raw, dict):
        raise AnnotationError(path, [f"{path.name}: top level must be an object of splits {list(SPLITS)}"])
    problems: list[str] = []
    unknown = [k for k in raw if k not in SPLITS]
    if unknown:
        problems.append(f"{path.name}: unknown split name(s) {unknown}; expected {list(SPLITS)}")
    annotation = Annotation(path)
    seen: dict[str, str] = {}
    for split in SPLITS:
        if split not in raw:
            continue
        records = raw[split]
        if not isinstance(records, list):
            problems.append(
                f"{path.name}: split {split!r} must be a list of records, got {type(records).__name__}"
            )
            continue
        studies = []
        # Records are released as they are converted, so the raw JSON and the studies are never
        # both whole in memory (MIMIC-CXR: ~276k studies).
        records.reverse()
        i = -1
        while records:
            rec = records.pop()
            i += 1
            if type(rec) is _Compact and rec[3] in (None, split):
                study = Study(rec[0], rec[1], rec[2], split, rec[4])
            else:
                study = _parse_record(
                    dict(_expand(rec)) if type(rec) is _Compact else rec, path, split, i, problems
                )
            if study is None:
                continue
            first = seen.get(study.id)
            if first == split:
                problems.append(f"{_where(path, split, i, study.id)}: duplicate id within split {split!r}")
            elif first is not None:
                problems.append(
                    f"{_where(path, split, i, study.id)}: id also in split {first!r} (train/eval leakage)"
                )
            else:
                seen[study.id] = split
            studies.append(study)
        annotation.splits[split] = studies
    if problems:
        raise AnnotationError(path, problems)
    if splits is not None:
        keep = list(splits)
        missing = [s for s in keep if s not in annotation.splits]
        if missing:
            raise AnnotationError(path, [f"{path.name}: requested split(s) {missing} not in the file"])
        annotation.splits = {s: annotation.splits[s] for s in keep}
    return annotation
