"""Label sampling: rates per finding, uncertainty and negation, determinism."""

from __future__ import annotations

import numpy as np

from amrg.data.synthetic.labels import DEVICES, FINDINGS, NO_FINDING, sample_codes
from amrg.labels import LABELS, NUM_LABELS, label_index


def test_indices_follow_chexbert_order():
    assert NO_FINDING == label_index("No Finding") == NUM_LABELS - 1
    assert DEVICES == label_index("Support Devices")
    assert FINDINGS == tuple(range(NUM_LABELS - 1))


def test_sample_codes_is_deterministic_and_never_uncertain_about_devices():
    assert sample_codes(np.random.default_rng(3)) == sample_codes(np.random.default_rng(3))
    for i in range(300):
        codes = sample_codes(np.random.default_rng([1, i]))
        assert len(codes) == len(FINDINGS) and all(c in (1, 0, -1, None) for c in codes)
        assert codes[DEVICES] != -1  # a device is there or not


def test_label_rates(studies):
    labels = np.array([[np.nan if v is None else v for v in s.labels] for s in studies(300, size=16, seed=3)])
    drawn = np.isin(labels, (1, -1)).mean(0)
    # ~0.15-0.3 positive per finding (issue); No Finding ~0.2 so normals are well represented.
    assert np.all((drawn > 0.1) & (drawn < 0.36)), dict(zip(LABELS, drawn.round(2)))
    mentioned = ~np.isnan(labels[:, :NO_FINDING])
    uncertain = (labels[:, :NO_FINDING] == -1).sum() / mentioned.sum()
    assert 0.005 < uncertain < 0.08, uncertain  # rare, as in real reports
    assert (labels[:, :NO_FINDING] == 0).any(axis=0).all()  # every finding gets negated sometimes
