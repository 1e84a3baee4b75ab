"""Negation and uncertainty cues of the CheXpert labeler, and finding them in text.

Each cue is a regular expression with a kind (the rule file of the original it comes from) and a
direction: a *pre* cue ("no", "possible") reaches the first mention after it, a *post* cue ("is not
seen", "has resolved") the last mention before it. They are rewritten from the comments and lemmas of
the original's Semgrex files (``patterns/pre_negation_uncertainty.txt``, ``negation.txt``,
``post_negation_uncertainty.txt``; stanfordmlgroup/chexpert-labeler, MIT licence).
"""

from __future__ import annotations

import re

from amrg.labeling.text import trie_regex

__all__ = [
    "BOTH",
    "CONDNEG",
    "NEG",
    "OR",
    "POST",
    "PRE",
    "PRENEG",
    "PSEUDO",
    "SIL",
    "UNC",
    "Cue",
    "CueMatcher",
]

# Cue kinds, by the rule file they come from. Bits of a per-mention flag word.
PRENEG = 1  # pre_negation_uncertainty.txt: checked first, uncertain
NEG = 2  # negation.txt
UNC = 4  # post_negation_uncertainty.txt
SIL = 8  # "stable/unchanged" heart or mediastinal silhouette: uncertain (post_negation_uncertainty.txt)
OR = 16  # member of an "X or Y" list: uncertain (post_negation_uncertainty.txt)
PSEUDO = 32  # looks like a cue but is not ("no change in", "not only"): matched to be skipped
CONDNEG = 64  # "no NN to suggest/explain XXX" (negation.txt): negates when a negation precedes it

PRE, POST, BOTH = 1, 2, 3

# (kind, direction, regex). Each regex starts with one literal word (its trigger); entries that share a
# trigger are tried in this order, so longer and more specific ones come first. Only (?:...) groups.
_CUES: tuple[tuple[int, int, str], ...] = (
    # --- pre_negation_uncertainty.txt: "cannot exclude", "XXX is not excluded", "no new XXX",
    # "cannot rule out XXX", "no evidence to rule out XXX".
    (PRENEG, PRE, r"cannot (?:entirely |completely |totally |definitely |fully )?(?:exclude|rule out)"),
    (
        PRENEG,
        POST,
        r"cannot (?:be )?(?:entirely |completely |totally |definitely |fully )?(?:excluded|ruled out)",
    ),
    (PRENEG, PRE, r"can not (?:entirely |completely )?(?:exclude|rule out)"),
    (PRENEG, POST, r"can not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)"),
    (PRENEG, PRE, r"can't (?:entirely |completely )?(?:exclude|rule out)"),
    (PRENEG, POST, r"can't (?:be )?(?:entirely |completely )?(?:excluded|ruled out)"),
    (PRENEG, PRE, r"could not (?:entirely |completely )?(?:exclude|rule out)"),
    (PRENEG, POST, r"could not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)"),
    (PRENEG, PRE, r"difficult to (?:exclude|rule out)"),
    (
        PRENEG,
        POST,
        r"not (?:be )?(?:entirely |completely |totally |definitely |fully |been )?(?:excluded|ruled out)",
    ),
    (PRENEG, PRE, r"no evidence to rule out"),
    (PRENEG, PRE, r"no new"),
    # --- negation.txt, patterns that start with a cue that is not itself a negation.
    (CONDNEG, PRE, r"to (?:suggest|explain|diagnose|indicate)"),
    # "no change in", "without change", "not changed": pseudo-negations, and for the heart or mediastinal
    # silhouette an uncertainty ("Silhouette/cardiomediastinal is stable|unchanged|not changed").
    (SIL, BOTH, r"no (?:significant |substantial |appreciable |definite |acute )?(?:interval )?changes?"),
    (SIL, BOTH, r"without (?:significant |substantial |appreciable |definite )?(?:interval )?changes?"),
    (SIL, BOTH, r"not (?:significantly |substantially |appreciably )?changed"),
    (SIL, BOTH, r"stable"),
    (SIL, BOTH, r"unchanged"),
    (SIL, BOTH, r"similar (?:in appearance )?(?:to|with) (?:the )?(?:prior|previous|recent)"),
    (
        PSEUDO,
        BOTH,
        r"no (?:significant |substantial |appreciable |definite )?(?:interval )?"
        r"(?:increase|decrease|worsening|progression|improvement|enlargement of the)",
    ),
    (
        PSEUDO,
        BOTH,
        r"not (?:completely |fully |entirely |yet |significantly )?(?:resolved|cleared|improved|removed|worsened)",
    ),
    (PSEUDO, BOTH, r"not only"),
    (PSEUDO, BOTH, r"gram negative"),
    # --- post_negation_uncertainty.txt: "XXX is not well visualized/evaluated", "XXX are not clearly
    # seen", "XXX was not appreciated", "XXX is poorly/incompletely evaluated".
    (
        UNC,
        POST,
        r"not (?:well |clearly |definitely |optimally )(?:seen|visualized|evaluated|assessed|demonstrated)",
    ),
    (UNC, POST, r"not (?:visualized|appreciated)"),
    # --- negation.txt
    # "XXX is no longer seen", then "no XXX", "no evidence of XXX", "no focus/area/development of XXX".
    (
        NEG,
        POST,
        r"no longer (?:seen|visualized|visible|present|evident|identified|demonstrated|noted|apparent|appreciated)",
    ),
    (NEG, PRE, r"no"),
    # "XXX is not seen/enlarged", "does not demonstrate XXX" (the brief: post cue "is not seen").
    (NEG, BOTH, r"not"),
    (NEG, PRE, r"without"),
    (NEG, PRE, r"neither"),
    (NEG, PRE, r"nor"),
    (NEG, PRE, r"absence of"),
    (NEG, BOTH, r"absent"),
    (NEG, PRE, r"negative for"),
    (NEG, PRE, r"free of"),
    (NEG, PRE, r"clear of"),
    (NEG, PRE, r"clearing(?: of)?"),
    (NEG, BOTH, r"cleared"),
    (NEG, BOTH, r"resolved"),
    (NEG, PRE, r"resolution of"),
    (NEG, PRE, r"disappearance of"),
    (NEG, PRE, r"drainage of"),
    (NEG, BOTH, r"removal(?: of)?"),
    (NEG, BOTH, r"removed"),
    (NEG, PRE, r"history of"),
    (NEG, PRE, r"rather than"),
    (NEG, PRE, r"to exclude"),
    (NEG, PRE, r"exclude"),
    (NEG, BOTH, r"excluded"),
    (NEG, PRE, r"rule out"),
    (NEG, BOTH, r"ruled out"),
    # "normal/unremarkable XXX", "XXX is/appears normal", "XXX within normal limits", "upper limits of normal".
    (NEG, BOTH, r"(?:within|at) (?:the )?(?:upper )?(?:normal limits?|limits? of normal)"),
    # "within limits" (IU X-ray: "normal" left out) and "nonenlarged cardiomediastinal silhouette".
    (NEG, BOTH, r"within limits"),
    (NEG, PRE, r"non-?enlarged"),
    # "mediastinal contours are maintained".
    (NEG, POST, r"maintained"),
    (NEG, BOTH, r"upper (?:limits? of )?normal"),
    (NEG, BOTH, r"top(?:-| )?normal"),
    (NEG, BOTH, r"normal"),
    (NEG, BOTH, r"unremarkable"),
    (NEG, BOTH, r"wnl"),
    # --- post_negation_uncertainty.txt
    # "XXX could/might/may/possibly be present", "XXX could appear", "XXX may have this appearance".
    (UNC, POST, r"may (?:also )?(?:possibly )?be present"),
    (UNC, POST, r"might (?:also )?(?:possibly )?be present"),
    (UNC, POST, r"could (?:also )?(?:possibly )?be present"),
    (UNC, POST, r"can (?:also )?be present"),
    (UNC, POST, r"possibly (?:be )?present"),
    (UNC, POST, r"(?:could|may|might|can) appear"),
    (UNC, POST, r"(?:could|may|might) (?:also )?have (?:this|a similar) appearance"),
    # "possible/possibly/presumably/probable/questionable/suspect/suspected/suspicious XXX".
    (UNC, BOTH, r"possible"),
    (UNC, PRE, r"possibly"),
    (UNC, BOTH, r"probable"),
    (UNC, PRE, r"probably"),
    (UNC, PRE, r"presumably"),
    (UNC, BOTH, r"presumed"),
    (UNC, PRE, r"questionable"),
    (UNC, PRE, r"question(?: of)?"),
    (UNC, BOTH, r"questioned"),
    (UNC, PRE, r"suspect"),
    (UNC, BOTH, r"suspected"),
    (UNC, PRE, r"suspicious(?: for| of)?"),
    (UNC, PRE, r"suspicion(?: for| of)?"),
    # "concern for / worrisome for XXX", "suggestion of XXX", "favor/consider XXX".
    (UNC, PRE, r"concern for"),
    (UNC, PRE, r"concerning for"),
    (UNC, PRE, r"worrisome for"),
    (UNC, PRE, r"suggestion of"),
    (UNC, PRE, r"suggestive of"),
    (UNC, PRE, r"suggest(?:s|ing)?"),
    (UNC, PRE, r"favor(?:s|ed|ing)?"),
    (UNC, PRE, r"consider(?:ed)?"),
    # "May/might/would/could be XXX", "may/could represent/reflect/indicate/include XXX", "maybe due to XXX".
    (UNC, PRE, r"may"),
    (UNC, PRE, r"might"),
    (UNC, PRE, r"could"),
    (UNC, PRE, r"would"),
    (UNC, PRE, r"maybe"),
    # "less likely" (original), "likely" (brief): "likely atelectasis", "pneumonia is (less) likely"; but not
    # "opacity likely reflects atelectasis", where the opacity is certain.
    (UNC, PRE, r"likely"),
    (UNC, POST, r"(?:is|are) (?:most |more |less |also )?likely"),
    # "maybe secondary to XXX", "may be compatible with XXX", "differential diagnosis includes XXX".
    (UNC, PRE, r"secondary to"),
    (UNC, PRE, r"compatible with"),
    (UNC, PRE, r"differential(?: diagnosis)?(?: includes?| considerations? includes?)?"),
    # "XXX versus YYY".
    (UNC, BOTH, r"versus"),
    (UNC, BOTH, r"vs"),
    # "correlate clinically for (evidence of) XXX", "correlation for symptoms of XXX".
    (UNC, PRE, r"correlate(?: clinically)? for"),
    (UNC, PRE, r"correlation for"),
    (UNC, PRE, r"clinically correlate for"),
    # "borderline heart size".
    (UNC, BOTH, r"borderline"),
    # "obscuring the XXX | XXX is obscured | obscured XXX", "XXX is poorly/incompletely evaluated".
    (UNC, BOTH, r"obscured"),
    (UNC, PRE, r"obscuring"),
    (UNC, POST, r"poorly (?:evaluated|visualized|seen|assessed)"),
    (UNC, POST, r"incompletely (?:evaluated|visualized|seen|assessed)"),
)


# One match: (start, end, kind, direction).
Cue = tuple[int, int, int, int]


class CueMatcher:
    """Finds the cues of a cleaned text, left to right, without overlaps (the longest at each start)."""

    def __init__(self) -> None:
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
        self._trigger = re.compile(r"\b" + trie_regex(tuple(re.escape(c) for c in w) for w in by_word))
        self._rx: dict[str, tuple[re.Pattern[str], list[tuple[int, int]]]] = {}
        for word, entries in by_word.items():
            alternation = "|".join(f"({p})" for _, _, p in entries)
            self._rx[word] = (re.compile(r"(?:" + alternation + r")\b"), [(k, d) for k, d, _ in entries])

    def find(self, text: str) -> list[Cue]:
        """Non-overlapping (start, end, kind, direction) cue matches, left to right."""
        cues: list[Cue] = []
        last_end = -1
        for t in self._trigger.finditer(text):
            if t.start() < last_end:
                continue
            rx, entries = self._rx[t.group()]
            m = rx.match(text, t.start())
            if m is None:
                continue
            kind, direction = entries[m.lastindex - 1]  # type: ignore[operator]
            cues.append((m.start(), m.end(), kind, direction))
            last_end = m.end()
        return cues
