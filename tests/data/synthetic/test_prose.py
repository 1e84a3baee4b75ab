"""Report prose: the report states exactly the stored labels."""

from __future__ import annotations

import re

from amrg.labels import NUM_LABELS, label_index

NO_FINDING = label_index("No Finding")

# A tiny sentence-level labeler for our own templates: which words mention a label, and which cues
# make a mention uncertain or negated. It checks that the stored labels are what the report says.
MENTION = {
    "Enlarged Cardiomediastinum": r"mediastin",
    "Cardiomegaly": r"cardiomegaly|heart (size|is)",
    "Lung Opacity": r"opacity",
    "Lung Lesion": r"nodule",
    "Edema": r"edema",
    "Consolidation": r"consolidation",
    "Pneumonia": r"pneumonia",
    "Atelectasis": r"atelectasis",
    "Pneumothorax": r"pneumothorax",
    "Pleural Effusion": r"effusion",
    "Pleural Other": r"pleural thickening",
    "Fracture": r"fracture",
    "Support Devices": r"pacemaker|endotracheal tube|central line|support devices",
}
UNCERTAIN = re.compile(r"\b(possible|cannot exclude|questionable|may)\b")
NEGATED = re.compile(r"\b(no|not|normal)\b")


def _stated(report: str) -> list[int | None]:
    codes: list[int | None] = [None] * NUM_LABELS
    for sentence in (s.strip().lower() for s in report.split(".")):
        for name, pattern in MENTION.items():
            if not re.search(pattern, sentence):
                continue
            code = -1 if UNCERTAIN.search(sentence) else 0 if NEGATED.search(sentence) else 1
            j = label_index(name)
            assert codes[j] in (None, code), f"{name}: contradictory sentences in {report!r}"
            codes[j] = code
    return codes


def test_report_states_exactly_the_labels(studies):
    for study in studies(250):
        assert study.report.strip() and study.report.endswith(".")
        assert _stated(study.report)[:NO_FINDING] == study.labels[:NO_FINDING], study.report


# Which region of the film a sentence speaks of (the prose's reading-order regions).
REGION = {
    "devices": r"pacemaker|endotracheal tube|central line|support devices",
    "heart": r"mediastin|cardiomegaly|heart|cardiomediastinal",
    "lungs": r"opacity|nodule|edema|consolidation|pneumonia|atelectasis|lungs",  # before pleura: "no
    "pleura": r"pneumothorax|pleural",  # consolidation, pleural effusion, or pneumothorax" is a lung sentence
    "bones": r"fracture|osseous",
}


def test_findings_come_in_one_of_the_reading_orders(studies):
    from amrg.data.synthetic.prose import READING_ORDERS

    used = set()
    for study in studies(150):
        if any(v == 1 for v in study.labels[:NO_FINDING]):
            continue  # the impression restates positives after the findings; check findings-only reports
        regions = []
        for sentence in (s.strip().lower() for s in study.report.split(".") if s.strip()):
            found = [r for r, pattern in REGION.items() if re.search(pattern, sentence)]
            if found and not sentence.startswith("no acute cardiopulmonary"):
                regions.append(found[0])
        fits = [
            order
            for order in READING_ORDERS
            if [order.index(r) for r in regions] == sorted(order.index(r) for r in regions)
        ]
        assert fits, (regions, study.report)
        used.update(fits)
    assert len(used) == len(READING_ORDERS)  # every reading order occurs
