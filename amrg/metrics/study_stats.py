"""Per-study statistics from which every NLG and CE score of any multiset of studies follows.

A bootstrap resample is a multiset of the scored studies. Instead of calling the scorers on each
resample, :func:`study_stats` runs them once over the whole set, keeps what each study contributes,
and :meth:`StudyStats.scores_from` turns summed (or averaged) contributions back into scores.
For each score, this is what a study contributes and how exact the score of a resample is:

- BLEU-1..4 (pycocoevalcap corpus BLEU): the hypothesis length, the reference length, and per
  n-gram order the number of hypothesis n-grams and of clipped matches (``BleuScorer``'s own
  ``cook_test`` counts). A resample sums them and recomputes the precisions and the corpus brevity
  penalty with pycocoevalcap's formula, float operations in its order: **exact**, bit for bit what
  ``Bleu().compute_score`` returns for that multiset.
- METEOR (the 1.5 jar): the jar's 23 per-segment statistics (lengths, function words, matches per
  module, chunks), read once from the jar. A resample sums them and recomputes the score with the
  jar's ``MeteorScorer.computeMetrics`` formula and its language ``en`` defaults (alpha 0.85,
  beta 0.2, gamma 0.6, delta 0.75, module weights 1.0/0.6/0.8/0.6), including the jar's rule that a
  perfectly matched segment adds no chunks (``MeteorStats.addStats``): **exact** up to Java's
  ``Math.pow`` versus C's ``pow`` (at most one unit in the last place). The full-set value is checked
  against the jar's own aggregate when the statistics are read.
- ROUGE-L: each study's score; a resample takes their mean, which is what pycocoevalcap's
  ``Rouge`` does for that multiset: **exact**.
- CIDEr: each study's score from ``Cider().compute_score`` over the **full** set; a resample takes
  their mean. **Approximation**: the document frequencies (and the log reference count) stay those of
  the full set, whereas ``Cider`` run on the resample would count them over the resample's
  references (a study drawn twice would count twice). Measured on the 3,858 synthetic pairs of
  ``benchmarks/bootstrap_speed.py`` over 30 resamples: the approximation is off by at most 0.0056
  CIDEr (mean +0.0014), against a bootstrap standard deviation of 0.053.
- CE micro: per-study, per-label TP/FP/FN (after the ``u0``/``u1`` mapping); a resample sums them over
  studies and labels: **exact**. CE macro: the same counts summed per label, then P/R/F1 per label and
  the mean over the label set: **exact** (up to float summation order across labels). CE example:
  each study's P/R/F1 over the label set; a resample takes their mean: **exact** (same remark).

The labels themselves are read once per report; a resample reuses them (a labeler reads each report
on its own, so this is no approximation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from amrg.labels import NUM_LABELS
from amrg.metrics.clinical import (
    CE_LABEL_SETS,
    CE_STATS,
    CE_UNCERTAIN,
    binarise_labels,
    ce_key,
    ce_scores,
)
from amrg.metrics.nlg import NLG_KEYS, close_meteor, meteor_scorer, normalise_text

__all__ = [
    "METEOR_EN",
    "RESAMPLING",
    "StudyStats",
    "meteor_from_stats",
    "meteor_segment_stats",
    "study_stats",
]

log = logging.getLogger(__name__)

_BLEU_N = 4
# BLEU columns: testlen, reflen, guess_1..4, correct_1..4 (BleuScorer.cook_test)
_BLEU_COLS = 2 + 2 * _BLEU_N
# The jar's MeteorStats string: 4 lengths, 4 modules x (test content, ref content, test function,
# ref function) matches, chunks, test word matches, reference word matches.
_METEOR_COLS = 23
_METEOR_MODULES = 4

METEOR_EN: dict[str, float | tuple[float, ...]] = {
    "alpha": 0.85,
    "beta": 0.20,
    "gamma": 0.60,
    "delta": 0.75,
    "weights": (1.0, 0.6, 0.8, 0.6),
}
"""The METEOR 1.5 jar's parameters for ``-l en`` (task ``default``), as pycocoevalcap runs it."""

RESAMPLING: dict[str, str] = {
    "bleu": "exact: summed per-study n-gram counts and lengths, corpus brevity penalty recomputed per resample",
    "meteor": "exact up to Java's Math.pow vs C pow (1 ulp): summed per-segment jar statistics, jar formula "
    "(en defaults) recomputed per resample",
    "rouge_l": "exact: mean of per-study scores",
    "cider": "approximation: mean of per-study scores with the full set's document frequencies "
    "(not recounted on each resample)",
    "ce": "exact: summed per-study, per-label TP/FP/FN (micro, macro) and mean of per-study P/R/F1 (example); "
    "labels read once per report",
}
"""How each score of a resample is obtained (module docstring); written into ``amrg eval``'s JSON."""


@dataclass(frozen=True)
class StudyStats:
    """What each study contributes to each score, and the full-set scores.

    Build with :func:`study_stats`. Two blocks of per-study statistics:

    - ``counts`` [N, K]: additive statistics; a multiset of studies sums their rows.
    - ``means`` [M, N]: per-study values averaged over a multiset (one row per statistic, contiguous
      over studies so a mean over the identity resample is ``np.mean`` of the row, bit for bit).
    """

    n: int
    """Number of studies."""
    counts: np.ndarray
    """Additive per-study statistics, float64 [N, K] (integer-valued)."""
    count_slices: Mapping[str, slice]
    """Block name (``bleu``, ``meteor``, ``ce_u0``, ``ce_u1``) -> its columns in ``counts``."""
    means: np.ndarray
    """Per-study values averaged by a resample, float64 [M, N]."""
    mean_names: tuple[str, ...]
    """Row names of ``means``: ``rouge_l``, ``cider`` and the CE example keys."""
    scores: Mapping[str, float] = field(default_factory=dict)
    """Full-set scores: pycocoevalcap's NLG values and :func:`~amrg.metrics.clinical.ce_scores`."""

    @property
    def keys(self) -> tuple[str, ...]:
        """Score names, in the order of :attr:`scores`."""
        return tuple(self.scores)

    def scores_from(self, count_totals: np.ndarray, mean_values: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of R multisets from their summed counts and averaged per-study values.

        Args:
            count_totals: per multiset, the sum of ``counts`` rows, [R, K].
            mean_values: per multiset, the mean of each ``means`` row, [R, M].

        Returns:
            Score name -> values, [R] each (the keys of :attr:`scores`).
        """
        out: dict[str, np.ndarray] = {}
        means = dict(zip(self.mean_names, mean_values.T))
        if "bleu" in self.count_slices:
            bleu = _bleu_from_totals(count_totals[:, self.count_slices["bleu"]])  # [R, 4]
            out.update({f"bleu{k + 1}": bleu[:, k] for k in range(_BLEU_N)})
        if "meteor" in self.count_slices:
            rows = count_totals[:, self.count_slices["meteor"]].tolist()
            out["meteor"] = np.array([meteor_from_stats(r) for r in rows], dtype=np.float64)
        for key in ("rouge_l", "cider"):
            if key in means:
                out[key] = means[key]
        for unc in CE_UNCERTAIN:
            block = f"ce_{unc}"
            if block not in self.count_slices:
                continue
            tp, fp, fn = (
                count_totals[:, self.count_slices[block]].reshape(-1, 3, NUM_LABELS).transpose(1, 0, 2)
            )
            for set_name, cols in CE_LABEL_SETS.items():
                idx = list(cols)
                s_tp, s_fp, s_fn = tp[:, idx], fp[:, idx], fn[:, idx]  # [R, |set|]
                micro = _prf(s_tp.sum(1), s_fp.sum(1), s_fn.sum(1))  # each [R]
                macro = _prf(s_tp, s_fp, s_fn)  # each [R, |set|]
                for stat in CE_STATS:
                    out[ce_key("micro", stat, set_name, unc)] = micro[stat]
                    out[ce_key("macro", stat, set_name, unc)] = macro[stat].mean(axis=1)
                    out[ce_key("example", stat, set_name, unc)] = means[
                        ce_key("example", stat, set_name, unc)
                    ]
        return {k: out[k] for k in self.scores}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # zero_division=0, as amrg.metrics.clinical
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _bleu_from_totals(totals: np.ndarray) -> np.ndarray:
    """pycocoevalcap ``BleuScorer.compute_score`` on summed counts, float operations in its order.

    Args:
        totals: per multiset, summed ``testlen, reflen, guess_1..4, correct_1..4``, [R, 10].

    Returns:
        BLEU-1..4, [R, 4].
    """
    small, tiny = 1e-9, 1e-15  # bleu_scorer.py's constants
    out = np.empty((totals.shape[0], _BLEU_N), dtype=np.float64)
    for r, row in enumerate(totals.tolist()):
        # Python floats and math.exp, as the reference: numpy's vectorised pow/exp may round differently.
        testlen, reflen = int(row[0]), int(row[1])
        guess = [int(g) for g in row[2 : 2 + _BLEU_N]]
        correct = [int(c) for c in row[2 + _BLEU_N :]]
        bleu = 1.0
        for k in range(_BLEU_N):
            bleu *= float(correct[k] + tiny) / (guess[k] + small)
            out[r, k] = bleu ** (1.0 / (k + 1))
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            out[r] *= math.exp(1 - 1 / ratio)
    return out


def meteor_from_stats(stats: Sequence[float]) -> float:
    """The METEOR 1.5 score of (summed) segment statistics: the jar's ``computeMetrics``, ``en`` defaults.

    Args:
        stats: the jar's 23 statistics (``MeteorStats`` string order); for a multiset, their sum with each
            perfectly matched segment's chunk count set to 0 (as ``MeteorStats.addStats`` adds them).

    Returns:
        The score (0.0 where the jar's formula gives NaN, as the jar).
    """
    alpha, beta, gamma, delta = (float(METEOR_EN[k]) for k in ("alpha", "beta", "gamma", "delta"))
    weights = METEOR_EN["weights"]
    test_len, ref_len, test_fn, ref_fn = stats[0], stats[1], stats[2], stats[3]
    stages = stats[4 : 4 + 4 * _METEOR_MODULES]
    chunks, test_word_matches, ref_word_matches = stats[20], stats[21], stats[22]
    test_total = sum(stages[0::4]) + sum(stages[2::4])
    ref_total = sum(stages[1::4]) + sum(stages[3::4])
    test_weighted_len = delta * (test_len - test_fn) + (1 - delta) * test_fn
    ref_weighted_len = delta * (ref_len - ref_fn) + (1 - delta) * ref_fn
    test_matches = ref_matches = 0.0
    # the jar's four loops, in its order: content matches first, then function-word matches
    for i in range(_METEOR_MODULES):
        test_matches += stages[4 * i] * weights[i] * delta
    for i in range(_METEOR_MODULES):
        ref_matches += stages[4 * i + 1] * weights[i] * delta
    for i in range(_METEOR_MODULES):
        test_matches += stages[4 * i + 2] * weights[i] * (1 - delta)
    for i in range(_METEOR_MODULES):
        ref_matches += stages[4 * i + 3] * weights[i] * (1 - delta)
    precision = _jdiv(test_matches, test_weighted_len)
    recall = _jdiv(ref_matches, ref_weighted_len)
    f_mean = _jdiv(1.0, _jdiv(1 - alpha, precision) + _jdiv(alpha, recall))
    if test_total == test_len and ref_total == ref_len and chunks == 1:
        frag = 0.0
    else:
        frag = _jdiv(chunks, (test_word_matches + ref_word_matches) / 2)
    penalty = gamma * _jpow(frag, beta)
    score = f_mean * (1 - penalty)
    return 0.0 if math.isnan(score) else max(score, 0.0)


def _jdiv(a: float, b: float) -> float:
    """Java's double division: x/0 is ±inf (NaN for 0/0) instead of an exception."""
    if b != 0:
        return a / b
    if math.isnan(a) or a == 0:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _jpow(a: float, b: float) -> float:
    if math.isnan(a):
        return math.nan
    if math.isinf(a):
        return math.inf if b > 0 else 0.0
    return math.pow(a, b)


def _effective_chunks(stats: list[float]) -> list[float]:
    """A segment's statistics as ``MeteorStats.addStats`` adds them: no chunks for a perfect match."""
    stages = stats[4 : 4 + 4 * _METEOR_MODULES]
    test_total = sum(stages[0::4]) + sum(stages[2::4])
    ref_total = sum(stages[1::4]) + sum(stages[3::4])
    if test_total == stats[0] and ref_total == stats[1] and stats[20] == 1:
        return [*stats[:20], 0.0, *stats[21:]]
    return stats


def meteor_segment_stats(
    gts: Mapping[int, list[str]], res: Mapping[int, list[str]]
) -> tuple[float, np.ndarray]:
    """Run the METEOR jar once as pycocoevalcap's ``Meteor.compute_score`` does, keeping each segment's stats.

    Args:
        gts: ``{i: [reference]}`` as given to the pycocoevalcap scorers.
        res: ``{i: [hypothesis]}``, the same keys.

    Returns:
        The jar's aggregate score (what ``compute_score`` returns) and the segments' 23 statistics
        as ``MeteorStats.addStats`` adds them, float64 [N, 23].

    Raises:
        RuntimeError: Java is missing, or the jar's output cannot be read back.
    """
    scorer = meteor_scorer()
    try:
        with scorer.lock:
            # The same commands as Meteor.compute_score (pycocoevalcap 1.2), whose `_stat` sends one
            # SCORE line; it is called here so the statistics it returns are kept.
            lines = [scorer._stat(res[i][0], gts[i]) for i in gts]
            scorer.meteor_p.stdin.write(("EVAL ||| " + " ||| ".join(lines) + "\n").encode())
            scorer.meteor_p.stdin.flush()
            for _ in lines:  # per-segment scores: not needed, the statistics hold them
                scorer.meteor_p.stdout.readline()
            aggregate = float(scorer.meteor_p.stdout.readline().strip())
    finally:
        close_meteor(scorer)
    rows = []
    for i, line in enumerate(lines):
        values = [float(v) for v in line.split()]
        if len(values) != _METEOR_COLS:
            raise RuntimeError(
                f"METEOR jar: expected {_METEOR_COLS} statistics for segment {i}, got {len(values)}: {line!r:.200}"
            )
        rows.append(_effective_chunks(values))
    stats = np.asarray(rows, dtype=np.float64).reshape(len(lines), _METEOR_COLS)  # [N, 23]
    recomputed = meteor_from_stats(stats.sum(axis=0).tolist())
    if not math.isclose(recomputed, aggregate, rel_tol=1e-9, abs_tol=1e-12):
        # would mean another jar version or parameters: the resampled METEOR would be wrong
        raise RuntimeError(
            f"METEOR jar: the aggregate recomputed from segment statistics ({recomputed!r}) differs from "
            f"the jar's ({aggregate!r}); amrg.metrics.study_stats.METEOR_EN does not match this jar"
        )
    return aggregate, stats


def _bleu_counts(
    gts: Mapping[int, list[str]], res: Mapping[int, list[str]]
) -> tuple[list[float], np.ndarray]:
    """pycocoevalcap's corpus BLEU-1..4 (as ``Bleu(4).compute_score``) and each study's counts [N, 10]."""
    scorer = BleuScorer(n=_BLEU_N)
    for i in gts:
        scorer += (res[i][0], gts[i])
    score, _ = scorer.compute_score(option="closest", verbose=0)
    rows = []
    for comps in scorer.ctest:
        testlen = comps["testlen"]
        reflen = scorer._single_reflen(comps["reflen"], "closest", testlen)
        rows.append([testlen, reflen, *comps["guess"], *comps["correct"]])
    return [float(s) for s in score], np.asarray(rows, dtype=np.float64).reshape(len(rows), _BLEU_COLS)


def _ce_blocks(
    hyp_labels: Sequence[Sequence[int | None]], ref_labels: Sequence[Sequence[int | None]]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-study TP/FP/FN per label ([N, 3*14] per uncertain mapping) and example P/R/F1 ([N] per key)."""
    counts: dict[str, np.ndarray] = {}
    example: dict[str, np.ndarray] = {}
    for unc, positive in CE_UNCERTAIN.items():
        pred = binarise_labels(hyp_labels, positive).numpy()  # [N, 14]
        true = binarise_labels(ref_labels, positive).numpy()  # [N, 14]
        tp = (pred & true).astype(np.float64)  # [N, 14]
        fp = (pred & ~true).astype(np.float64)  # [N, 14]
        fn = (~pred & true).astype(np.float64)  # [N, 14]
        counts[f"ce_{unc}"] = np.concatenate([tp, fp, fn], axis=1)  # [N, 42]
        for set_name, cols in CE_LABEL_SETS.items():
            idx = list(cols)
            per_study = _prf(tp[:, idx].sum(1), fp[:, idx].sum(1), fn[:, idx].sum(1))  # each [N]
            for stat in CE_STATS:
                example[ce_key("example", stat, set_name, unc)] = per_study[stat]
    return counts, example


def study_stats(
    hypotheses: Sequence[str],
    references: Sequence[str],
    hyp_labels: Sequence[Sequence[int | None]] | None = None,
    ref_labels: Sequence[Sequence[int | None]] | None = None,
    meteor: bool = True,
) -> StudyStats:
    """Score the whole set once (R2Gen protocol, as :func:`~amrg.metrics.nlg.nlg_scores`) and keep each study's part.

    Args:
        hypotheses: generated reports, [N].
        references: cleaned reference reports, [N].
        hyp_labels: labeler rows of the generated reports (14 values 1/0/-1/None each), or ``None`` for no CE.
        ref_labels: labeler rows of the references, aligned; given together with ``hyp_labels``.
        meteor: score METEOR (one JVM; needs Java).

    Returns:
        The statistics; ``scores`` holds ``bleu1``..``bleu4``, ``meteor`` (if on), ``rouge_l``, ``cider``
        exactly as :func:`~amrg.metrics.nlg.nlg_scores` computes them, then the 36 CE scores of
        :func:`~amrg.metrics.clinical.ce_scores` (if labels are given).

    Raises:
        ValueError: no studies, or the sequences differ in length.
        RuntimeError: ``meteor`` is on and Java is missing.
    """
    n = len(hypotheses)
    if n == 0:
        raise ValueError("study_stats: no studies to score")
    if len(references) != n:
        raise ValueError(f"study_stats: got {n} hypotheses but {len(references)} references")
    if (hyp_labels is None) != (ref_labels is None):
        raise ValueError("study_stats: give both hyp_labels and ref_labels, or neither")
    if hyp_labels is not None and not len(hyp_labels) == len(ref_labels) == n:
        raise ValueError(
            f"study_stats: got {len(hyp_labels)} hypothesis and {len(ref_labels)} reference label rows for {n} studies"
        )
    # As nlg_scores: integer keys in order, normalised text, no PTB tokenizer.
    gts = {i: [normalise_text(r)] for i, r in enumerate(references)}
    res = {i: [normalise_text(h)] for i, h in enumerate(hypotheses)}
    scores: dict[str, float] = {}
    count_blocks: dict[str, np.ndarray] = {}
    bleu, count_blocks["bleu"] = _bleu_counts(gts, res)
    scores.update({f"bleu{k + 1}": b for k, b in enumerate(bleu)})
    if meteor:
        scores["meteor"], count_blocks["meteor"] = meteor_segment_stats(gts, res)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    scores["rouge_l"], scores["cider"] = float(rouge), float(cider)
    mean_rows: dict[str, np.ndarray] = {"rouge_l": np.asarray(rouge_each), "cider": np.asarray(cider_each)}
    assert tuple(scores) == tuple(k for k in NLG_KEYS if meteor or k != "meteor")
    if hyp_labels is not None:
        ce_counts, example = _ce_blocks(hyp_labels, ref_labels)
        count_blocks.update(ce_counts)
        mean_rows.update(example)
        scores.update(ce_scores(hyp_labels, ref_labels))
    slices, start = {}, 0
    for name, block in count_blocks.items():
        slices[name] = slice(start, start + block.shape[1])
        start += block.shape[1]
    counts = np.concatenate(list(count_blocks.values()), axis=1)  # [N, K]
    means = np.ascontiguousarray(
        np.stack([np.asarray(v, dtype=np.float64) for v in mean_rows.values()])
    )  # [M, N]
    return StudyStats(
        n=n, counts=counts, count_slices=slices, means=means, mean_names=tuple(mean_rows), scores=scores
    )
