"""Read the 14 CheXpert labels off report text: a rule-based offline labeler and a CheXbert one.

:class:`CheXpertLabeler` re-implements the CheXpert labeler (Irvin et al., 2019, "CheXpert: A Large
Chest Radiograph Dataset with Uncertainty Labels and Expert Comparison", arXiv:1901.07031;
stanfordmlgroup/chexpert-labeler, MIT licence) without its dependency parser. Its phrase lists are
copied unchanged into ``_phrases/chexpert_phrases.json`` with the MIT notice; the negation and
uncertainty cues below are rewritten as regular expressions from the comments and lemmas of the
original's Semgrex files (``patterns/pre_negation_uncertainty.txt``, ``negation.txt``,
``post_negation_uncertainty.txt``).

How a report is labelled:

1. Clean as the original loader does: lower-case, ``and/or`` -> ``or``, ``a/b`` -> ``a or b``,
   a space after punctuation glued to a word, whitespace collapsed. R2Gen-cleaned text (no commas,
   `` . `` between sentences) works too.
2. Mentions: every phrase of ``mention`` matched at a word start; a phrase is a stem
   (``atelecta`` matches "atelectasis"), ``_`` is a word boundary (``_line_`` is the word "line").
   Overlapping matches of different phrases are all kept, as the original runs each phrase
   separately. A mention that overlaps an ``unmention`` phrase of its label is dropped.
3. Cues: each cue is a regular expression with a kind and a direction. A *pre* cue ("no",
   "without", "possible", "may", "cannot exclude") reaches the first mention after it; a *post*
   cue ("is not seen", "has resolved", "cannot be excluded", "is normal") reaches the last
   mention before it. The reach stops at a scope end (below) and after ``pre_window`` /
   ``post_window`` words.
4. Coordination: mentions joined by ``,``, "and", "or", "nor" or (in comma-less cleaned text) by at
   most ``chain_window`` plain words form a list, and a cue that reaches one member spreads along
   the list ("no pleural effusion or pneumothorax" negates both; "heart size and mediastinal
   contours are normal" negates both). A list with "or" in it makes its members uncertain
   (the original's ``XXX or YYY`` rule), after negation.
5. Per mention, as the original's detector orders its rule files: pre-negation uncertainty
   ("cannot exclude", "no new", "not ruled out") -> -1, else negation -> 0, else uncertainty
   -> -1, else positive 1.
6. Aggregation, as the original's README: per label positive > uncertain > negative; a positive or
   uncertain "chf" / "heart failure" adds an uncertain Cardiomegaly; No Finding is 1 when no
   mention of another label except Support Devices (the other-finding phrases of
   ``no_finding.txt`` included) is positive or uncertain, else None. A report with no findings
   therefore gets No Finding 1 and 0 for each negated label.

Scope ends (decided from the reference's rules, which follow the dependency tree): the end of a
sentence (``. ! ?``, not a decimal point), ``;`` and ``:``, and the words "but", "however",
"although", "though", "whereas", "while", "which", "who", "yet", "except", "aside from", "apart
from", "besides", "other than", "otherwise", "with", "there", "due to", "related to", "given",
"because", "since". "with" ends a scope because the original's negation of "no X" does not reach
a noun attached by "with" ("cardiomegaly without edema", "effusion with adjacent atelectasis");
"there" starts a new clause ("no effusion, there is a pneumothorax"); "otherwise" closes a list
("small effusion and otherwise normal chest"). Between a pre cue and the first mention it
reaches, a copula ("is", "are", "was", "were") also ends the scope, and so does a comma unless it
follows a single word ("no acute, displaced rib fractures"); conjunctions do not ("normal in size
and contour", "no evidence for failure or pneumonia"), as the original spreads negation over
conjuncts. Between the last mention and a post cue, a conjunction is allowed only where the
mention heads a coordinated subject ("heart size and pulmonary vascularity are normal").

Uncertainty beats negation where the original's rule order says so: "cannot exclude", "not
excluded", "cannot rule out", "no new", "no evidence to rule out" are pre-negation uncertainty
(-1); "no evidence of X versus Y" and "no X or Y" stay negative, since "versus" and "or" are
post-negation uncertainty rules.

Deliberate departures from the original, each for a reason:

- Phrases match at word starts only; the original matches substrings anywhere, so "plate" is a
  device inside "endplate", "pacer" inside "spacer", and the unmention "calcified nodul" removes
  the nodule of "noncalcified nodule". Substrings the original relied on come back as added
  phrases: "cardiomediastinal silhouette" (Enlarged Cardiomediastinum, via "mediastinal
  silhouette"), "hydropneumothorax", "hemopneumothorax". ``match="substring"`` restores the
  original matching.
- Added unmention phrases (``amrg_unmention``): for Support Devices "plate-like" / "platelike"
  atelectasis, "tuberculosis" / "tuberosity" (stem "tube"), Kerley / septal / B-"lines",
  "supportive" / "supporting" (stem "support"); for Cardiomegaly "the heart" used as a place
  ("behind / over / overlying / posterior to ... the heart", "the heart border"); for Pneumonia
  "granulomatous infection" (old granulomatous disease, not pneumonia).
- Aggregation follows the README (positive > uncertain > negative). The original's
  ``dict_to_vec`` returns uncertain when a label has negative, uncertain *and* positive mentions.
- "likely" ("likely atelectasis", "pneumonia is likely"), "suggestive of" and "X is not seen" are
  cues here (the brief of amrg's issue); the original has "less likely", "suggestion of" and "X is
  no longer seen". "within normal limits", "upper limits of normal" and "top normal" are single
  cues so that a long subject still reaches them.
- An empty report (or ``None`` / NaN) gets no labels at all, not No Finding 1.
"""

from __future__ import annotations

import bisect
import inspect
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrg._state import load_state_strict
from amrg.labels import LABELS, NUM_LABELS

__all__ = [
    "DEFAULT_PHRASES",
    "CheXbertLabeler",
    "CheXbertNet",
    "CheXpertLabeler",
    "Mention",
    "clean_text",
    "load_chexbert_state_dict",
]

log = logging.getLogger(__name__)

# The CheXpert labeler's phrase lists (MIT notice inside), packaged with amrg.
DEFAULT_PHRASES = Path(__file__).with_name("_phrases") / "chexpert_phrases.json"

_NO_FINDING = LABELS.index("No Finding")
_SUPPORT = LABELS.index("Support Devices")
_CARDIOMEGALY = LABELS.index("Cardiomegaly")
_OTHER = NUM_LABELS  # pseudo-label of the other-finding phrases (no_finding.txt)

# Cue kinds, by the rule file they come from. Bits of a per-mention flag word.
_PRENEG = 1  # pre_negation_uncertainty.txt: checked first, uncertain
_NEG = 2  # negation.txt
_UNC = 4  # post_negation_uncertainty.txt
_SIL = 8  # "stable/unchanged" heart or mediastinal silhouette: uncertain (post_negation_uncertainty.txt)
_OR = 16  # member of an "X or Y" list: uncertain (post_negation_uncertainty.txt)
_PSEUDO = 32  # looks like a cue but is not ("no change in", "not only"): matched to be skipped
_CONDNEG = 64  # "no NN to suggest/explain XXX" (negation.txt): negates when a negation precedes it

_PRE, _POST, _BOTH = 1, 2, 3

# (kind, direction, regex). Each regex starts with one literal word (its trigger); entries that share a
# trigger are tried in this order, so longer and more specific ones come first. Only (?:...) groups.
_CUES: tuple[tuple[int, int, str], ...] = (
    # --- pre_negation_uncertainty.txt: "cannot exclude", "XXX is not excluded", "no new XXX",
    # "cannot rule out XXX", "no evidence to rule out XXX".
    (_PRENEG, _PRE, r"cannot (?:entirely |completely |totally |definitely |fully )?(?:exclude|rule out)"),
    (
        _PRENEG,
        _POST,
        r"cannot (?:be )?(?:entirely |completely |totally |definitely |fully )?(?:excluded|ruled out)",
    ),
    (_PRENEG, _PRE, r"can not (?:entirely |completely )?(?:exclude|rule out)"),
    (_PRENEG, _POST, r"can not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)"),
    (_PRENEG, _PRE, r"can't (?:entirely |completely )?(?:exclude|rule out)"),
    (_PRENEG, _POST, r"can't (?:be )?(?:entirely |completely )?(?:excluded|ruled out)"),
    (_PRENEG, _PRE, r"could not (?:entirely |completely )?(?:exclude|rule out)"),
    (_PRENEG, _POST, r"could not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)"),
    (_PRENEG, _PRE, r"difficult to (?:exclude|rule out)"),
    (
        _PRENEG,
        _POST,
        r"not (?:be )?(?:entirely |completely |totally |definitely |fully |been )?(?:excluded|ruled out)",
    ),
    (_PRENEG, _PRE, r"no evidence to rule out"),
    (_PRENEG, _PRE, r"no new"),
    # --- negation.txt, patterns that start with a cue that is not itself a negation.
    (_CONDNEG, _PRE, r"to (?:suggest|explain|diagnose|indicate)"),
    # "no change in", "without change", "not changed": pseudo-negations, and for the heart or mediastinal
    # silhouette an uncertainty ("Silhouette/cardiomediastinal is stable|unchanged|not changed").
    (_SIL, _BOTH, r"no (?:significant |substantial |appreciable |definite |acute )?(?:interval )?changes?"),
    (_SIL, _BOTH, r"without (?:significant |substantial |appreciable |definite )?(?:interval )?changes?"),
    (_SIL, _BOTH, r"not (?:significantly |substantially |appreciably )?changed"),
    (_SIL, _BOTH, r"stable"),
    (_SIL, _BOTH, r"unchanged"),
    (_SIL, _BOTH, r"similar (?:in appearance )?(?:to|with) (?:the )?(?:prior|previous|recent)"),
    (
        _PSEUDO,
        _BOTH,
        r"no (?:significant |substantial |appreciable |definite )?(?:interval )?"
        r"(?:increase|decrease|worsening|progression|improvement|enlargement of the)",
    ),
    (
        _PSEUDO,
        _BOTH,
        r"not (?:completely |fully |entirely |yet |significantly )?(?:resolved|cleared|improved|removed|worsened)",
    ),
    (_PSEUDO, _BOTH, r"not only"),
    (_PSEUDO, _BOTH, r"gram negative"),
    # --- post_negation_uncertainty.txt: "XXX is not well visualized/evaluated", "XXX are not clearly
    # seen", "XXX was not appreciated", "XXX is poorly/incompletely evaluated".
    (
        _UNC,
        _POST,
        r"not (?:well |clearly |definitely |optimally )(?:seen|visualized|evaluated|assessed|demonstrated)",
    ),
    (_UNC, _POST, r"not (?:visualized|appreciated)"),
    # --- negation.txt
    # "XXX is no longer seen", then "no XXX", "no evidence of XXX", "no focus/area/development of XXX".
    (
        _NEG,
        _POST,
        r"no longer (?:seen|visualized|visible|present|evident|identified|demonstrated|noted|apparent|appreciated)",
    ),
    (_NEG, _PRE, r"no"),
    # "XXX is not seen/enlarged", "does not demonstrate XXX" (the brief: post cue "is not seen").
    (_NEG, _BOTH, r"not"),
    (_NEG, _PRE, r"without"),
    (_NEG, _PRE, r"neither"),
    (_NEG, _PRE, r"nor"),
    (_NEG, _PRE, r"absence of"),
    (_NEG, _BOTH, r"absent"),
    (_NEG, _PRE, r"negative for"),
    (_NEG, _PRE, r"free of"),
    (_NEG, _PRE, r"clear of"),
    (_NEG, _PRE, r"clearing(?: of)?"),
    (_NEG, _BOTH, r"cleared"),
    (_NEG, _BOTH, r"resolved"),
    (_NEG, _PRE, r"resolution of"),
    (_NEG, _PRE, r"disappearance of"),
    (_NEG, _PRE, r"drainage of"),
    (_NEG, _BOTH, r"removal(?: of)?"),
    (_NEG, _BOTH, r"removed"),
    (_NEG, _PRE, r"history of"),
    (_NEG, _PRE, r"rather than"),
    (_NEG, _PRE, r"to exclude"),
    (_NEG, _PRE, r"exclude"),
    (_NEG, _BOTH, r"excluded"),
    (_NEG, _PRE, r"rule out"),
    (_NEG, _BOTH, r"ruled out"),
    # "normal/unremarkable XXX", "XXX is/appears normal", "XXX within normal limits", "upper limits of normal".
    (_NEG, _BOTH, r"(?:within|at) (?:the )?(?:upper )?(?:normal limits?|limits? of normal)"),
    (_NEG, _BOTH, r"upper (?:limits? of )?normal"),
    (_NEG, _BOTH, r"top(?:-| )?normal"),
    (_NEG, _BOTH, r"normal"),
    (_NEG, _BOTH, r"unremarkable"),
    (_NEG, _BOTH, r"wnl"),
    # --- post_negation_uncertainty.txt
    # "XXX could/might/may/possibly be present", "XXX could appear", "XXX may have this appearance".
    (_UNC, _POST, r"may (?:also )?(?:possibly )?be present"),
    (_UNC, _POST, r"might (?:also )?(?:possibly )?be present"),
    (_UNC, _POST, r"could (?:also )?(?:possibly )?be present"),
    (_UNC, _POST, r"can (?:also )?be present"),
    (_UNC, _POST, r"possibly (?:be )?present"),
    (_UNC, _POST, r"(?:could|may|might|can) appear"),
    (_UNC, _POST, r"(?:could|may|might) (?:also )?have (?:this|a similar) appearance"),
    # "possible/possibly/presumably/probable/questionable/suspect/suspected/suspicious XXX".
    (_UNC, _BOTH, r"possible"),
    (_UNC, _PRE, r"possibly"),
    (_UNC, _BOTH, r"probable"),
    (_UNC, _PRE, r"probably"),
    (_UNC, _PRE, r"presumably"),
    (_UNC, _BOTH, r"presumed"),
    (_UNC, _PRE, r"questionable"),
    (_UNC, _PRE, r"question(?: of)?"),
    (_UNC, _BOTH, r"questioned"),
    (_UNC, _PRE, r"suspect"),
    (_UNC, _BOTH, r"suspected"),
    (_UNC, _PRE, r"suspicious(?: for| of)?"),
    (_UNC, _PRE, r"suspicion(?: for| of)?"),
    # "concern for / worrisome for XXX", "suggestion of XXX", "favor/consider XXX".
    (_UNC, _PRE, r"concern for"),
    (_UNC, _PRE, r"concerning for"),
    (_UNC, _PRE, r"worrisome for"),
    (_UNC, _PRE, r"suggestion of"),
    (_UNC, _PRE, r"suggestive of"),
    (_UNC, _PRE, r"suggest(?:s|ing)?"),
    (_UNC, _PRE, r"favor(?:s|ed|ing)?"),
    (_UNC, _PRE, r"consider(?:ed)?"),
    # "May/might/would/could be XXX", "may/could represent/reflect/indicate/include XXX", "maybe due to XXX".
    (_UNC, _PRE, r"may"),
    (_UNC, _PRE, r"might"),
    (_UNC, _PRE, r"could"),
    (_UNC, _PRE, r"would"),
    (_UNC, _PRE, r"maybe"),
    # "less likely" (original), "likely" (brief): "likely atelectasis", "pneumonia is (less) likely"; but not
    # "opacity likely reflects atelectasis", where the opacity is certain.
    (_UNC, _PRE, r"likely"),
    (_UNC, _POST, r"(?:is|are) (?:most |more |less |also )?likely"),
    # "maybe secondary to XXX", "may be compatible with XXX", "differential diagnosis includes XXX".
    (_UNC, _PRE, r"secondary to"),
    (_UNC, _PRE, r"compatible with"),
    (_UNC, _PRE, r"differential(?: diagnosis)?(?: includes?| considerations? includes?)?"),
    # "XXX versus YYY".
    (_UNC, _BOTH, r"versus"),
    (_UNC, _BOTH, r"vs"),
    # "correlate clinically for (evidence of) XXX", "correlation for symptoms of XXX".
    (_UNC, _PRE, r"correlate(?: clinically)? for"),
    (_UNC, _PRE, r"correlation for"),
    (_UNC, _PRE, r"clinically correlate for"),
    # "borderline heart size".
    (_UNC, _BOTH, r"borderline"),
    # "obscuring the XXX | XXX is obscured | obscured XXX", "XXX is poorly/incompletely evaluated".
    (_UNC, _BOTH, r"obscured"),
    (_UNC, _PRE, r"obscuring"),
    (_UNC, _POST, r"poorly (?:evaluated|visualized|seen|assessed)"),
    (_UNC, _POST, r"incompletely (?:evaluated|visualized|seen|assessed)"),
)

# Ends of a cue's scope (see the module docstring): punctuation, words, and two-word phrases.
_END_WORDS = frozenset(
    (
        "but",
        "however",
        "although",
        "though",
        "whereas",
        "while",
        "which",
        "who",
        "yet",
        "except",
        "besides",
        "otherwise",
        "with",
        "there",
        "given",
        "because",
        "since",
    )
)
_END_BIGRAMS = {"aside": "from", "apart": "from", "other": "than", "due": "to", "related": "to"}
_CONJ_WORDS = frozenset(("and", "or", "nor", "andor"))  # also "," and "as well as"
_OR_WORDS = frozenset(("or", "andor"))
_COPULAS = frozenset(("is", "are", "was", "were"))
# Verbs that make a gap a clause rather than a list separator.
_VERBS = _COPULAS | frozenset(
    (
        "be",
        "been",
        "being",
        "has",
        "have",
        "had",
        "seen",
        "noted",
        "identified",
        "present",
        "demonstrated",
        "visualized",
        "show",
        "shows",
        "showed",
        "demonstrate",
        "demonstrates",
        "appear",
        "appears",
        "remain",
        "remains",
        "measure",
        "measures",
        "persist",
        "persists",
        "represent",
        "represents",
        "reflect",
        "reflects",
    )
)
_TRAILING = ".,;:!?"  # punctuation split off the end of a chunk: "," a conjunction, the rest scope ends
_LEADING = "([{\"'"
_SPECIAL = _CONJ_WORDS | _END_WORDS | _VERBS | frozenset(_END_BIGRAMS) | {"as"}
_VERB_AFTER = re.compile(r"\W*(?:is|are|was|were|has|have|had|appears?|remains?|measures?|persists?)\b")
# "a/b" (-> "a or b") and punctuation glued to the next word ("normal.no" -> "normal. no").
_SPACING = re.compile(r"(?<=[a-z])/(?=[a-z])|(?<=[.,;:!?])(?=[^\W\d_])")
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


class Mention(NamedTuple):
    """One labelled phrase match in a cleaned report (see :meth:`CheXpertLabeler.annotate`)."""

    label: str
    """Label name, or ``"Other finding"`` for a phrase of ``no_finding.txt``."""
    phrase: str
    """The phrase that matched (``_`` word-boundary marks removed)."""
    start: int
    """Start offset in :func:`clean_text` of the report."""
    end: int
    """End offset (the end of the word that contains the phrase's end)."""
    value: int
    """1 positive, 0 negative, -1 uncertain."""


def clean_text(report: str) -> str:
    """Normalise a report as the CheXpert labeler's loader does: lower case, ``and/or`` -> ``or``,
    ``a/b`` -> ``a or b``, a space after punctuation glued to a word, single spaces; plus ``vs.`` ->
    ``vs`` so that the abbreviation ends no sentence."""
    text = report.lower().replace("and/or", "or")
    text = _SPACING.sub(_spacing, text)
    text = " ".join(text.split())
    return text.replace("vs.", "vs")


def _spacing(m: re.Match[str]) -> str:
    return " or " if m.group() == "/" else " "


def _trie_regex(alternatives: Iterable[tuple[str, ...]]) -> str:
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


@dataclass(frozen=True)
class _Phrase:
    text: str  # as matched (boundary marks removed)
    labels: tuple[int, ...]
    silhouette: bool
    always_uncertain: bool
    chf: bool
    regex: re.Pattern[str]  # this phrase alone, anchored with .match at a position


class CheXpertLabeler:
    """Rule-based, offline CheXpert labeler (mention phrases, negation and uncertainty cues, CheXpert
    aggregation). Deterministic, thread-safe after construction, and never raises on a string.

    See the module docstring for the rules and where each departs from the original.

    Args:
        phrases: JSON file of mention / unmention phrases (format of the packaged
            ``_phrases/chexpert_phrases.json``); ``None`` uses the packaged CheXpert lists.
        match: ``"word"`` matches phrases at word starts (default); ``"substring"`` anywhere, as the
            original does.
        pre_window: most words between a pre cue ("no", "possible") and the first mention it reaches.
        post_window: most words between the last mention and a post cue ("is not seen").
        chain_window: most words, besides "and", "or", "nor" and commas, between two mentions of one
            list (see the module docstring).
    """

    def __init__(
        self,
        phrases: str | Path | None = None,
        match: Literal["word", "substring"] = "word",
        pre_window: int = 6,
        post_window: int = 6,
        chain_window: int = 3,
    ) -> None:
        if match not in ("word", "substring"):
            raise ValueError(f"CheXpertLabeler: match={match!r}; expected 'word' or 'substring'")
        for name, value in (
            ("pre_window", pre_window),
            ("post_window", post_window),
            ("chain_window", chain_window),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"CheXpertLabeler: {name}={value!r}; expected an int >= 0")
        self.phrases_path = Path(phrases) if phrases is not None else DEFAULT_PHRASES
        self.match = match
        self.pre_window = pre_window
        self.post_window = post_window
        self.chain_window = chain_window
        mention, unmention = _load_phrases(self.phrases_path)
        self._phrases, self._mention_rx, self._co_matches = self._compile_phrases(mention)
        unmention_phrases, self._unmention_rx, _ = self._compile_phrases(unmention)
        self._unmention = unmention_phrases
        self._compile_cues()
        log.debug(
            "CheXpertLabeler: %d mention and %d unmention phrases from %s",
            len(self._phrases),
            len(self._unmention),
            self.phrases_path,
        )

    # ------------------------------------------------------------------ building
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

    def _compile_phrases(
        self, table: dict[int, list[str]]
    ) -> tuple[dict[str, _Phrase], re.Pattern[str], dict[str, tuple[_Phrase, ...]]]:
        by_literal: dict[str, tuple[list[int], str]] = {}
        for label, phrases in table.items():
            for phrase in phrases:
                literal = self._literal(phrase)
                labels, _ = by_literal.setdefault(literal, ([], phrase))
                if label not in labels:
                    labels.append(label)
        start = r"\b" if self.match == "word" else ""
        info: dict[str, _Phrase] = {}
        for literal, (labels, phrase) in by_literal.items():
            atoms = self._atoms(phrase)
            info[literal] = _Phrase(
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
            re.compile(start + "(?=(" + _trie_regex(atoms_all) + r")(\w*))")
            if atoms_all
            else re.compile(r"(?!)")
        )
        # Shorter phrases that match where a longer one does: its literal prefixes.
        co = {
            lit: tuple(info[other] for other in info if other != lit and lit.startswith(other))
            for lit in info
        }
        return info, rx, co

    def _compile_cues(self) -> None:
        by_word: dict[str, list[tuple[int, int, str]]] = {}
        for kind, direction, pattern in _CUES:
            # A leading "(?:a|b) rest" is a shorthand for one entry per word.
            lead = re.match(r"\(\?:([a-z'|]+)\)", pattern)
            expanded = [w + pattern[lead.end() :] for w in lead.group(1).split("|")] if lead else [pattern]
            for entry in expanded:
                word = re.match(r"[a-z']+", entry)
                assert word is not None, entry  # every cue starts with a literal trigger word
                by_word.setdefault(word.group(), []).append((kind, direction, entry))
        # The longest trigger that starts a word; its entries end with \b ("suggest" also tries "suggests").
        self._cue_trigger = re.compile(r"\b" + _trie_regex(tuple(re.escape(c) for c in w) for w in by_word))
        self._cue_rx: dict[str, tuple[re.Pattern[str], list[tuple[int, int]]]] = {}
        for word, entries in by_word.items():
            alternation = "|".join(f"({p})" for _, _, p in entries)
            self._cue_rx[word] = (re.compile(r"(?:" + alternation + r")\b"), [(k, d) for k, d, _ in entries])

    # ------------------------------------------------------------------ matching
    def _find_mentions(self, text: str) -> list[tuple[int, int, _Phrase, int]]:
        """All (start, end, phrase, label) matches, unmentions removed, sorted by start."""
        found: list[tuple[int, int, _Phrase, int]] = []
        for m in self._mention_rx.finditer(text):
            start, literal, end = m.start(), m.group(1), m.end(2)
            phrase = self._phrases[literal]
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
        if spans:
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
                    if s < end and e > start and f[3] in self._unmention[lit].labels:
                        break
                    i -= 1
                else:
                    kept.append(f)
            found = kept
        return found

    def _find_cues(self, text: str) -> list[tuple[int, int, int, int]]:
        """Non-overlapping (start, end, kind, direction) cue matches, left to right."""
        cues: list[tuple[int, int, int, int]] = []
        last_end = -1
        for t in self._cue_trigger.finditer(text):
            if t.start() < last_end:
                continue
            rx, entries = self._cue_rx[t.group()]
            m = rx.match(text, t.start())
            if m is None:
                continue
            kind, direction = entries[m.lastindex - 1]  # type: ignore[operator]
            cues.append((m.start(), m.end(), kind, direction))
            last_end = m.end()
        return cues

    # ------------------------------------------------------------------ scope
    def _pre_gap_ok(self, g: _Gaps, a: int, b: int) -> bool:
        if g.plain(a, b) > self.pre_window or g.count(g.ends, a, b) or g.count(g.copulas, a, b):
            return False
        # A conjunction may sit in between, as the original's negation spreads over conjuncts: "normal in
        # size and contour", "no acute displaced clavicle or rib fractures", "no evidence for failure or
        # pneumonia". A comma only after one word, between adjectives: "no acute, displaced rib fractures".
        i, j = bisect.bisect_left(g.commas, a), bisect.bisect_left(g.commas, b)
        return i == j or (j == i + 1 and g.words(a, g.commas[i]) == 1)

    def _post_gap_ok(self, g: _Gaps, a: int, b: int) -> bool:
        if g.plain(a, b) > self.post_window or g.count(g.ends, a, b):
            return False
        i = bisect.bisect_left(g.conj, a)
        if i == len(g.conj) or g.conj[i] >= b:
            return True
        # The mention is one conjunct of the subject: "heart size and pulmonary vascularity are normal",
        # "heart size, mediastinal contour, and pulmonary vascularity are within normal limits". A comma
        # alone ("cardiomegaly, lungs are normal") is not enough.
        c, c_end = g.conj[i], g.conj_end[i]
        if g.words(a, c) or not g.words(c_end, b):
            return False
        return g.conj_kind[i] != _COMMA or g.count(g.conj, c_end, b) > 0

    def _link(self, g: _Gaps, a: int, b: int) -> int:
        """How two mentions, ending at ``a`` and starting at ``b``, go together: 0 not one list; 1 listed;
        2 listed with "or"; 3 adjacent, one noun phrase ("consolidating airspace disease")."""
        plain = g.plain(a, b)
        n_conj = g.count(g.conj, a, b)
        if not plain and not n_conj and not g.count(g.ends, a, b):
            return 3
        if b - a > 60 or g.count(g.ends, a, b) or g.count(g.verbs, a, b):
            return 0
        # Without a conjunction (commas removed by R2Gen cleaning) only a few words may separate them.
        if plain > self.chain_window or (not n_conj and plain > 2):
            return 0
        i, j = bisect.bisect_left(g.conj, a), bisect.bisect_left(g.conj, b)
        return 2 if any(g.conj_kind[k] == _OR_KIND for k in range(i, j)) else 1

    # ------------------------------------------------------------------ labelling
    def _analyse(self, text: str) -> list[tuple[int, int, _Phrase, int, int]]:
        """(start, end, phrase, label, value) for each mention of a cleaned text."""
        found = self._find_mentions(text)
        if not found:
            return []
        found.sort(key=lambda f: (f[0], f[1]))
        # Overlapping mentions form one cluster: one noun phrase for the cue logic.
        starts: list[int] = []
        ends: list[int] = []
        member: list[int] = []
        for s, e, _, _ in found:
            if starts and s < ends[-1]:
                ends[-1] = max(ends[-1], e)
            else:
                starts.append(s)
                ends.append(e)
            member.append(len(starts) - 1)
        n = len(starts)
        g = _Gaps(text)
        links = [self._link(g, ends[k], starts[k + 1]) for k in range(n - 1)]
        flags = [0] * n
        # Kinds already spread forward / backward from a cluster: a later cue stops there, which keeps
        # the work linear in long lists ("no effusion, no effusion, ...").
        fwd = [0] * n
        bwd = [0] * n
        cues = self._find_cues(text)
        for ci, (cs, ce, kind, direction) in enumerate(cues):
            if kind == _PSEUDO:
                continue
            if kind == _CONDNEG:
                if not _negated_before(g, cues, ci):
                    continue
                kind, direction = _NEG, _PRE
            if direction & _PRE:
                k = bisect.bisect_left(starts, ce)
                if k < n and self._pre_gap_ok(g, ce, starts[k]):
                    flags[k] |= kind
                    # "no effusion, the heart is enlarged": a list member followed by a verb starts a clause.
                    while (
                        not fwd[k] & kind
                        and k + 1 < n
                        and links[k]
                        and (links[k] >= 2 or not _VERB_AFTER.match(text, ends[k + 1]))
                    ):
                        fwd[k] |= kind
                        k += 1
                        flags[k] |= kind
            if direction & _POST:
                k = bisect.bisect_right(ends, cs) - 1
                if k >= 0 and self._post_gap_ok(g, ends[k], cs):
                    flags[k] |= kind
                    while not bwd[k] & kind and k > 0 and links[k - 1]:
                        bwd[k] |= kind
                        k -= 1
                        flags[k] |= kind
        # "XXX or YYY": every member of a list with an "or" in it.
        k = 0
        while k < n - 1:
            if not links[k]:
                k += 1
                continue
            j, has_or = k, False
            while j < n - 1 and links[j]:
                has_or = has_or or links[j] == 2
                j += 1
            if has_or:
                for i in range(k, j + 1):
                    flags[i] |= _OR
            k = j
        out = []
        for (s, e, phrase, label), c in zip(found, member):
            f = flags[c]
            if f & _PRENEG:
                value = -1
            elif f & _NEG:
                value = 0
            elif f & (_UNC | _OR) or (f & _SIL and phrase.silhouette) or phrase.always_uncertain:
                value = -1
            else:
                value = 1
            out.append((s, e, phrase, label, value))
        return out

    def annotate(self, report: str | None) -> list[Mention]:
        """Every mention of a report with its value, for inspection (offsets into :func:`clean_text`)."""
        text = _as_text(report)
        names = (*LABELS, "Other finding")
        return [Mention(names[lab], ph.text, s, e, v) for s, e, ph, lab, v in self._analyse(clean_text(text))]

    def label(self, report: str | None) -> list[int | None]:
        """Label one report.

        Args:
            report: report text; ``None`` or NaN count as empty.

        Returns:
            14 values in :data:`amrg.labels.LABELS` order: 1 positive, 0 negative, -1 uncertain,
            None not mentioned.
        """
        text = clean_text(_as_text(report))
        if not text:
            return [None] * NUM_LABELS
        per_label: list[list[int]] = [[] for _ in range(NUM_LABELS)]
        finding = False
        for _, _, phrase, label, value in self._analyse(text):
            if value != 0 and label != _SUPPORT:
                finding = True
            if label == _OTHER:
                continue
            per_label[label].append(value)
            if value != 0 and phrase.chf:
                per_label[_CARDIOMEGALY].append(-1)
        out: list[int | None] = [
            None if not vals else 1 if 1 in vals else -1 if -1 in vals else 0 for vals in per_label
        ]
        out[_NO_FINDING] = None if finding else 1
        return out

    def label_batch(self, reports: Sequence[str | None], progress: bool = False) -> list[list[int | None]]:
        """Label many reports; ``progress`` shows a tqdm bar. Returns one :meth:`label` row per report."""
        return [self.label(r) for r in tqdm(reports, desc="labelling reports", disable=not progress)]

    def __call__(self, reports: Sequence[str | None]) -> Tensor:
        """Labels as a float tensor, [N, 14], NaN where a label is not mentioned."""
        return _rows_to_tensor(self.label_batch(reports))

    def __repr__(self) -> str:
        return (
            f"CheXpertLabeler(phrases={str(self.phrases_path)!r}, match={self.match!r}, "
            f"pre_window={self.pre_window}, post_window={self.post_window}, chain_window={self.chain_window})"
        )


_COMMA, _AND, _OR_KIND = 0, 1, 2  # kinds of conjunction


class _Gaps:
    """Offsets of the conjunctions, verbs and scope ends of a cleaned text, for gap tests by bisection.

    The text has single spaces (:func:`clean_text`), so words are counted by counting spaces, and only
    the chunks between spaces that are special words or carry punctuation are looked at: several times
    faster than a tokenising regex.
    """

    __slots__ = ("text", "ends", "conj", "conj_end", "conj_kind", "conj_words", "commas", "copulas", "verbs")

    def __init__(self, text: str) -> None:
        self.text = text
        self.ends: list[int] = []
        self.conj: list[int] = []
        self.conj_end: list[int] = []
        self.conj_kind: list[int] = []
        self.conj_words: list[int] = []  # starts of the words of conjunctions ("as well as": three)
        self.commas: list[int] = []
        self.copulas: list[int] = []
        self.verbs: list[int] = []
        p = skip = 0
        for chunk in text.split(" "):
            if skip:  # the rest of "as well as"
                skip -= 1
            elif chunk in _SPECIAL or (chunk and (chunk[-1] in _TRAILING or chunk[0] in _LEADING)):
                self._special(chunk, p)
                if chunk == "as" and text.startswith("as well as", p):
                    skip = 2
            p += len(chunk) + 1

    def _special(self, chunk: str, p: int) -> None:
        core = chunk.rstrip(_TRAILING)
        word = core.lstrip(_LEADING)
        q = p + len(core) - len(word)
        if word in _CONJ_WORDS:
            self._add_conj(q, q + len(word), _OR_KIND if word in _OR_WORDS else _AND)
            self.conj_words.append(q)
        elif word == "as" and self.text.startswith("as well as", q):
            self._add_conj(q, q + 10, _AND)
            self.conj_words.extend((q, q + 3, q + 8))
        elif word in _END_WORDS or (
            word in _END_BIGRAMS and self.text.startswith(_END_BIGRAMS[word], q + len(word) + 1)
        ):
            self.ends.append(q)
        elif word in _VERBS:
            self.verbs.append(q)
            if word in _COPULAS:
                self.copulas.append(q)
        for i in range(len(core), len(chunk)):  # trailing punctuation; a decimal point stays inside core
            if chunk[i] == ",":
                self._add_conj(p + i, p + i + 1, _COMMA)
            else:
                self.ends.append(p + i)

    def _add_conj(self, start: int, end: int, kind: int) -> None:
        self.conj.append(start)
        self.conj_end.append(end)
        self.conj_kind.append(kind)
        if kind == _COMMA:
            self.commas.append(start)

    @staticmethod
    def count(offsets: list[int], a: int, b: int) -> int:
        """How many offsets fall in [a, b)."""
        return bisect.bisect_left(offsets, b) - bisect.bisect_left(offsets, a) if a < b else 0

    def words(self, a: int, b: int) -> int:
        """Words that start in [a, b): one after each space but one at b - 1."""
        return self.text.count(" ", a, b - 1) if a < b - 1 else 0

    def plain(self, a: int, b: int) -> int:
        """Words in [a, b), conjunctions not counted."""
        n = self.words(a, b)
        return n - self.count(self.conj_words, a, b) if n else 0


def _negated_before(g: _Gaps, cues: list[tuple[int, int, int, int]], ci: int) -> bool:
    """True when a "no" / "without" / "not" cue precedes cue ``ci`` in the same clause (among the 8 cues
    before it, which bounds the work)."""
    for j in range(ci - 1, max(ci - 9, -1), -1):
        _, e, kind, direction = cues[j]
        if g.count(g.ends, e, cues[ci][0]):
            return False
        if kind == _NEG and direction & _PRE:
            return True
    return False


def _as_text(report: Any) -> str:
    if report is None or (isinstance(report, float) and math.isnan(report)):
        return ""
    if not isinstance(report, str):
        raise TypeError(f"a report must be a str (or None); got {type(report).__name__}: {report!r:.80}")
    return report


def _rows_to_tensor(rows: list[list[int | None]]) -> Tensor:
    out = torch.full((len(rows), NUM_LABELS), float("nan"))
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                out[i, j] = float(v)
    return out


def _load_phrases(path: Path) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Mention and unmention phrases by label index (``_OTHER`` for the other-finding phrases)."""
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
                index = _OTHER if name == "No Finding" else LABELS.index(name) if name in LABELS else None
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


# ====================================================================== CheXbert
# Class indices of CheXbert's heads (stanfordmlgroup/CheXbert, src/constants.py): 0 blank, 1 positive,
# 2 negative, 3 uncertain; the No Finding head has 0 blank and 1 positive.
_CHEXBERT_VALUES: tuple[int | None, ...] = (None, 1, 0, -1)
# Older transformers saved this buffer; newer ones do not register it as persistent.
_OPTIONAL_KEYS = ("bert.embeddings.position_ids",)


class CheXbertNet(nn.Module):
    """CheXbert (Smit et al., 2020, "CheXbert: Combining Automatic Labelers and Expert Annotations for
    Accurate Radiology Report Labeling Using BERT", arXiv:2004.09167): BERT + 14 linear heads on [CLS].

    Parameter names match the released checkpoint and the f1chexbert package (``bert.*``,
    ``linear_heads.{0..13}.*``).

    Args:
        bert: the BERT encoder (``transformers.BertModel``, with its pooler so checkpoint keys match).
        dropout: dropout on [CLS] before the heads (CheXbert uses 0.1; inactive in eval mode).
    """

    def __init__(self, bert: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        hidden = int(bert.config.hidden_size)
        # 13 heads over (blank, positive, negative, uncertain), then No Finding over (blank, positive).
        self.linear_heads = nn.ModuleList(
            [nn.Linear(hidden, 4) for _ in range(NUM_LABELS - 1)] + [nn.Linear(hidden, 2)]
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """Class logits per label.

        Args:
            input_ids: token ids, [B, T].
            attention_mask: 1 for tokens, 0 for padding, [B, T].

        Returns:
            14 tensors in LABELS order: [B, 4] for the first 13, [B, 2] for No Finding.
        """
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]  # [B, T, D]
        cls = self.dropout(hidden[:, 0])  # [B, D]
        return [head(cls) for head in self.linear_heads]


def load_chexbert_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a CheXbert checkpoint (``{"model_state_dict": ...}`` or a bare state dict; ``module.``
    prefixes from DataParallel removed) with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CheXbert checkpoint {path} not found (set checkpoint=)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"CheXbert checkpoint {path}: expected a state dict of tensors "
            "(or a dict with 'model_state_dict'); got something else"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _wordpiece_from_vocab(cls: Any, path: Path) -> Any:
    """A lower-casing WordPiece tokenizer from a ``vocab.txt`` (one token per line, id = line number)."""
    if "vocab" in inspect.signature(cls.__init__).parameters:
        # transformers >= 5 builds the tokenizer from a dict and ignores vocab_file.
        tokens = path.read_text(encoding="utf-8").splitlines()
        return cls(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    return cls(vocab_file=str(path), do_lower_case=True)


class CheXbertLabeler:
    """CheXbert labels from local weights, with the same API as :class:`CheXpertLabeler`.

    Args:
        checkpoint: CheXbert weights (``chexbert.pth``: ``{"model_state_dict": {"module.bert...": ...}}``),
            read with ``torch.load(weights_only=True)``.
        tokenizer: a local tokenizer folder (``save_pretrained`` layout, e.g. bert-base-uncased's) or a
            WordPiece ``vocab.txt``.
        config: BERT config: a folder with ``config.json``, a JSON file, or ``None`` for bert-base-uncased's
            sizes (``transformers.BertConfig()`` defaults, which CheXbert uses).
        device: torch device to run on.
        batch_size: reports per forward pass.
        max_length: tokens per report, [CLS] and [SEP] included (CheXbert truncates at 512).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        tokenizer: str | Path,
        config: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 512,
    ) -> None:
        from transformers import BertConfig, BertModel, BertTokenizerFast

        if batch_size < 1 or max_length < 2:
            raise ValueError(
                f"CheXbertLabeler: batch_size={batch_size}, max_length={max_length}; expected >= 1 and >= 2"
            )
        tok_path = Path(tokenizer)
        if tok_path.is_file():
            self.tokenizer = _wordpiece_from_vocab(BertTokenizerFast, tok_path)
        elif tok_path.is_dir():
            self.tokenizer = BertTokenizerFast.from_pretrained(str(tok_path), local_files_only=True)
        else:
            raise FileNotFoundError(
                f"CheXbert tokenizer {tok_path} not found (set tokenizer= to a folder or vocab.txt)"
            )
        if config is None:
            bert_config = BertConfig()
        else:
            cfg_path = Path(config)
            if cfg_path.is_dir():
                bert_config = BertConfig.from_pretrained(str(cfg_path), local_files_only=True)
            elif cfg_path.is_file():
                bert_config = BertConfig.from_json_file(str(cfg_path))
            else:
                raise FileNotFoundError(f"CheXbert config {cfg_path} not found (set config=)")
        if len(self.tokenizer) > bert_config.vocab_size:
            raise ValueError(
                f"CheXbert tokenizer {tok_path} has {len(self.tokenizer)} tokens but the config's "
                f"vocab_size is {bert_config.vocab_size} (set config= or tokenizer=)"
            )
        self.max_length = min(max_length, int(bert_config.max_position_embeddings))
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.net = CheXbertNet(BertModel(bert_config, add_pooling_layer=True))
        load_state_strict(
            self.net,
            load_chexbert_state_dict(checkpoint),
            f"CheXbert checkpoint {Path(checkpoint)} does not fit the model (check config=)",
            optional=_OPTIONAL_KEYS,
        )
        self.net.eval().to(self.device)
        log.info(
            "CheXbertLabeler: loaded %s (%d parameters) on %s",
            checkpoint,
            sum(p.numel() for p in self.net.parameters()),
            self.device,
        )

    @torch.inference_mode()
    def label_batch(self, reports: Sequence[str | None], progress: bool = False) -> list[list[int | None]]:
        """Label many reports; one row of 14 values (1, 0, -1, None) per report, LABELS order."""
        texts = [" ".join(_as_text(r).split()) for r in reports]
        rows: list[list[int | None]] = [[None] * NUM_LABELS for _ in texts]
        todo = [i for i, t in enumerate(texts) if t]  # an empty report has no labels, as for CheXpertLabeler
        batches = range(0, len(todo), self.batch_size)
        for b in tqdm(batches, desc="CheXbert", disable=not progress):
            idx = todo[b : b + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.net(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            classes = torch.stack([lg.argmax(dim=-1) for lg in logits], dim=1).tolist()  # [b, 14]
            for i, row in zip(idx, classes):
                rows[i] = [_CHEXBERT_VALUES[c] for c in row]
        return rows

    def label(self, report: str | None) -> list[int | None]:
        """Label one report: 14 values (1, 0, -1, None) in LABELS order."""
        return self.label_batch([report])[0]

    def __call__(self, reports: Sequence[str | None]) -> Tensor:
        """Labels as a float tensor, [N, 14], NaN where a label is not mentioned."""
        return _rows_to_tensor(self.label_batch(reports))
