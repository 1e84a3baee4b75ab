"""Tests for amrg.labeling.text: report cleaning, input checks and the phrase trie."""

from __future__ import annotations

import math
import re

import pytest

from amrg.labeling.text import as_text, clean_text, trie_regex


def test_clean_text() -> None:
    assert clean_text("Effusion/atelectasis  and/or\nPNEUMONIA") == "effusion or atelectasis or pneumonia"
    assert (
        clean_text("normal.No effusion,no pneumothorax. 1.5 cm")
        == "normal. no effusion, no pneumothorax. 1.5 cm"
    )
    assert clean_text("Effusion vs. atelectasis.") == "effusion vs atelectasis."  # "vs." ends no sentence


def test_as_text() -> None:
    assert as_text(None) == "" and as_text(math.nan) == "" and as_text("x") == "x"
    with pytest.raises(TypeError, match="a report must be a str.*got int: 3"):
        as_text(3)


def test_trie_regex_prefers_the_longest_alternative() -> None:
    rx = re.compile(trie_regex([tuple("effusion"), tuple("eff"), tuple("edema")]))
    assert rx.match("effusions").group() == "effusion"
    assert rx.match("effort").group() == "eff"
    assert rx.match("edematous").group() == "edema"
    assert rx.match("emphysema") is None
