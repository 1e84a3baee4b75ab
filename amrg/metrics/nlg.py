"""Natural-language-generation scores for generated reports: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

Protocol of R2Gen (Chen et al., "Generating Radiology Reports via Memory-driven Transformer",
EMNLP 2020, https://github.com/cuhksz-nlp/R2Gen; ``modules/metrics.py`` and ``modules/trainer.py``,
followed, not copied): the pycocoevalcap scorers get ``{i: [text]}`` dicts directly, with no PTB
tokenizer, so a token is whatever whitespace separates. R2Gen's texts are its tokenizer's decoded
output, i.e. cleaned, lower-cased tokens joined by single spaces; we lower-case and collapse runs of
whitespace (which also keeps newlines out of METEOR's line protocol) and otherwise pass the text
through unchanged. Departure: R2Gen scores references re-decoded from its truncated, <unk>-mapped
token ids; we score the cleaned reference text itself (see shared/DESIGN.md).

BLEU is pycocoevalcap's corpus BLEU (closest reference length); METEOR is the aggregate of the
METEOR 1.5 jar; ROUGE-L and CIDEr (not CIDEr-D) are means over reports. Cleaning the reference
report is the data module's job (R2Gen's ``clean_report_*`` rules); the generated text is scored
as generated, apart from the lower-casing and whitespace collapsing above.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from torch import Tensor

from amrg.metrics._gather import ReportTextMetric

__all__ = ["NLG_KEYS", "NLGScores", "close_meteor", "meteor_scorer", "nlg_scores", "normalise_text"]

log = logging.getLogger(__name__)

NLG_KEYS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
"""Names of the scores, in the order they are computed and logged."""


def normalise_text(text: str) -> str:
    """Lower-case and collapse whitespace runs to single spaces (the form R2Gen's decoder emits)."""
    return " ".join(text.lower().split())


def meteor_scorer() -> Meteor:
    """pycocoevalcap's METEOR scorer (starts the jar's JVM; stop it with :func:`close_meteor`)."""
    if shutil.which("java") is None:
        raise RuntimeError(
            "METEOR needs a Java runtime ('java' on PATH) to run pycocoevalcap's meteor-1.5.jar; "
            "install Java 8+ or turn METEOR off (NLGScores(meteor=False) / ReportMetricsCallback(meteor=False))"
        )
    return Meteor()


def close_meteor(scorer: Meteor) -> None:
    """Stop the JVM of a scorer from :func:`meteor_scorer`."""
    # pycocoevalcap 1.2 only stops the JVM in __del__; stop it now so each compute owns one JVM.
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    with scorer.lock:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.kill()
        proc.wait()


def nlg_scores(hypotheses: Sequence[str], references: Sequence[str], meteor: bool = True) -> dict[str, float]:
    """Score generated reports against one reference each, once over the whole corpus.

    Args:
        hypotheses: generated reports, [N].
        references: cleaned reference reports, [N], aligned with ``hypotheses``.
        meteor: run METEOR (starts one JVM for this call; needs Java).

    Returns:
        ``bleu1``..``bleu4``, ``meteor`` (only when ``meteor`` is on), ``rouge_l``, ``cider``. An empty
        corpus scores 0.0 everywhere, with a warning.

    Raises:
        ValueError: ``hypotheses`` and ``references`` differ in length.
        RuntimeError: ``meteor`` is on and Java is not installed.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"nlg_scores: got {len(hypotheses)} hypotheses but {len(references)} references")
    keys = [k for k in NLG_KEYS if meteor or k != "meteor"]
    if not hypotheses:
        log.warning("nlg_scores: no reports to score; returning 0.0 for %s", ", ".join(keys))
        return dict.fromkeys(keys, 0.0)
    # Integer keys in a fixed order, as R2Gen's compute_scores builds them.
    gts = {i: [normalise_text(r)] for i, r in enumerate(references)}
    res = {i: [normalise_text(h)] for i, h in enumerate(hypotheses)}
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{n}": float(b) for n, b in enumerate(bleu, start=1)})
    if meteor:
        scorer = meteor_scorer()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            close_meteor(scorer)
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out


class NLGScores(ReportTextMetric):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr over all ranks' reports, scored once.

    ``update`` stores (id, hypothesis, reference) strings. ``compute`` gathers every rank's rows,
    drops repeated ids (``DistributedSampler`` padding; the first copy is kept), sorts by id and
    scores on rank 0 with :func:`nlg_scores`; every rank gets the same values. The rows scored are
    kept in ``last_rows``. ``reset`` clears the stored strings.

    Args:
        meteor: score METEOR (one JVM per ``compute``; needs Java). Off: no ``meteor`` key.

    Example:
        >>> m = NLGScores(meteor=False)
        >>> m.update(["a"], ["the heart is normal ."], ["the heart is normal in size ."])
        >>> sorted(m.compute())
        ['bleu1', 'bleu2', 'bleu3', 'bleu4', 'cider', 'rouge_l']
    """

    def __init__(self, meteor: bool = True) -> None:
        super().__init__()
        self.meteor = meteor

    def compute(self) -> dict[str, Tensor]:
        """Score the gathered reports (a collective under DDP: every rank must call it).

        Returns:
            Float64 scalar tensors keyed ``bleu1``..``bleu4``, ``meteor`` (if on), ``rouge_l``, ``cider``.
        """
        rows = self._gathered_rows()

        def score() -> dict[str, Any]:
            return nlg_scores([r[1] for r in rows], [r[2] for r in rows], meteor=self.meteor)

        values = self._on_rank_zero(score)
        return {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in values.items()}
