"""Rendering: every sign is visible inside its box; views and pixel boxes."""

from __future__ import annotations

import numpy as np
import pytest

from amrg.data.synthetic import render_study
from amrg.data.synthetic.render import View, pixel_box, sample_view
from amrg.labels import LABELS, NUM_LABELS, label_index

NO_FINDING = label_index("No Finding")


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


def test_first_view_is_canonical_and_pixel_boxes_stay_on_the_image():
    rng = np.random.default_rng(0)
    first, second = sample_view(rng, 0), sample_view(rng, 1)
    assert (first.angle, first.scale, first.shift) == (0.0, 1.0, (0.0, 0.0))
    assert pixel_box((0.25, 0.5, 0.75, 0.75), first, 64) == [16, 32, 48, 48]
    assert second.angle != 0.0
    for box in ((0.0, 0.0, 1.0, 1.0), (-0.1, 0.9, 0.05, 1.2), (0.4, 0.4, 0.41, 0.41)):
        x0, y0, x1, y1 = pixel_box(box, second, 64)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_view_inverse_undoes_forward():
    view = View(
        gain=2.5, fog=0.03, vignette=0.2, blur=0.5, noise=2.0, angle=0.04, scale=0.97, shift=(0.02, -0.01)
    )
    a, b, c, d, e, f = view.inverse_coeffs(100)
    px, py = view.forward(30.0, 70.0, 100)
    assert np.allclose((a * px + b * py + c, d * px + e * py + f), (30.0, 70.0))
