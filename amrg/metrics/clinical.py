"""Clinical efficacy (CE): precision, recall and F1 of the findings a labeler reads off reports.

A CheXpert-style labeler reads the 14 labels (:data:`amrg.labels.LABELS`, CheXbert order) off the
generated and off the reference report; each value is 1 (positive), 0 (negative), -1 (uncertain)
or None (not mentioned). The reference's labels are the truth. Every score's name says its
protocol, ``ce/{average}_{stat}/{label set}/{uncertain}``, e.g. ``ce/micro_f1/14/u0``:

- uncertain: ``u0`` counts -1 as negative, ``u1`` counts it as positive. 0 and None are negative
  in both; only 1 (and -1 under ``u1``) is positive.
- label set: ``14`` is all labels (No Finding included), ``5`` is :data:`amrg.labels.COMMON5`.
- average, over reports i and labels l with TP/FP/FN counts:

  - ``micro``: pool TP, FP, FN over all reports and labels, then P = TP/(TP+FP), R = TP/(TP+FN),
    F1 = 2TP/(2TP+FP+FN). This is the "CE F1" most MIMIC-CXR papers report (14 labels, ``u0``).
  - ``macro``: P, R, F1 per label over the reports, then the unweighted mean over labels.
  - ``example``: P, R, F1 per report over its labels, then the mean over reports (sklearn's
    ``average="samples"``).

Edge cases follow scikit-learn's ``zero_division=0``: a ratio whose denominator is 0 is 0. So a
label that neither the references nor the hypotheses ever mark positive scores P = R = F1 = 0 and
still counts in the macro mean (which pulls macro scores down on small or skewed sets), and a
report with no positive label on either side scores 0 in the example average. F1 is computed as
2TP/(2TP+FP+FN), which equals the harmonic mean of P and R whenever both are defined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from amrg.labels import COMMON5, LABELS, NUM_LABELS, label_index
from amrg.metrics._gather import ReportTextMetric

__all__ = [
    "CE_AVERAGES",
    "CE_LABEL_SETS",
    "CE_STATS",
    "CE_UNCERTAIN",
    "ClinicalEfficacy",
    "ReportLabeler",
    "binarise_labels",
    "ce_key",
    "ce_scores",
    "precision_recall_f1",
]

log = logging.getLogger(__name__)

CE_AVERAGES: tuple[str, ...] = ("micro", "macro", "example")
CE_STATS: tuple[str, ...] = ("precision", "recall", "f1")
CE_LABEL_SETS: dict[str, tuple[int, ...]] = {
    "14": tuple(range(NUM_LABELS)),
    "5": tuple(label_index(name) for name in COMMON5),
}
"""Label-set name -> column indices into :data:`amrg.labels.LABELS`."""
CE_UNCERTAIN: dict[str, bool] = {"u0": False, "u1": True}
"""Uncertain-mapping name -> whether -1 counts as positive."""

LabelRow = list[int | None]


@runtime_checkable
class ReportLabeler(Protocol):
    """Anything that reads the 14 CheXpert labels off reports (e.g. ``amrg.labeling.CheXpertLabeler``)."""

    # Annotated `Any` on purpose: jsonargparse (which builds `labeler` from a config's class_path) only
    # accepts an implementation whose annotations equal the protocol's exactly, unless they are Any.
    def label_batch(self, reports: Any) -> Any:
        """Label reports: a sequence of N report strings -> N rows of 14 values (LABELS order, 1/0/-1/None)."""
        ...


def ce_key(average: str, stat: str, label_set: str, uncertain: str) -> str:
    """Name of one CE score, e.g. ``ce_key("micro", "f1", "14", "u0") == "ce/micro_f1/14/u0"``."""
    return f"ce/{average}_{stat}/{label_set}/{uncertain}"


def binarise_labels(rows: Sequence[Sequence[int | None]], uncertain_positive: bool) -> Tensor:
    """Turn labeler rows into positives.

    Args:
        rows: N rows of 14 values 1/0/-1/None.
        uncertain_positive: count -1 as positive (``u1``) instead of negative (``u0``).

    Returns:
        Bool tensor [N, 14]; True where the label is positive.
    """
    positive = {1, -1} if uncertain_positive else {1}
    flags = [[value is not None and value in positive for value in row] for row in rows]
    return torch.tensor(flags, dtype=torch.bool).reshape(len(rows), NUM_LABELS)  # [N, 14]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    # sklearn zero_division=0: 0 where the denominator is 0.
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def precision_recall_f1(pred: Tensor, true: Tensor) -> dict[str, float]:
    """Micro, macro and example-based precision, recall and F1 (zero_division=0).

    Args:
        pred: predicted positives, bool [N, L].
        true: reference positives, bool [N, L].

    Returns:
        ``{average}_{stat}`` -> value, for average in micro/macro/example and stat in precision/recall/f1.
    """
    if pred.shape != true.shape or pred.dim() != 2:
        raise ValueError(
            f"pred and true must both be [N, L]; got {tuple(pred.shape)} and {tuple(true.shape)}"
        )
    tp = (pred & true).double()  # [N, L]
    fp = (pred & ~true).double()  # [N, L]
    fn = (~pred & true).double()  # [N, L]
    out: dict[str, float] = {}
    for average, dims in (("micro", None), ("macro", 0), ("example", 1)):
        if dims is None:
            tp_s, fp_s, fn_s = tp.sum(), fp.sum(), fn.sum()  # scalars
        else:
            tp_s, fp_s, fn_s = tp.sum(dims), fp.sum(dims), fn.sum(dims)  # [L] (macro) or [N] (example)
        stats = {
            "precision": _ratio(tp_s, tp_s + fp_s),
            "recall": _ratio(tp_s, tp_s + fn_s),
            "f1": _ratio(2 * tp_s, 2 * tp_s + fp_s + fn_s),
        }
        for stat, value in stats.items():
            out[f"{average}_{stat}"] = float(value.mean()) if value.numel() else 0.0
    return out


def ce_scores(
    hyp_labels: Sequence[Sequence[int | None]], ref_labels: Sequence[Sequence[int | None]]
) -> dict[str, float]:
    """All CE scores: every average × statistic × label set × uncertain mapping.

    Args:
        hyp_labels: labels of the generated reports, N rows of 14 values 1/0/-1/None.
        ref_labels: labels of the reference reports, aligned with ``hyp_labels``.

    Returns:
        ``ce/{micro,macro,example}_{precision,recall,f1}/{14,5}/{u0,u1}`` -> value (36 scores).
    """
    if len(hyp_labels) != len(ref_labels):
        raise ValueError(
            f"ce_scores: got {len(hyp_labels)} hypothesis rows but {len(ref_labels)} reference rows"
        )
    out: dict[str, float] = {}
    for unc, positive in CE_UNCERTAIN.items():
        pred = binarise_labels(hyp_labels, positive)  # [N, 14]
        true = binarise_labels(ref_labels, positive)  # [N, 14]
        for set_name, cols in CE_LABEL_SETS.items():
            idx = torch.tensor(cols, dtype=torch.long)
            scores = precision_recall_f1(pred[:, idx], true[:, idx])  # columns [N, |set|]
            for average in CE_AVERAGES:
                for stat in CE_STATS:
                    out[ce_key(average, stat, set_name, unc)] = scores[f"{average}_{stat}"]
    return out


def _check_rows(rows: Any, ids: Sequence[str], which: str) -> list[LabelRow]:
    """Validate a labeler's output and normalise it to lists of 1/0/-1/None (NaN -> None)."""
    if len(rows) != len(ids):
        raise ValueError(
            f"labeler returned {len(rows)} rows for {len(ids)} {which} reports; expected one per report"
        )
    out: list[LabelRow] = []
    for sid, row in zip(ids, rows):
        row = list(row)
        if len(row) != NUM_LABELS:
            raise ValueError(
                f"labeler output for the {which} report of id={sid!r} has {len(row)} values; "
                f"expected {NUM_LABELS} in amrg.labels.LABELS order"
            )
        clean: LabelRow = []
        for name, value in zip(LABELS, row):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                clean.append(None)
            elif value in (1, 0, -1) and not isinstance(value, str):
                clean.append(int(value))
            else:
                raise ValueError(
                    f"labeler output for the {which} report of id={sid!r}, label {name!r}: "
                    f"expected 1, 0, -1 or None, found {value!r}"
                )
        out.append(clean)
    return out


class ClinicalEfficacy(ReportTextMetric):
    """CE precision, recall and F1 over all ranks' reports, labelled and scored once.

    ``update`` stores (id, hypothesis, reference) strings. ``compute`` gathers every rank's rows,
    drops repeated ids (the first copy is kept), sorts by id, and on rank 0 runs the labeler once on
    the hypotheses and once on the references, then :func:`ce_scores`; every rank gets the same
    values, and ``last_labels`` holds the label rows per id. See the module docstring for the
    protocols and the zero-division convention.

    Args:
        labeler: reads labels off reports (any object with ``label_batch``). ``None`` builds
            ``amrg.labeling.CheXpertLabeler()`` (rule-based, offline) at the first
            ``compute``, on rank 0 only.
    """

    def __init__(self, labeler: ReportLabeler | None = None) -> None:
        super().__init__()
        self.labeler = labeler
        self.last_labels: dict[str, dict[str, LabelRow]] = {}
        """id -> ``{"hyp": [14 values], "ref": [14 values]}`` from the last ``compute``."""

    def _get_labeler(self) -> ReportLabeler:
        if self.labeler is None:
            from amrg.labeling.chexpert import CheXpertLabeler  # heavy; only needed on the scoring rank

            self.labeler = CheXpertLabeler()
            log.info("ClinicalEfficacy: built the default labeler %s", type(self.labeler).__name__)
        return self.labeler

    def compute(self) -> dict[str, Tensor]:
        """Label and score the gathered reports (a collective under DDP: every rank must call it).

        Returns:
            Float64 scalar tensors keyed ``ce/{micro,macro,example}_{precision,recall,f1}/{14,5}/{u0,u1}``.
        """
        rows = self._gathered_rows()
        ids = [r[0] for r in rows]

        def score() -> dict[str, Any]:
            if not rows:
                log.warning("ClinicalEfficacy: no reports to score; every CE score is 0.0")
                return {"scores": ce_scores([], []), "hyp": [], "ref": []}
            labeler = self._get_labeler()
            hyp = _check_rows(labeler.label_batch([r[1] for r in rows]), ids, "generated")
            ref = _check_rows(labeler.label_batch([r[2] for r in rows]), ids, "reference")
            return {"scores": ce_scores(hyp, ref), "hyp": hyp, "ref": ref}

        result = self._on_rank_zero(score)
        self.last_labels = {sid: {"hyp": h, "ref": r} for sid, h, r in zip(ids, result["hyp"], result["ref"])}
        return {
            k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in result["scores"].items()
        }
