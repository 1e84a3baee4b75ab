"""``amrg eval`` results as a Markdown table and a JSON file, written without overwriting anyone's files.

The table shows the headline protocols; the JSON holds every score (all 36 CE keys) with its interval.
CE protocols by name (keys as in :mod:`amrg.metrics.clinical`):

- ``ce14_micro_u0``: R2Gen-style micro P/R/F1 over the 14 labels, uncertain counted as negative (the
  "CE F1" of most MIMIC-CXR papers).
- ``ce14_macro_u0``: per-label P/R/F1 averaged over the 14 labels, uncertain as negative.
- ``ce14_example_u0``: example-based (PromptMRG-style): P/R/F1 per study over the 14 labels, averaged
  over studies, uncertain as negative.
- ``ce5_micro_u1`` / ``ce5_macro_u1``: the 5 labels Atelectasis, Cardiomegaly, Consolidation, Edema,
  Pleural Effusion, uncertain counted as positive.

Output files: ``<stem>.eval.json`` and ``<stem>.eval.md`` (stem: the predictions file's name without
its suffix, ``<A>.vs.<B>`` with a comparison) in ``--out`` or next to the predictions. A file that
already exists is replaced only if ``amrg eval`` wrote it (its marker is checked); an input file is
never a target. Files are written to a temporary name in the folder and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amrg.labels import COMMON5
from amrg.metrics.evaluate import EvalInputError, EvalResult

if TYPE_CHECKING:
    from amrg.metrics.bootstrap import Difference, Interval

__all__ = [
    "CE_PROTOCOLS",
    "MARKER",
    "NLG_ROWS",
    "check_targets",
    "markdown_table",
    "output_paths",
    "result_json",
    "write_outputs",
]

MARKER = "amrg eval"
"""``written_by`` of the JSON and the first line of the Markdown: files that may be replaced."""
_MD_FIRST_LINE = f"<!-- written by {MARKER}; it replaces this file when run again -->"

NLG_ROWS: tuple[tuple[str, str], ...] = (
    ("BLEU-1", "bleu1"),
    ("BLEU-2", "bleu2"),
    ("BLEU-3", "bleu3"),
    ("BLEU-4", "bleu4"),
    ("METEOR", "meteor"),
    ("ROUGE-L", "rouge_l"),
    ("CIDEr", "cider"),
)
"""Table label -> score key of the NLG rows."""

CE_PROTOCOLS: dict[str, dict[str, str]] = {
    "ce14_micro_u0": {
        "label": "CE-14 micro",
        "average": "micro",
        "label_set": "14",
        "uncertain": "u0",
        "description": "R2Gen-style: TP/FP/FN pooled over studies and the 14 labels; uncertain counted as negative",
    },
    "ce14_macro_u0": {
        "label": "CE-14 macro",
        "average": "macro",
        "label_set": "14",
        "uncertain": "u0",
        "description": "R2Gen-style: P/R/F1 per label, unweighted mean over the 14 labels; uncertain counted as negative",
    },
    "ce14_example_u0": {
        "label": "CE-14 example",
        "average": "example",
        "label_set": "14",
        "uncertain": "u0",
        "description": "example-based (PromptMRG-style): P/R/F1 per study over the 14 labels, mean over studies; "
        "uncertain counted as negative",
    },
    "ce5_micro_u1": {
        "label": "CE-5 micro (u1)",
        "average": "micro",
        "label_set": "5",
        "uncertain": "u1",
        "description": f"TP/FP/FN pooled over studies and the 5 labels {', '.join(COMMON5)}; uncertain counted as positive",
    },
    "ce5_macro_u1": {
        "label": "CE-5 macro (u1)",
        "average": "macro",
        "label_set": "5",
        "uncertain": "u1",
        "description": f"P/R/F1 per label, mean over the 5 labels {', '.join(COMMON5)}; uncertain counted as positive",
    },
}
"""Named CE protocols shown in the table; every key also names its protocol (``ce/micro_f1/14/u0``)."""

_STAT_SHORT = {"precision": "P", "recall": "R", "f1": "F1"}


def _rows(keys: set[str]) -> list[tuple[str, str]]:
    from amrg.metrics.clinical import CE_STATS, ce_key

    rows = [(label, key) for label, key in NLG_ROWS if key in keys]
    for proto in CE_PROTOCOLS.values():
        for stat in CE_STATS:
            key = ce_key(proto["average"], stat, proto["label_set"], proto["uncertain"])
            if key in keys:
                rows.append((f"{proto['label']} {_STAT_SHORT[stat]}", key))
    return rows


def _iv(x: Interval) -> str:
    return f"{x.value:.4f} [{x.low:.4f}, {x.high:.4f}]"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def markdown_table(result: EvalResult) -> str:
    """The headline scores as a Markdown table, with a few lines saying what was scored and how."""
    a = result.systems["A"]
    pct = f"{result.confidence * 100:g} %"
    refs = result.references
    source = (
        "the lines' `reference`"
        if refs["source"] == "inline"
        else f"`{refs['annotation']}` split {refs['split']}, cleaned with `{refs['cleaning']}`"
    )
    head = [
        _MD_FIRST_LINE,
        "",
        f"**{len(result.ids)} studies**; references: {source}; labeler: "
        f"{'`' + result.labeler + '`' if result.labeler else 'none (CE off)'}; METEOR {'on' if result.meteor else 'off'}.  ",
        f"[{pct} CI]: percentile bootstrap over studies, {result.resamples} resamples, seed {result.seed}"
        + (
            f"; p: two-sided paired bootstrap (the JSON's `bootstrap.p_value`), at least "
            f"2/(R+1) = {2 / (result.resamples + 1):.4f}."
            if result.difference
            else "."
        ),
        "",
    ]
    rows = _rows(set(a.intervals))
    if result.difference is None:
        lines = [f"| metric | `{a.path.name}` [{pct} CI] |", "|---|---|"]
        lines += [f"| {label} | {_iv(a.intervals[key])} |" for label, key in rows]
    else:
        b = result.systems["B"]
        lines = [
            f"| metric | A: `{a.path.name}` [{pct} CI] | B: `{b.path.name}` [{pct} CI] | A − B [{pct} CI] | p |",
            "|---|---|---|---|---|",
        ]
        for label, key in rows:
            if key not in result.difference:
                continue
            d: Difference = result.difference[key]
            lines.append(
                f"| {label} | {_iv(a.intervals[key])} | {_iv(b.intervals[key])} | "
                f"{d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | {_p(d.p_value)} |"
            )
    return "\n".join(head + lines) + "\n"


def result_json(result: EvalResult) -> dict[str, Any]:
    """Every score with its interval (and differences), plus what was scored and how."""
    from amrg.metrics import bootstrap
    from amrg.metrics.clinical import CE_STATS, ce_key
    from amrg.metrics.study_stats import RESAMPLING

    doc = bootstrap.__doc__ or ""
    p_definition = doc[doc.index("- two-sided p-value") :].strip() if "- two-sided p-value" in doc else ""
    protocols = {
        name: {
            "description": proto["description"],
            "keys": {
                stat: ce_key(proto["average"], stat, proto["label_set"], proto["uncertain"])
                for stat in CE_STATS
            },
        }
        for name, proto in CE_PROTOCOLS.items()
    }
    out: dict[str, Any] = {
        "written_by": MARKER,
        "num_studies": len(result.ids),
        "references": result.references,
        "labeler": result.labeler,
        "meteor": result.meteor,
        "bootstrap": {
            "unit": "study",
            "resamples": result.resamples,
            "seed": result.seed,
            "confidence": result.confidence,
            "interval": "percentile (numpy.quantile, linear) of the resampled scores",
            "p_value": " ".join(p_definition.replace("::", ":").split()),
            "resampling": dict(RESAMPLING),
        },
        "protocols": protocols,
        "systems": {
            name: {
                "path": str(system.path),
                "metrics": {
                    k: {"value": v.value, "low": v.low, "high": v.high} for k, v in system.intervals.items()
                },
            }
            for name, system in result.systems.items()
        },
    }
    if result.difference is not None:
        out["difference"] = {
            k: {"a": d.a, "b": d.b, "value": d.value, "low": d.low, "high": d.high, "p_value": d.p_value}
            for k, d in result.difference.items()
        }
    return out


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def output_paths(
    predictions: Path, compare: Path | None = None, out: Path | None = None
) -> tuple[Path, Path]:
    """The JSON and Markdown files ``amrg eval`` writes (names in the module docstring)."""
    stem = _stem(Path(predictions)) + (f".vs.{_stem(Path(compare))}" if compare is not None else "")
    folder = Path(out) if out is not None else Path(predictions).parent
    return folder / f"{stem}.eval.json", folder / f"{stem}.eval.md"


def _ours(path: Path) -> bool:
    """Whether an existing file was written by amrg eval (so it may be replaced)."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8")).get("written_by") == MARKER
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == _MD_FIRST_LINE
    except (OSError, ValueError, AttributeError):
        return False


def check_targets(targets: list[Path], inputs: list[Path]) -> None:
    """Refuse targets that are inputs, or existing files amrg eval did not write.

    Raises:
        EvalInputError: naming the first such target.
    """
    given = {Path(p).resolve() for p in inputs if p is not None}
    for target in targets:
        if target.resolve() in given:
            raise EvalInputError(
                f"{target}: is an input of this run; refusing to overwrite it (choose another --out)"
            )
        if target.exists() and (not target.is_file() or not _ours(target)):
            raise EvalInputError(
                f"{target}: exists and was not written by {MARKER}; refusing to overwrite it (choose another --out)"
            )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"  # opened as usual: the user's umask mode
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(result: EvalResult, json_path: Path, md_path: Path, inputs: list[Path]) -> None:
    """Write the JSON and the Markdown table (checked with :func:`check_targets` first).

    Raises:
        EvalInputError: a target is an input, or a file amrg eval did not write, or cannot be written.
    """
    check_targets([json_path, md_path], inputs)
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(json_path, json.dumps(result_json(result), indent=2) + "\n")
        _write_atomic(md_path, markdown_table(result))
    except OSError as err:
        raise EvalInputError(
            f"{json_path.parent}: cannot write the results ({err.strerror or err})"
        ) from None
