"""Tests for amrg.labeling.phrases: the packaged phrase file, custom files and their errors."""

from __future__ import annotations

import json

import pytest

from amrg.labeling.chexpert import CheXpertLabeler
from amrg.labeling.phrases import DEFAULT_PHRASES, OTHER, PhraseMatcher, load_phrases
from amrg.labels import LABELS, label_index


def _labels(labeler: CheXpertLabeler, report: str) -> dict[str, int]:
    return {LABELS[i]: v for i, v in enumerate(labeler.label(report)) if v is not None}


def test_phrase_file(tmp_path) -> None:
    data = json.loads(DEFAULT_PHRASES.read_text())
    assert "Stanford Machine Learning Group" in "\n".join(data["license"])  # MIT notice kept with the copy
    assert set(data["mention"]) == set(LABELS)
    custom = tmp_path / "phrases.json"
    custom.write_text(json.dumps({"mention": {"Pneumothorax": ["ptx"], "No Finding": ["granuloma"]}}))
    lab = CheXpertLabeler(phrases=custom)
    assert _labels(lab, "No PTX.") == {"Pneumothorax": 0, "No Finding": 1}
    assert _labels(lab, "Granuloma.") == {}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mention": {"Pneumothorax": ["ptx"], "Lung Cancer": ["tumor"]}}))
    with pytest.raises(ValueError, match=r"bad\.json.*unknown label 'Lung Cancer'"):
        CheXpertLabeler(phrases=bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CheXpertLabeler(phrases=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="pre_window"):
        CheXpertLabeler(pre_window=-1)


def test_matcher_finds_overlaps_and_drops_unmentions() -> None:
    mention = {label_index("Lung Lesion"): ["nodul", "mass"], OTHER: ["calcified"]}
    unmention = {label_index("Lung Lesion"): ["calcified nodul"]}
    matcher = PhraseMatcher(mention, unmention)
    found = [(s, e, p.text, lab) for s, e, p, lab in matcher.find("calcified nodule. nodular mass")]
    assert found == [
        (0, 9, "calcified", OTHER),  # the unmention removes the nodule, not the other finding
        (18, 25, "nodul", label_index("Lung Lesion")),  # a stem: the match runs to the word's end
        (26, 30, "mass", label_index("Lung Lesion")),
    ]
    mention_only, _ = load_phrases(DEFAULT_PHRASES)
    assert "pneumothorax" in mention_only[label_index("Pneumothorax")]
