"""Tests for amrg.labeling.text: report cleaning, input checks and the phrase trie."""

from __future__ import annotations

import math
import re

import pytest

from amrg.labeling.text import as_text, clean_text, has_content, trie_regex


def test_clean_text() -> None:
    assert clean_text("Effusion/atelectasis  and/or\nPNEUMONIA") == "effusion or atelectasis or pneumonia"
    assert (
        clean_text("normal.No effusion,no pneumothorax. 1.5 cm")
        == "normal. no effusion, no pneumothorax. 1.5 cm"
    )
    assert clean_text("Effusion vs. atelectasis.") == "effusion vs atelectasis."  # "vs." ends no sentence
    # De-identification tokens (IU X-ray's XXXX) are read as if they were not there.
    assert clean_text("Right XXXX-A-XXXX tip, chest x-XXXX. XXXX effusion") == "right tip, chest . effusion"
    assert clean_text("x-ray of the xxxl") == "x-ray of the xxxl"  # only whole tokens of x's


def test_has_content() -> None:
    assert has_content("no .") and has_content("1.")
    assert not has_content("") and not has_content(". , ;") and not has_content(clean_text("XXXX. XXXX"))


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
