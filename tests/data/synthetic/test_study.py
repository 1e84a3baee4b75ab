"""One study in memory: shapes, determinism, boxes per drawn label, given labels, views without prose."""

from __future__ import annotations

import numpy as np
import pytest

from amrg.data.synthetic import render_study, render_views
from amrg.labels import LABELS, NUM_LABELS, label_index

NO_FINDING = label_index("No Finding")
DEVICES = label_index("Support Devices")


def test_render_shapes_and_boxes(studies):
    for study in studies(40, size=48, views=2):
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


def test_every_drawn_label_has_a_box_in_every_view_and_no_finding_rule(studies):
    for study in studies(150, views=2):
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


def test_render_views_draws_the_films_of_render_study():
    codes = [None] * NUM_LABELS
    codes[label_index("Cardiomegaly")] = 1
    codes[label_index("Atelectasis")] = -1  # uncertain findings are drawn too
    codes[label_index("Edema")] = 0
    views = render_views(np.random.default_rng(9), 48, 2, codes)
    study = render_study(np.random.default_rng(9), 48, 2, labels=codes)
    assert len(views.images) == 2
    assert all(np.array_equal(a, b) for a, b in zip(views.images, study.images))
    assert views.boxes == study.boxes
    assert {(b["label"], b["view"]) for b in views.boxes} == {
        (name, v) for name in ("Cardiomegaly", "Atelectasis") for v in (0, 1)
    }
    normal = [None] * (NUM_LABELS - 1) + [1]
    assert render_views(np.random.default_rng(9), 48, 2, normal).boxes == []
    with pytest.raises(ValueError, match="14 codes"):
        render_views(np.random.default_rng(0), 32, 2, [1])
    with pytest.raises(ValueError, match=r"labels\[4\] \(Edema\) is 'x'"):
        render_views(np.random.default_rng(0), 32, 2, [None] * 4 + ["x"] + [None] * 9)
