"""Report cleaning, following R2Gen's rules exactly (quirks included).

AM-MRG builds on R2GenGPT, whose ``dataset/data_helper.py`` carries R2Gen's
``clean_report_iu_xray`` / ``clean_report_mimic_cxr`` (cuhksz-nlp/R2Gen ``modules/tokenizers.py``,
Apache-2.0). We reproduce those rules, not the code, and keep every quirk because published scores
are computed on text cleaned this way:

- the IU character class ``[.,?;*!%^&_+():-\\[\\]{}]`` contains the *range* ``:-\\[`` (0x3A-0x5B),
  so it also deletes ``;<=>?@`` and upper-case letters (already lower-cased by then); the hyphen
  inside words survives only because it is not in that range;
- the MIMIC-CXR rules first turn ``:`` into `` :`` and use the class ``[.,?;*!%^&_+()\\[\\]{}]``
  (no range, so ``:`` and ``-`` survive);
- ``"1. "`` is removed anywhere (also inside "11. "), enumerations 2-5 become sentence breaks;
- sentences are split on ``". "`` and re-joined with ``" . "``; an empty sentence is kept (the
  reference filters with ``!= []``, which is always true for a string), so ``" .  . "`` can occur.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

__all__ = ["CleaningStyle", "clean_report", "clean_report_iu_xray", "clean_report_mimic_cxr", "get_cleaner"]

CleaningStyle = Literal["iu_xray", "mimic_cxr", "none"]

_IU_CHARS = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_MIMIC_CHARS = re.compile(r"[.,?;*!%^&_+()\[\]{}]")
# Enumeration markers, applied in this order by the reference.
_ENUMERATION = (
    ("1. ", ""),
    (". 2. ", ". "),
    (". 3. ", ". "),
    (". 4. ", ". "),
    (". 5. ", ". "),
    (" 2. ", ". "),
    (" 3. ", ". "),
    (" 4. ", ". "),
    (" 5. ", ". "),
)


def _replace_n(text: str, old: str, new: str, times: int) -> str:
    # The reference chains str.replace a fixed number of times (not until a fixed point);
    # e.g. a run of 16 underscores is not fully collapsed. Keep that.
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _strip_quotes(sentence: str) -> str:
    return sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()


def _join(sentences: list[str], chars: re.Pattern[str]) -> str:
    return " . ".join(chars.sub("", _strip_quotes(s)) for s in sentences) + " ."


def clean_report_iu_xray(report: str) -> str:
    """Clean an IU X-ray report with R2Gen's ``clean_report_iu_xray`` rules."""
    text = _replace_n(report, "..", ".", 3)
    for old, new in _ENUMERATION:
        text = text.replace(old, new)
    return _join(text.strip().lower().split(". "), _IU_CHARS)


def clean_report_mimic_cxr(report: str) -> str:
    """Clean a MIMIC-CXR / CheXpert Plus report with R2Gen(GPT)'s ``clean_report_mimic_cxr`` rules."""
    text = report.replace("\n", " ")
    text = _replace_n(text, "__", "_", 7)
    text = _replace_n(text, "  ", " ", 6)
    text = _replace_n(text, "..", ".", 8)
    for old, new in _ENUMERATION:
        text = text.replace(old, new)
    text = text.replace(":", " :")
    return _join(text.strip().lower().split(". "), _MIMIC_CHARS)


def _identity(report: str) -> str:
    return report.strip()


_CLEANERS: dict[str, Callable[[str], str]] = {
    "iu_xray": clean_report_iu_xray,
    "mimic_cxr": clean_report_mimic_cxr,
    "none": _identity,
}


def get_cleaner(style: CleaningStyle) -> Callable[[str], str]:
    """The cleaning function for a style name ("iu_xray", "mimic_cxr" or "none")."""
    if style not in _CLEANERS:
        raise ValueError(f"unknown report cleaning {style!r}; expected one of {sorted(_CLEANERS)}")
    return _CLEANERS[style]


def clean_report(report: str, style: CleaningStyle) -> str:
    """Clean one report with the named style."""
    return get_cleaner(style)(report)
