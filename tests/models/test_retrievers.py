"""Tests for amrg.models.retrievers: shapes, associative recall, reference equality, buffers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amrg.models.retrievers import CrossAttentionRetriever, HopfieldRetriever, NoRetriever

B, Q, D, M, DM = 2, 14, 16, 10, 12  # batch, disease queries, query width, memory slots, memory width
HEADS, HIDDEN = 2, 8

RETRIEVERS = {
    "hopfield": lambda memory: HopfieldRetriever(D, memory, num_heads=HEADS, hidden_size=HIDDEN),
    "cross_attention": lambda memory: CrossAttentionRetriever(D, memory, num_heads=HEADS, hidden_size=HIDDEN),
    "none": lambda memory: NoRetriever(D, memory),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _set_identity(retriever: HopfieldRetriever) -> None:
    """W_Q = W_K = W_V = W_O = I and zero biases: the layer is then the bare Hopfield update."""
    with torch.no_grad():
        for proj in (retriever.q_proj, retriever.k_proj, retriever.v_proj, retriever.out_proj):
            proj.weight.copy_(torch.eye(proj.weight.shape[0], proj.weight.shape[1]))
            proj.bias.zero_()


@pytest.mark.parametrize("name", list(RETRIEVERS))
def test_forward_shapes(name: str) -> None:
    retriever = RETRIEVERS[name](torch.randn(M, DM)).eval()
    queries = torch.randn(B, Q, D)
    out = retriever(queries)
    assert out.shape == (B, Q, D)
    assert torch.isfinite(out).all()
    out, attention = retriever(queries, return_attention=True)
    assert out.shape == (B, Q, D)
    heads = 0 if name == "none" else HEADS  # NoRetriever: no heads attend, an empty tensor
    assert attention.shape == (B, heads, Q, M)
    if name == "none":
        assert torch.equal(out, torch.zeros(B, Q, D))


@pytest.mark.parametrize("name", list(RETRIEVERS))
@pytest.mark.parametrize("batched", [True, False])
def test_extra_patterns_are_prepended(name: str, batched: bool) -> None:
    retriever = RETRIEVERS[name](torch.randn(M, DM)).eval()
    queries = torch.randn(B, Q, D)
    num_extra = 14  # AM-MRG prepends the 14 stage-1 disease-query embeddings
    extra = torch.randn(B, num_extra, DM) if batched else torch.randn(num_extra, DM)
    out, attention = retriever(queries, extra_patterns=extra, return_attention=True)
    assert out.shape == (B, Q, D)
    assert attention.shape[-1] == num_extra + M
    if name != "none":
        assert not torch.allclose(out, retriever(queries))


def test_extra_patterns_come_first() -> None:
    # With identity projections a query equal to an extra pattern must attend to slot 0, not to M+0.
    retriever = HopfieldRetriever(
        D, F.normalize(torch.randn(M, D), dim=-1), num_heads=1, hidden_size=D, beta=50.0, normalize=False
    )
    _set_identity(retriever)
    retriever.eval()
    extra = F.normalize(torch.randn(1, D), dim=-1)
    _, attention = retriever(extra.expand(B, 1, D), extra_patterns=extra, return_attention=True)
    assert attention.shape == (B, 1, 1, 1 + M)
    assert (attention.argmax(dim=-1) == 0).all()


@pytest.mark.parametrize("name", ["hopfield", "cross_attention"])
def test_attention_sums_to_one_and_fast_path_agrees(name: str) -> None:
    retriever = RETRIEVERS[name](torch.randn(M, DM)).eval()
    queries = torch.randn(B, Q, D)
    extra = torch.randn(B, 3, DM)
    out, attention = retriever(queries, extra_patterns=extra, return_attention=True)
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(B, HEADS, Q))
    assert (attention >= 0).all()
    # The SDPA fast path and the explicit softmax path compute the same thing.
    torch.testing.assert_close(retriever(queries, extra_patterns=extra), out)


def test_associative_recall_of_a_noisy_pattern() -> None:
    # Ramsauer et al. 2020, Theorem 3/4: for well-separated patterns and large beta, one update of
    # xi_new = Y^T softmax(beta Y xi) lands on the stored pattern nearest to xi.
    dim, num_patterns = 64, 16
    patterns = F.normalize(torch.randn(num_patterns, dim), dim=-1)  # random unit vectors: near-orthogonal
    retriever = HopfieldRetriever(
        dim, patterns, num_heads=1, hidden_size=dim, beta=64.0, dropout=0.0, normalize=False
    )
    _set_identity(retriever)
    retriever.eval()
    noisy = patterns + 0.05 * torch.randn(num_patterns, dim)  # one noisy copy of every pattern
    recalled, attention = retriever(noisy.unsqueeze(0), return_attention=True)
    torch.testing.assert_close(recalled[0], patterns, atol=1e-2, rtol=0)
    assert torch.equal(attention[0, 0].argmax(dim=-1), torch.arange(num_patterns))

    # A small beta lands on the global average instead (the "metastable" regime), not on the pattern.
    retriever.scale = 1e-3
    averaged = retriever(noisy.unsqueeze(0))[0]
    torch.testing.assert_close(averaged, patterns.mean(0).expand_as(averaged), atol=1e-2, rtol=0)
    assert not torch.allclose(averaged, patterns, atol=1e-1)


def _reference_mha(retriever: CrossAttentionRetriever | HopfieldRetriever) -> nn.MultiheadAttention:
    """torch's MultiheadAttention holding the same projection weights (kdim = vdim = D_m)."""
    mha = nn.MultiheadAttention(
        D, retriever.num_heads, kdim=retriever.memory_dim, vdim=retriever.memory_dim, batch_first=True
    )
    with torch.no_grad():
        mha.q_proj_weight.copy_(retriever.q_proj.weight)
        mha.k_proj_weight.copy_(retriever.k_proj.weight)
        mha.v_proj_weight.copy_(retriever.v_proj.weight)
        mha.in_proj_bias.copy_(
            torch.cat([retriever.q_proj.bias, retriever.k_proj.bias, retriever.v_proj.bias])
        )
        mha.out_proj.weight.copy_(retriever.out_proj.weight)
        mha.out_proj.bias.copy_(retriever.out_proj.bias)
    return mha.eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda mem: CrossAttentionRetriever(D, mem, num_heads=2, hidden_size=D // 2, dropout=0.0),
        # beta = 1/sqrt(head width) turns the Hopfield update into the Transformer's attention.
        lambda mem: HopfieldRetriever(
            D, mem, num_heads=2, hidden_size=D // 2, beta=1 / math.sqrt(D // 2), normalize=False
        ),
        lambda mem: HopfieldRetriever(D, mem, num_heads=2, hidden_size=D // 2, beta=1 / math.sqrt(D // 2)),
    ],
    ids=["cross_attention", "hopfield_plain", "hopfield_normalized"],
)
def test_matches_torch_multihead_attention(build) -> None:
    memory = torch.randn(M, DM)
    retriever = build(memory).eval()
    with torch.no_grad():  # non-trivial weights, so the comparison is not between two near-zero outputs
        for p in retriever.parameters():
            p.normal_(0.0, 0.3)
    mha = _reference_mha(retriever)
    queries = torch.randn(B, Q, D)
    if retriever.normalize:  # hflayers normalises state, stored patterns and pattern projection separately
        q_in = F.layer_norm(queries, (D,), retriever.norm_state.weight, retriever.norm_state.bias)
        k_in = F.layer_norm(memory, (DM,), retriever.norm_stored.weight, retriever.norm_stored.bias)
        v_in = F.layer_norm(memory, (DM,), retriever.norm_projection.weight, retriever.norm_projection.bias)
    else:
        q_in, k_in, v_in = queries, memory, memory
    expected, expected_attention = mha(
        q_in, k_in.expand(B, M, DM), v_in.expand(B, M, DM), average_attn_weights=False
    )
    out, attention = retriever(queries, return_attention=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(attention, expected_attention)


@pytest.mark.parametrize("name", ["hopfield", "cross_attention"])
def test_gradients_reach_projections_not_memory(name: str) -> None:
    retriever = RETRIEVERS[name](torch.randn(M, DM)).train()
    assert "memory" not in dict(retriever.named_parameters())
    assert not retriever.memory.requires_grad
    extra = torch.randn(B, 3, DM, requires_grad=True)
    retriever(torch.randn(B, Q, D), extra_patterns=extra).square().sum().backward()
    for pname, param in retriever.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname
    assert retriever.memory.grad is None
    assert extra.grad is not None


@pytest.mark.parametrize("name", list(RETRIEVERS))
def test_state_dict_round_trip_resizes_memory(name: str) -> None:
    memory = torch.randn(M, DM)
    source = RETRIEVERS[name](memory).eval()
    state = source.state_dict()
    torch.testing.assert_close(state["memory"], memory)
    # A retriever built from a config starts with an empty memory; loading the checkpoint fills it.
    target = type(source)(
        D, memory_dim=DM, **({} if name == "none" else {"num_heads": HEADS, "hidden_size": HIDDEN})
    )
    assert target.num_memories == 0
    target.load_state_dict(state)
    target.eval()
    assert target.num_memories == M
    queries = torch.randn(B, Q, D)
    torch.testing.assert_close(target(queries), source(queries))


def test_load_state_dict_with_wrong_memory_width_fails() -> None:
    source = HopfieldRetriever(D, torch.randn(M, DM), num_heads=HEADS, hidden_size=HIDDEN)
    target = HopfieldRetriever(D, memory_dim=DM + 1, num_heads=HEADS, hidden_size=HIDDEN)
    with pytest.raises(RuntimeError, match="memory"):
        target.load_state_dict(source.state_dict(), strict=False)


def test_set_memory_checks_shape_and_values() -> None:
    retriever = HopfieldRetriever(D, memory_dim=DM, num_heads=HEADS, hidden_size=HIDDEN)
    with pytest.raises(ValueError, match=rf"\[M, {DM}\] \(memory_dim\), got shape \[5, {DM + 1}\]"):
        retriever.set_memory(torch.randn(5, DM + 1))
    with pytest.raises(ValueError, match="got shape"):
        retriever.set_memory(torch.randn(DM))
    bad = torch.randn(5, DM)
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf in rows \[3\]"):
        retriever.set_memory(bad)
    source = torch.randn(5, DM)
    retriever.set_memory(source)
    source.zero_()  # the retriever keeps its own copy
    assert retriever.memory.abs().sum() > 0 and retriever.num_memories == 5


@pytest.mark.parametrize("cls", [HopfieldRetriever, CrossAttentionRetriever])
def test_empty_memory_is_a_clear_error(cls) -> None:
    retriever = cls(D, num_heads=HEADS, hidden_size=HIDDEN).eval()
    with pytest.raises(ValueError, match=r"memory is empty \(\[0, 16\]\) and no extra_patterns"):
        retriever(torch.randn(B, Q, D))
    # Extra patterns alone are enough to recall from.
    assert retriever(torch.randn(B, Q, D), extra_patterns=torch.randn(3, D)).shape == (B, Q, D)


def test_no_retriever_accepts_an_empty_memory() -> None:
    out, attention = NoRetriever(D)(torch.randn(B, Q, D), return_attention=True)
    assert out.shape == (B, Q, D) and attention.shape == (B, 0, Q, 0)


def test_bad_input_shapes_name_the_dimension() -> None:
    retriever = HopfieldRetriever(D, torch.randn(M, DM), num_heads=HEADS, hidden_size=HIDDEN)
    with pytest.raises(ValueError, match=r"queries \[B, Q, 16\] \(dim\), got \[2, 14, 8\]"):
        retriever(torch.randn(B, Q, 8))
    with pytest.raises(ValueError, match=r"extra_patterns \[B=2, P, 12\]"):
        retriever(torch.randn(B, Q, D), extra_patterns=torch.randn(3, 3, DM))
    with pytest.raises(ValueError, match="dropout"):
        HopfieldRetriever(D, dropout=1.5)
    with pytest.raises(ValueError, match="beta"):
        HopfieldRetriever(D, beta=0.0)


def test_memory_dtype_follows_module_and_low_precision_memory_works() -> None:
    retriever = HopfieldRetriever(
        D, torch.randn(M, DM).bfloat16(), num_heads=HEADS, hidden_size=HIDDEN
    ).eval()
    assert retriever.memory.dtype == torch.bfloat16  # kept as stored, cast in forward
    assert retriever(torch.randn(B, Q, D)).dtype == torch.float32
    retriever.double()
    assert retriever.memory.dtype == torch.float64
    assert retriever(torch.randn(B, Q, D, dtype=torch.float64)).dtype == torch.float64


def test_dropout_only_in_training() -> None:
    retriever = HopfieldRetriever(D, torch.randn(M, DM), num_heads=HEADS, hidden_size=HIDDEN, dropout=0.5)
    with torch.no_grad():
        for p in retriever.parameters():
            p.normal_(0.0, 0.3)
    queries = torch.randn(B, Q, D)
    retriever.train()
    assert not torch.allclose(retriever(queries), retriever(queries))
    retriever.eval()
    torch.testing.assert_close(retriever(queries), retriever(queries))


def test_association_dropout_drops_p_of_the_weights_and_rescales_the_rest() -> None:
    from amrg.models.retrievers import _dropout

    weights = torch.rand(4, 2, 14, 500) + 0.5
    dropped = _dropout(weights, 0.3)
    kept = dropped != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01  # 56,000 draws
    torch.testing.assert_close(dropped[kept], weights[kept] / 0.7)
    assert _dropout(weights, 0.0) is weights


def test_configs_build_retrievers_by_class_path() -> None:
    # Configs swap retrievers by class_path; the signatures must be parseable by jsonargparse.
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(nn.Module, "retriever")
    for cls in (HopfieldRetriever, CrossAttentionRetriever, NoRetriever):
        cfg = parser.parse_object(
            {"retriever": {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": {"dim": D}}}
        )
        retriever = parser.instantiate(cfg).retriever
        assert type(retriever) is cls and retriever.dim == D and retriever.num_memories == 0


def _outputs_and_grads(retriever: HopfieldRetriever, queries, extra) -> tuple[torch.Tensor, dict]:
    retriever.zero_grad()
    out = retriever(queries, extra_patterns=extra)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in retriever.named_parameters()}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("extra_shape", [None, (3, DM), (B, 3, DM)], ids=["none", "shared", "per-study"])
@pytest.mark.parametrize("repeated", [False, True], ids=["distinct", "repeated-rows"])
def test_folded_memory_projection_equals_normalising_every_call(
    normalize: bool, extra_shape, repeated
) -> None:
    """The stored patterns are standardised once, each distinct one projected once and each LayerNorm's
    affine part folded into the projection after it: outputs and every parameter's gradient are those of
    LN -> Linear on every stored row at each call (a report stored under several labels repeats a row)."""
    memory = torch.randn(M, DM, dtype=torch.float64) * 3 + 1  # float64: sums in any order agree
    if repeated:
        memory = torch.cat([memory, memory[[4, 1, 4]]])[torch.randperm(M + 3)]
    retriever = HopfieldRetriever(
        D, memory, num_heads=2, hidden_size=D // 2, dropout=0.0, normalize=normalize
    ).double()
    with torch.no_grad():
        for p in retriever.parameters():
            p.normal_(0.0, 0.3)
    queries = torch.randn(B, Q, D, dtype=torch.float64)
    extra = None if extra_shape is None else torch.randn(*extra_shape, dtype=torch.float64)
    fast, fast_grads = _outputs_and_grads(retriever, queries, extra)

    def plain(self: HopfieldRetriever, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keys_values(self.memory.to(dtype))  # LN -> Linear of every stored pattern, each call

    original = HopfieldRetriever._memory_keys_values
    HopfieldRetriever._memory_keys_values = plain  # type: ignore[method-assign]
    try:
        slow, slow_grads = _outputs_and_grads(retriever, queries, extra)
    finally:
        HopfieldRetriever._memory_keys_values = original  # type: ignore[method-assign]
    torch.testing.assert_close(fast, slow)
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], msg=name)


def test_the_standardised_memory_follows_a_new_or_reloaded_memory() -> None:
    retriever = HopfieldRetriever(D, torch.randn(M, DM), num_heads=2, hidden_size=D // 2, dropout=0.0).eval()
    queries = torch.randn(B, Q, D)
    retriever(queries)  # standardised and kept
    other = HopfieldRetriever(D, torch.randn(M, DM) * 2, num_heads=2, hidden_size=D // 2, dropout=0.0).eval()
    other.load_state_dict(retriever.state_dict() | {"memory": other.memory.clone()})
    retriever.load_state_dict(other.state_dict())  # same shape: copied into the buffer in place
    torch.testing.assert_close(retriever(queries), other(queries))
    retriever.set_memory(torch.randn(M + 2, DM))
    fresh = HopfieldRetriever(
        D, retriever.memory.clone(), num_heads=2, hidden_size=D // 2, dropout=0.0
    ).eval()
    fresh.load_state_dict(retriever.state_dict())
    torch.testing.assert_close(retriever(queries), fresh(queries))
    assert "_normalized" not in retriever.state_dict()


@pytest.mark.parametrize("name", ["hopfield", "cross_attention"])
def test_a_shared_memory_recalls_as_one_copy_per_study(name: str) -> None:
    """The stored memory is attended as one [heads, B*Q, hidden] query matrix against the shared keys; the
    outputs, association weights and gradients are those of giving every study its own copy of it."""
    memory = torch.randn(M, DM, dtype=torch.float64)  # float64: sums in any order agree
    shared = RETRIEVERS[name](memory).double().eval()
    with torch.no_grad():
        for p in shared.parameters():
            p.normal_(0.0, 0.3)
    per_study = copy.deepcopy(shared)
    per_study.set_memory(torch.empty(0, DM, dtype=torch.float64))  # the patterns come per study instead
    queries = torch.randn(B, Q, D, dtype=torch.float64)
    outputs, grads = [], []
    for retriever, extra in ((shared, None), (per_study, memory.expand(B, M, DM))):
        out, attention = retriever(queries, extra_patterns=extra, return_attention=True)
        (out.square().sum() + attention.square().sum()).backward()
        outputs.append((out, attention, retriever(queries, extra_patterns=extra)))
        grads.append({n: p.grad for n, p in retriever.named_parameters()})
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
