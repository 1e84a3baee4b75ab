"""The rule-based, offline CheXpert labeler: the 14 CheXpert labels read off report text.

:class:`CheXpertLabeler` re-implements the CheXpert labeler (Irvin et al., 2019, "CheXpert: A Large
Chest Radiograph Dataset with Uncertainty Labels and Expert Comparison", arXiv:1901.07031;
stanfordmlgroup/chexpert-labeler, MIT licence) without its dependency parser. Its phrase lists are
copied unchanged into ``_phrases/chexpert_phrases.json`` with the MIT notice (read by
:mod:`amrg.labeling.phrases`); the negation and uncertainty cues (:mod:`amrg.labeling.cues`) are
rewritten as regular expressions from the comments and lemmas of the original's Semgrex files
(``patterns/pre_negation_uncertainty.txt``, ``negation.txt``, ``post_negation_uncertainty.txt``); the
scope rules below live in :mod:`amrg.labeling.scope`.

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
("small effusion and otherwise normal chest"), except after a linking verb ("the silhouette is
otherwise unremarkable"). Between a pre cue and the first mention it
reaches, a copula ("is", "are", "was", "were") also ends the scope, and so does a comma unless it
follows a single word ("no acute, displaced rib fractures"); conjunctions do not ("normal in size
and contour", "no evidence for failure or pneumonia"), as the original spreads negation over
conjuncts. Between the last mention and a post cue, a conjunction is allowed only where the
mention heads a coordinated subject ("heart size and pulmonary vascularity are normal"; "heart size,
mediastinal silhouette, pulmonary vascularity are normal", where a conjunction precedes the mention
too), and the ``post_window`` then counts the words after the subject's last conjunction; an active
verb ("show", "demonstrate", "represent") ends the reach ("monitor leads show normal heart size").

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
- An empty report (or ``None`` / NaN, or one of punctuation and de-identification tokens only) gets
  no labels at all, not No Finding 1.
- De-identification tokens (IU X-ray's ``XXXX``, also in "XXXX-A-XXXX") are removed by
  :func:`~amrg.labeling.text.clean_text`: the report is read as if the unreadable word were not
  there, so a token can never create, hide or flip a finding ("XXXX opacity" is an opacity, "no
  XXXX" says nothing, "cannot XXXX exclude" still excludes nothing).
- "XXX or YYY" makes a label uncertain only when some member of the list does not name it:
  "pacemaker/defibrillator" is a device either way, "atelectasis or scarring" stays uncertain.
- Added phrases measured against the MeSH terms of the IU X-ray reports
  (``benchmarks/labeler_vs_mesh.py``), each a finding of the label by CheXpert's or CheXbert's
  definition:

  - Support Devices: post-surgical and implanted hardware, which CheXbert-labelled sets count as
    devices: sternotomy (IU X-ray de-identifies its "wires" as XXXX), sternal / cerclage wires, CABG
    and bypass grafts, surgical clips, sutures, staples, stents, stimulators, generators, AICDs,
    ports, leads, electrodes, a line's "tip", prostheses, anchors, fixation, rods, tubing, shunts,
    tracheostomies and filters; not a breast prosthesis or implant, the "pleural line" of a
    pneumothorax, "lung lines" (IU X-ray's typo for lung volumes) or the scapular tip.
  - Pleural Other: "pleural-parenchymal" (hyphenated) and "pleural-peripheral" scarring, apical /
    pleural capping, fissural thickening, pleural plaques, calcification and abnormality, and
    "fibrotic" change next to CheXpert's "fibrosis"; "cystic fibrosis" is no fibrosis.
  - Enlarged Cardiomediastinum: "mediastinal widening / enlargement", "widened mediastinal"; and,
    unmentioned, "contour" of a rib, hilum, clavicle, ventricle, aorta or diaphragm ("rib contour
    deformity") and the mediastinum as a place ("clips in the mediastinum", "opacity in the
    posterior mediastinum"), as the heart is for Cardiomegaly.
  - Lung Lesion: a thyroid, chest wall, breast or soft tissue "mass" is none.
  - Cues: "within limits" (IU X-ray's "normal" left out), "nonenlarged", "X is maintained".
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from torch import Tensor
from tqdm.auto import tqdm

from amrg.labeling.cues import CONDNEG, NEG, OR, POST, PRE, PRENEG, PSEUDO, SIL, UNC, CueMatcher
from amrg.labeling.phrases import DEFAULT_PHRASES, OTHER, Phrase, PhraseMatcher, load_phrases
from amrg.labeling.rows import rows_to_tensor
from amrg.labeling.scope import VERB_AFTER, Gaps, link, negated_before, post_gap_ok, pre_gap_ok
from amrg.labeling.text import as_text, clean_text, has_content
from amrg.labels import LABELS, NUM_LABELS

__all__ = ["CheXpertLabeler", "Mention"]

log = logging.getLogger(__name__)

_NO_FINDING = LABELS.index("No Finding")
_SUPPORT = LABELS.index("Support Devices")
_CARDIOMEGALY = LABELS.index("Cardiomegaly")


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

    Attributes:
        name: which labeler this is, for logs and result files: ``"chexpert-rules"`` with the packaged
            phrases and default settings, else ``"chexpert-rules:"`` and what differs, e.g.
            ``"chexpert-rules:phrases=mine.json,match=substring"``.
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
        self._mentions = PhraseMatcher(*load_phrases(self.phrases_path), match=match)
        self._cues = CueMatcher()
        changed = []
        if self.phrases_path.resolve() != DEFAULT_PHRASES.resolve():
            changed.append(f"phrases={self.phrases_path.name}")
        changed += [
            f"{key}={value}"
            for key, value, default in (
                ("match", match, "word"),
                ("pre_window", pre_window, 6),
                ("post_window", post_window, 6),
                ("chain_window", chain_window, 3),
            )
            if value != default
        ]
        self.name = "chexpert-rules" + (":" + ",".join(changed) if changed else "")
        log.debug(
            "CheXpertLabeler: %d mention and %d unmention phrases from %s",
            len(self._mentions.phrases),
            len(self._mentions.unmention),
            self.phrases_path,
        )

    # ------------------------------------------------------------------ labelling
    def _analyse(self, text: str) -> list[tuple[int, int, Phrase, int, int]]:
        """(start, end, phrase, label, value) for each mention of a cleaned text."""
        found = self._mentions.find(text)
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
        g = Gaps(text)
        links = [link(g, ends[k], starts[k + 1], self.chain_window) for k in range(n - 1)]
        flags = [0] * n
        # Kinds already spread forward / backward from a cluster: a later cue stops there, which keeps
        # the work linear in long lists ("no effusion, no effusion, ...").
        fwd = [0] * n
        bwd = [0] * n
        cues = self._cues.find(text)
        for ci, (cs, ce, kind, direction) in enumerate(cues):
            if kind == PSEUDO:
                continue
            if kind == CONDNEG:
                if not negated_before(g, cues, ci):
                    continue
                kind, direction = NEG, PRE
            if direction & PRE:
                k = bisect.bisect_left(starts, ce)
                if k < n and pre_gap_ok(g, ce, starts[k], self.pre_window):
                    flags[k] |= kind
                    # "no effusion, the heart is enlarged": a list member followed by a verb starts a clause.
                    while (
                        not fwd[k] & kind
                        and k + 1 < n
                        and links[k]
                        and (links[k] >= 2 or not VERB_AFTER.match(text, ends[k + 1]))
                    ):
                        fwd[k] |= kind
                        k += 1
                        flags[k] |= kind
            if direction & POST:
                k = bisect.bisect_right(ends, cs) - 1
                if k >= 0 and post_gap_ok(g, ends[k], cs, self.post_window, starts[k]):
                    flags[k] |= kind
                    while not bwd[k] & kind and k > 0 and links[k - 1]:
                        bwd[k] |= kind
                        k -= 1
                        flags[k] |= kind
        # "XXX or YYY": every member of a list with an "or" in it, except for a label that every member
        # names ("pacemaker or defibrillator" is a device either way).
        sure: list[frozenset[int]] = [frozenset()] * n
        cluster_labels: list[set[int]] = [set() for _ in range(n)]
        for (_, _, _, label), c in zip(found, member):
            cluster_labels[c].add(label)
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
                common = frozenset(cluster_labels[k]).intersection(*cluster_labels[k + 1 : j + 1])
                for i in range(k, j + 1):
                    flags[i] |= OR
                    sure[i] = common
            k = j
        out = []
        for (s, e, phrase, label), c in zip(found, member):
            f = flags[c]
            if f & OR and label in sure[c]:
                f &= ~OR
            if f & PRENEG:
                value = -1
            elif f & NEG:
                value = 0
            elif f & (UNC | OR) or (f & SIL and phrase.silhouette) or phrase.always_uncertain:
                value = -1
            else:
                value = 1
            out.append((s, e, phrase, label, value))
        return out

    def annotate(self, report: str | None) -> list[Mention]:
        """Every mention of a report with its value, for inspection (offsets into :func:`clean_text`)."""
        text = as_text(report)
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
        text = clean_text(as_text(report))
        if not has_content(text):  # empty, or punctuation and de-identification tokens only
            return [None] * NUM_LABELS
        per_label: list[list[int]] = [[] for _ in range(NUM_LABELS)]
        finding = False
        for _, _, phrase, label, value in self._analyse(text):
            if value != 0 and label != _SUPPORT:
                finding = True
            if label == OTHER:
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
        return rows_to_tensor(self.label_batch(reports))

    def __repr__(self) -> str:
        return (
            f"CheXpertLabeler(phrases={str(self.phrases_path)!r}, match={self.match!r}, "
            f"pre_window={self.pre_window}, post_window={self.post_window}, chain_window={self.chain_window})"
        )
