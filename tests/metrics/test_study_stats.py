"""Per-study statistics: full-set scores equal pycocoevalcap / ce_scores, and a resample's scores equal
the scorers run on that multiset (exactly; CIDEr with the full set's document frequencies)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from amrg.metrics.bootstrap import resampled_scores
from amrg.metrics.clinical import ce_scores
from amrg.metrics.nlg import nlg_scores, normalise_text
from amrg.metrics.study_stats import meteor_from_stats, study_stats
from tests.metrics.test_clinical import EXPECTED, TOY
from tests.metrics.test_nlg import ROWS, _direct

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java ('java' not on PATH)")

HYPS = [r[1] for r in sorted(ROWS)]
REFS = [r[2] for r in sorted(ROWS)]
# A multiset of the six studies with repeats and one left out, as a bootstrap draws it.
DRAW = [4, 0, 4, 2, 2, 5]


def _toy_ce_inputs():
    ids = sorted(TOY)
    return [TOY[i][2] for i in ids], [TOY[i][3] for i in ids]


def _dicts(indices):
    gts = {j: [normalise_text(REFS[i])] for j, i in enumerate(indices)}
    res = {j: [normalise_text(HYPS[i])] for j, i in enumerate(indices)}
    return gts, res


def test_full_set_scores_are_pycocoevalcap_and_ce_scores() -> None:
    hyp_l, ref_l = _toy_ce_inputs()
    stats = study_stats([f"h{i}" for i in range(3)], [f"r{i}" for i in range(3)], hyp_l, ref_l, meteor=False)
    assert {k: v for k, v in stats.scores.items() if k.startswith("ce/")} == ce_scores(hyp_l, ref_l)
    for key, value in EXPECTED.items():  # the hand-computed CE toy
        assert stats.scores[key] == pytest.approx(value, abs=1e-12), key
    nlg = study_stats(HYPS, REFS, meteor=False)
    assert nlg.scores == nlg_scores(HYPS, REFS, meteor=False) == _direct(ROWS)  # exact equality


def test_identity_resample_reproduces_every_full_set_score_exactly() -> None:
    hyp_l, ref_l = _toy_ce_inputs()
    hyp_l, ref_l = hyp_l * 2, ref_l * 2  # six studies: the NLG rows with the CE toy's labels twice
    stats = study_stats(HYPS, REFS, hyp_l, ref_l, meteor=False)
    identity = resampled_scores(stats, np.arange(stats.n)[None])
    assert set(identity) == set(stats.scores)
    for key, value in stats.scores.items():
        assert float(identity[key][0]) == value, key  # bit for bit, not approximately


def test_a_resample_scores_what_the_scorers_give_on_that_multiset() -> None:
    stats = study_stats(HYPS, REFS, meteor=False)
    got = {k: float(v[0]) for k, v in resampled_scores(stats, np.array([DRAW])).items()}
    gts, res = _dicts(DRAW)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert got[f"bleu{n + 1}"] == bleu[n]  # counts summed, brevity penalty of the multiset: exact
    assert got["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-15)
    # CIDEr keeps the full set's document frequencies: the mean of the full-set per-study scores ...
    _, per_study = Cider().compute_score(*_dicts(range(6)))
    assert got["cider"] == pytest.approx(np.mean(per_study[DRAW]), rel=1e-15)
    # ... which is not what Cider computes with the multiset's own frequencies (the stated approximation)
    assert got["cider"] != pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-6)


def test_a_resample_of_ce_equals_ce_scores_on_that_multiset() -> None:
    hyp_l, ref_l = _toy_ce_inputs()
    stats = study_stats(["a", "b", "c"], ["x", "y", "z"], hyp_l, ref_l, meteor=False)
    draw = [2, 0, 0]
    got = {k: float(v[0]) for k, v in resampled_scores(stats, np.array([draw])).items()}
    expected = ce_scores([hyp_l[i] for i in draw], [ref_l[i] for i in draw])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-15), key


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="no studies"):
        study_stats([], [], meteor=False)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        study_stats(["a", "b"], ["a"], meteor=False)
    with pytest.raises(ValueError, match="both hyp_labels and ref_labels"):
        study_stats(["a"], ["a"], hyp_labels=[[None] * 14], meteor=False)


def test_meteor_formula_edge_cases() -> None:
    # No words on either side: the jar's formula is 0/0 = NaN, which it reports as 0.
    assert meteor_from_stats([0.0] * 23) == 0.0
    # A perfect 3-word match in one chunk: P = R = 1, no fragmentation penalty.
    perfect = [3, 3, 0, 0, 3, 3, 0, 0] + [0] * 12 + [1, 3, 3]
    assert meteor_from_stats([float(v) for v in perfect]) == 1.0


@needs_java
def test_meteor_full_set_and_resample_match_the_jar() -> None:
    stats = study_stats(HYPS, REFS, meteor=True)
    got = float(resampled_scores(stats, np.array([DRAW]))["meteor"][0])
    scorer = Meteor()  # one JVM for both references (each start loads the paraphrase tables)
    try:
        full = scorer.compute_score(*_dicts(range(6)))[0]  # what nlg_scores returns
        multiset = scorer.compute_score(*_dicts(DRAW))[0]  # the jar on the multiset itself
    finally:
        scorer.meteor_p.kill()
    assert stats.scores["meteor"] == full
    assert got == pytest.approx(multiset, rel=1e-12)
