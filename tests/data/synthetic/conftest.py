"""Shared helpers for the synthetic-film tests: a batch of rendered studies."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from amrg.data.synthetic import SyntheticStudy, render_study


@pytest.fixture
def studies() -> Callable[..., list[SyntheticStudy]]:
    """``studies(n, size=32, seed=11, views=1)``: n studies rendered from ``default_rng([seed, i])``."""

    def make(n: int, size: int = 32, seed: int = 11, views: int = 1) -> list[SyntheticStudy]:
        return [render_study(np.random.default_rng([seed, i]), size, views) for i in range(n)]

    return make
