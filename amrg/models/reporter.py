"""Stage-2 report generator: the stage-1 classifier, two associative memories and an LLM, as one nn.Module.

Paper: Wang et al., 2025, "Activating Associative Disease-Aware Vision Token Memory for LLM-Based X-ray
Report Generation" (AM-MRG), https://arxiv.org/abs/2501.03458. Stage 2 reuses the frozen stage-1 Swin
encoder and disease Q-Former, recalls visual evidence (Grad-CAM ROI patches) and past reports with two
modern Hopfield layers queried by the disease tokens, projects

    [patch tokens, disease tokens, visual recall, report recall]

into the LLM width (a linear layer per source, then one LayerNorm, as R2GenGPT's ``llama_proj`` +
``layer_norm``; Wang et al., 2023, https://arxiv.org/abs/2309.09812) and feeds the result to a causal LM
as a visual prefix inside the generation prompt. No code is copied from either reference.

This module knows nothing of Lightning or files: :func:`amrg.checkpoints.stage2.build_report_generator`
loads the stage-1 checkpoint, the memory folder and the LLM and hands the parts to
:class:`ReportGenerator`; :func:`amrg.checkpoints.stage2.load_stage2` rebuilds it from a checkpoint.

Departure from the reference code: stage 2 keeps the stage-1 Swin (the released code swaps in a Mamba
encoder that needs custom CUDA kernels), so one stage-1 checkpoint carries the whole visual side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from amrg.errors import ConfigError
from amrg.labels import LABELS
from amrg.models.classifier import DiseaseClassifier
from amrg.models.decoding import CacheKind, CompileMode, check_fast_path
from amrg.models.llm import (
    DEFAULT_INSTRUCTION,
    ReportPrompt,
    build_generation_inputs,
    build_inputs,
    generate_reports,
    report_loss,
    token_offset,
)

__all__ = ["GeneratorPrediction", "RecalledItem", "ReportGenerator", "VisualPrefix", "memory_items"]

_logger = logging.getLogger(__name__)

MemoryName = Literal["visual", "report"]
_NO_COMPILE = (
    "findings_embedding does not combine with compile (a compiled decode step would not see the vector it "
    "adds); use compile='off'"
)
_PREFIX_SOURCES = ("patch", "disease", "visual_recall", "report_recall")


@dataclass
class VisualPrefix:
    """What the visual side computes for one batch.

    Attributes:
        prefix: the visual prefix in the LLM width, [B, P, H] with P = N + 3Q.
        prefix_mask: which prefix slots are real, [B, P] bool; None when all are (masked views in
            ``multi_view="concat"`` encoders give False slots).
        logits: stage-1 per-label logits, [B, Q].
        visual_attention: visual-memory association weights, [B, heads, Q, Q + M_v] (the Q disease
            query embeddings first), or None when not requested.
        report_attention: report-memory association weights, [B, heads, Q, M_r], or None.
    """

    prefix: Tensor
    prefix_mask: Tensor | None
    logits: Tensor
    visual_attention: Tensor | None = None
    report_attention: Tensor | None = None


@dataclass(frozen=True)
class RecalledItem:
    """One stored memory item that a report's prefix attended to.

    Attributes:
        memory: ``"visual"`` (a Grad-CAM ROI patch) or ``"report"`` (a training report).
        source_id: the study the item comes from (a train-split id).
        label: the label under which the item is stored.
        weight: association weight, averaged over heads and disease queries (in [0, 1]).
        slot: row of the item in its memory.
        text: the report text (report memory, when the bank recorded it); None otherwise.
        view: the view of the source study the patch was cut from (visual memory); None otherwise.
        box: the patch box ``[x0, y0, x1, y1]`` in pixels of that view's original image (visual memory).
        image: the source view's file, relative to the memory's ``image_root`` (visual memories built by
            amrg >= 0.1 with image paths); None when the memory did not record it.
        labels: every label the item is stored under, CheXbert order. The report memory stores a report
            once under each of its labels; :meth:`ReportGenerator.explain_from_prefix` lists it once, with
            the weight summed over its rows and ``label``/``slot`` those of its highest-weight row.
            Empty means ``(label,)``.
    """

    memory: MemoryName
    source_id: str
    label: str
    weight: float
    slot: int
    text: str | None = None
    view: int | None = None
    box: tuple[float, float, float, float] | None = None
    image: str | None = None
    labels: tuple[str, ...] = ()

    @property
    def all_labels(self) -> tuple[str, ...]:
        """Every label the item is stored under (``labels``, or ``(label,)`` when that is empty)."""
        return self.labels or (self.label,)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form used by ``amrg predict-images``: memory, source_id, label, labels when the item is
        stored under more than one, then text, view, box and image where known, then weight."""
        out: dict[str, Any] = {"memory": self.memory, "source_id": self.source_id, "label": self.label}
        if len(self.all_labels) > 1:
            out["labels"] = list(self.all_labels)
        if self.text is not None:
            out["text"] = self.text
        if self.view is not None:
            out["view"] = self.view
        if self.box is not None:
            out["box"] = list(self.box)
        if self.image is not None:
            out["image"] = self.image
        out["weight"] = self.weight
        return out


@dataclass
class GeneratorPrediction:
    """Reports, stage-1 probabilities and explanations for one batch.

    Attributes:
        reports: one generated report per study.
        probabilities: stage-1 per-label probabilities, [B, Q] float32 (CheXbert order).
        explanations: per study, the top recalled items of both memories (visual first, then report,
            each by decreasing weight).
    """

    reports: list[str]
    probabilities: Tensor
    explanations: list[list[RecalledItem]] = field(default_factory=list)


class ReportGenerator(nn.Module):
    """The whole stage-2 network: stage-1 classifier -> memories -> visual prefix -> LLM -> report.

    The retrievers are any modules with the :mod:`amrg.models.retrievers` interface:
    ``retriever(queries [B, Q, D], extra_patterns=None, return_attention=False)`` returning recalled
    tokens [B, Q, D] (and, on request, weights [B, heads, Q, P + M]), with the memory already stored.
    The visual retriever gets the stage-1 disease-query embeddings [Q, D] as extra patterns in front of
    its memory (the paper's [disease queries ⊕ visual memory]); the report retriever recalls from the
    report memory alone. Both are queried by the disease tokens.

    Args:
        classifier: the trained stage-1 network (encoder + Q-Former + head).
        llm: the causal LM, already set up for training (peft LoRA-wrapped, frozen or fully trainable).
        tokenizer: the LLM's tokenizer; pad/bos/eos and the prompt conventions come from it.
        visual_retriever: recalls ROI-patch features; its ``dim`` and memory width must equal the
            Q-Former width D.
        report_retriever: recalls report embeddings; its ``dim`` must equal D (any memory width).
        freeze_encoder: keep the stage-1 vision encoder frozen (paper: frozen).
        freeze_qformer: keep the stage-1 Q-Former (and its query embeddings) frozen (paper: frozen). The
            stage-1 head is always frozen: stage 2 has no classification loss.
        instruction: the request after the image in the prompt.
        prompt_template: ``"auto"`` uses the tokenizer's chat template when it has one, ``"chat"``
            requires it, ``"plain"`` uses R2GenGPT's ``Human: ... \\nAssistant:`` format.
        system_prompt: optional system turn (chat format only).
        max_report_tokens: report tokens kept for teacher forcing (paper: 60 IU X-ray, 100 otherwise).
        num_beams: beam width (paper: 3).
        repetition_penalty: penalty on repeated tokens (paper: 2.0).
        length_penalty: beam length penalty (paper: 2.0).
        min_new_tokens: eos blocked before this many tokens (paper: 40 IU X-ray, 80 otherwise).
        max_new_tokens: generation stops here (paper: 100 IU X-ray, 120 otherwise).
        cache: the KV cache of generation, ``"dynamic"`` or ``"static"`` (speed only: same reports).
        compile: ``"off"`` or a ``torch.compile`` mode for the decode steps, with ``cache="static"``
            (speed only; :mod:`amrg.models.decoding`).
        visual_provenance: one record per visual memory row (``source_id``, ``label``, ...), for
            explanations; may be set later with :meth:`set_provenance`.
        report_provenance: one record per report memory row (``source_id``, ``label``, ``text``).
        queries: ``"disease"`` (paper): the Q-Former's disease tokens query the memories and enter the
            prefix; ``"pooled"`` (ablation): the mean of the projected patch tokens, repeated Q times, takes
            their place, so nothing is disease-specific (the stage-1 probabilities still come from the
            disease tokens).
        findings_threshold: when ``instruction`` holds :data:`~amrg.models.llm.FINDINGS_PLACEHOLDER`, the
            labels whose stage-1 probability reaches this are written there as text, in training and in
            generation alike (a diagnosis prompt, as PromptMRG's; not in the AM-MRG paper).
        training_findings: what the findings placeholder (and the findings embedding) states in the
            training loss: ``"stage1"`` (the stage-1 positives, as in generation) or ``"labels"`` (the
            study's annotated positives, when the loss is given them: the diagnosis is teacher-forced, so
            the LLM learns to write what the prompt states and nothing else). Generation and the
            validation loss always state stage 1's.
        findings_embedding: also state the findings as one learned vector per label (zero at the start),
            whose sum over the stated labels is added to the input embedding of every report token, in
            training and generation alike (:func:`~amrg.models.llm.token_offset`): the LLM gets the
            diagnosis at every step without having to attend back to it (not in the AM-MRG paper). Not
            with ``compile``.

    Raises:
        ConfigError: (a ValueError) options out of range or that do not combine, and widths of the
            classifier, retrievers and memories that do not fit together; all of them in one message.
    """

    def __init__(
        self,
        classifier: DiseaseClassifier,
        llm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        visual_retriever: nn.Module,
        report_retriever: nn.Module,
        freeze_encoder: bool = True,
        freeze_qformer: bool = True,
        instruction: str = DEFAULT_INSTRUCTION,
        prompt_template: Literal["auto", "chat", "plain"] = "auto",
        system_prompt: str | None = None,
        max_report_tokens: int = 100,
        num_beams: int = 3,
        repetition_penalty: float = 2.0,
        length_penalty: float = 2.0,
        min_new_tokens: int = 80,
        max_new_tokens: int = 120,
        cache: CacheKind = "dynamic",
        compile: CompileMode = "off",
        visual_provenance: Sequence[dict[str, Any]] = (),
        report_provenance: Sequence[dict[str, Any]] = (),
        queries: Literal["disease", "pooled"] = "disease",
        findings_threshold: float = 0.5,
        training_findings: Literal["stage1", "labels"] = "stage1",
        findings_embedding: bool = False,
    ) -> None:
        super().__init__()
        width = classifier.qformer.hidden_size
        vision_width = classifier.encoder.num_features
        problems = []
        for name, retriever in (
            ("visual_retriever", visual_retriever),
            ("report_retriever", report_retriever),
        ):
            dim = getattr(retriever, "dim", width)
            if dim != width:
                problems.append(
                    f"{name} ({type(retriever).__name__}) has dim={dim} but the stage-1 disease tokens are "
                    f"{width} wide (Q-Former hidden_size)"
                )
        memory_dim = getattr(visual_retriever, "memory_dim", width)
        if memory_dim != width:
            problems.append(
                f"visual_retriever stores patterns of width {memory_dim}, but the visual memory and the "
                f"disease-query embeddings prepended to it are {width} wide (Q-Former hidden_size)"
            )
        if max_report_tokens < 1:
            problems.append(f"max_report_tokens must be >= 1, got {max_report_tokens}")
        if not 0.0 < findings_threshold < 1.0:
            problems.append(f"findings_threshold must be in (0, 1), got {findings_threshold}")
        if training_findings not in ("stage1", "labels"):
            problems.append(f"training_findings must be 'stage1' or 'labels', got {training_findings!r}")
        if queries not in ("disease", "pooled"):
            problems.append(f"queries must be 'disease' or 'pooled', got {queries!r}")
        if num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {num_beams}")
        if not 0 <= min_new_tokens <= max_new_tokens or max_new_tokens < 1:
            problems.append(
                f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
                f"{min_new_tokens} and {max_new_tokens}"
            )
        problems += check_fast_path(cache, compile)
        if findings_embedding and compile != "off":
            problems.append(_NO_COMPILE)
        if problems:
            raise ConfigError("ReportGenerator: " + "; ".join(problems))

        self.classifier = classifier
        self.llm = llm
        self.tokenizer = tokenizer
        self.visual_retriever = visual_retriever
        self.report_retriever = report_retriever
        self.freeze_encoder = freeze_encoder
        self.freeze_qformer = freeze_qformer
        self.queries = queries
        self.prompt = ReportPrompt(
            tokenizer, instruction=instruction, template=prompt_template, system_prompt=system_prompt
        )
        self.findings_threshold = findings_threshold
        self.training_findings = training_findings
        self.max_report_tokens = max_report_tokens
        self.num_beams = num_beams
        self.repetition_penalty = repetition_penalty
        self.length_penalty = length_penalty
        self.min_new_tokens = min_new_tokens
        self.max_new_tokens = max_new_tokens
        self.cache = cache
        self.compile = compile

        hidden = int(llm.get_input_embeddings().weight.shape[1])
        self.llm_hidden_size = hidden
        # One projection per source (they live in different spaces), one shared LayerNorm; nn.Linear's
        # default init, as R2GenGPT's llama_proj.
        self.prefix_proj = nn.ModuleDict(
            {
                "patch": nn.Linear(vision_width, hidden),
                "disease": nn.Linear(width, hidden),
                "visual_recall": nn.Linear(width, hidden),
                "report_recall": nn.Linear(width, hidden),
            }
        )
        self.prefix_norm = nn.LayerNorm(hidden)
        # Zero at the start: a network built with it writes what one built without it writes until it trains.
        self.findings_embed = (
            nn.Parameter(torch.zeros(classifier.num_labels, hidden)) if findings_embedding else None
        )

        self.visual_provenance: list[dict[str, Any]] = [dict(r) for r in visual_provenance]
        self.report_provenance: list[dict[str, Any]] = [dict(r) for r in report_provenance]
        self._label_cache: dict[str, tuple[list[dict[str, Any]], Tensor]] = {}
        self._item_cache: dict[str, tuple[list[dict[str, Any]], Tensor, list[list[int]]]] = {}
        self.build_record: dict[str, Any] | None = None
        """How the parts were assembled, as plain data (set by :mod:`amrg.checkpoints.stage2`); a stage-2
        checkpoint stores it so the network can be rebuilt from the checkpoint alone."""
        self._apply_freezing()

    # ------------------------------------------------------------------ set-up
    def frozen_parts(self) -> list[nn.Module]:
        """The stage-1 parts stage 2 does not train: the head always, the encoder and Q-Former when frozen."""
        parts: list[nn.Module] = [self.classifier.head]
        if self.freeze_encoder:
            parts.append(self.classifier.encoder)
        if self.freeze_qformer:
            parts.append(self.classifier.qformer)
        return parts

    def _apply_freezing(self) -> None:
        for part in self.frozen_parts():
            part.requires_grad_(False)
            part.eval()
        # A trainable part that stage 1 froze (VisionEncoder(freeze=True)) is unfrozen here.
        if not self.freeze_encoder:
            self.classifier.encoder.frozen = False
            self.classifier.encoder.requires_grad_(True)
        if not self.freeze_qformer:
            self.classifier.qformer.requires_grad_(True)

    def train(self, mode: bool = True) -> ReportGenerator:
        """Switch train/eval mode; frozen stage-1 parts and a wholly frozen LLM stay in eval mode."""
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        if not any(p.requires_grad for p in self.llm.parameters()):
            self.llm.eval()
        return self

    def set_provenance(
        self, visual: Sequence[dict[str, Any]] | None = None, report: Sequence[dict[str, Any]] | None = None
    ) -> None:
        """Replace the provenance records of the visual and/or report memory (one per memory row)."""
        if visual is not None:
            self.visual_provenance = [dict(r) for r in visual]
        if report is not None:
            self.report_provenance = [dict(r) for r in report]

    @property
    def image_size(self) -> int:
        """Side in pixels of the views the stage-1 encoder expects."""
        return int(self.classifier.encoder.img_size)

    @property
    def num_labels(self) -> int:
        return self.classifier.num_labels

    # ------------------------------------------------------------------ visual side
    def encode(
        self, images: Tensor, view_mask: Tensor | None = None, return_attention: bool = False
    ) -> VisualPrefix:
        """Compute the visual prefix (and the stage-1 logits) for a batch of studies.

        Args:
            images: normalised views, [B, V, 3, H, W].
            view_mask: which views are real, [B, V] bool; None keeps all.
            return_attention: also return both memories' association weights (for explanations).

        Returns:
            :class:`VisualPrefix` with prefix [B, N + 3Q, H], its mask, logits [B, Q] and the weights.
        """
        grad = torch.is_grad_enabled()
        encoder, qformer = self.classifier.encoder, self.classifier.qformer
        # Frozen parts run without a graph (the paper's frozen Swin costs no activation memory); the
        # Q-Former keeps one when the encoder below it trains.
        with torch.set_grad_enabled(grad and not self.freeze_encoder):
            patch = encoder.forward_features(images, view_mask)  # [B, N, C]
        token_mask = encoder.token_mask(view_mask, patch.shape[1])  # [B, N] or None
        with torch.set_grad_enabled(grad and not (self.freeze_qformer and self.freeze_encoder)):
            disease = qformer(patch, token_mask)  # [B, Q, D]
            queries = qformer.queries[0]  # [Q, D], the learned disease-query embeddings
        with torch.no_grad():
            logits = self.classifier.head(disease.detach()).float()  # [B, Q]
        if self.queries == "pooled":
            disease = self._pooled(qformer.project_visual(patch), token_mask, disease.shape[1])  # [B, Q, D]

        visual = self.visual_retriever(disease, extra_patterns=queries, return_attention=return_attention)
        report = self.report_retriever(disease, return_attention=return_attention)
        visual_attention = report_attention = None
        if return_attention:
            visual, visual_attention = visual  # [B, Q, D], [B, heads, Q, Q + M_v]
            report, report_attention = report  # [B, Q, D], [B, heads, Q, M_r]

        proj = self.prefix_proj
        parts = [
            proj["patch"](patch),  # [B, N, H]
            proj["disease"](disease),  # [B, Q, H]
            proj["visual_recall"](visual),  # [B, Q, H]
            proj["report_recall"](report),  # [B, Q, H]
        ]
        prefix = self.prefix_norm(torch.cat(parts, dim=1))  # [B, N + 3Q, H]
        prefix_mask = None
        if token_mask is not None:
            rest = token_mask.new_ones(token_mask.shape[0], 3 * disease.shape[1])  # [B, 3Q]
            prefix_mask = torch.cat([token_mask.bool(), rest.bool()], dim=1)  # [B, N + 3Q]
        return VisualPrefix(prefix, prefix_mask, logits, visual_attention, report_attention)

    # ------------------------------------------------------------------ association
    def _item_labels(self, memory: MemoryName) -> Tensor:
        """Label index (CheXbert order) of each memory row, from its provenance; -1 when unknown."""
        provenance = self.visual_provenance if memory == "visual" else self.report_provenance
        cached = self._label_cache.get(memory)
        if cached is None or cached[0] is not provenance:
            index = {name: i for i, name in enumerate(LABELS)}
            rows = torch.tensor([index.get(str(r.get("label")), -1) for r in provenance], dtype=torch.long)
            cached = self._label_cache[memory] = (provenance, rows)
        return cached[1]

    def association_loss(self, visual: VisualPrefix, labels: Tensor) -> Tensor:
        """How far the memories' recall is from the study's findings: mean of -log(matching mass).

        For every study with a positive label (code 1), every memory and every disease query, the
        matching mass is the share of the query's association weight (averaged over heads, over the
        memory rows only; the disease-query embeddings in front of the visual memory are left free) that
        falls on rows stored under one of the study's positive labels. The loss is the mean of
        -log(mass) over studies, queries and the two memories; 0 means every query recalls only rows of
        the study's findings. Studies without a positive label, and memories without heads or rows,
        add nothing.

        Departure from the paper (trained with the report loss alone): on the tiny from-scratch demo
        model the report loss alone leaves the association weights nearly uniform and the same for
        every study, so recall does not follow the disease; this auxiliary term, weighted by
        ``ReporterModule(association_weight=...)``, ties it to the labels. Weight 0 is the paper.

        Args:
            visual: the output of :meth:`encode` with ``return_attention=True``.
            labels: the studies' CheXpert codes, [B, 14] (1 positive; 0, -1 and NaN are not).

        Returns:
            A scalar (0 when nothing counts), differentiable through the retrievers' projections.

        Raises:
            ValueError: no attention in ``visual``, or labels that are not [B, 14].
        """
        if visual.visual_attention is None or visual.report_attention is None:
            raise ValueError("association_loss needs encode(..., return_attention=True)")
        batch = visual.prefix.shape[0]
        if labels.ndim != 2 or labels.shape != (batch, len(LABELS)):
            raise ValueError(f"labels must be [B={batch}, {len(LABELS)}], got {list(labels.shape)}")
        positive = labels.to(visual.prefix.device) == 1  # [B, 14]; NaN compares False
        studies = positive.any(dim=1)  # [B]
        terms = []
        for name, attention, skip in (
            ("visual", visual.visual_attention, visual.logits.shape[1]),
            ("report", visual.report_attention, 0),
        ):
            if attention.shape[1] == 0 or attention.shape[-1] <= skip or not bool(studies.any()):
                continue
            rows = attention[..., skip:].float().mean(dim=1)  # [B, Q, M]
            item_labels = self._item_labels(name).to(rows.device)  # [M]
            if item_labels.numel() != rows.shape[-1]:
                raise ValueError(
                    f"{name} memory: {item_labels.numel()} provenance records for {rows.shape[-1]} slots"
                )
            known = item_labels >= 0
            match = positive[:, item_labels.clamp_min(0)] & known  # [B, M]
            mass = (rows * match.unsqueeze(1)).sum(-1) / rows.sum(-1).clamp_min(1e-12)  # [B, Q]
            terms.append(-torch.log(mass[studies].clamp_min(1e-6)).mean())
        if not terms:
            return visual.prefix.new_zeros(())
        return torch.stack(terms).mean()

    @staticmethod
    def _pooled(tokens: Tensor, token_mask: Tensor | None, num_queries: int) -> Tensor:
        """Mean of the real projected patch tokens, [B, N, D] -> [B, Q, D] (the same vector Q times)."""
        if token_mask is None:
            pooled = tokens.mean(dim=1)  # [B, D]
        else:
            weights = token_mask.to(tokens.dtype).unsqueeze(-1)  # [B, N, 1]
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # [B, D]
        return pooled.unsqueeze(1).expand(-1, num_queries, -1)  # [B, Q, D]

    def stated(self, visual: VisualPrefix, labels: Tensor | None = None) -> Tensor:
        """Which labels are stated for each study, [B, Q] bool.

        Args:
            visual: the output of :meth:`encode`; its stage-1 probabilities >= the findings threshold are
                stated.
            labels: [B, Q] label codes (1 positive, 0 negative, -1 uncertain, NaN unmentioned); when given,
                the positives (1) are stated instead of stage 1's.
        """
        if labels is not None:
            return labels.to(visual.logits.device) == 1  # [B, Q]
        return torch.sigmoid(visual.logits.float()) >= self.findings_threshold  # [B, Q]

    def findings(self, visual: VisualPrefix, labels: Tensor | None = None) -> list[list[str]] | None:
        """The label names the prompt states for each study (:meth:`stated`), or None when the prompt
        states none."""
        if not self.prompt.has_findings:
            return None
        return [[LABELS[q] for q in row.nonzero().flatten().tolist()] for row in self.stated(visual, labels)]

    def findings_offset(self, visual: VisualPrefix, labels: Tensor | None = None) -> Tensor | None:
        """The findings embedding's vector for each study, [B, H] (the sum of its stated labels' vectors),
        or None without a findings embedding."""
        if self.findings_embed is None:
            return None
        stated = self.stated(visual, labels).to(self.findings_embed.dtype)  # [B, Q]
        return stated @ self.findings_embed  # [B, H]

    # ------------------------------------------------------------------ training
    def loss_from_prefix(
        self, visual: VisualPrefix, reports: Sequence[str], labels: Tensor | None = None
    ) -> Tensor:
        """Teacher-forced next-token loss on the report tokens (and eos) only.

        Args:
            visual: the output of :meth:`encode`.
            reports: target reports, one per study (cleaned text).
            labels: the studies' [B, Q] label codes; with ``training_findings="labels"`` the prompt states
                their positives (ignored otherwise, and stage 1's are stated when None).

        Returns:
            The mean cross-entropy over report tokens, a scalar.
        """
        stated_labels = labels if self.training_findings == "labels" else None
        with token_offset(self.llm, self.findings_offset(visual, stated_labels)):
            inputs = build_inputs(
                self.llm.get_input_embeddings(),
                self.prompt,
                visual.prefix,
                reports,
                max_report_tokens=self.max_report_tokens,
                prefix_mask=visual.prefix_mask,
                findings=self.findings(visual, stated_labels),
            )
        return report_loss(self.llm, inputs)

    def forward(
        self, images: Tensor, view_mask: Tensor | None, reports: Sequence[str], labels: Tensor | None = None
    ) -> Tensor:
        """Training loss for a batch.

        Args:
            images: [B, V, 3, H, W].
            view_mask: [B, V] bool, or None.
            reports: B target reports.
            labels: the studies' [B, Q] label codes (see :meth:`loss_from_prefix`).

        Returns:
            Scalar loss on the report tokens.
        """
        return self.loss_from_prefix(self.encode(images, view_mask), reports, labels)

    # ------------------------------------------------------------------ generation
    def _decoding(self, overrides: dict[str, Any]) -> dict[str, Any]:
        options = {
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "length_penalty": self.length_penalty,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
            "cache": self.cache,
            "compile": self.compile,
        }
        unknown = sorted(set(overrides) - set(options))
        if unknown:
            raise ValueError(f"unknown decoding option(s) {unknown}; expected some of {sorted(options)}")
        options.update({k: v for k, v in overrides.items() if v is not None})
        problems = check_fast_path(options["cache"], options["compile"])
        if problems:
            raise ConfigError("decoding: " + "; ".join(problems))
        return options

    @torch.no_grad()
    def generate_from_prefix(self, visual: VisualPrefix, **decoding: Any) -> list[str]:
        """Beam-search one report per study from an already computed prefix.

        Args:
            visual: the output of :meth:`encode`.
            **decoding: overrides of num_beams, repetition_penalty, length_penalty, min_new_tokens,
                max_new_tokens, cache, compile (None keeps the constructor's value).

        Returns:
            B reports.
        """
        options = self._decoding(decoding)
        offset = self.findings_offset(visual)
        if offset is not None and options["compile"] != "off":
            raise ConfigError("decoding: " + _NO_COMPILE)
        inputs = build_generation_inputs(
            self.llm.get_input_embeddings(),
            self.prompt,
            visual.prefix,
            visual.prefix_mask,
            self.findings(visual),
        )
        with token_offset(self.llm, offset):
            return generate_reports(
                self.llm, self.tokenizer, inputs.inputs_embeds, inputs.attention_mask, **options
            )

    @torch.no_grad()
    def generate(self, images: Tensor, view_mask: Tensor | None = None, **decoding: Any) -> list[str]:
        """Write one report per study with batched beam search (paper decoding unless overridden).

        The network is in eval mode for the call (no Hopfield or LoRA dropout), then restored.

        Args:
            images: [B, V, 3, H, W].
            view_mask: [B, V] bool, or None.
            **decoding: see :meth:`generate_from_prefix`.

        Returns:
            B reports.
        """
        with _eval_mode(self):
            return self.generate_from_prefix(self.encode(images, view_mask), **decoding)

    # ------------------------------------------------------------------ explanations
    def explain_from_prefix(self, visual: VisualPrefix, top_k: int = 5) -> list[list[RecalledItem]]:
        """The top recalled items of each memory for every study.

        A memory slot's weight is its association weight averaged over heads and disease queries; the
        disease-query embeddings in front of the visual memory are not memory items and are skipped. A
        report the memory stores under several labels is one item (its rows' weights summed, every label
        in :attr:`RecalledItem.labels`), so the top items are distinct reports.

        Args:
            visual: the output of :meth:`encode` with ``return_attention=True``.
            top_k: items per memory and study.

        Returns:
            Per study, up to ``top_k`` visual items then up to ``top_k`` report items.

        Raises:
            ValueError: no attention in ``visual``, or provenance that does not match the memory size.
        """
        if visual.visual_attention is None or visual.report_attention is None:
            raise ValueError("explain_from_prefix needs encode(..., return_attention=True)")
        batch = visual.prefix.shape[0]
        num_queries = visual.logits.shape[1]
        out: list[list[RecalledItem]] = [[] for _ in range(batch)]
        memories = (
            ("visual", visual.visual_attention, num_queries, self.visual_provenance, self.visual_retriever),
            ("report", visual.report_attention, 0, self.report_provenance, self.report_retriever),
        )
        for name, attention, skip, provenance, retriever in memories:
            if attention.shape[1] == 0 or attention.shape[-1] <= skip or top_k < 1:
                continue  # a retriever without heads (NoRetriever) recalls nothing to explain
            weights = attention[..., skip:].float().mean(dim=(1, 2))  # [B, M]
            size = weights.shape[1]
            stored = getattr(retriever, "num_memories", size)
            if len(provenance) != size or stored != size:
                raise ValueError(
                    f"{name} memory: {len(provenance)} provenance records for {size} attended slots "
                    f"({stored} stored); load the memory and its provenance together"
                )
            # one item per stored item: the report memory's rows of one report (one per label) join
            item_of_row, rows_of_item = self._items(name)  # [M], rows of each item
            items = weights.new_zeros(batch, len(rows_of_item))  # [B, I]
            items.index_add_(1, item_of_row.to(weights.device), weights)
            values, picked = items.topk(min(top_k, items.shape[1]), dim=1)  # [B, k] each
            for b in range(batch):
                for value, item in zip(values[b].tolist(), picked[b].tolist()):
                    rows = rows_of_item[item]
                    slot = rows[int(weights[b, rows].argmax())] if len(rows) > 1 else rows[0]
                    record = provenance[slot]
                    out[b].append(
                        RecalledItem(
                            memory=name,  # type: ignore[arg-type]
                            source_id=str(record.get("source_id")),
                            label=str(record.get("label", "")),
                            weight=float(value),
                            slot=int(slot),
                            **(_visual_fields(record) if name == "visual" else _report_fields(record)),
                            labels=_ordered_labels(str(provenance[r].get("label", "")) for r in rows),
                        )
                    )
        return out

    def _items(self, memory: MemoryName) -> tuple[Tensor, list[list[int]]]:
        """The item of each memory row, [M], and the rows of each item: every row is its own item, except
        that the report memory's rows of one report (the same ``source_id``) are one."""
        provenance = self.visual_provenance if memory == "visual" else self.report_provenance
        cached = self._item_cache.get(memory)
        if cached is None or cached[0] is not provenance:
            rows_of_item = memory_items(provenance, by_source=memory == "report")
            item_of_row = torch.empty(len(provenance), dtype=torch.long)
            for item, rows in enumerate(rows_of_item):
                item_of_row[rows] = item
            cached = self._item_cache[memory] = (provenance, item_of_row, rows_of_item)
        return cached[1], cached[2]

    @torch.no_grad()
    def predict(
        self, images: Tensor, view_mask: Tensor | None = None, top_k: int = 5, **decoding: Any
    ) -> GeneratorPrediction:
        """Reports, stage-1 probabilities and the top recalled memory items, from one encoder pass.

        Args:
            images: [B, V, 3, H, W].
            view_mask: [B, V] bool, or None.
            top_k: recalled items per memory and study (0 for none).
            **decoding: see :meth:`generate_from_prefix`.

        Returns:
            :class:`GeneratorPrediction`; probabilities are [B, Q] in CheXbert order.
        """
        with _eval_mode(self):
            visual = self.encode(images, view_mask, return_attention=top_k > 0)
            reports = self.generate_from_prefix(visual, **decoding)
            explanations = self.explain_from_prefix(visual, top_k) if top_k > 0 else [[] for _ in reports]
        return GeneratorPrediction(reports, torch.sigmoid(visual.logits), explanations)

    def extra_repr(self) -> str:
        return (
            f"labels={len(LABELS)}, llm_hidden_size={self.llm_hidden_size}, "
            f"freeze_encoder={self.freeze_encoder}, "
            f"freeze_qformer={self.freeze_qformer}, num_beams={self.num_beams}, "
            f"new_tokens={self.min_new_tokens}-{self.max_new_tokens}"
        )


def memory_items(provenance: Sequence[dict[str, Any]], by_source: bool) -> list[list[int]]:
    """The rows of each memory item, in order of first row: one item a row, or with ``by_source`` (the report
    memory, which stores a report once under each of its labels) one item per ``source_id``; rows without a
    ``source_id`` stay items of their own."""
    index: dict[object, int] = {}
    rows_of_item: list[list[int]] = []
    for row, record in enumerate(provenance):
        source = record.get("source_id")
        key = ("source", str(source)) if by_source and source is not None else ("row", row)
        item = index.setdefault(key, len(rows_of_item))
        if item == len(rows_of_item):
            rows_of_item.append([])
        rows_of_item[item].append(row)
    return rows_of_item


def _ordered_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Distinct labels, CheXbert order first (unknown names after, as first seen)."""
    seen = dict.fromkeys(labels)
    order = {name: i for i, name in enumerate(LABELS)}
    return tuple(sorted(seen, key=lambda name: order.get(name, len(order))))


def _report_fields(record: dict[str, Any]) -> dict[str, Any]:
    text = record.get("text")
    return {"text": text if isinstance(text, str) else None}


def _visual_fields(record: dict[str, Any]) -> dict[str, Any]:
    """``view``, ``box`` and ``image`` of a visual provenance record, each None when absent or malformed."""
    view, box, image = record.get("view"), record.get("box"), record.get("image")
    good_box = (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    )
    return {
        "view": int(view) if isinstance(view, int) and not isinstance(view, bool) else None,
        "box": tuple(float(v) for v in box) if good_box else None,
        "image": image if isinstance(image, str) else None,
    }


class _eval_mode:  # noqa: N801 - used like a function, as torch.no_grad
    """Context manager: put a module in eval mode and restore its mode afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.was_training = module.training

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)
