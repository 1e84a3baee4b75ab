"""Synthetic chest films: determinism, schema, boxes, label/report agreement, visible signs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amrg.data.schema import load_annotation
from amrg.data.synthetic import render_study, synthesize
from amrg.labels import LABELS, NUM_LABELS, label_index

NO_FINDING = label_index("No Finding")
DEVICES = label_index("Support Devices")

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


def _studies(n: int, size: int = 32, seed: int = 11, views: int = 1):
    return [render_study(np.random.default_rng([seed, i]), size, views) for i in range(n)]


def test_render_shapes_and_boxes():
    for study in _studies(40, size=48, views=2):
        assert len(study.images) == 2
        for img in study.images:
            assert img.dtype == np.uint8 and img.shape == (48, 48)
        assert len(study.labels) == NUM_LABELS
        assert all(v in (1, 0, -1, None) for v in study.labels)
        for b in study.boxes:
            x0, y0, x1, y1 = b["box"]
            assert b["label"] in LABELS and b["view"] in (0, 1)
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48, b
    # A second view is another exposure, not a copy.
    assert not np.array_equal(study.images[0], study.images[1])


def test_render_is_deterministic_by_rng_state():
    a = render_study(np.random.default_rng(5), 64, 2)
    b = render_study(np.random.default_rng(5), 64, 2)
    c = render_study(np.random.default_rng(6), 64, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert (a.labels, a.boxes, a.report) == (b.labels, b.boxes, b.report)
    assert not np.array_equal(a.images[0], c.images[0])


def test_every_drawn_label_has_a_box_in_every_view_and_no_finding_rule():
    for study in _studies(150, views=2):
        boxed = {(b["label"], b["view"]) for b in study.boxes}
        for j, name in enumerate(LABELS[:NO_FINDING]):
            drawn = study.labels[j] in (1, -1)
            for view in (0, 1):
                assert ((name, view) in boxed) == drawn, (name, study.labels, study.boxes)
        # CheXpert rule: No Finding is positive iff no other label except Support Devices is positive
        # or uncertain, else unmentioned.
        others_clear = all(v in (0, None) for j, v in enumerate(study.labels[:NO_FINDING]) if j != DEVICES)
        assert study.labels[NO_FINDING] == (1 if others_clear else None)
        assert not any(b["label"] == "No Finding" for b in study.boxes)


def test_report_states_exactly_the_labels():
    for study in _studies(250):
        assert study.report.strip() and study.report.endswith(".")
        assert _stated(study.report)[:NO_FINDING] == study.labels[:NO_FINDING], study.report


def test_label_rates():
    labels = np.array(
        [[np.nan if v is None else v for v in s.labels] for s in _studies(300, size=16, seed=3)]
    )
    drawn = np.isin(labels, (1, -1)).mean(0)
    # ~0.15-0.3 positive per finding (issue); No Finding ~0.2 so normals are well represented.
    assert np.all((drawn > 0.1) & (drawn < 0.36)), dict(zip(LABELS, drawn.round(2)))
    mentioned = ~np.isnan(labels[:, :NO_FINDING])
    uncertain = (labels[:, :NO_FINDING] == -1).sum() / mentioned.sum()
    assert 0.005 < uncertain < 0.08, uncertain  # rare, as in real reports
    assert (labels[:, :NO_FINDING] == 0).any(axis=0).all()  # every finding gets negated sometimes


def test_forced_labels_and_validation():
    codes = [None] * NUM_LABELS
    codes[label_index("Pleural Effusion")] = 1
    codes[label_index("Pneumothorax")] = 0
    codes[NO_FINDING] = 1  # ignored: derived from the others
    study = render_study(np.random.default_rng(0), 32, 1, labels=codes)
    assert study.labels[label_index("Pleural Effusion")] == 1
    assert study.labels[label_index("Pneumothorax")] == 0
    assert study.labels[NO_FINDING] is None
    with pytest.raises(ValueError, match="14 codes"):
        render_study(np.random.default_rng(0), 32, 1, labels=[1])
    with pytest.raises(ValueError, match=r"labels\[2\] \(Lung Opacity\) is 2"):
        render_study(np.random.default_rng(0), 32, 1, labels=[None, None, 2] + [None] * 11)
    with pytest.raises(ValueError, match="n_views"):
        render_study(np.random.default_rng(0), 32, 0)


@pytest.mark.parametrize("name", LABELS[:NO_FINDING])
def test_each_sign_changes_its_box(name):
    # Same rng seed with and without the finding: anatomy, other signs and noise come from separate
    # streams, so the difference is the sign alone. 64 px is the smallest size the stage-1 demo uses.
    j = label_index(name)
    for seed in range(3):
        with_sign = [0] * NUM_LABELS
        with_sign[j] = 1
        a = render_study(np.random.default_rng(seed), 64, 1, labels=with_sign)
        b = render_study(np.random.default_rng(seed), 64, 1, labels=[0] * NUM_LABELS)
        diff = np.abs(a.images[0].astype(np.float32) - b.images[0].astype(np.float32))
        inside = np.zeros_like(diff, dtype=bool)
        for box in a.boxes:
            x0, y0, x1, y1 = box["box"]
            inside[y0:y1, x0:x1] = True
        # A clearly visible change in the box (grey levels; a high percentile, because tubes and
        # lines are thin inside big boxes), and much more change inside than outside.
        assert np.percentile(diff[inside], 98) > 20, (name, seed, np.percentile(diff[inside], 98))
        assert diff[inside].mean() > 4 * diff[~inside].mean(), (name, seed)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthesize_writes_a_valid_deterministic_dataset(tmp_path):
    ann = synthesize(tmp_path / "a", n=20, seed=4, image_size=32, progress=False)
    assert ann == tmp_path / "a" / "annotation.json"
    data = load_annotation(ann)
    assert data.counts() == {"train": 16, "val": 2, "test": 2}
    ids = [s.id for s in data]
    assert sorted(ids) == [f"synth_{i:06d}" for i in range(20)]
    for study in data:
        assert (
            len(study.image_paths) in (1, 2) and study.labels is not None and len(study.labels) == NUM_LABELS
        )
        for v, rel in enumerate(study.image_paths):
            assert rel == f"images/{study.id}/{v}.png"
            with Image.open(tmp_path / "a" / rel) as img:
                assert img.mode == "L" and img.size == (32, 32)
        assert all(b.view < len(study.image_paths) for b in study.boxes)
    raw = json.loads(ann.read_text())
    assert all(rec["split"] == split for split, recs in raw.items() for rec in recs)
    assert not list((tmp_path / "a").glob(".annotation.json.tmp*"))

    synthesize(tmp_path / "b", n=20, seed=4, image_size=32, progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    synthesize(tmp_path / "c", n=20, seed=5, image_size=32, progress=False)
    assert (tmp_path / "c" / "annotation.json").read_bytes() != ann.read_bytes()


def test_synthesize_prefix_stable_and_overwrites(tmp_path):
    # Study i depends only on (seed, i): a smaller run is a prefix of a larger one.
    synthesize(
        tmp_path / "big",
        n=6,
        seed=1,
        image_size=24,
        two_view_prob=1.0,
        val_fraction=0,
        test_fraction=0,
        progress=False,
    )
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "annotation.json").write_text("stale")
    synthesize(
        tmp_path / "small",
        n=3,
        seed=1,
        image_size=24,
        two_view_prob=1.0,
        val_fraction=0,
        test_fraction=0,
        progress=False,
    )
    for i in range(3):
        for v in (0, 1):
            rel = f"images/synth_{i:06d}/{v}.png"
            assert (tmp_path / "big" / rel).read_bytes() == (tmp_path / "small" / rel).read_bytes()
    assert load_annotation(tmp_path / "small" / "annotation.json").counts() == {
        "train": 3,
        "val": 0,
        "test": 0,
    }


def test_synthesize_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be >= 1.*val_fraction"):
        synthesize(tmp_path, n=0, val_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        synthesize(tmp_path, n=10, val_fraction=0.5, test_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="two_view_prob"):
        synthesize(tmp_path, n=10, two_view_prob=2.0, progress=False)
    assert not (tmp_path / "annotation.json").exists()
