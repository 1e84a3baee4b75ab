"""Each decoding setting takes effect (issue 15): beam width, repetition and length penalties, min and max new
tokens, through amrg.models.llm.generate_reports and ReportGenerator.generate_from_prefix, on a tiny random LLM.

The new token ids are read from the LLM's own ``generate`` (wrapped to record its output), so counts are exact
and do not depend on how the tokenizer decodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, RepetitionPenaltyLogitsProcessor

from amrg.models.llm import (
    LLMInputs,
    ReportPrompt,
    SpecialTokenIds,
    build_generation_inputs,
    generate_reports,
)
from tests.models.test_reporter import make_generator, tiny_llm, tiny_tokenizer

# the settings that leave everything else out of the way: greedy, no penalty, no minimum
PLAIN: dict[str, Any] = {
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "min_new_tokens": 0,
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return tiny_tokenizer(tmp_path_factory.mktemp("decoding_tokenizer"), "llama")


@pytest.fixture
def model(tok: PreTrainedTokenizerBase) -> nn.Module:
    return tiny_llm(tok, seed=0)


def inputs(model: nn.Module, tok: PreTrainedTokenizerBase, batch: int = 3, padded: bool = True) -> LLMInputs:
    prefix = torch.randn(batch, 4, 32, generator=torch.Generator().manual_seed(1)) * 3  # [B, P, H]
    mask = torch.ones(batch, 4, dtype=torch.bool)
    if padded:
        mask[1, 2:] = False  # prompts of different lengths: the batch is left-padded
    return build_generation_inputs(model.get_input_embeddings(), ReportPrompt(tok), prefix, prefix_mask=mask)


@contextmanager
def recorded(model: nn.Module) -> Iterator[list[dict[str, Any]]]:
    """Record every ``model.generate`` call: its keyword arguments and the new token ids, [B, new]."""
    calls: list[dict[str, Any]] = []
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Tensor:
        out = original(*args, **kwargs)
        calls.append({"kwargs": kwargs, "tokens": out})
        return out

    model.generate = generate
    try:
        yield calls
    finally:
        del model.generate  # back to the class method


def new_tokens(model: nn.Module, tok: PreTrainedTokenizerBase, gen: LLMInputs, **options: Any) -> Tensor:
    """The new token ids generate_reports produced, [B, new] (pad after a row's eos)."""
    with recorded(model) as calls:
        generate_reports(model, tok, gen.inputs_embeds, gen.attention_mask, **options)
    return calls[-1]["tokens"]


def lengths(tokens: Tensor, eos: int) -> list[int]:
    """Tokens before the first eos in each row (the report's length), or the row's length without one."""
    out = []
    for row in tokens.tolist():
        out.append(row.index(eos) if eos in row else len(row))
    return out


@contextmanager
def eos_bias(model: nn.Module, eos: int, bias: float) -> Iterator[None]:
    """Add ``bias`` to the eos logit at every step (a model that wants to stop)."""

    def hook(_module: nn.Module, _args: Any, logits: Tensor) -> Tensor:
        return logits + bias * torch.nn.functional.one_hot(torch.tensor(eos), logits.shape[-1]).to(logits)

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def greedy_by_hand(
    model: nn.Module,
    gen: LLMInputs,
    eos: int,
    pad: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Argmax decoding with full forward passes (no KV cache), as the settings are defined.

    The repetition penalty follows CTRL (Keskar et al., 2019, https://arxiv.org/abs/1909.05858) as
    transformers applies it: a generated token's logit is divided by the penalty when positive and multiplied
    when negative (the prompt is embeddings, so only generated tokens count). Before ``min_new_tokens`` eos
    cannot be chosen. Returns the new tokens [B, new] and each chosen token's log-probability [B, new].
    """
    model.eval()
    embeds, mask = gen.inputs_embeds, gen.attention_mask  # [B, T, H], [B, T]
    embed = model.get_input_embeddings()
    batch = embeds.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    tokens: list[Tensor] = []
    scores: list[Tensor] = []
    for step in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, T], as generate derives them from the mask
        logits = (
            model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        )
        logprobs = logits.log_softmax(-1)  # [B, V]
        if repetition_penalty != 1.0 and tokens:
            seen = torch.stack(tokens, dim=1)  # [B, step]
            picked = logits.gather(1, seen)
            logits = logits.scatter(
                1, seen, torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
            )
        if step < min_new_tokens:
            logits[:, eos] = float("-inf")
        choice = logits.argmax(-1)  # [B]
        choice = torch.where(done, torch.full_like(choice, pad), choice)
        tokens.append(choice)
        scores.append(logprobs.gather(1, choice[:, None])[:, 0])
        done |= choice == eos
        if bool(done.all()):
            break
        embeds = torch.cat([embeds, embed(choice)[:, None].to(embeds.dtype)], dim=1)  # [B, T + 1, H]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)  # [B, T + 1]
    return torch.stack(tokens, dim=1), torch.stack(scores, dim=1)


# --------------------------------------------------------------------------------------------------
# One setting at a time


@pytest.mark.parametrize("max_new_tokens", [1, 4, 9])
def test_max_new_tokens_bounds_the_token_count(model, tok, max_new_tokens: int) -> None:
    gen = inputs(model, tok)
    tokens = new_tokens(model, tok, gen, **PLAIN, max_new_tokens=max_new_tokens)
    assert tokens.shape[1] <= max_new_tokens
    # the random model never picks eos here, so it runs to the bound
    assert lengths(tokens, SpecialTokenIds.from_tokenizer(tok).eos) == [max_new_tokens] * 3


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens_forbids_an_early_eos(model, tok, num_beams: int) -> None:
    special = SpecialTokenIds.from_tokenizer(tok)
    gen = inputs(model, tok)
    with eos_bias(model, special.eos, 50.0):  # eos wins every step it is allowed
        eager = new_tokens(model, tok, gen, **{**PLAIN, "num_beams": num_beams}, max_new_tokens=10)
        held = new_tokens(
            model, tok, gen, **{**PLAIN, "num_beams": num_beams, "min_new_tokens": 5}, max_new_tokens=10
        )
    assert lengths(eager, special.eos) == [0, 0, 0]  # stops at once...
    assert lengths(held, special.eos) == [5, 5, 5]  # ...unless eos is blocked before 5 tokens, then it stops
    assert all(special.eos in row for row in held.tolist())


def test_greedy_equals_argmax_decoding_by_hand(model, tok) -> None:
    special = SpecialTokenIds.from_tokenizer(tok)
    gen = inputs(model, tok)
    tokens = new_tokens(model, tok, gen, **PLAIN, max_new_tokens=8)
    by_hand, _ = greedy_by_hand(model, gen, special.eos, special.pad, max_new_tokens=8)
    assert tokens.tolist() == by_hand.tolist()


def test_repetition_penalty_stops_a_repeating_model_as_by_hand(model, tok) -> None:
    special = SpecialTokenIds.from_tokenizer(tok)
    gen = inputs(model, tok)
    plain = new_tokens(model, tok, gen, **PLAIN, max_new_tokens=12)
    penalised = new_tokens(model, tok, gen, **{**PLAIN, "repetition_penalty": 2.0}, max_new_tokens=12)
    # this random model loops over a few tokens; with penalty 2.0 it repeats less, and as computed by hand
    repeats = [len(row) - len(set(row)) for row in plain.tolist()]
    assert min(repeats) >= 3, plain.tolist()
    assert all(len(row) - len(set(row)) < r for row, r in zip(penalised.tolist(), repeats)), (
        penalised.tolist()
    )
    by_hand, _ = greedy_by_hand(model, gen, special.eos, special.pad, 12, repetition_penalty=2.0)
    assert penalised.tolist() == by_hand.tolist()


def test_beam_width_changes_the_search_and_finds_a_likelier_report(model, tok) -> None:
    special = SpecialTokenIds.from_tokenizer(tok)
    gen = inputs(model, tok, padded=False)
    options = {**PLAIN, "min_new_tokens": 10, "max_new_tokens": 10}  # equal lengths: scores compare directly
    greedy = new_tokens(model, tok, gen, **options)
    beam = new_tokens(model, tok, gen, **{**options, "num_beams": 3})
    assert greedy.tolist() != beam.tolist()

    @torch.no_grad()
    def logprob(tokens: Tensor) -> Tensor:
        """Sum of log p(token | prompt, earlier tokens) per row, by teacher forcing, [B]."""
        embeds = torch.cat([gen.inputs_embeds, model.get_input_embeddings()(tokens)], dim=1)  # [B, T + n, H]
        logits = model(inputs_embeds=embeds).logits[:, gen.inputs_embeds.shape[1] - 1 : -1].float()
        return logits.log_softmax(-1).gather(2, tokens[..., None])[..., 0].sum(-1)

    # beam search (length penalty moot at equal lengths) keeps 3 hypotheses a step, so it finds a likelier
    # 10-token report than greedy here (not a guarantee in general; deterministic for this seed)
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()
    assert (logprob(beam) > logprob(greedy) + 1e-3).any()
    assert special.eos not in beam.tolist()[0]


def test_length_penalty_favours_longer_reports_when_positive(model, tok) -> None:
    special = SpecialTokenIds.from_tokenizer(tok)
    gen = inputs(model, tok)
    found = {}
    with eos_bias(model, special.eos, 2.0):  # eos competes with the other tokens
        for penalty in (-3.0, 0.0, 3.0):
            options = {**PLAIN, "num_beams": 3, "length_penalty": penalty, "max_new_tokens": 12}
            found[penalty] = lengths(new_tokens(model, tok, gen, **options), special.eos)
    # beam score = sum of log-probs / length ** length_penalty: a larger exponent rewards length
    for short, long in ((-3.0, 0.0), (0.0, 3.0)):
        assert all(a <= b for a, b in zip(found[short], found[long])), found
    assert sum(found[3.0]) > sum(found[-3.0]), found
    # the length penalty only scores beams: greedy ignores it
    greedy = [
        new_tokens(model, tok, gen, **{**PLAIN, "length_penalty": p}, max_new_tokens=6) for p in (-3.0, 3.0)
    ]
    assert greedy[0].tolist() == greedy[1].tolist()


# --------------------------------------------------------------------------------------------------
# Through the stage-2 network


def test_report_generator_passes_its_settings_and_overrides_to_generate(tok) -> None:
    net = make_generator(
        tok, num_beams=3, repetition_penalty=1.7, length_penalty=0.5, min_new_tokens=2, max_new_tokens=7
    ).eval()
    images = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    visual = net.encode(images, None)
    with recorded(net.llm) as calls:
        reports = net.generate_from_prefix(visual)
        overridden = net.generate_from_prefix(visual, num_beams=1, max_new_tokens=3, min_new_tokens=None)
    first, second = (c["kwargs"] for c in calls)
    assert {k: first[k] for k in ("num_beams", "length_penalty")} == {"num_beams": 3, "length_penalty": 0.5}
    # the penalty goes in as amrg's own processor (generate's own is off: it is batch-dependent)
    assert first["repetition_penalty"] == 1.0
    (penalty,) = first["logits_processor"]
    assert isinstance(penalty, RepetitionPenaltyLogitsProcessor) and penalty.penalty == 1.7
    assert (first["min_new_tokens"], first["max_new_tokens"]) == (2, 7)
    # an override replaces one setting; None keeps the network's; greedy sends no length penalty
    assert (second["num_beams"], second["max_new_tokens"], second["min_new_tokens"]) == (1, 3, 2)
    assert "length_penalty" not in second
    assert calls[1]["tokens"].shape[1] <= 3
    # the network's reports are generate_reports' on the same inputs
    gen = build_generation_inputs(
        net.llm.get_input_embeddings(), net.prompt, visual.prefix, visual.prefix_mask
    )
    direct = generate_reports(
        net.llm,
        tok,
        gen.inputs_embeds,
        gen.attention_mask,
        num_beams=3,
        repetition_penalty=1.7,
        length_penalty=0.5,
        min_new_tokens=2,
        max_new_tokens=7,
    )
    assert reports == direct and len(overridden) == 2


# --------------------------------------------------------------------------------------------------
# The fast path: a static KV cache and a compiled decode step write the same tokens

FAST_SETTINGS = {"repetition_penalty": 2.0, "length_penalty": 2.0, "min_new_tokens": 3, "max_new_tokens": 10}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_static_cache_writes_the_same_tokens(model, tok, num_beams: int) -> None:
    gen = inputs(model, tok)
    with recorded(model) as calls:
        generate_reports(
            model, tok, gen.inputs_embeds, gen.attention_mask, num_beams=num_beams, **FAST_SETTINGS
        )
        generate_reports(
            model,
            tok,
            gen.inputs_embeds,
            gen.attention_mask,
            num_beams=num_beams,
            cache="static",
            **FAST_SETTINGS,
        )
    slow, fast = calls
    assert "cache_implementation" not in slow["kwargs"] and fast["kwargs"]["cache_implementation"] == "static"
    assert torch.equal(slow["tokens"], fast["tokens"])


@contextmanager
def counted_decode_steps(model: nn.Module, mode: str) -> Iterator[list[int]]:
    """Count the calls of ``model``'s compiled decode step (compiled on first use)."""
    from amrg.models.decoding import _COMPILED, _compiled_forward

    step = _compiled_forward(model, mode)
    seen: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["input_ids"].shape[0])
        return step(*args, **kwargs)

    model.__dict__[_COMPILED][mode] = counting
    try:
        yield seen
    finally:
        model.__dict__[_COMPILED][mode] = step


@pytest.mark.slow  # torch.compile (inductor) builds a graph per batch shape: ~15 s each on 2 CPU cores
@pytest.mark.parametrize(("mode", "beams"), [("default", (1, 3)), ("reduce-overhead", (1,))])
def test_a_compiled_decode_step_writes_the_same_tokens(model, tok, mode: str, beams: tuple[int, ...]) -> None:
    gen = inputs(model, tok)
    for num_beams in beams:
        settings = {"num_beams": num_beams, **FAST_SETTINGS}
        slow = new_tokens(model, tok, gen, **settings)
        with counted_decode_steps(model, mode) as steps:
            fast = new_tokens(model, tok, gen, cache="static", compile=mode, **settings)
        assert torch.equal(slow, fast), (mode, num_beams)
        # every step after the prefill went through the compiled function, one row per beam
        assert steps and set(steps) == {gen.inputs_embeds.shape[0] * num_beams}
        assert len(steps) == fast.shape[1] - 1
    assert "forward" not in model.__dict__  # the eager forward is back after the call


def test_the_fast_path_settings_are_checked(model, tok) -> None:
    gen = inputs(model, tok)
    with pytest.raises(ValueError, match="compile='default' needs cache='static'"):
        generate_reports(model, tok, gen.inputs_embeds, gen.attention_mask, compile="default")
    with pytest.raises(ValueError, match="cache must be one of"):
        generate_reports(model, tok, gen.inputs_embeds, gen.attention_mask, cache="paged")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ReportGenerator: .*needs cache='static'"):
        make_generator(tok, compile="max-autotune-no-cudagraphs")


@pytest.mark.slow  # one torch.compile
def test_a_forward_set_on_the_instance_is_compiled_and_kept(model, tok) -> None:
    """accelerate's offloading hooks replace ``model.forward`` on the instance: the compiled step must run
    through it (not around it), and it must be the model's forward again after the call."""
    calls: list[int] = []
    original = type(model).forward.__get__(model, type(model))

    def hooked(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = hooked
    gen = inputs(model, tok)
    settings = {"num_beams": 1, **FAST_SETTINGS}
    try:
        slow = new_tokens(model, tok, gen, **settings)
        eager_calls = len(calls)
        fast = new_tokens(model, tok, gen, cache="static", compile="default", **settings)
        assert torch.equal(slow, fast)
        # every forward of the fast path (the eager prefill and the compiled steps) went through the hook
        assert len(calls) == 2 * eager_calls
        assert model.__dict__["forward"] is hooked
    finally:
        del model.forward
