"""Disease Q-Former: one learnable query per CheXpert label, cross-attending to visual patch tokens.

Paper: Wang et al., 2025, "Activating Associative Disease-Aware Vision Token Memory for LLM-Based X-ray
Report Generation" (AM-MRG), https://arxiv.org/abs/2501.03458 — stage 1 feeds Swin patch tokens to a
Q-Former with 14 disease queries. The Q-Former is BLIP-2's (Li et al., 2023, https://arxiv.org/abs/2301.12597):
a bidirectional BERT whose query stream has self-attention, cross-attention to the image every
``cross_attention_freq``-th layer (2 in BLIP-2 and the paper) and its own feed-forward.

The transformer is ``transformers.Blip2QFormerModel`` (Apache-2.0). The BERT-initialisation key map
follows BLIP-2's recipe (LAVIS ``Blip2Base.init_Qformer``, BSD-3-Clause): BERT's self-attention and
feed-forward weights initialise the query stream, cross-attention starts random.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

__all__ = ["DiseaseQFormer"]

_logger = logging.getLogger(__name__)

# BERT keys that have no counterpart in a query-only Q-Former: the token/position embeddings and the
# pooler serve text input, which the disease Q-Former never receives. They are skipped on purpose.
_BERT_UNUSED = re.compile(
    r"^(embeddings\.(word|position|token_type)_embeddings\.|embeddings\.position_ids|pooler\.)"
)
# BERT key -> Blip2QFormerModel key (query stream), per layer.
_BERT_LAYER_MAP = (
    (r"attention\.self\.(query|key|value)\.", r"attention.attention.\1."),
    (r"attention\.output\.(dense|LayerNorm)\.", r"attention.output.\1."),
    (r"intermediate\.dense\.", r"intermediate_query.dense."),
    (r"output\.(dense|LayerNorm)\.", r"output_query.\1."),
)


class DiseaseQFormer(nn.Module):
    """A BLIP-2 Q-Former whose ``num_queries`` learnable queries each stand for one disease.

    Visual tokens first pass :attr:`visual_proj` (Linear C->D, then LayerNorm), the trained projection
    into the Q-Former width. It is one named module so that memory mining and stage 2 encode CAM
    patches with exactly the projection stage 1 learned (:meth:`project_visual`); the Q-Former's own
    cross-attention key/value layers then work at width D (``encoder_hidden_size = hidden_size``).
    """

    def __init__(
        self,
        vision_width: int | None = None,
        num_queries: int = 14,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_freq: int = 2,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
        bert_path: Path | None = None,
    ) -> None:
        """Build the Q-Former with random weights (BERT-style init), then optionally load BERT weights.

        Args:
            vision_width: C, the width of the incoming patch tokens (``VisionEncoder.num_features``);
                None (the recipes' choice) takes it from the encoder when :class:`DiseaseClassifier`
                assembles the two (:meth:`set_vision_width`).
            num_queries: Q, one learnable query per label (14 CheXpert labels).
            hidden_size: D, the Q-Former width (768 for BERT-base).
            num_layers: transformer layers (12 for BERT-base).
            num_heads: attention heads; must divide ``hidden_size``.
            intermediate_size: feed-forward width (3072 for BERT-base).
            cross_attention_freq: layer i cross-attends to the visual tokens when i % freq == 0
                (2 in BLIP-2 and the paper: layers 0, 2, 4, ...).
            dropout: dropout on hidden states and attention probabilities.
            initializer_range: std of the normal init of every linear layer and of the queries (BERT's
                0.02, tuned for width 768). At small widths 0.02 makes the cross-attention branch so
                weak against the post-LN residual that the disease tokens start almost independent of
                the image (and training stalls at the label base rates); use about ``hidden_size ** -0.5``
                there.
            bert_path: a local BERT folder (``save_pretrained`` layout) whose weights initialise the
                self-attention and feed-forward layers; see :meth:`load_bert_weights`.
        """
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {cross_attention_freq}")
        self.vision_width = vision_width
        self.num_queries = num_queries
        self.hidden_size = hidden_size
        # fc: Linear C->D, built here when C is known, else by set_vision_width (an Identity until then)
        fc = nn.Linear(vision_width, hidden_size) if vision_width is not None else nn.Identity()
        self.visual_proj = nn.Sequential(OrderedDict(fc=fc, norm=nn.LayerNorm(hidden_size)))
        self.queries = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            cross_attention_frequency=cross_attention_freq,
            encoder_hidden_size=hidden_size,  # visual tokens arrive already projected to D
            use_qformer_text_input=False,
            initializer_range=initializer_range,
        )
        self.qformer = Blip2QFormerModel(config)
        self.reset_parameters()
        if bert_path is not None:
            self.load_bert_weights(bert_path)

    def reset_parameters(self) -> None:
        """Initialise the queries and the visual projection.

        Queries ~ N(0, 0.02) as BLIP-2's ``query_tokens``; the projection uses BERT's init
        (normal 0.02 weights, zero bias); the transformer keeps its own ``_init_weights``.
        """
        std = self.qformer.config.initializer_range
        nn.init.normal_(self.queries, mean=0.0, std=std)
        self._reset_visual_fc()
        self.visual_proj.norm.reset_parameters()

    def _reset_visual_fc(self) -> None:
        fc = self.visual_proj.fc
        if isinstance(fc, nn.Linear):
            nn.init.normal_(fc.weight, mean=0.0, std=self.qformer.config.initializer_range)
            nn.init.zeros_(fc.bias)

    def set_vision_width(self, vision_width: int) -> None:
        """Build the visual projection for patch tokens of width C, for a Q-Former made with
        ``vision_width=None``; a Q-Former that already has this width is left as it is.

        Raises:
            ValueError: the Q-Former was built for another width.
        """
        if self.vision_width == vision_width:
            return
        if self.vision_width is not None:
            raise ValueError(
                f"qformer.vision_width={self.vision_width} does not match the encoder's num_features="
                f"{vision_width}; leave qformer init_args.vision_width unset (null) to follow the encoder"
            )
        self.vision_width = vision_width
        self.visual_proj.fc = nn.Linear(vision_width, self.hidden_size)
        self._reset_visual_fc()

    @property
    def num_layers(self) -> int:
        return int(self.qformer.config.num_hidden_layers)

    def project_visual(self, tokens: Tensor) -> Tensor:
        """Map visual tokens into the Q-Former width with the trained projection.

        Args:
            tokens: patch tokens from the vision encoder, [B, N, C].

        Returns:
            Projected tokens, [B, N, D].
        """
        if self.vision_width is None:
            raise ValueError(
                "this DiseaseQFormer was built with vision_width=None and no encoder has set it yet: "
                "assemble it in a DiseaseClassifier, or call set_vision_width(C) first"
            )
        return self.visual_proj(tokens)

    def forward(self, visual_tokens: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """Disease tokens: each query attends to the others and to the visual tokens.

        Args:
            visual_tokens: patch tokens, [B, N, C].
            token_mask: which visual tokens are real, [B, N] bool; None means all.

        Returns:
            Disease tokens, [B, Q, D].
        """
        visual = self.project_visual(visual_tokens)  # [B, N, D]
        queries = self.queries.expand(visual.shape[0], -1, -1)  # [B, Q, D]
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=visual,
            encoder_attention_mask=token_mask.long() if token_mask is not None else None,
        )
        return out.last_hidden_state  # [B, Q, D]

    # ------------------------------------------------------------------ BERT init
    @classmethod
    def from_bert(
        cls,
        path: Path | str,
        vision_width: int,
        num_queries: int = 14,
        num_layers: int | None = None,
        cross_attention_freq: int = 2,
        dropout: float = 0.1,
    ) -> DiseaseQFormer:
        """Build a Q-Former shaped like a local BERT checkpoint and initialise it from it.

        Args:
            path: local BERT folder (``config.json`` + weights, as written by ``save_pretrained``).
            vision_width: C of the incoming patch tokens.
            num_queries: Q.
            num_layers: layers to keep (the first ``num_layers`` BERT layers); None keeps all.
            cross_attention_freq: see the constructor.
            dropout: see the constructor.

        Returns:
            The initialised Q-Former.
        """
        from transformers import BertConfig

        cfg = BertConfig.from_pretrained(str(path), local_files_only=True)
        return cls(
            vision_width=vision_width,
            num_queries=num_queries,
            hidden_size=cfg.hidden_size,
            num_layers=num_layers if num_layers is not None else cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            cross_attention_freq=cross_attention_freq,
            dropout=dropout,
            bert_path=Path(path),
        )

    def load_bert_weights(self, path: Path | str) -> None:
        """Copy a local BERT's weights into the query stream, strictly and loudly.

        Mapping (BLIP-2 recipe): ``embeddings.LayerNorm`` -> the Q-Former input LayerNorm; per layer,
        ``attention.self.{query,key,value}`` and ``attention.output.*`` -> self-attention,
        ``intermediate.dense`` -> ``intermediate_query.dense``, ``output.*`` -> ``output_query.*``.
        Cross-attention, queries and the visual projection have no BERT counterpart and stay random;
        BERT's word/position/type embeddings and pooler are skipped (no text input). BERT layers beyond
        ``num_layers`` are left out with a warning naming them.

        Args:
            path: local BERT folder (``save_pretrained`` layout).

        Raises:
            FileNotFoundError: ``path`` is not a directory.
            ValueError: names every Q-Former key the BERT lacks and every shape mismatch.
        """
        from transformers import BertModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"BERT folder {str(path)!r} not found (set qformer bert_path)")
        bert_state = BertModel.from_pretrained(str(path), local_files_only=True).state_dict()
        own = self.qformer.state_dict()
        mapped: dict[str, Tensor] = {}
        unused: list[str] = []
        for key, value in bert_state.items():
            target = _bert_to_qformer_key(key)
            if target is None:
                if not _BERT_UNUSED.match(key):
                    unused.append(key)
                continue
            if target not in own:
                unused.append(key)
                continue
            mapped[target] = value
        expected = [k for k in own if _qformer_key_from_bert(k)]
        missing = sorted(k for k in expected if k not in mapped)
        mismatched = sorted(
            f"{k}: BERT {tuple(v.shape)} vs Q-Former {tuple(own[k].shape)}"
            for k, v in mapped.items()
            if tuple(v.shape) != tuple(own[k].shape)
        )
        if missing or mismatched:
            problems = []
            if missing:
                problems.append(f"Q-Former keys with no BERT weight {missing}")
            if mismatched:
                problems.append(f"mis-shaped keys {mismatched}")
            raise ValueError(
                f"cannot initialise DiseaseQFormer from BERT {str(path)!r}: " + "; ".join(problems)
            )
        if unused:
            _logger.warning("BERT %s: %d weights not used by the Q-Former: %s", path, len(unused), unused)
        random_keys = sorted(k for k in own if k not in mapped)
        _logger.info(
            "Q-Former initialised from BERT %s: %d tensors copied; %d stay random: %s",
            path,
            len(mapped),
            len(random_keys),
            random_keys,
        )
        self.qformer.load_state_dict({**own, **mapped}, strict=True)


def _bert_to_qformer_key(key: str) -> str | None:
    """The Blip2QFormerModel key a BERT key initialises, or None if it has no counterpart."""
    if key.startswith("embeddings.LayerNorm."):
        return "layernorm." + key[len("embeddings.LayerNorm.") :]
    m = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", key)
    if m is None:
        return None
    layer, rest = m.groups()
    for pattern, repl in _BERT_LAYER_MAP:
        if re.match(pattern, rest):
            return f"encoder.layer.{layer}." + re.sub(pattern, repl, rest, count=1)
    return None


def _qformer_key_from_bert(key: str) -> bool:
    """Whether a Blip2QFormerModel key is one that BERT should initialise."""
    if key.startswith("layernorm."):
        return True
    return (
        re.match(
            r"^encoder\.layer\.\d+\.(attention\.(attention|output)\.|intermediate_query\.|output_query\.)",
            key,
        )
        is not None
    )
