"""Stage-1 disease classifier: vision encoder -> disease Q-Former -> one binary head per disease query.

Paper: Wang et al., 2025, "Activating Associative Disease-Aware Vision Token Memory for LLM-Based X-ray
Report Generation" (AM-MRG), https://arxiv.org/abs/2501.03458 — stage 1 trains Swin + Q-Former with 14
binary disease heads; its encoder and Q-Former are reused, frozen, by Grad-CAM memory mining and stage 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amrg.models.qformer import DiseaseQFormer
from amrg.models.vision import VisionEncoder

__all__ = ["ClassifierOutput", "DiseaseClassifier", "DiseaseHead"]


class DiseaseHead(nn.Module):
    """Per-query linear heads: disease token i predicts label i alone.

    Each query has its own weight vector and bias (``weight [Q, D]``, ``bias [Q]``), so query i is tied
    to label i rather than every label reading every token.
    """

    def __init__(self, hidden_size: int, num_queries: int = 14) -> None:
        """Create the per-query weights.

        Args:
            hidden_size: D, the disease-token width.
            num_queries: Q, the number of labels (one per query).
        """
        super().__init__()
        self.hidden_size = hidden_size
        self.num_queries = num_queries
        self.weight = nn.Parameter(torch.empty(num_queries, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_queries))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) weights and zero bias, as timm initialises classifier heads."""
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, disease_tokens: Tensor) -> Tensor:
        """Logits from disease tokens.

        Args:
            disease_tokens: [B, Q, D].

        Returns:
            Logits, [B, Q].
        """
        return torch.einsum("bqd,qd->bq", disease_tokens, self.weight) + self.bias


@dataclass
class ClassifierOutput:
    """Everything one forward pass of :class:`DiseaseClassifier` computes.

    Attributes:
        patch_tokens: fused visual tokens from the encoder, [B, N, C].
        token_mask: which of them are real, [B, N] bool, or None when all are.
        disease_tokens: Q-Former outputs, one per label, [B, Q, D].
        logits: per-label logits, [B, Q].
    """

    patch_tokens: Tensor
    token_mask: Tensor | None
    disease_tokens: Tensor
    logits: Tensor


class DiseaseClassifier(nn.Module):
    """The whole stage-1 network: :class:`VisionEncoder` + :class:`DiseaseQFormer` + :class:`DiseaseHead`."""

    def __init__(
        self, encoder: VisionEncoder, qformer: DiseaseQFormer, head: DiseaseHead | None = None
    ) -> None:
        """Assemble the network from its parts.

        Args:
            encoder: turns views into patch tokens [B, N, C].
            qformer: turns patch tokens into disease tokens [B, Q, D]; its ``vision_width`` is set to the
                encoder's ``num_features`` when None, and must equal it otherwise.
            head: per-query linear head; None builds ``DiseaseHead(qformer.hidden_size, qformer.num_queries)``.
        """
        super().__init__()
        qformer.set_vision_width(encoder.num_features)  # builds the projection, or checks a given width
        if head is None:
            head = DiseaseHead(hidden_size=qformer.hidden_size, num_queries=qformer.num_queries)
        if (head.hidden_size, head.num_queries) != (qformer.hidden_size, qformer.num_queries):
            raise ValueError(
                f"head expects (hidden_size, num_queries)=({head.hidden_size}, {head.num_queries}) but the "
                f"qformer gives ({qformer.hidden_size}, {qformer.num_queries})"
            )
        self.encoder = encoder
        self.qformer = qformer
        self.head = head

    @property
    def num_labels(self) -> int:
        return self.head.num_queries

    def forward_features(self, images: Tensor, view_mask: Tensor | None = None) -> ClassifierOutput:
        """Run the whole network and keep every intermediate.

        Args:
            images: normalised views, [B, V, 3, H, W], or [B, 3, H, W] for one view per study (the
                layout ``pytorch_grad_cam`` needs).
            view_mask: which views are real, [B, V] bool; None keeps all.

        Returns:
            :class:`ClassifierOutput` with patch tokens [B, N, C], disease tokens [B, Q, D] and logits [B, Q].
        """
        patch_tokens = self.encoder.forward_features(images, view_mask)  # [B, N, C]
        token_mask = self.encoder.token_mask(view_mask, patch_tokens.shape[1])  # [B, N] or None
        disease_tokens = self.qformer(patch_tokens, token_mask)  # [B, Q, D]
        logits = self.head(disease_tokens)  # [B, Q]
        return ClassifierOutput(patch_tokens, token_mask, disease_tokens, logits)

    def forward_head(self, disease_tokens: Tensor) -> Tensor:
        """Logits from disease tokens, [B, Q, D] -> [B, Q]."""
        return self.head(disease_tokens)

    def forward(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """Per-label logits.

        Args:
            images: [B, V, 3, H, W], or [B, 3, H, W] for one view per study.
            view_mask: [B, V] bool, or None.

        Returns:
            Logits, [B, Q].
        """
        return self.forward_features(images, view_mask).logits

    @torch.no_grad()
    def predict_proba(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """Per-label probabilities without gradients.

        Args:
            images: [B, V, 3, H, W].
            view_mask: [B, V] bool, or None.

        Returns:
            Sigmoid probabilities, [B, Q].
        """
        return torch.sigmoid(self(images, view_mask))
