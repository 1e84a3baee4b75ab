"""Where a cue's reach ends, and which mentions form one list: word gaps in a cleaned report.

:class:`Gaps` indexes the conjunctions, verbs and scope ends of a text once; the tests below ask how
many of each fall between two offsets (by bisection). The rules are those of
:mod:`amrg.labeling.chexpert`'s module docstring ("Scope ends", "Coordination").
"""

from __future__ import annotations

import bisect
import re

from amrg.labeling.cues import NEG, PRE, Cue

__all__ = ["VERB_AFTER", "Gaps", "link", "negated_before", "post_gap_ok", "pre_gap_ok"]

# Ends of a cue's scope (the chexpert module docstring says why): punctuation, words, two-word phrases.
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
        "reveal",
        "reveals",
    )
)
# Verbs with an object: a post cue after one describes the object ("monitor leads show normal heart size").
_ACTIVE = frozenset(
    (
        "show",
        "shows",
        "showed",
        "demonstrate",
        "demonstrates",
        "reveal",
        "reveals",
        "represent",
        "represents",
        "reflect",
        "reflects",
    )
)
# "X is otherwise normal": after these, "otherwise" ends no scope (it does in "effusion and otherwise normal").
_LINKING = _COPULAS | frozenset(("appear", "appears", "remain", "remains", "seem", "seems"))
_TRAILING = ".,;:!?"  # punctuation split off the end of a chunk: "," a conjunction, the rest scope ends
_LEADING = "([{\"'"
_SPECIAL = _CONJ_WORDS | _END_WORDS | _VERBS | frozenset(_END_BIGRAMS) | {"as"}
# A verb right after a list member: "no effusion, the heart is enlarged" starts a clause there.
VERB_AFTER = re.compile(r"\W*(?:is|are|was|were|has|have|had|appears?|remains?|measures?|persists?)\b")

_COMMA, _AND, _OR_KIND = 0, 1, 2  # kinds of conjunction


class Gaps:
    """Offsets of the conjunctions, verbs and scope ends of a cleaned text, for gap tests by bisection.

    The text has single spaces (:func:`amrg.labeling.text.clean_text`), so words are counted by counting
    spaces, and only the chunks between spaces that are special words or carry punctuation are looked at:
    several times faster than a tokenising regex.
    """

    __slots__ = (
        "text",
        "ends",
        "conj",
        "conj_end",
        "conj_kind",
        "conj_words",
        "commas",
        "copulas",
        "verbs",
        "active",
    )

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
        self.active: list[int] = []
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
            if word != "otherwise" or self.text[self.text.rfind(" ", 0, q - 1) + 1 : q - 1] not in _LINKING:
                self.ends.append(q)
        elif word in _VERBS:
            self.verbs.append(q)
            if word in _COPULAS:
                self.copulas.append(q)
            if word in _ACTIVE:
                self.active.append(q)
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


def negated_before(g: Gaps, cues: list[Cue], ci: int) -> bool:
    """True when a "no" / "without" / "not" cue precedes cue ``ci`` in the same clause (among the 8 cues
    before it, which bounds the work)."""
    for j in range(ci - 1, max(ci - 9, -1), -1):
        _, e, kind, direction = cues[j]
        if g.count(g.ends, e, cues[ci][0]):
            return False
        if kind == NEG and direction & PRE:
            return True
    return False


def pre_gap_ok(g: Gaps, a: int, b: int, window: int) -> bool:
    """True when a pre cue ending at ``a`` reaches a mention starting at ``b`` (at most ``window`` words)."""
    if g.plain(a, b) > window or g.count(g.ends, a, b) or g.count(g.copulas, a, b):
        return False
    # A conjunction may sit in between, as the original's negation spreads over conjuncts: "normal in
    # size and contour", "no acute displaced clavicle or rib fractures", "no evidence for failure or
    # pneumonia". A comma only after one word, between adjectives: "no acute, displaced rib fractures".
    i, j = bisect.bisect_left(g.commas, a), bisect.bisect_left(g.commas, b)
    return i == j or (j == i + 1 and g.words(a, g.commas[i]) == 1)


def post_gap_ok(g: Gaps, a: int, b: int, window: int, start: int) -> bool:
    """True when a post cue starting at ``b`` reaches a mention from ``start`` to ``a``: at most ``window``
    words between, counted from the last conjunction when the mention heads a coordinated subject."""
    if g.count(g.ends, a, b) or g.count(g.active, a, b):
        return False
    i = bisect.bisect_left(g.conj, a)
    if i == len(g.conj) or g.conj[i] >= b:
        return g.plain(a, b) <= window
    # The mention is one conjunct of the subject: "heart size and pulmonary vascularity are normal",
    # "heart size, mediastinal contour, and pulmonary vascularity are within normal limits", "heart size,
    # mediastinal silhouette, pulmonary vascularity are normal" (a conjunction before the mention too). A
    # comma alone ("cardiomegaly, lungs are normal") is not enough, nor a clause inside the list.
    c, c_end = g.conj[i], g.conj_end[i]
    if g.words(a, c) or not g.words(c_end, b):
        return False
    last = bisect.bisect_left(g.conj, b) - 1
    if g.count(g.verbs, a, g.conj[last]):
        return False
    if g.conj_kind[i] == _COMMA and last == i:
        j = bisect.bisect_right(g.conj_end, start) - 1
        if j < 0 or g.words(g.conj_end[j], start):
            return False
    return g.plain(g.conj_end[last], b) <= window


def link(g: Gaps, a: int, b: int, chain_window: int) -> int:
    """How two mentions, ending at ``a`` and starting at ``b``, go together: 0 not one list; 1 listed;
    2 listed with "or"; 3 adjacent, one noun phrase ("consolidating airspace disease")."""
    plain = g.plain(a, b)
    n_conj = g.count(g.conj, a, b)
    if not plain and not n_conj and not g.count(g.ends, a, b):
        return 3
    if b - a > 60 or g.count(g.ends, a, b) or g.count(g.verbs, a, b):
        return 0
    # Without a conjunction (commas removed by R2Gen cleaning) only a few words may separate them.
    if plain > chain_window or (not n_conj and plain > 2):
        return 0
    i, j = bisect.bisect_left(g.conj, a), bisect.bisect_left(g.conj, b)
    return 2 if any(g.conj_kind[k] == _OR_KIND for k in range(i, j)) else 1
