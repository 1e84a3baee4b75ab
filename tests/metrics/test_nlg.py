"""NLGScores against pycocoevalcap called directly (R2Gen protocol), dedup, reset, validation."""

from __future__ import annotations

import shutil

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from amrg.metrics.nlg import NLG_KEYS, NLGScores, nlg_scores, normalise_text

# (id, hypothesis, reference); ids out of order, mixed case and stray whitespace on purpose.
ROWS = [
    (
        "s3",
        "The heart is normal in size.  The lungs are clear .",
        "the heart is normal in size . the lungs are clear .",
    ),
    ("s1", "no acute cardiopulmonary abnormality .", "no acute cardiopulmonary abnormality ."),
    ("s5", "mild cardiomegaly . small left pleural effusion .", "cardiomegaly . no pleural effusion ."),
    ("s2", "", "the lungs are clear . no pneumothorax ."),
    (
        "s4",
        "Lungs\nare clear. No\tpneumothorax .",
        "lungs are clear . there is no pneumothorax or effusion .",
    ),
    ("s6", "stable sternotomy wires . no focal consolidation .", "sternotomy wires . heart size normal ."),
]


def _direct_inputs(rows):
    """What R2Gen's compute_scores hands the scorers: {i: [text]} over the id-sorted rows, lower-cased."""
    rows = sorted(rows)
    gts = {i: [" ".join(r[2].lower().split())] for i, r in enumerate(rows)}
    res = {i: [" ".join(r[1].lower().split())] for i, r in enumerate(rows)}
    return gts, res


def _direct(rows, meteor: Meteor | None = None) -> dict[str, float]:
    gts, res = _direct_inputs(rows)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{i + 1}": b for i, b in enumerate(bleu)}
    if meteor is not None:
        out["meteor"] = meteor.compute_score(gts, res)[0]
    out["rouge_l"] = Rouge().compute_score(gts, res)[0]
    out["cider"] = Cider().compute_score(gts, res)[0]
    return out


def _update(metric: NLGScores, rows) -> None:
    ids, hyps, refs = zip(*rows)
    metric.update(list(ids), list(hyps), list(refs))


def test_normalise_text():
    assert normalise_text("  The Heart\n is  NORMAL .\t") == "the heart is normal ."


def test_matches_pycocoevalcap_exactly():
    metric = NLGScores(meteor=False)
    _update(metric, ROWS[:4])  # two batches, as a validation loop would feed them
    _update(metric, ROWS[4:])
    got = metric.compute()
    expected = _direct(ROWS)
    assert set(got) == set(expected) == {k for k in NLG_KEYS if k != "meteor"}
    for key, value in expected.items():
        assert got[key].dtype == torch.float64
        assert float(got[key]) == float(value), key  # exact: same inputs, same scorers
    # Sanity: the toy is neither trivially perfect nor zero.
    assert 0.0 < float(got["bleu4"]) < 1.0 and float(got["cider"]) > 0.0


def test_order_of_updates_does_not_matter():
    a, b = NLGScores(meteor=False), NLGScores(meteor=False)
    _update(a, ROWS)
    _update(b, ROWS[::-1])
    assert {k: float(v) for k, v in a.compute().items()} == {k: float(v) for k, v in b.compute().items()}


def test_duplicate_ids_are_dropped_keeping_the_first():
    padded = NLGScores(meteor=False)
    _update(padded, ROWS)
    _update(padded, ROWS[:2])  # what DistributedSampler padding looks like after a gather
    plain = NLGScores(meteor=False)
    _update(plain, ROWS)
    assert {k: float(v) for k, v in padded.compute().items()} == {
        k: float(v) for k, v in plain.compute().items()
    }
    assert [r[0] for r in padded.last_rows] == ["s1", "s2", "s3", "s4", "s5", "s6"]


def test_conflicting_duplicates_keep_the_first(caplog):
    metric = NLGScores(meteor=False)
    # A padded repeat generated differently: keep the first, no warning.
    metric.update(["x", "x"], ["first hypothesis .", "second hypothesis ."], ["ref .", "ref ."])
    with caplog.at_level("WARNING"):
        metric.compute()
    assert metric.last_rows == [("x", "first hypothesis .", "ref .")]
    assert caplog.text == ""
    # Two different references under one id: a real id clash, warned about.
    metric.reset()
    metric.update(["y", "y"], ["h .", "h ."], ["first ref .", "second ref ."])
    with caplog.at_level("WARNING"):
        metric.compute()
    assert metric.last_rows == [("y", "h .", "first ref .")]
    assert "different reference text (e.g. id='y')" in caplog.text


def test_reset_clears_state():
    metric = NLGScores(meteor=False)
    _update(metric, ROWS[:3])
    first = {k: float(v) for k, v in metric.compute().items()}
    metric.reset()
    assert metric.ids == [] and metric.hypotheses == [] and metric.references == []
    _update(metric, ROWS[3:])
    second = {k: float(v) for k, v in metric.compute().items()}
    assert second == {k: float(v) for k, v in _direct(ROWS[3:]).items()}
    assert second != first


def test_string_states_survive_device_moves():
    metric = NLGScores(meteor=False)
    _update(metric, ROWS)
    metric.to(torch.device("cpu"))
    metric.to(torch.float64)
    assert metric.ids == [r[0] for r in ROWS]
    assert float(metric.compute()["bleu1"]) == _direct(ROWS)["bleu1"]


def test_empty_corpus_scores_zero():
    assert nlg_scores([], [], meteor=False) == {
        "bleu1": 0.0,
        "bleu2": 0.0,
        "bleu3": 0.0,
        "bleu4": 0.0,
        "rouge_l": 0.0,
        "cider": 0.0,
    }


def test_update_rejects_bad_input():
    metric = NLGScores(meteor=False)
    with pytest.raises(ValueError, match="2 ids, 1 hypotheses and 2 references"):
        metric.update(["a", "b"], ["h"], ["r", "r"])
    with pytest.raises(ValueError, match=r"id='b': hypothesis must be a str, found NoneType"):
        metric.update(["a", "b"], ["h", None], ["r", "r"])
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        nlg_scores(["a", "b"], ["r"], meteor=False)


def test_meteor_without_java_names_the_fix(monkeypatch):
    monkeypatch.setattr("amrg.metrics.nlg.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"METEOR needs a Java runtime.*meteor=False"):
        nlg_scores(["a ."], ["a ."], meteor=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_matches_pycocoevalcap_exactly():
    # Start the reference JVM first so that both load METEOR's paraphrase table at the same time.
    reference_scorer = Meteor()
    metric = NLGScores(meteor=True)
    _update(metric, ROWS)
    got = {k: float(v) for k, v in metric.compute().items()}
    expected = _direct(ROWS, meteor=reference_scorer)
    # NLGScores stopped its own JVM inside compute; the reference one stops when collected.
    assert got == {k: float(v) for k, v in expected.items()}
    assert 0.0 < got["meteor"] < 1.0
