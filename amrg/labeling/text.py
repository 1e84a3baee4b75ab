"""Report text as the labelers see it: the CheXpert loader's cleaning, input checks, and one regex for
many phrases (a trie, so that matching stays fast with hundreds of phrases and cues)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["as_text", "clean_text", "has_content", "trie_regex"]

# "a/b" (-> "a or b") and punctuation glued to the next word ("normal.no" -> "normal. no").
_SPACING = re.compile(r"(?<=[a-z])/(?=[a-z])|(?<=[.,;:!?])(?=[^\W\d_])")
# A de-identification token: IU X-ray's "XXXX" and any hyphenated word that holds one ("XXXX-A-XXXX",
# "x-XXXX"), lower-cased. The labeler reads the report as if it were not there (see clean_text).
_DEID = re.compile(r"[\w-]*\bx{3,}\b[\w-]*")
_WORD = re.compile(r"[^\W_]")


def as_text(report: Any) -> str:
    """A report as a string: ``None`` and NaN (a missing cell) are empty; anything else not a str raises."""
    if report is None or (isinstance(report, float) and math.isnan(report)):
        return ""
    if not isinstance(report, str):
        raise TypeError(f"a report must be a str (or None); got {type(report).__name__}: {report!r:.80}")
    return report


def clean_text(report: str) -> str:
    """Normalise a report as the CheXpert labeler's loader does: lower case, ``and/or`` -> ``or``,
    ``a/b`` -> ``a or b``, a space after punctuation glued to a word, single spaces; plus ``vs.`` ->
    ``vs`` so that the abbreviation ends no sentence, and de-identification tokens (IU X-ray's
    ``XXXX``) removed, so that one can never create, hide or flip a finding: the report is read as if the
    unreadable word were not there."""
    text = report.lower().replace("and/or", "or")
    text = _SPACING.sub(_spacing, text)
    if "xxx" in text:
        text = _DEID.sub(" ", text)
    text = " ".join(text.split())
    return text.replace("vs.", "vs")


def has_content(text: str) -> bool:
    """True when a cleaned report holds a letter or digit (not only punctuation)."""
    return _WORD.search(text) is not None


def _spacing(m: re.Match[str]) -> str:
    return " or " if m.group() == "/" else " "


def trie_regex(alternatives: Iterable[tuple[str, ...]]) -> str:
    """One regex that matches any of the atom sequences, longest first (atoms are regex pieces)."""
    trie: dict[str, Any] = {}
    for atoms in alternatives:
        node = trie
        for atom in atoms:
            node = node.setdefault(atom, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        # A zero-width atom (\b) last, so that a longer literal continuation is tried first.
        keys = sorted((k for k in node if k), key=lambda k: (k == r"\b", k))
        alts = [k + build(node[k]) for k in keys]
        if not alts:
            return ""
        if len(alts) == 1:  # a sub-result never has a top-level "|", so plain concatenation is safe
            return f"(?:{alts[0]})?" if "" in node else alts[0]
        body = "(?:" + "|".join(alts) + ")"
        return body + "?" if "" in node else body

    return build(trie)
