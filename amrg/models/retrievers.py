"""Associative retrievers: recall stored patterns for each disease query.

The default, :class:`HopfieldRetriever`, is the one-step update of a modern (continuous) Hopfield
network from Ramsauer et al., 2020, "Hopfield Networks is All You Need",
https://arxiv.org/abs/2008.02217 (eq. 10 there, in its multi-head "Hopfield layer" form)::

    Z = softmax(beta * LN(xi) W_Q (LN(Y) W_K)^T) LN(Y) W_V,   then W_O

where ``xi`` are the state patterns (the queries, [B, Q, D]) and ``Y`` the stored patterns (the
memory, [M, D_m]). The argument names and defaults follow the authors' ``hflayers.Hopfield``
(https://github.com/ml-jku/hopfield-layers, MIT licence; no code copied): ``hidden_size`` is the
width of the association space of *one* head, ``beta`` replaces 1/sqrt(d), and the state, the stored
patterns and the pattern projection each get their own LayerNorm. AM-MRG (Wang et al., 2025) uses it
with 6 heads, hidden 1024, beta 4.0, normalised state and stored patterns, dropout 0.1 and frozen
stored patterns, and prepends the stage-1 disease-query embeddings to the visual memory
(``extra_patterns``).

:class:`CrossAttentionRetriever` (plain multi-head cross-attention, 1/sqrt(d) scaling) and
:class:`NoRetriever` (recalls zeros) exist for ablations. All three take the same constructor
arguments for the memory and the same ``forward``, so configs swap them by ``class_path``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrossAttentionRetriever", "HopfieldRetriever", "NoRetriever"]

_logger = logging.getLogger(__name__)


def _dropout(weights: Tensor, p: float) -> Tensor:
    """Inverted dropout, as ``F.dropout`` in training, with the mask drawn from ``rand_like``: on CPU
    ``F.dropout``'s ``bernoulli_`` draws ~2x slower, and the demo's report memory drops 0.9 M weights
    a step."""
    if p == 0.0:
        return weights
    return weights * (torch.rand_like(weights) >= p) / (1.0 - p)


class _Retriever(nn.Module):
    """Holds the frozen stored patterns and the shape checks every retriever shares.

    The stored patterns are a buffer, not a parameter: no optimiser sees them and no gradient reaches
    them, yet they go into ``state_dict`` (``persistent=True``), so a stage-2 checkpoint carries the
    memory it was trained with. Loading a state dict whose memory has a different number of slots
    resizes the buffer (a freshly built retriever starts with an empty [0, D_m] memory).

    Args:
        dim: width D of the queries and of the recalled tokens.
        memory: stored patterns Y, [M, D_m]; ``None`` starts with an empty memory ([0, D_m]) to be
            filled by :meth:`set_memory` or by loading a checkpoint.
        memory_dim: width D_m of the stored patterns; defaults to ``memory.shape[1]`` when a memory is
            given, else to ``dim``.
    """

    # Whether an empty memory (and no extra patterns) is an error in forward.
    _needs_patterns: bool = True

    def __init__(self, dim: int, memory: Tensor | None = None, memory_dim: int | None = None) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"{type(self).__name__}: dim must be positive, got {dim}")
        if memory_dim is None:
            memory_dim = int(memory.shape[-1]) if memory is not None and memory.ndim == 2 else dim
        if memory_dim <= 0:
            raise ValueError(f"{type(self).__name__}: memory_dim must be positive, got {memory_dim}")
        self.dim = dim
        self.memory_dim = memory_dim
        self.memory: Tensor
        self.register_buffer("memory", torch.zeros(0, memory_dim), persistent=True)
        if memory is not None:
            self.set_memory(memory)

    @property
    def num_memories(self) -> int:
        """Number M of stored patterns."""
        return int(self.memory.shape[0])

    @torch.no_grad()
    def set_memory(self, memory: Tensor) -> None:
        """Replace the stored patterns (a detached copy, kept on the buffer's current device).

        Args:
            memory: stored patterns, [M, D_m]; its dtype is kept (bf16/fp16 memories stay so) and
                cast to the queries' dtype in ``forward``.

        Raises:
            ValueError: not 2-D, wrong width, not floating point, or holding NaN/Inf.
        """
        name = type(self).__name__
        if not isinstance(memory, Tensor):
            raise ValueError(
                f"{name}.set_memory: expected a Tensor [M, {self.memory_dim}], got {type(memory)}"
            )
        if memory.ndim != 2 or memory.shape[1] != self.memory_dim:
            raise ValueError(
                f"{name}.set_memory: expected stored patterns [M, {self.memory_dim}] (memory_dim), "
                f"got shape {list(memory.shape)}"
            )
        if not memory.is_floating_point():
            raise ValueError(f"{name}.set_memory: stored patterns must be floating point, got {memory.dtype}")
        finite = torch.isfinite(memory).all(dim=1)
        if not bool(finite.all()):
            rows = torch.nonzero(~finite).flatten()[:10].tolist()
            raise ValueError(f"{name}.set_memory: stored patterns hold NaN/Inf in rows {rows}")
        self.memory = memory.detach().to(device=self.memory.device).clone()
        _logger.debug("%s: stored %d patterns of width %d", name, memory.shape[0], self.memory_dim)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The number of slots is data, not architecture: resize the buffer to the incoming memory so a
        # retriever built from a config (empty memory) loads a checkpoint that holds one. A width
        # mismatch is left to the parent, which reports it as a size mismatch for `<prefix>memory`.
        incoming = state_dict.get(prefix + "memory")
        if (
            isinstance(incoming, Tensor)
            and incoming.ndim == 2
            and incoming.shape[1] == self.memory_dim
            and incoming.shape != self.memory.shape
        ):
            self.memory = torch.empty(incoming.shape, dtype=incoming.dtype, device=self.memory.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_inputs(self, queries: Tensor, extra_patterns: Tensor | None) -> Tensor | None:
        """Validate shapes; return the extra patterns as [B, P, D_m], or [P, D_m] when shared by the batch
        (or None)."""
        name = type(self).__name__
        if queries.ndim != 3 or queries.shape[-1] != self.dim:
            raise ValueError(f"{name}: expected queries [B, Q, {self.dim}] (dim), got {list(queries.shape)}")
        if extra_patterns is None:
            return None
        batch = queries.shape[0]
        if (
            extra_patterns.ndim not in (2, 3)
            or (extra_patterns.ndim == 3 and extra_patterns.shape[0] != batch)
            or extra_patterns.shape[-1] != self.memory_dim
        ):
            raise ValueError(
                f"{name}: expected extra_patterns [B={batch}, P, {self.memory_dim}] or [P, {self.memory_dim}] "
                f"(memory_dim), got {list(extra_patterns.shape)}"
            )
        return extra_patterns

    def forward(
        self,
        queries: Tensor,
        extra_patterns: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Recall stored patterns for each query.

        Args:
            queries: state patterns (disease tokens), [B, Q, D].
            extra_patterns: patterns prepended to the stored memory for this call only, [B, P, D_m] or
                [P, D_m] (AM-MRG prepends the stage-1 disease-query embeddings to the visual memory).
            return_attention: also return the association weights.

        Returns:
            Recalled tokens [B, Q, D]; with ``return_attention`` also the association weights
            [B, heads, Q, P + M] (softmax over the last axis, before dropout; extra patterns first).

        Raises:
            ValueError: wrong shapes, or no patterns at all (empty memory and no extra patterns).
        """
        extra = self._check_inputs(queries, extra_patterns)
        num_patterns = self.num_memories + (0 if extra is None else extra.shape[-2])
        if num_patterns == 0 and self._needs_patterns:
            raise ValueError(
                f"{type(self).__name__}: nothing to recall from: the memory is empty ([0, {self.memory_dim}]) "
                "and no extra_patterns were given; call set_memory(...) or load a checkpoint that holds "
                "the memory"
            )
        out, attention = self._retrieve(queries, extra, return_attention)
        if return_attention:
            return out, attention
        return out

    def _retrieve(
        self, queries: Tensor, extra: Tensor | None, return_attention: bool
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, memory_dim={self.memory_dim}, num_memories={self.num_memories}"


class _MultiHeadRetriever(_Retriever):
    """Multi-head association of queries with stored patterns; the scale is a constructor choice.

    Args:
        dim: width D of the queries and of the recalled tokens.
        memory: stored patterns Y, [M, D_m], or ``None`` for an empty memory.
        memory_dim: width D_m of the stored patterns (defaults as in :class:`_Retriever`).
        num_heads: number of association heads.
        hidden_size: width of one head's association space (query/key and value width per head).
        scale: factor on the dot products; ``None`` means 1/sqrt(hidden_size).
        dropout: dropout probability on the association weights (training only).
        normalize: LayerNorm the state patterns, the stored patterns and the pattern projection before
            their projections.
    """

    def __init__(
        self,
        dim: int,
        memory: Tensor | None,
        memory_dim: int | None,
        num_heads: int,
        hidden_size: int,
        scale: float | None,
        dropout: float,
        normalize: bool,
    ) -> None:
        super().__init__(dim=dim, memory=memory, memory_dim=memory_dim)
        name = type(self).__name__
        if num_heads <= 0 or hidden_size <= 0:
            raise ValueError(
                f"{name}: num_heads and hidden_size must be positive, got {num_heads}, {hidden_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        if scale is not None and not scale > 0:
            raise ValueError(f"{name}: the scaling (beta) must be positive, got {scale}")
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.scale = scale if scale is not None else 1.0 / math.sqrt(hidden_size)
        self.dropout = dropout
        self.normalize = normalize
        inner = num_heads * hidden_size
        self.norm_state = nn.LayerNorm(dim) if normalize else nn.Identity()
        self.norm_stored = nn.LayerNorm(self.memory_dim) if normalize else nn.Identity()
        self.norm_projection = nn.LayerNorm(self.memory_dim) if normalize else nn.Identity()
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(self.memory_dim, inner)
        self.v_proj = nn.Linear(self.memory_dim, inner)
        self.out_proj = nn.Linear(inner, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections ~ N(0, 0.02), biases 0, LayerNorms to identity (as hflayers' HopfieldCore)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=0.02)
            nn.init.zeros_(proj.bias)
        for norm in (self.norm_state, self.norm_stored, self.norm_projection):
            if isinstance(norm, nn.LayerNorm):
                norm.reset_parameters()

    def _keys_values(self, patterns: Tensor) -> tuple[Tensor, Tensor]:
        """Project stored patterns [..., M, D_m] to per-head keys and values [..., heads, M, hidden]."""
        keys = self.k_proj(self.norm_stored(patterns))  # [..., M, heads*hidden]
        values = self.v_proj(self.norm_projection(patterns))  # [..., M, heads*hidden]
        heads = (self.num_heads, self.hidden_size)
        keys = keys.unflatten(-1, heads).transpose(-3, -2)  # [..., heads, M, hidden]
        values = values.unflatten(-1, heads).transpose(-3, -2)  # [..., heads, M, hidden]
        return keys, values

    def _normalized_memory(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The distinct stored patterns standardised as the LayerNorms do before their affine part,
        [U, D_m], and each stored row's index among them, [M] (None when every row is distinct).

        A memory may hold one pattern several times (the report memory stores a report once under each of
        its labels: 4,132 rows of 1,600 reports in the demo); projecting each distinct pattern once and
        indexing gives the same keys, values and gradients. The patterns are a frozen buffer, so this is
        computed once per memory (again when the buffer is replaced or changed in place, moved or cast)
        and kept out of the state dict.
        """
        memory = self.memory
        key = (memory.data_ptr(), memory._version, tuple(memory.shape), memory.device, dtype)
        cached = self.__dict__.get("_normalized")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                patterns, rows = memory.to(dtype), None
                if memory.shape[0] > 1 and not memory.is_meta:  # meta (FLOP counts): no values to compare
                    distinct, inverse = torch.unique(patterns, dim=0, return_inverse=True)
                    if distinct.shape[0] < patterns.shape[0]:
                        patterns, rows = distinct, inverse
                if self.normalize:
                    eps = self.norm_stored.eps  # type: ignore[union-attr]
                    wide = torch.promote_types(dtype, torch.float32)  # bf16 memories in float32, float64 kept
                    patterns = F.layer_norm(patterns.to(wide), (self.memory_dim,), eps=eps).to(dtype)
            cached = (key, patterns, rows)
            self.__dict__["_normalized"] = cached
        return cached[1], cached[2]

    def _memory_keys_values(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """:meth:`_keys_values` of the stored memory, [heads, M, hidden] each, with each LayerNorm's affine
        part folded into the projection after it: LN(Y) W^T + b = Y_hat (W diag(gamma))^T + (W beta + b),
        Y_hat the standardised patterns (:meth:`_normalized_memory`). The same values, without normalising
        the M stored patterns (and back-propagating through that) at every call, and with each distinct
        pattern projected once."""
        patterns, rows = self._normalized_memory(dtype)  # [U, D_m], [M] or None
        weights, biases = [], []
        for norm, proj in ((self.norm_stored, self.k_proj), (self.norm_projection, self.v_proj)):
            weight, bias = proj.weight, proj.bias  # [inner, D_m], [inner]
            if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
                bias = bias + weight @ norm.bias if norm.bias is not None else bias
                weight = weight * norm.weight  # [inner, D_m]
            weights.append(weight)
            biases.append(bias)
        # keys and values in one product: [U, 2 * inner]
        projected = F.linear(patterns, torch.cat(weights).to(dtype), torch.cat(biases).to(dtype))
        if rows is not None:
            projected = projected[rows]  # [M, 2 * inner]
        heads = (2, self.num_heads, self.hidden_size)
        keys, values = projected.unflatten(-1, heads).permute(1, 2, 0, 3)  # [heads, M, hidden] each
        return keys, values

    def _retrieve(
        self, queries: Tensor, extra: Tensor | None, return_attention: bool
    ) -> tuple[Tensor, Tensor | None]:
        batch, num_queries, _ = queries.shape
        dtype = queries.dtype
        q = self.q_proj(self.norm_state(queries))  # [B, Q, heads*hidden]
        q = q.view(batch, num_queries, self.num_heads, self.hidden_size)  # [B, Q, heads, hidden]

        # The stored memory is shared by the batch: project it once; extra patterns shared by the batch
        # ([P, D_m]) join it.
        k, v = self._memory_keys_values(dtype)  # [heads, M, hidden] each
        if extra is not None and extra.ndim == 2:
            k_extra, v_extra = self._keys_values(extra.to(dtype))  # [heads, P, hidden] each
            k, v = torch.cat([k_extra, k], dim=1), torch.cat([v_extra, v], dim=1)  # [heads, P+M, hidden]
            extra = None
        if extra is None:
            # Patterns shared by the batch: every study's queries are rows of one [heads, B*Q, hidden]
            # query matrix against one [heads, M, hidden] key matrix, so the memory is neither copied
            # per study nor summed back over the batch in the backward pass (~2x faster on CPU).
            q = q.permute(2, 0, 1, 3).reshape(self.num_heads, batch * num_queries, self.hidden_size)
        else:
            q = q.transpose(1, 2)  # [B, heads, Q, hidden]
            k_extra, v_extra = self._keys_values(extra.to(dtype))  # [B, heads, P, hidden] each
            k = torch.cat(
                [k_extra, k.unsqueeze(0).expand(batch, -1, -1, -1)], dim=2
            )  # [B, heads, P+M, hidden]
            v = torch.cat(
                [v_extra, v.unsqueeze(0).expand(batch, -1, -1, -1)], dim=2
            )  # [B, heads, P+M, hidden]

        dropout_p = self.dropout if self.training else 0.0
        if return_attention:
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [..., rows, P+M]
            # softmax in at least float32 (bf16/fp16 scores), float64 stays float64
            attention = scores.softmax(dim=-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
            weights = _dropout(attention, dropout_p)
            recalled = torch.matmul(weights, v)  # [..., rows, hidden]
        else:
            attention = None
            # Fast path; `scale` replaces SDPA's default 1/sqrt(hidden) with beta.
            recalled = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        if q.ndim == 3:  # shared patterns: rows are (study, query)
            recalled = recalled.view(self.num_heads, batch, num_queries, self.hidden_size).permute(1, 2, 0, 3)
            if attention is not None:
                attention = attention.view(self.num_heads, batch, num_queries, -1).transpose(0, 1)
        else:
            recalled = recalled.transpose(1, 2)  # [B, Q, heads, hidden]
        recalled = recalled.reshape(batch, num_queries, -1)  # [B, Q, heads*hidden]
        return self.out_proj(recalled), attention  # [B, Q, D]; attention [B, heads, Q, P+M]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_heads={self.num_heads}, hidden_size={self.hidden_size}, "
            f"scale={self.scale:g}, dropout={self.dropout}, normalize={self.normalize}"
        )


class HopfieldRetriever(_MultiHeadRetriever):
    """One-step modern Hopfield retrieval over frozen stored patterns (Ramsauer et al., 2020).

    Z = softmax(beta * LN(queries) W_Q (LN(Y) W_K)^T) LN(Y) W_V, then W_O. The stored patterns Y are a
    frozen buffer; the projections and LayerNorms are trainable.

    Args:
        dim: width D of the queries (state patterns) and of the recalled tokens.
        memory: stored patterns Y, [M, D_m]; ``None`` starts empty (fill with :meth:`set_memory`, or
            load a checkpoint that holds the memory).
        memory_dim: width D_m of the stored patterns; defaults to ``memory.shape[1]``, else ``dim``.
        num_heads: number of association heads (paper: 6).
        hidden_size: width of ONE head's association space, as ``hidden_size`` in hflayers'
            ``Hopfield`` (paper: 1024, so 6 x 1024 in all).
        beta: inverse temperature on the dot products, replacing 1/sqrt(d) (paper: 4.0). Larger beta
            recalls single patterns; smaller beta averages over many (metastable states).
        dropout: dropout probability on the association weights (paper: 0.1).
        normalize: LayerNorm the state patterns, the stored patterns and the pattern projection
            (paper: on).
    """

    def __init__(
        self,
        dim: int,
        memory: Tensor | None = None,
        memory_dim: int | None = None,
        num_heads: int = 6,
        hidden_size: int = 1024,
        beta: float = 4.0,
        dropout: float = 0.1,
        normalize: bool = True,
    ) -> None:
        super().__init__(
            dim=dim,
            memory=memory,
            memory_dim=memory_dim,
            num_heads=num_heads,
            hidden_size=hidden_size,
            scale=beta,
            dropout=dropout,
            normalize=normalize,
        )

    @property
    def beta(self) -> float:
        """The Hopfield inverse temperature (the scale on the dot products)."""
        return self.scale


class CrossAttentionRetriever(_MultiHeadRetriever):
    """Plain multi-head cross-attention from the queries to the stored patterns (ablation).

    The same layer as :class:`HopfieldRetriever` but with the Transformer's 1/sqrt(hidden_size)
    scaling and, by default, no LayerNorms: it isolates what the Hopfield choices (beta, normalised
    patterns) add. Defaults keep the head layout of the Hopfield default so parameter counts match.

    Args:
        dim: width D of the queries and of the recalled tokens.
        memory: stored patterns, [M, D_m], or ``None`` for an empty memory.
        memory_dim: width D_m of the stored patterns; defaults to ``memory.shape[1]``, else ``dim``.
        num_heads: number of attention heads.
        hidden_size: width of one head.
        dropout: dropout probability on the attention weights.
        normalize: LayerNorm queries and stored patterns before the projections.
    """

    def __init__(
        self,
        dim: int,
        memory: Tensor | None = None,
        memory_dim: int | None = None,
        num_heads: int = 6,
        hidden_size: int = 1024,
        dropout: float = 0.1,
        normalize: bool = False,
    ) -> None:
        super().__init__(
            dim=dim,
            memory=memory,
            memory_dim=memory_dim,
            num_heads=num_heads,
            hidden_size=hidden_size,
            scale=None,
            dropout=dropout,
            normalize=normalize,
        )


class NoRetriever(_Retriever):
    """Recalls nothing: returns zeros [B, Q, D] (ablation without a memory).

    It still holds a memory buffer, so a config can swap it in without touching anything else, and
    an empty memory is not an error here.

    Args:
        dim: width D of the queries and of the (zero) recalled tokens.
        memory: stored patterns, [M, D_m], kept but unused; ``None`` for an empty memory.
        memory_dim: width D_m of the stored patterns; defaults to ``memory.shape[1]``, else ``dim``.
    """

    _needs_patterns = False

    def __init__(self, dim: int, memory: Tensor | None = None, memory_dim: int | None = None) -> None:
        super().__init__(dim=dim, memory=memory, memory_dim=memory_dim)

    def _retrieve(
        self, queries: Tensor, extra: Tensor | None, return_attention: bool
    ) -> tuple[Tensor, Tensor | None]:
        batch, num_queries, _ = queries.shape
        num_patterns = self.num_memories + (0 if extra is None else extra.shape[-2])
        # No heads attend: an empty [B, 0, Q, P+M] keeps the attention a Tensor for callers.
        attention = queries.new_zeros(batch, 0, num_queries, num_patterns) if return_attention else None
        return torch.zeros_like(queries), attention  # [B, Q, D]
