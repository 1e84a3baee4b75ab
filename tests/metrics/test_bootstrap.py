"""Bootstrap intervals and the paired comparison: seeding, chunking, p-value, identical and known-effect cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from amrg.labels import label_index
from amrg.metrics import bootstrap
from amrg.metrics.bootstrap import (
    bootstrap_intervals,
    paired_bootstrap,
    paired_p_value,
    resample_indices,
    resampled_scores,
)
from amrg.metrics.study_stats import study_stats

_SENTENCES = [
    "the heart is normal in size .",
    "the lungs are clear .",
    "no pleural effusion or pneumothorax .",
    "mild cardiomegaly .",
    "small left pleural effusion .",
    "patchy opacity at the right base .",
    "no acute osseous abnormality .",
    "mild pulmonary edema .",
]
_LABEL_OF = {3: "Cardiomegaly", 4: "Pleural Effusion", 5: "Lung Opacity", 7: "Edema"}


def _study(rng: random.Random) -> tuple[str, list[int | None]]:
    picks = sorted(rng.sample(range(len(_SENTENCES)), rng.randint(2, 4)))
    labels: list[int | None] = [None] * 14
    for i in picks:
        if i in _LABEL_OF:
            labels[label_index(_LABEL_OF[i])] = 1
    return " ".join(_SENTENCES[i] for i in picks), labels


def _systems(n: int = 120, emptied: int = 30, seed: int = 0):
    """References, system A (the reference with one sentence changed half the time) and
    B = A with its first ``emptied`` reports emptied; labels alongside."""
    rng = random.Random(seed)
    refs, ref_l, hyps, hyp_l = [], [], [], []
    for _ in range(n):
        text, labels = _study(rng)
        refs.append(text)
        ref_l.append(labels)
        if rng.random() < 0.5:
            text, labels = _study(rng)
        hyps.append(text)
        hyp_l.append(labels)
    hyps_b = [""] * emptied + hyps[emptied:]
    hyp_l_b = [[None] * 14] * emptied + hyp_l[emptied:]
    a = study_stats(hyps, refs, hyp_l, ref_l, meteor=False)
    b = study_stats(hyps_b, refs, hyp_l_b, ref_l, meteor=False)
    return a, b


def test_resample_indices_are_seeded() -> None:
    first = resample_indices(50, 7, seed=3)
    assert first.shape == (7, 50) and first.min() >= 0 and first.max() < 50
    assert np.array_equal(first, resample_indices(50, 7, seed=3))
    assert not np.array_equal(first, resample_indices(50, 7, seed=4))
    with pytest.raises(ValueError, match="resamples >= 1"):
        resample_indices(50, 0, seed=0)


def test_chunked_resamples_equal_one_at_a_time(monkeypatch) -> None:
    a, _ = _systems(n=40)
    indices = resample_indices(a.n, 9, seed=1)
    monkeypatch.setattr(bootstrap, "_CHUNK", 4)  # blocks of 4, 4, 1 resamples
    together = resampled_scores(a, indices)
    for r in (0, 5, 8):
        alone = resampled_scores(a, indices[r : r + 1])
        for key in a.scores:
            assert together[key][r] == alone[key][0], (key, r)


def test_p_value_definition() -> None:
    # p = min(1, 2 * (min(#{d <= 0}, #{d >= 0}) + 1) / (R + 1))
    assert paired_p_value(np.zeros(99)) == 1.0
    assert paired_p_value(np.ones(99)) == pytest.approx(2 / 100)  # the smallest reachable p
    assert paired_p_value(np.array([-1.0] * 9 + [1.0] * 90)) == pytest.approx(2 * 10 / 100)
    assert paired_p_value(-np.array([-1.0] * 9 + [1.0] * 90)) == pytest.approx(2 * 10 / 100)


def test_identical_systems_differ_by_zero_with_p_one() -> None:
    a, _ = _systems(n=60)
    for key, d in paired_bootstrap(a, a, resamples=200, seed=0).items():
        assert (d.value, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0), key


def test_known_effect_is_covered_and_detected() -> None:
    a, b = _systems()
    diffs = paired_bootstrap(a, b, resamples=1000, seed=0)
    for key in ("bleu4", "rouge_l", "cider", "ce/micro_f1/14/u0", "ce/example_f1/14/u0"):
        d = diffs[key]
        assert d.value == a.scores[key] - b.scores[key] > 0, key  # emptying reports costs every score
        assert d.low <= d.value <= d.high, key  # the interval covers the full-set difference
        assert d.low > 0 and d.p_value < 0.01, key  # and excludes 0 for an effect this size


def test_intervals_hold_the_full_set_score_and_narrow_with_more_studies() -> None:
    small, _ = _systems(n=40)
    large, _ = _systems(n=400)
    iv_small = bootstrap_intervals(small, resamples=300, seed=0)
    iv_large = bootstrap_intervals(large, resamples=300, seed=0)
    assert list(iv_small) == list(small.scores)
    for key in ("bleu4", "rouge_l", "ce/micro_f1/14/u0"):
        assert iv_small[key].value == small.scores[key]
        assert iv_small[key].low <= iv_small[key].value <= iv_small[key].high
        assert iv_large[key].high - iv_large[key].low < iv_small[key].high - iv_small[key].low, key


def test_bad_options_raise() -> None:
    a, _ = _systems(n=10, emptied=3)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals(a, confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(a, a, resamples=0)
    with pytest.raises(ValueError, match="values in 0..9"):
        resampled_scores(a, np.array([[0, 10]]))
