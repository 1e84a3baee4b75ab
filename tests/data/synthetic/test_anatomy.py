"""Patient anatomy: sampling and the geometry helpers."""

from __future__ import annotations

import numpy as np
import pytest

from amrg.data.synthetic.anatomy import (
    SIDE_SIGN,
    ZONES,
    centred_box,
    heart_q,
    lung_half_width,
    lung_inside,
    lung_point,
    poly_box,
    sample_anatomy,
)


def test_sample_anatomy_is_deterministic_and_plausible():
    a, b = sample_anatomy(np.random.default_rng(4)), sample_anatomy(np.random.default_rng(4))
    assert a == b
    for i in range(50):
        a = sample_anatomy(np.random.default_rng([2, i]))
        for side in (0, 1):
            assert 0 < a.lung_top[side] < a.lung_base[side] < 1
            assert 0 < a.lung_cx(side) < 1 and (a.lung_cx(side) - 0.5) * SIDE_SIGN[side] > 0
        assert a.lung_base[0] < a.lung_base[1]  # the right hemidiaphragm sits higher
        assert a.heart_x > 0.5  # the heart bulges to the patient's left (image right)


def test_lung_point_is_inside_a_lung_and_clear_of_the_heart():
    for i in range(50):
        rng = np.random.default_rng([5, i])
        a = sample_anatomy(rng)
        side, zone, x, y = lung_point(rng, a, (0, 1), ZONES, 0.03)
        assert zone in ZONES and side in (0, 1)
        assert lung_inside(a, side, x, y) < 0.8
        assert heart_q(a, x, y) > 1
        assert lung_half_width(a, side, y) > 0


def test_boxes():
    assert centred_box(0.5, 0.4, 0.1, 0.2) == pytest.approx((0.4, 0.2, 0.6, 0.6))
    assert poly_box([(0.1, 0.2), (0.3, 0.1)], 0.05) == (0.05, 0.05, 0.35, 0.25)
