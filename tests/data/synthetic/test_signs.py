"""Sign sampling: every finding gets boxes near the thorax; some signs edit the anatomy."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from amrg.data.synthetic.anatomy import sample_anatomy
from amrg.data.synthetic.labels import CARDIO, DEVICES, EC, FINDINGS, FRACTURE
from amrg.data.synthetic.signs import sample_sign
from amrg.labels import LABELS


@pytest.mark.parametrize("label", FINDINGS, ids=LABELS[: len(FINDINGS)])
def test_every_finding_has_boxes_on_the_film(label):
    for i in range(20):
        a = sample_anatomy(np.random.default_rng([6, i]))
        sign = sample_sign(label, np.random.default_rng([7, i]), a)
        assert sign.label == label and sign.boxes
        for x0, y0, x1, y1 in sign.boxes:
            assert x0 < x1 and y0 < y1
            assert -0.05 < x0 and x1 < 1.05 and -0.05 < y0 and y1 < 1.05, (LABELS[label], sign.boxes)


def test_anatomy_changing_signs():
    a = sample_anatomy(np.random.default_rng(0))
    before = copy.deepcopy(a)
    sample_sign(EC, np.random.default_rng(1), a)
    assert a.med_widen > 0 and before.med_widen == 0
    sample_sign(CARDIO, np.random.default_rng(1), a)
    assert a.heart_rx > before.heart_rx
    sample_sign(FRACTURE, np.random.default_rng(1), a)
    assert len(a.fractures) == 1
    b = copy.deepcopy(a)
    sample_sign(DEVICES, np.random.default_rng(1), a)
    assert a == b  # devices sit on the patient, they do not change it


def test_devices_describe_what_they_draw():
    for i in range(30):
        sign = sample_sign(DEVICES, np.random.default_rng([8, i]), sample_anatomy(np.random.default_rng(i)))
        kinds = sign.desc["kinds"]
        assert kinds and set(kinds) <= {"pacemaker", "ett", "line"}
        assert len(sign.boxes) == len(kinds)  # one box per device
