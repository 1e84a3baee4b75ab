"""Tests for amrg.labeling.chexpert: the rule-based CheXpert labeler."""

from __future__ import annotations

import csv
import io
import random
import time

import pytest
import torch

from amrg.labeling.chexpert import CheXpertLabeler
from amrg.labeling.text import clean_text
from amrg.labels import LABELS, NUM_LABELS, label_index

# sample_reports.csv / labeled_reports.csv of the CheXpert labeler (stanfordmlgroup/chexpert-labeler,
# MIT licence): 4 reports and the labels the original tool gives them. Column order is the original's,
# not ours: map by name. A blank cell is "not mentioned".
_LABELED_REPORTS = """Reports,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Lesion,Lung Opacity,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices
Heart size normal and lungs are clear. No edema or pneumonia. No effusion,1.0,,0.0,,,0.0,,0.0,,,0.0,,,
"1. Left pleural effusion with adjacent atelectasis. Right effusion is also present.

2. Cardiomegaly without overt edema.",,,1.0,,,0.0,,,1.0,,1.0,,,
"Minimal patchy airspace disease within the lingula, may reflect atelectasis or consolidation.",,,,,1.0,,-1.0,,-1.0,,,,,
1. Stable mild cardiomegaly. 2. Hyperexpanded but clear lungs.,,,1.0,,,,,,,,,,,
"""


@pytest.fixture(scope="module")
def labeler() -> CheXpertLabeler:
    return CheXpertLabeler()


def _labels(labeler: CheXpertLabeler, report: str) -> dict[str, int]:
    """The mentioned labels of a report, by name."""
    return {LABELS[i]: v for i, v in enumerate(labeler.label(report)) if v is not None}


def test_sample_reports_match_the_original(labeler: CheXpertLabeler) -> None:
    rows = list(csv.DictReader(io.StringIO(_LABELED_REPORTS)))
    assert len(rows) == 4
    for row in rows:
        expected: list[int | None] = [None] * NUM_LABELS
        for name, cell in row.items():
            if name != "Reports" and cell.strip():
                expected[label_index(name)] = int(float(cell))
        assert labeler.label(row["Reports"]) == expected, row["Reports"]


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("No pleural effusion.", {"Pleural Effusion": 0}),
        ("There is no evidence of pneumothorax.", {"Pneumothorax": 0}),
        ("Without focal consolidation.", {"Consolidation": 0}),
        ("Negative for pneumothorax.", {"Pneumothorax": 0}),
        ("The lungs are free of consolidation.", {"Consolidation": 0}),
        ("No definite focal consolidation.", {"Consolidation": 0}),
        ("No acute, displaced rib fractures.", {"Fracture": 0}),
        ("The heart is not enlarged.", {"Cardiomegaly": 0}),
        ("Heart size is normal.", {"Cardiomegaly": 0}),
        ("Normal heart size.", {"Cardiomegaly": 0}),
        ("Heart size is at the upper limits of normal.", {"Cardiomegaly": 0}),
        ("The mediastinum is unremarkable.", {"Enlarged Cardiomediastinum": 0}),
        ("No focal consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0}),
        ("No change in the left pleural effusion.", {"Pleural Effusion": 1}),  # "no change" is no negation
        ("No increase in the pneumothorax.", {"Pneumothorax": 1}),
    ],
)
def test_negation(labeler: CheXpertLabeler, report: str, expected: dict[str, int]) -> None:
    got = _labels(labeler, report)
    assert {k: got.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("no effusion or pneumothorax", {"Pleural Effusion": 0, "Pneumothorax": 0}),
        (
            "No focal consolidation, pleural effusion, or pneumothorax.",
            {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0},
        ),
        # R2Gen-cleaned text has no commas.
        (
            "no focal consolidation pleural effusion or pneumothorax .",
            {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0},
        ),
        ("Neither effusion nor pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
        (
            "Heart size and mediastinal contours are normal.",
            {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0},
        ),
        (
            "Heart size, mediastinal contour, and pulmonary vascularity are within normal limits.",
            {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0},
        ),
        (
            "The cardiomediastinal silhouette is normal in size and contour.",
            {"Enlarged Cardiomediastinum": 0},
        ),
        ("Heart size and pulmonary vascularity appear within normal limits.", {"Cardiomegaly": 0}),
        ("No consolidating airspace disease is seen.", {"Consolidation": 0, "Lung Opacity": 0}),
    ],
)
def test_coordinated_negation(labeler: CheXpertLabeler, report: str, expected: dict[str, int]) -> None:
    got = _labels(labeler, report)
    assert {k: got.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("cannot exclude pneumonia", {"Pneumonia": -1}),
        ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
        ("Early pneumonia is not excluded.", {"Pneumonia": -1}),
        ("Cannot rule out a small effusion.", {"Pleural Effusion": -1}),
        ("possible atelectasis", {"Atelectasis": -1}),
        ("Findings may represent edema.", {"Edema": -1}),
        ("Opacity concerning for pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
        ("Atelectasis versus pneumonia.", {"Atelectasis": -1, "Pneumonia": -1}),
        ("Bibasilar atelectasis or scarring.", {"Atelectasis": -1, "Lung Opacity": -1}),
        ("Questionable nodule in the right upper lobe.", {"Lung Lesion": -1}),
        ("Suspected pneumothorax.", {"Pneumothorax": -1}),
        ("Small effusion is likely.", {"Pleural Effusion": -1}),
        ("Mild pulmonary vascular congestion.", {"Edema": -1}),  # uncertain by itself, as in the original
        ("Stable cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": -1}),
        ("Borderline heart size.", {"Cardiomegaly": -1}),
        # Pre-negation uncertainty beats negation: "no new" and "cannot exclude".
        ("No new focal consolidation.", {"Consolidation": -1}),
        ("No pneumothorax, although a small one cannot be excluded.", {"Pneumothorax": 0}),
    ],
)
def test_uncertainty(labeler: CheXpertLabeler, report: str, expected: dict[str, int]) -> None:
    got = _labels(labeler, report)
    assert {k: got.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("pneumothorax is not seen", {"Pneumothorax": 0}),
        ("The pneumothorax has resolved.", {"Pneumothorax": 0}),
        ("Pleural effusion is no longer visualized.", {"Pleural Effusion": 0}),
        ("The endotracheal tube has been removed.", {"Support Devices": 0}),
        ("Pneumonia is excluded.", {"Pneumonia": 0}),
        ("The heart is normal in size.", {"Cardiomegaly": 0}),
        ("Atelectasis may be present.", {"Atelectasis": -1}),
        ("A nodule is possible.", {"Lung Lesion": -1}),
        ("The effusion is poorly evaluated.", {"Pleural Effusion": -1}),
        ("The effusion has not resolved.", {"Pleural Effusion": 1}),  # a pseudo-negation
    ],
)
def test_post_cues(labeler: CheXpertLabeler, report: str, expected: dict[str, int]) -> None:
    got = _labels(labeler, report)
    assert {k: got.get(k) for k in expected} == expected


def test_unmention(labeler: CheXpertLabeler) -> None:
    # phrases/unmention: "pericardial effusion" is no pleural effusion, "calcified nodule" and "massive"
    # are no lung lesion, "pleural scar" no lung opacity ("scar").
    assert _labels(labeler, "Small pericardial effusion.").get("Pleural Effusion") is None
    assert (
        _labels(labeler, "Pericardial effusion and a small left pleural effusion.")["Pleural Effusion"] == 1
    )
    assert _labels(labeler, "Calcified nodule in the left upper lobe.").get("Lung Lesion") is None
    assert _labels(labeler, "Massive cardiomegaly.").get("Lung Lesion") is None
    assert _labels(labeler, "Right apical pleural scarring.") == {"Pleural Other": 1}
    # amrg's additions: plate-like atelectasis is no device, and the stem "tube" is no tuberculosis.
    assert _labels(labeler, "Plate-like atelectasis at the left base.") == {"Atelectasis": 1}
    assert "Support Devices" not in _labels(labeler, "History of tuberculosis.")
    assert _labels(labeler, "Opacity behind the heart.") == {"Lung Opacity": 1}


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        # Post-surgical and implanted hardware: Support Devices, as in CheXbert-labelled sets. IU X-ray
        # de-identifies "wires" as XXXX, so "sternotomy" itself has to say it.
        ("Intact sternotomy wires.", {"Support Devices": 1, "No Finding": 1}),
        ("Sternotomy XXXX and mediastinal clips from prior CABG.", {"Support Devices": 1, "No Finding": 1}),
        ("Status post coronary artery bypass grafting.", {"Support Devices": 1, "No Finding": 1}),
        ("Cholecystectomy clips in the right upper quadrant.", {"Support Devices": 1, "No Finding": 1}),
        ("Vagal nerve stimulator overlying the left chest.", {"Support Devices": 1, "No Finding": 1}),
        ("Right chest port with its tip in the SVC.", {"Support Devices": 1, "No Finding": 1}),
        ("Coronary artery stents.", {"Support Devices": 1, "No Finding": 1}),
        ("Cardiac pacing leads in stable position.", {"Support Devices": 1, "No Finding": 1}),
        ("Prosthetic right shoulder with a bone anchor.", {"Support Devices": 1, "No Finding": 1}),
        ("VP shunt tubing is seen.", {"Support Devices": 1, "No Finding": 1}),
        # (the original's no_finding.txt lists "tracheostomy" as an other finding, so No Finding stays blank)
        ("Tracheostomy in place.", {"Support Devices": 1}),
        # ... and the usual rules still apply to them.
        ("Interval removal of the tracheostomy tube.", {"Support Devices": 0, "No Finding": 1}),
        ("The sternotomy wires have been removed.", {"Support Devices": 0, "No Finding": 1}),
        # Not devices: breast prostheses, the pleural line of a pneumothorax, the tip of the scapula, a
        # "port"able film.
        ("Bilateral breast prostheses.", {"No Finding": 1}),
        ("No pleural line to suggest pneumothorax.", {"Pneumothorax": 0, "No Finding": 1}),
        ("Density related to the scapular tip.", {}),
        ("Portable view of the chest. Lungs clear.", {"No Finding": 1}),
    ],
)
def test_post_surgical_hardware_is_a_support_device(
    labeler: CheXpertLabeler, report: str, expected: dict[str, int]
) -> None:
    assert _labels(labeler, report) == expected


def test_or_between_devices_stays_certain(labeler: CheXpertLabeler) -> None:
    # "a/b" reads "a or b", and "or" makes a list uncertain, but not for a label every member names.
    assert _labels(labeler, "Left chest wall pacemaker/defibrillator.")["Support Devices"] == 1
    assert _labels(labeler, "PICC or central line in place.") == {"Support Devices": 1, "No Finding": 1}
    # Different findings stay uncertain, as the original's "XXX or YYY" rule says.
    assert _labels(labeler, "Scarring or atelectasis.") == {"Lung Opacity": -1, "Atelectasis": -1}
    assert _labels(labeler, "Pacemaker or effusion.") == {"Support Devices": -1, "Pleural Effusion": -1}


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("XXXX opacity.", {"Lung Opacity": 1}),
        ("No XXXX.", {"No Finding": 1}),
        ("No XXXX effusion.", {"Pleural Effusion": 0, "No Finding": 1}),
        ("XXXX effusion.", {"Pleural Effusion": 1}),
        ("Possible XXXX pneumonia.", {"Pneumonia": -1}),
        ("Cannot XXXX exclude pneumonia.", {"Pneumonia": -1}),  # a split cue still works
        ("The XXXX heart is normal in size.", {"Cardiomegaly": 0, "No Finding": 1}),
        ("Right XXXX-A-XXXX tip in the SVC.", {"Support Devices": 1, "No Finding": 1}),
        ("XXXX XXXX.", {}),  # nothing but de-identification: an empty report
    ],
)
def test_deidentification_tokens_never_create_or_flip_a_finding(
    labeler: CheXpertLabeler, report: str, expected: dict[str, int]
) -> None:
    assert _labels(labeler, report) == expected
    assert labeler.label(report) == labeler.label(report.replace("XXXX-A-XXXX", "").replace("XXXX", ""))


def test_a_deidentification_token_anywhere_changes_nothing(labeler: CheXpertLabeler) -> None:
    reports = [
        "No focal consolidation, pleural effusion, or pneumothorax.",
        "Findings suggestive of congestive heart failure.",
        "Patchy opacity in the right lower lobe, concerning for pneumonia.",
        "Stable cardiomediastinal silhouette. Intact sternotomy wires.",
        "Heart size, mediastinal silhouette, pulmonary vascularity are within normal limits.",
    ]
    for report in reports:
        words = report.split(" ")
        want = labeler.label(report)
        for i in range(len(words) + 1):
            for token in ("XXXX", "XXXX-A-XXXX", "x-XXXX"):
                assert labeler.label(" ".join([*words[:i], token, *words[i:]])) == want, (report, i, token)


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        # Pleural Other: CheXpert's "pleural parenchymal scar" with a hyphen, apical capping, fissural
        # thickening, pleural plaques and calcification, fibrotic change; cystic fibrosis is no fibrosis.
        ("Biapical pleural-parenchymal scarring.", {"Pleural Other": 1, "Lung Opacity": 1}),  # "scar"
        ("Stable bilateral apical pleural capping.", {"Pleural Other": 1}),
        ("Mild fissural thickening.", {"Pleural Other": 1}),
        ("Calcified pleural plaques.", {"Pleural Other": 1}),
        ("Stable interstitial fibrotic changes.", {"Pleural Other": 1}),
        ("Changes of cystic fibrosis.", {"No Finding": 1}),
        # Lung Lesion: a mass outside the lung is none.
        ("Known thyroid mass.", {"No Finding": 1}),
        ("Left chest wall mass.", {"No Finding": 1}),
        # Enlarged Cardiomediastinum: "contour" of a rib, hilum or aorta, and the mediastinum as a place,
        # are not the cardiomediastinal silhouette.
        ("Contour deformity of the right 7th rib.", {}),  # "deformity" is an other finding
        ("Prominent hilar contours.", {}),  # so is "prominen"
        ("Surgical clips in the mediastinum.", {"Support Devices": 1, "No Finding": 1}),
        ("Round opacity in the posterior mediastinum.", {"Lung Opacity": 1}),
        ("Widening of the mediastinum.", {"Enlarged Cardiomediastinum": 1}),
        ("Mediastinal widening.", {"Enlarged Cardiomediastinum": 1}),
    ],
)
def test_phrases_added_for_iu_xray(labeler: CheXpertLabeler, report: str, expected: dict[str, int]) -> None:
    assert _labels(labeler, report) == expected


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        # A coordinated subject of comma-separated items is reached by a post cue, however long.
        (
            "Heart size, mediastinal silhouette, pulmonary vascularity are within normal limits.",
            {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1},
        ),
        (
            "The cardiomediastinal contours, lungs, pleura, osseous structures and visualized upper abdomen "
            "are normal.",
            {"Enlarged Cardiomediastinum": 0, "No Finding": 1},
        ),
        # "otherwise" after a linking verb ends no scope; after "and" it still does.
        (
            "Cardiomediastinal silhouette is otherwise unremarkable.",
            {"Enlarged Cardiomediastinum": 0, "No Finding": 1},
        ),
        ("Small effusion and otherwise normal chest.", {"Pleural Effusion": 1}),
        # A post cue after a verb with an object describes the object.
        (
            "External monitor leads show normal size of the cardiac silhouette.",
            {"Support Devices": 1, "Cardiomegaly": 0, "No Finding": 1},
        ),
        # "within limits" (IU X-ray leaves out "normal"), "nonenlarged", "maintained".
        (
            "Heart size and mediastinal contours are within limits.",
            {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1},
        ),
        ("Nonenlarged cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": 0, "No Finding": 1}),
        ("Mediastinal contours are maintained.", {"Enlarged Cardiomediastinum": 0, "No Finding": 1}),
    ],
)
def test_scope_rules_added_for_iu_xray(
    labeler: CheXpertLabeler, report: str, expected: dict[str, int]
) -> None:
    assert _labels(labeler, report) == expected


def test_scope_ends(labeler: CheXpertLabeler) -> None:
    assert _labels(labeler, "No effusion. Large pneumothorax.") == {"Pleural Effusion": 0, "Pneumothorax": 1}
    got = _labels(labeler, "no pneumothorax but there is atelectasis")
    assert got == {"Pneumothorax": 0, "Atelectasis": 1}
    assert _labels(labeler, "No pneumothorax; small effusion.") == {"Pneumothorax": 0, "Pleural Effusion": 1}
    got = _labels(labeler, "Cardiomegaly without edema.")
    assert got == {"Cardiomegaly": 1, "Edema": 0}
    got = _labels(labeler, "No effusion, the heart is enlarged.")
    assert got["Pleural Effusion"] == 0 and got["Cardiomegaly"] == 1
    got = _labels(labeler, "Mild cardiomegaly, lungs are normal.")
    assert got == {"Cardiomegaly": 1}
    got = _labels(labeler, "No pneumothorax. Possible small effusion.")
    assert got == {"Pneumothorax": 0, "Pleural Effusion": -1}
    # A decimal point ends no sentence; "vs." is no full stop.
    assert _labels(labeler, "No 1.5 cm nodule.") == {"Lung Lesion": 0, "No Finding": 1}
    assert _labels(labeler, "Atelectasis vs. pneumonia.") == {"Atelectasis": -1, "Pneumonia": -1}


def test_no_finding(labeler: CheXpertLabeler) -> None:
    # A normal report: No Finding 1 and the negated labels 0 (as the original does).
    got = _labels(labeler, "The lungs are clear. No pleural effusion or pneumothorax. Normal heart size.")
    assert got == {"No Finding": 1, "Pleural Effusion": 0, "Pneumothorax": 0, "Cardiomegaly": 0}
    assert _labels(labeler, "The lungs are clear.") == {"No Finding": 1}
    # Support devices do not stop No Finding; any other positive or uncertain finding does.
    assert _labels(labeler, "Right PICC line in place. Lungs clear.") == {
        "Support Devices": 1,
        "No Finding": 1,
    }
    assert _labels(labeler, "Possible small effusion.") == {"Pleural Effusion": -1}
    # Other-finding phrases (no_finding.txt) also stop it, without a label of their own.
    assert _labels(labeler, "Emphysema. No pneumothorax.") == {"Pneumothorax": 0}
    assert _labels(labeler, "No emphysema.") == {"No Finding": 1}
    # No Finding is never 0 or -1.
    rows = labeler.label_batch(["Cardiomegaly.", "Possible edema.", "No edema.", "Hiatal hernia."])
    assert [r[label_index("No Finding")] for r in rows] == [None, None, 1, None]


def test_chf_adds_uncertain_cardiomegaly(labeler: CheXpertLabeler) -> None:
    assert _labels(labeler, "Findings consistent with CHF.") == {"Edema": 1, "Cardiomegaly": -1}
    assert _labels(labeler, "Possible heart failure.") == {"Edema": -1, "Cardiomegaly": -1}
    assert _labels(labeler, "No evidence of CHF.") == {"Edema": 0, "No Finding": 1}
    # Positive beats the added uncertain.
    assert _labels(labeler, "CHF with cardiomegaly.")["Cardiomegaly"] == 1


def test_aggregation(labeler: CheXpertLabeler) -> None:
    # Per label: positive > uncertain > negative, across sentences and mentions.
    assert _labels(labeler, "No effusion on the left. Right effusion.") == {"Pleural Effusion": 1}
    assert _labels(labeler, "Right effusion. No effusion on the left.") == {"Pleural Effusion": 1}
    assert _labels(labeler, "No effusion. Possible effusion.") == {"Pleural Effusion": -1}
    # The README's rule (the original's code would say -1 here).
    assert _labels(labeler, "No effusion. Possible effusion. Large effusion.") == {"Pleural Effusion": 1}


@pytest.mark.parametrize(
    "report",
    [
        "",
        "   ",
        "\n\n",
        "nan",
        "None",
        ".",
        "no",
        "no no no",
        "or or or",
        ". . ;;: ,,,",
        "/",
        "a/b/c",
        "\u00e9panchement pleural \u2014 \u2603 \U0001f600",
        "\x00\x01\x02",
        "İstanbul",
        "N\u0303O effusion",
        "effusion" * 1000,
        "no " * 5000 + "effusion",
        "(((effusion",
        "effusion)))",
        "_line_",
        "x-ray x-ray",
        "1. 2. 3. 4.",
        "CANNOT EXCLUDE PNEUMONIA",
        "pneumothorax is" + " not" * 200 + " seen",
    ],
)
def test_never_crashes(labeler: CheXpertLabeler, report: str) -> None:
    row = labeler.label(report)
    assert len(row) == NUM_LABELS
    assert all(v in (None, 0, 1, -1) for v in row)
    assert labeler.label(report) == row  # deterministic


def test_empty_and_missing_reports(labeler: CheXpertLabeler) -> None:
    assert labeler.label("") == [None] * NUM_LABELS
    assert labeler.label(None) == [None] * NUM_LABELS
    assert labeler.label(float("nan")) == [None] * NUM_LABELS  # type: ignore[arg-type]
    # "nan" is text: no findings, so No Finding 1 as the original would say.
    assert _labels(labeler, "nan") == {"No Finding": 1}
    with pytest.raises(TypeError, match="must be a str"):
        labeler.label(3)  # type: ignore[arg-type]


def test_random_strings_and_a_huge_report(labeler: CheXpertLabeler) -> None:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz .,;:/-()'\n\t0123456789\u00e9\u2014"
    words = [
        "no",
        "not",
        "effusion",
        "pleural",
        "or",
        "and",
        "possible",
        "heart",
        "size",
        "normal",
        "may",
        ",",
    ]
    reports = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(100)]
    reports += [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(100)]
    rows = labeler.label_batch(reports)
    assert len(rows) == len(reports) and all(len(r) == NUM_LABELS for r in rows)
    huge = "No pleural effusion. Mild cardiomegaly. " * 20000  # ~800 kB
    got = labeler.label(huge)
    assert got[label_index("Pleural Effusion")] == 0 and got[label_index("Cardiomegaly")] == 1


def test_long_lists_take_linear_time(labeler: CheXpertLabeler) -> None:
    # Cue spreading along lists and unmention checks are bounded per mention: 20k-mention reports
    # take about a second here; a quadratic version took minutes.
    for report in (
        "no effusion, " * 20000,
        "pericardial effusion and effusion " * 10000,
        "effusion or " * 20000,
    ):
        t0 = time.perf_counter()
        row = labeler.label(report)
        assert time.perf_counter() - t0 < 20
        assert row[label_index("Pleural Effusion")] in (0, 1, -1)


def test_batch_tensor_and_annotate(labeler: CheXpertLabeler) -> None:
    reports = ["No effusion.", "Possible pneumonia.", ""]
    rows = labeler.label_batch(reports, progress=False)
    assert rows == [labeler.label(r) for r in reports]
    t = labeler(reports)
    assert t.shape == (3, NUM_LABELS) and t.dtype == torch.float32
    assert t[0, label_index("Pleural Effusion")] == 0 and t[1, label_index("Pneumonia")] == -1
    assert torch.isnan(t[2]).all()
    assert torch.isnan(t[0, label_index("Cardiomegaly")])
    mentions = labeler.annotate("No effusion. Emphysema.")
    assert [(m.label, m.phrase, m.value) for m in mentions] == [
        ("Pleural Effusion", "effusion", 0),
        ("Other finding", "emphysema", 1),
    ]
    text = clean_text("No effusion. Emphysema.")
    assert text[mentions[0].start : mentions[0].end] == "effusion"


def test_substring_mode_is_the_original_matching() -> None:
    word, sub = CheXpertLabeler(), CheXpertLabeler(match="substring")
    # The original matches anywhere: "pacer" inside "spacer" is a device there, not here.
    assert "Support Devices" not in _labels(word, "Spacer noted.")
    assert _labels(sub, "Spacer noted.")["Support Devices"] == 1
    for report in (row["Reports"] for row in csv.DictReader(io.StringIO(_LABELED_REPORTS))):
        assert sub.label(report) == word.label(report)
    with pytest.raises(ValueError, match="match='regex'"):
        CheXpertLabeler(match="regex")  # type: ignore[arg-type]
