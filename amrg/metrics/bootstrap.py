"""Bootstrap intervals over studies, and the paired bootstrap comparison of two systems.

The unit of resampling is the study: a resample draws N studies with replacement (seeded NumPy
``default_rng(seed).integers``, one [R, N] index matrix). Each score of a resample comes from the
per-study statistics of :mod:`amrg.metrics.study_stats` (summed counts or averaged per-study values,
vectorised over resamples); the scorers are not called again. That module's docstring states, score by
score, which resampled values are exact and which are approximations (CIDEr keeps the full set's
document frequencies). The point estimates are never resampled values: they are the scorers' own
full-set scores (pycocoevalcap, :func:`~amrg.metrics.clinical.ce_scores`).

Definitions, for R resamples and confidence level c (default 0.95):

- interval: the percentile interval, the (1-c)/2 and (1+c)/2 quantiles of the R resampled values
  (``numpy.quantile``, linear interpolation).
- paired comparison of systems A and B scored on the same studies: every resample draws the same
  studies for both; d*_r = score_A(resample r) - score_B(resample r); the interval of A - B is the
  percentile interval of the d*_r, and the point estimate is the full-set difference.
- two-sided p-value (percentile-interval inversion)::

      p = min(1, 2 * (min(#{r: d*_r <= 0}, #{r: d*_r >= 0}) + 1) / (R + 1))

  i.e. twice the smaller tail of the resampled differences at 0, with the +1 that keeps an estimate
  from R draws above 0. p <= 1 - c essentially when the c percentile interval excludes 0. Identical
  systems give d*_r = 0 for every r and p = 1. The smallest reachable p is 2 / (R + 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from amrg.metrics.study_stats import StudyStats

__all__ = [
    "Difference",
    "Interval",
    "bootstrap_intervals",
    "paired_bootstrap",
    "paired_p_value",
    "resample_indices",
    "resampled_scores",
]

_CHUNK = 250  # resamples per block: bounds the [chunk, N] weight and gather arrays


@dataclass(frozen=True)
class Interval:
    """A full-set score with its bootstrap interval."""

    value: float
    """The full-set score."""
    low: float
    """Lower end of the percentile interval."""
    high: float
    """Upper end of the percentile interval."""


@dataclass(frozen=True)
class Difference:
    """A paired difference A - B of one score, with its bootstrap interval and p-value."""

    a: float
    """A's full-set score."""
    b: float
    """B's full-set score."""
    value: float
    """A - B on the full set."""
    low: float
    """Lower end of the percentile interval of A - B."""
    high: float
    """Upper end of the percentile interval of A - B."""
    p_value: float
    """Two-sided paired-bootstrap p-value (module docstring)."""


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """The study indices of each resample.

    Args:
        n: number of studies.
        resamples: number of resamples R.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        int64 [R, N], each row N draws from 0..n-1 with replacement.
    """
    if n < 1 or resamples < 1:
        raise ValueError(
            f"resample_indices: need n >= 1 and resamples >= 1, got n={n}, resamples={resamples}"
        )
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int64)


def _chunks(indices: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, indices.shape[0], _CHUNK):
        yield indices[start : start + _CHUNK]


def resampled_scores(stats: StudyStats, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Every score of every resample.

    Args:
        stats: the per-study statistics.
        indices: study indices per resample, int [R, N'] (N' may differ from N; the identity
            ``np.arange(N)[None]`` gives the full-set scores).

    Returns:
        Score name -> values, float64 [R] each.
    """
    if indices.ndim != 2 or (indices.size and (indices.min() < 0 or indices.max() >= stats.n)):
        raise ValueError(f"resampled_scores: indices must be [R, N'] with values in 0..{stats.n - 1}")
    parts: list[dict[str, np.ndarray]] = []
    for block in _chunks(indices):
        rows = block.shape[0]
        # weights[r, i] = how often resample r drew study i; counts are sums, so weights @ counts
        # (integer-valued float64 products and sums: exact below 2**53)
        offsets = (np.arange(rows, dtype=np.int64) * stats.n)[:, None]  # [C, 1]
        weights = np.bincount((block + offsets).ravel(), minlength=rows * stats.n)  # [C * N]
        weights = weights.reshape(rows, stats.n).astype(np.float64)  # [C, N]
        count_totals = weights @ stats.counts  # [C, K]
        # per-study values: gathered rows, mean over the contiguous last axis (np.mean's pairwise sum)
        mean_values = stats.means[:, block].mean(axis=-1).T  # [M, C, N'] -> [C, M]
        parts.append(stats.scores_from(count_totals, mean_values))
    return {k: np.concatenate([p[k] for p in parts]) for k in stats.scores}


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must be in (0, 1), got {confidence}")


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_intervals(
    stats: StudyStats, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Interval]:
    """Percentile bootstrap interval of every score, resampling studies.

    Args:
        stats: per-study statistics from :func:`~amrg.metrics.study_stats.study_stats`.
        resamples: number of resamples.
        seed: seed of the resample indices.
        confidence: coverage of the interval.

    Returns:
        Score name -> :class:`Interval` (value: the full-set score), in the order of ``stats.scores``.
    """
    _check(resamples, confidence)
    values = resampled_scores(stats, resample_indices(stats.n, resamples, seed))
    return {k: Interval(stats.scores[k], *_percentiles(values[k], confidence)) for k in stats.scores}


def paired_p_value(differences: np.ndarray) -> float:
    """Two-sided paired-bootstrap p-value of resampled differences (definition in the module docstring)."""
    r = differences.size
    tail = min(int((differences <= 0).sum()), int((differences >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (r + 1))


def paired_bootstrap(
    stats_a: StudyStats,
    stats_b: StudyStats,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Difference]:
    """Paired bootstrap of A - B for every score both carry: the same studies drawn for both systems.

    Args:
        stats_a: system A's per-study statistics.
        stats_b: system B's, for the same studies in the same order (the caller aligns them by id).
        resamples: number of resamples.
        seed: seed of the resample indices (the same seed gives the same indices as
            :func:`bootstrap_intervals`, so the per-system intervals and the difference share draws).
        confidence: coverage of the interval.

    Returns:
        Score name -> :class:`Difference`, for the scores of A that B also has.
    """
    _check(resamples, confidence)
    if stats_a.n != stats_b.n:
        raise ValueError(f"paired_bootstrap: A has {stats_a.n} studies but B has {stats_b.n}")
    indices = resample_indices(stats_a.n, resamples, seed)
    values_a = resampled_scores(stats_a, indices)
    values_b = resampled_scores(stats_b, indices)
    out: dict[str, Difference] = {}
    for k in stats_a.scores:
        if k not in stats_b.scores:
            continue
        diff = values_a[k] - values_b[k]  # [R]
        a, b = stats_a.scores[k], stats_b.scores[k]
        out[k] = Difference(a, b, a - b, *_percentiles(diff, confidence), paired_p_value(diff))
    return out
