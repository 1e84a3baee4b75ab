"""Report cleaning: worked examples of R2Gen's rules, quirks included."""

import pytest

from amrg.data.cleaning import clean_report, clean_report_iu_xray, clean_report_mimic_cxr, get_cleaner


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # sentences split on ". ", re-joined with " . ", final " ."
        ("The heart is normal. The lungs are clear.", "the heart is normal . the lungs are clear ."),
        # "1. " removed, " 2. " becomes a sentence break; "..." collapses
        ("1. No acute disease... 2. Stable nodule.", "no acute disease . stable nodule ."),
        # the range :-\[ deletes : ; < = > ? @ but keeps the hyphen and digits
        ("Left-sided effusion (small); X-ray @ 10:30 <ok>=", "left-sided effusion small x-ray  1030 ok ."),
        # quotes and slashes removed
        ('"AP/PA" view\'s quality', "appa views quality ."),
        # empty sentence kept (the reference's `!= []` filter never removes a string)
        ("Clear. . Normal.", "clear .  . normal ."),
    ],
)
def test_iu_xray_examples(raw: str, expected: str) -> None:
    assert clean_report_iu_xray(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # newlines to spaces, ":" becomes " :" and survives (no range in the MIMIC class)
        ("FINDINGS:\nHeart size is normal.", "findings : heart size is normal ."),
        # runs of "__" collapse, double spaces collapse
        ("Patient __ is  stable.", "patient  is stable ."),
        # the hyphen survives, enumerations become breaks
        (
            "IMPRESSION: 1. No acute cardio-pulmonary process. 2. Stable.",
            "impression : no acute cardio-pulmonary process . stable .",
        ),
        # the MIMIC class keeps = < > @ that the IU range deletes
        ("pH=7 @ <5", "ph=7 @ <5 ."),
    ],
)
def test_mimic_cxr_examples(raw: str, expected: str) -> None:
    assert clean_report_mimic_cxr(raw) == expected


def test_styles_differ_on_colon_and_range() -> None:
    raw = "Impression: a=b."
    assert clean_report(raw, "iu_xray") == "impression ab ."
    assert clean_report(raw, "mimic_cxr") == "impression : a=b ."
    assert clean_report("  Keep As Is.  ", "none") == "Keep As Is."


def test_fixed_number_of_replacements_quirk() -> None:
    # MIMIC collapses double spaces with six chained replace() calls, not until a fixed point:
    # each call halves a run, so 64 spaces end as 1 but 65..128 still leave 2.
    assert clean_report_mimic_cxr("a" + " " * 64 + "b") == "a b ."
    assert clean_report_mimic_cxr("a" + " " * 128 + "b") == "a  b ."


def test_unknown_style_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown report cleaning 'r2gen'"):
        get_cleaner("r2gen")  # type: ignore[arg-type]
