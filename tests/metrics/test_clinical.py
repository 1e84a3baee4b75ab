"""ClinicalEfficacy on a hand-computed toy, u0 vs u1, sklearn cross-check, labeler checks."""

from __future__ import annotations

import math

import pytest
import torch

from amrg.labels import LABELS, label_index
from amrg.metrics.clinical import (
    CE_AVERAGES,
    CE_LABEL_SETS,
    CE_STATS,
    CE_UNCERTAIN,
    ClinicalEfficacy,
    ReportLabeler,
    binarise_labels,
    ce_key,
    ce_scores,
    precision_recall_f1,
)


def row(**values: int) -> list[int | None]:
    """A 14-value label row, None everywhere except the named labels (underscores for spaces)."""
    out: list[int | None] = [None] * len(LABELS)
    for name, value in values.items():
        out[label_index(name.replace("_", " "))] = value
    return out


class TableLabeler:
    """Looks each report up in a fixed table; counts its calls."""

    def __init__(self, table: dict[str, list[int | None]]) -> None:
        self.table = table
        self.calls = 0

    def label_batch(self, reports):
        self.calls += 1
        return [self.table[r] for r in reports]


# Three reports. Values: 1 positive, 0 negative, -1 uncertain, None not mentioned.
#   r1  ref: Cardiomegaly 1, Pleural Effusion 1          hyp: Cardiomegaly 1, Edema 1, Fracture 1
#   r2  ref: Atelectasis -1, Lung Opacity 1              hyp: Atelectasis 1, Lung Opacity 0
#   r3  ref: No Finding 1                                hyp: No Finding 1, Support Devices -1
TOY = {
    "r1": (
        "hyp r1",
        "ref r1",
        row(Cardiomegaly=1, Edema=1, Fracture=1),
        row(Cardiomegaly=1, Pleural_Effusion=1),
    ),
    "r2": ("hyp r2", "ref r2", row(Atelectasis=1, Lung_Opacity=0), row(Atelectasis=-1, Lung_Opacity=1)),
    "r3": ("hyp r3", "ref r3", row(No_Finding=1, Support_Devices=-1), row(No_Finding=1)),
}

# Per-report (TP, FP, FN):
#   14/u0: r1 (1, 2, 1)  r2 (0, 1, 1)  r3 (1, 0, 0)   [-1 is negative: r2 ref Atel, r3 hyp SD drop out]
#   14/u1: r1 (1, 2, 1)  r2 (1, 0, 1)  r3 (1, 1, 0)   [-1 is positive]
#    5/u0: r1 (1, 1, 1)  r2 (0, 1, 0)  r3 (0, 0, 0)   [COMMON5 = Atel, Card, Cons, Edema, PE]
#    5/u1: r1 (1, 1, 1)  r2 (1, 0, 0)  r3 (0, 0, 0)
EXPECTED = {
    # micro: pooled counts. 14/u0: TP 2, FP 3, FN 2 -> P 2/5, R 2/4, F1 4/(4+3+2)
    "ce/micro_precision/14/u0": 2 / 5,
    "ce/micro_recall/14/u0": 1 / 2,
    "ce/micro_f1/14/u0": 4 / 9,
    # 14/u1: TP 3, FP 3, FN 2 -> P 3/6, R 3/5, F1 6/(6+3+2)
    "ce/micro_precision/14/u1": 1 / 2,
    "ce/micro_recall/14/u1": 3 / 5,
    "ce/micro_f1/14/u1": 6 / 11,
    # 5/u0: TP 1, FP 2, FN 1 -> P 1/3, R 1/2, F1 2/(2+2+1)
    "ce/micro_precision/5/u0": 1 / 3,
    "ce/micro_recall/5/u0": 1 / 2,
    "ce/micro_f1/5/u0": 2 / 5,
    # 5/u1: TP 2, FP 1, FN 1 -> P 2/3, R 2/3, F1 4/6
    "ce/micro_precision/5/u1": 2 / 3,
    "ce/micro_recall/5/u1": 2 / 3,
    "ce/micro_f1/5/u1": 2 / 3,
    # macro: per-label scores, mean over the set. A label with no TP scores 0 (zero_division=0).
    # 14/u0: only Cardiomegaly (r1) and No Finding (r3) have a TP, with P = R = F1 = 1 -> 2/14.
    "ce/macro_precision/14/u0": 2 / 14,
    "ce/macro_recall/14/u0": 2 / 14,
    "ce/macro_f1/14/u0": 2 / 14,
    # 14/u1: Atelectasis (r2: hyp 1, ref -1) becomes a TP too -> 3/14.
    #        Support Devices (r3 hyp -1) is an FP: P 0, it does not lower the others.
    "ce/macro_precision/14/u1": 3 / 14,
    "ce/macro_recall/14/u1": 3 / 14,
    "ce/macro_f1/14/u1": 3 / 14,
    # 5/u0: Cardiomegaly 1; Atelectasis FP, Edema FP, Pleural Effusion FN, Consolidation empty -> 1/5.
    "ce/macro_precision/5/u0": 1 / 5,
    "ce/macro_recall/5/u0": 1 / 5,
    "ce/macro_f1/5/u0": 1 / 5,
    # 5/u1: Cardiomegaly and Atelectasis 1 -> 2/5.
    "ce/macro_precision/5/u1": 2 / 5,
    "ce/macro_recall/5/u1": 2 / 5,
    "ce/macro_f1/5/u1": 2 / 5,
    # example: per-report P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN), mean over 3 reports.
    # 14/u0: r1 (1/3, 1/2, 2/5), r2 (0, 0, 0), r3 (1, 1, 1)
    "ce/example_precision/14/u0": (1 / 3 + 0 + 1) / 3,
    "ce/example_recall/14/u0": (1 / 2 + 0 + 1) / 3,
    "ce/example_f1/14/u0": (2 / 5 + 0 + 1) / 3,
    # 14/u1: r1 (1/3, 1/2, 2/5), r2 (1, 1/2, 2/3), r3 (1/2, 1, 2/3)
    "ce/example_precision/14/u1": (1 / 3 + 1 + 1 / 2) / 3,
    "ce/example_recall/14/u1": (1 / 2 + 1 / 2 + 1) / 3,
    "ce/example_f1/14/u1": (2 / 5 + 2 / 3 + 2 / 3) / 3,
    # 5/u0: r1 (1/2, 1/2, 1/2), r2 (0, 0, 0), r3 has no positives on either side -> (0, 0, 0)
    "ce/example_precision/5/u0": (1 / 2) / 3,
    "ce/example_recall/5/u0": (1 / 2) / 3,
    "ce/example_f1/5/u0": (1 / 2) / 3,
    # 5/u1: r1 (1/2, 1/2, 1/2), r2 (1, 1, 1), r3 (0, 0, 0)
    "ce/example_precision/5/u1": (1 / 2 + 1) / 3,
    "ce/example_recall/5/u1": (1 / 2 + 1) / 3,
    "ce/example_f1/5/u1": (1 / 2 + 1) / 3,
}


def _toy_labeler() -> TableLabeler:
    table = {}
    for hyp, ref, hyp_labels, ref_labels in TOY.values():
        table[hyp], table[ref] = hyp_labels, ref_labels
    return TableLabeler(table)


def _toy_metric(labeler=None) -> ClinicalEfficacy:
    metric = ClinicalEfficacy(labeler=labeler or _toy_labeler())
    ids = list(TOY)[::-1]  # out of order on purpose
    metric.update(ids, [TOY[i][0] for i in ids], [TOY[i][1] for i in ids])
    return metric


def test_keys_name_the_protocol():
    keys = {
        ce_key(a, s, ls, u)
        for a in CE_AVERAGES
        for s in CE_STATS
        for ls in CE_LABEL_SETS
        for u in CE_UNCERTAIN
    }
    assert len(keys) == 36 and set(EXPECTED) == keys
    assert ce_key("micro", "f1", "14", "u0") == "ce/micro_f1/14/u0"


def test_hand_computed_toy():
    labeler = _toy_labeler()
    got = _toy_metric(labeler).compute()
    assert set(got) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert got[key].dtype == torch.float64
        assert math.isclose(float(got[key]), value, rel_tol=1e-12, abs_tol=1e-15), (
            key,
            float(got[key]),
            value,
        )
    assert labeler.calls == 2  # once for the hypotheses, once for the references


def test_uncertain_mapping_changes_scores_as_expected():
    got = {k: float(v) for k, v in _toy_metric().compute().items()}
    # Uncertain-as-positive turns r2's Atelectasis into a hit and r3's Support Devices into a false alarm:
    # recall rises (2/4 -> 3/5) and so does F1 (4/9 -> 6/11).
    assert got["ce/micro_recall/14/u1"] > got["ce/micro_recall/14/u0"]
    assert got["ce/micro_f1/14/u1"] > got["ce/micro_f1/14/u0"]
    # With no uncertain values at all, u0 and u1 agree.
    plain = ce_scores([row(Edema=1), row(Cardiomegaly=0)], [row(Edema=1), row(Cardiomegaly=1)])
    for a in CE_AVERAGES:
        for s in CE_STATS:
            for ls in CE_LABEL_SETS:
                assert plain[ce_key(a, s, ls, "u0")] == plain[ce_key(a, s, ls, "u1")]


def test_last_labels_and_dedup():
    metric = _toy_metric()
    metric.update(["r1"], ["hyp r1"], ["ref r1"])  # a padded repeat
    metric.compute()
    assert list(metric.last_labels) == ["r1", "r2", "r3"]
    assert metric.last_labels["r2"] == {"hyp": TOY["r2"][2], "ref": TOY["r2"][3]}
    assert [r[0] for r in metric.last_rows] == ["r1", "r2", "r3"]


def test_reset_between_epochs():
    labeler = _toy_labeler()
    metric = _toy_metric(labeler)
    metric.compute()
    metric.reset()
    metric.update(["r3"], ["hyp r3"], ["ref r3"])
    got = metric.compute()
    # Only r3: No Finding TP, Support Devices uncertain -> u0 perfect micro scores.
    assert float(got["ce/micro_f1/14/u0"]) == 1.0
    assert list(metric.last_labels) == ["r3"]


def test_binarise_labels():
    rows = [row(Edema=1, Atelectasis=-1, Cardiomegaly=0), [float("nan")] * 14]
    u0, u1 = binarise_labels(rows, False), binarise_labels(rows, True)
    assert u0.shape == (2, 14) and u0.dtype == torch.bool
    assert u0[0].nonzero().flatten().tolist() == [label_index("Edema")]
    assert u1[0].nonzero().flatten().tolist() == sorted([label_index("Edema"), label_index("Atelectasis")])
    assert not u0[1].any() and not u1[1].any()


def test_zero_division_convention():
    # Nothing positive anywhere: every score is 0 (sklearn zero_division=0), not NaN.
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert set(precision_recall_f1(none, none).values()) == {0.0}
    assert set(ce_scores([], []).values()) == {0.0}


def test_matches_sklearn_on_random_labels():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    codes = torch.tensor([1, 0, -1, 2])  # 2 stands for None
    hyp = codes[torch.randint(0, 4, (40, 14), generator=gen)].tolist()
    ref = codes[torch.randint(0, 4, (40, 14), generator=gen)].tolist()
    hyp = [[None if v == 2 else v for v in r] for r in hyp]
    ref = [[None if v == 2 else v for v in r] for r in ref]
    got = ce_scores(hyp, ref)
    for unc, positive in CE_UNCERTAIN.items():
        for set_name, cols in CE_LABEL_SETS.items():
            y_pred = binarise_labels(hyp, positive)[:, list(cols)].numpy()
            y_true = binarise_labels(ref, positive)[:, list(cols)].numpy()
            for average, sk_average in (("micro", "micro"), ("macro", "macro"), ("example", "samples")):
                p, r, f, _ = metrics.precision_recall_fscore_support(
                    y_true, y_pred, average=sk_average, zero_division=0
                )
                for stat, value in (("precision", p), ("recall", r), ("f1", f)):
                    key = ce_key(average, stat, set_name, unc)
                    assert math.isclose(got[key], float(value), rel_tol=1e-12, abs_tol=1e-15), key


def test_labeler_output_is_checked():
    short = TableLabeler({"h": [1] * 13, "r": [1] * 14})
    metric = ClinicalEfficacy(labeler=short)
    metric.update(["id7"], ["h"], ["r"])
    with pytest.raises(ValueError, match=r"generated report of id='id7' has 13 values; expected 14"):
        metric.compute()
    bad = TableLabeler({"h": [2] + [None] * 13, "r": [1] * 14})
    metric = ClinicalEfficacy(labeler=bad)
    metric.update(["id8"], ["h"], ["r"])
    with pytest.raises(
        ValueError, match=r"id='id8', label 'Enlarged Cardiomediastinum': expected 1, 0, -1 or None"
    ):
        metric.compute()


def test_table_labeler_satisfies_protocol():
    assert isinstance(_toy_labeler(), ReportLabeler)


def test_default_labeler_is_built_lazily():
    metric = ClinicalEfficacy()
    assert metric.labeler is None  # nothing imported or built at construction
    labeler_module = pytest.importorskip("amrg.labeling.chexpert")
    metric.update(["a"], ["Mild cardiomegaly."], ["The heart is enlarged."])
    got = metric.compute()
    assert isinstance(metric.labeler, labeler_module.CheXpertLabeler)
    assert len(got) == 36 and len(metric.last_labels["a"]["hyp"]) == 14
