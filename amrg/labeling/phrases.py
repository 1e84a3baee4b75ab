"""Mention and unmention phrases of the CheXpert labeler: the phrase file, and finding mentions in text.

The packaged file ``_phrases/chexpert_phrases.json`` holds the original's phrase lists unchanged (MIT
notice inside) plus amrg's additions (``amrg_mention`` / ``amrg_unmention``), which
:mod:`amrg.labeling.chexpert` explains.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amrg.labeling.text import trie_regex
from amrg.labels import LABELS, NUM_LABELS

__all__ = ["DEFAULT_PHRASES", "OTHER", "Found", "Phrase", "PhraseMatcher", "load_phrases"]

# The CheXpert labeler's phrase lists (MIT notice inside), packaged with amrg.
DEFAULT_PHRASES = Path(__file__).with_name("_phrases") / "chexpert_phrases.json"

OTHER = NUM_LABELS  # pseudo-label of the other-finding phrases (no_finding.txt)

# Head words of "Silhouette/cardiomediastinal is stable|unchanged" (post_negation_uncertainty.txt).
_SILHOUETTE_WORDS = (
    "cardiomediastinal",
    "pericardial",
    "mediastinal",
    "mediastinum",
    "cardiomediastinum",
    "contour",
    "configuration",
    "silhouette",
    "size",
    "heart",
    "shadow",
)
# Edema phrases that a post-negation uncertainty rule matches by themselves ("vascular congestion" ...).
_ALWAYS_UNCERTAIN = ("vascular congestion", "pulmonary congestion", "indistinctness", "vascular prominence")
_CHF = ("chf", "heart failure")


@dataclass(frozen=True)
class Phrase:
    """A phrase as matched, with the labels it names and the rules that single it out."""

    text: str  # as matched (boundary marks removed)
    labels: tuple[int, ...]
    silhouette: bool  # a heart / mediastinal silhouette phrase: "stable" makes it uncertain
    always_uncertain: bool  # "vascular congestion" and the like: uncertain Edema by itself
    chf: bool  # "chf", "heart failure": a positive or uncertain one adds an uncertain Cardiomegaly
    regex: re.Pattern[str]  # this phrase alone, anchored with .match at a position


# One match: (start, end, phrase, label); ``end`` is the end of the word that holds the phrase's end.
Found = tuple[int, int, Phrase, int]


def load_phrases(path: Path) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Mention and unmention phrases by label index (``OTHER`` for the other-finding phrases).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or a section, label or phrase list of the wrong kind (all of them listed).
    """
    if not path.is_file():
        raise FileNotFoundError(f"CheXpert phrase file {path} not found (set phrases=)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"CheXpert phrase file {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("mention"), dict):
        raise ValueError(f"CheXpert phrase file {path}: expected an object with a 'mention' object")
    problems: list[str] = []

    def table(*keys: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for key in keys:
            section = data.get(key, {})
            if not isinstance(section, dict):
                problems.append(f"'{key}' is a {type(section).__name__}, expected an object")
                continue
            for name, phrases in section.items():
                index = OTHER if name == "No Finding" else LABELS.index(name) if name in LABELS else None
                if index is None:
                    problems.append(f"'{key}' has unknown label {name!r}; expected one of {list(LABELS)}")
                    continue
                if not isinstance(phrases, list) or not all(
                    isinstance(p, str) and p.strip() for p in phrases
                ):
                    problems.append(f"'{key}'/{name!r}: expected a list of non-empty strings")
                    continue
                out.setdefault(index, []).extend(p.strip().lower() for p in phrases)
        return out

    mention = table("mention", "amrg_mention")
    unmention = table("unmention", "amrg_unmention")
    if problems:
        raise ValueError(f"CheXpert phrase file {path}: " + "; ".join(problems))
    return mention, unmention


class PhraseMatcher:
    """Finds every mention of a cleaned text, unmentions removed.

    Args:
        mention: phrases by label index (:func:`load_phrases`).
        unmention: phrases whose overlap drops a mention of the same label.
        match: ``"word"`` matches phrases at word starts; ``"substring"`` anywhere, as the original.
    """

    def __init__(
        self,
        mention: dict[int, list[str]],
        unmention: dict[int, list[str]],
        match: Literal["word", "substring"] = "word",
    ) -> None:
        self.match = match
        self.phrases, self._mention_rx, self._co_matches = self._compile(mention)
        self.unmention, self._unmention_rx, _ = self._compile(unmention)

    def _atoms(self, phrase: str) -> tuple[str, ...]:
        atoms: list[str] = []
        for i, ch in enumerate(phrase):
            if ch == "_":
                if self.match == "substring":
                    atoms.append(" ")
                elif 0 < i:  # a leading "_" is implied by matching at word starts
                    atoms.append(r"\b")
            else:
                atoms.append(re.escape(ch))
        return tuple(atoms)

    def _literal(self, phrase: str) -> str:
        return phrase.replace("_", " " if self.match == "substring" else "")

    def _compile(
        self, table: dict[int, list[str]]
    ) -> tuple[dict[str, Phrase], re.Pattern[str], dict[str, tuple[Phrase, ...]]]:
        by_literal: dict[str, tuple[list[int], str]] = {}
        for label, phrases in table.items():
            for phrase in phrases:
                literal = self._literal(phrase)
                labels, _ = by_literal.setdefault(literal, ([], phrase))
                if label not in labels:
                    labels.append(label)
        start = r"\b" if self.match == "word" else ""
        info: dict[str, Phrase] = {}
        for literal, (labels, phrase) in by_literal.items():
            atoms = self._atoms(phrase)
            info[literal] = Phrase(
                text=literal.strip(),
                labels=tuple(sorted(labels)),
                silhouette=any(w in literal for w in _SILHOUETTE_WORDS),
                always_uncertain=literal.strip() in _ALWAYS_UNCERTAIN,
                chf=literal.strip() in _CHF,
                regex=re.compile("".join(atoms)),
            )
        atoms_all = [self._atoms(p) for _, p in by_literal.values()]
        # Zero-width search so that overlapping matches (at other starts) are all found.
        rx = (
            re.compile(start + "(?=(" + trie_regex(atoms_all) + r")(\w*))")
            if atoms_all
            else re.compile(r"(?!)")
        )
        # Shorter phrases that match where a longer one does: its literal prefixes.
        co = {
            lit: tuple(info[other] for other in info if other != lit and lit.startswith(other))
            for lit in info
        }
        return info, rx, co

    def find(self, text: str) -> list[Found]:
        """All (start, end, phrase, label) matches, unmentions removed, in the order found."""
        found: list[Found] = []
        for m in self._mention_rx.finditer(text):
            start, literal, end = m.start(), m.group(1), m.end(2)
            phrase = self.phrases[literal]
            for label in phrase.labels:
                found.append((start, end, phrase, label))
            for other in self._co_matches[literal]:
                if other.regex.match(text, start):
                    for label in other.labels:
                        found.append((start, end, other, label))
        if not found:
            return found
        spans = [
            (m.start(), m.start() + len(m.group(1)), m.group(1)) for m in self._unmention_rx.finditer(text)
        ]
        if not spans:
            return found
        starts = [s for s, _, _ in spans]
        longest = max(e - s for s, e, _ in spans)
        kept = []
        for f in found:
            # The original tests overlap with the phrase's own span (before word-end extension); only
            # unmentions that start less than the longest one's length before it can overlap.
            start, end = f[0], f[0] + len(f[2].text)
            i = bisect.bisect_left(starts, end) - 1
            while i >= 0 and starts[i] > start - longest:
                s, e, lit = spans[i]
                if s < end and e > start and f[3] in self.unmention[lit].labels:
                    break
                i -= 1
            else:
                kept.append(f)
        return kept
