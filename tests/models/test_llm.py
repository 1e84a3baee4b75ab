"""Tests for amrg.models.llm: tiny LLMs, LoRA, the prompt, input building and generation."""

from __future__ import annotations

import inspect
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

import amrg.models.llm as llm_module
from amrg.models.llm import (
    DEFAULT_INSTRUCTION,
    FINDINGS_PLACEHOLDER,
    IGNORE_INDEX,
    LLMInputs,
    LoRAConfig,
    ReportPrompt,
    SpecialTokenIds,
    apply_lora,
    build_generation_inputs,
    build_inputs,
    build_tiny_llm,
    enable_gradient_checkpointing,
    freeze,
    generate_reports,
    load_causal_lm,
    report_loss,
    token_offset,
)
from amrg.models.tokenizer import train_report_tokenizer
from tests.models.test_tokenizer import toy_reports

HIDDEN = 32
REPORTS = [
    "the heart is normal in size. the lungs are clear.",
    "small left pleural effusion.",
    "mild cardiomegaly is present. no pneumothorax is seen. the mediastinum is unremarkable.",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreTrainedTokenizerBase]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        style: train_report_tokenizer(toy_reports(), root / style, vocab_size=600, style=style)
        for style in ("llama", "qwen")
    }


def tiny(tokenizer: PreTrainedTokenizerBase, family: str = "llama", dtype: str = "float32", seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny_llm(
        tokenizer,
        hidden_size=HIDDEN,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        family=family,
        dtype=dtype,
    )


def prefix(batch: int, length: int = 3, seed: int = 1, width: int = HIDDEN) -> Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Special tokens


def test_special_ids_come_from_the_tokenizer(tokenizers) -> None:
    llama, qwen = (SpecialTokenIds.from_tokenizer(tokenizers[s]) for s in ("llama", "qwen"))
    # Llama style: <unk>=0 doubles as pad, <s>=1, </s>=2 (amrg/models/tokenizer.py).
    assert llama == SpecialTokenIds(pad=0, eos=2, bos=1)
    # Qwen style: no bos, pad = eos = <|endoftext|>, the first of the three specials at the end.
    n = len(tokenizers["qwen"])
    assert qwen == SpecialTokenIds(pad=n - 3, eos=n - 3, bos=None)
    assert llama.pad != qwen.pad and llama.eos != qwen.eos


def test_missing_pad_falls_back_to_eos(tokenizers) -> None:
    tok = tokenizers["llama"]
    saved = tok.pad_token
    try:
        tok.pad_token = None  # as Llama-2's own tokenizer
        assert SpecialTokenIds.from_tokenizer(tok).pad == tok.eos_token_id
    finally:
        tok.pad_token = saved


def test_source_never_hard_codes_a_special_token_id() -> None:
    source = inspect.getsource(llm_module)
    # Code only: docstrings and comments may describe the reference code's bug.
    code = " ".join(
        t.string
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.STRING, tokenize.COMMENT)
    )
    # e.g. "pad_token_id = 0", "bos=1", "eos_id == 2": the reference code's Qwen bug.
    literal = re.compile(r"\b(pad|bos|eos|unk)\w*\s*(=|==|!=)\s*-?\d", re.IGNORECASE)
    assert "pad_token_id" in code and literal.findall(code) == []


# --------------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("style", ["llama", "qwen"])
def test_tiny_llm_builds_forward_backward(tokenizers, family: str, style: str) -> None:
    tok = tokenizers[style]
    model = tiny(tok, family)
    cfg = model.config
    assert cfg.model_type == family
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    ids = torch.randint(0, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 7, len(tok))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_tiny_llm_rejects_bad_sizes(tokenizers) -> None:
    with pytest.raises(ValueError, match="heads of even size"):
        build_tiny_llm(tokenizers["llama"], hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="family must be"):
        build_tiny_llm(tokenizers["llama"], family="gpt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_tiny_llm(tokenizers["llama"], dtype="float64")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Prompt


def test_plain_prompt_follows_r2gengpt_and_the_tokenizer_bos(tokenizers) -> None:
    tok = tokenizers["llama"]
    prompt = ReportPrompt(tok)
    assert prompt.template == "plain"
    assert prompt.text == f"Human: <Img><ImageHere></Img> {DEFAULT_INSTRUCTION} \nAssistant:"
    assert prompt.before_ids[0] == tok.bos_token_id and prompt.before_ids.count(tok.bos_token_id) == 1
    assert tok.decode(prompt.before_ids, skip_special_tokens=True) == "Human: <Img>"
    assert tok.decode(prompt.after_ids) == f"</Img> {DEFAULT_INSTRUCTION} \nAssistant:"
    assert prompt.encode_report("no pneumothorax is seen.", 100)[-1] == tok.eos_token_id
    assert len(prompt.encode_report(REPORTS[2], 4)) == 5  # 4 report tokens + eos
    with pytest.raises(ValueError, match="has no chat_template"):
        ReportPrompt(tok, template="chat")


def test_chat_prompt_uses_the_chat_template(tokenizers) -> None:
    tok = tokenizers["qwen"]
    prompt = ReportPrompt(tok, instruction="Describe the image.")
    assert prompt.template == "chat"
    assert (
        prompt.text
        == "<|im_start|>user\n<Img><ImageHere></Img> Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(prompt.before_ids) == "<|im_start|>user\n<Img>"
    assert tok.decode(prompt.after_ids) == "</Img> Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.before_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no bos: Qwen has none
    plain = ReportPrompt(tok, template="plain")
    assert tok.decode(plain.before_ids) == "Human: <Img>"  # nothing in front either


# --------------------------------------------------------------------------------------------------
# Inputs


@pytest.mark.parametrize("style", ["llama", "qwen"])
def test_build_inputs_masks_exactly_the_non_report_tokens(tokenizers, style: str) -> None:
    tok = tokenizers[style]
    model = tiny(tok)
    embed = model.get_input_embeddings()
    prompt = ReportPrompt(tok)
    pre = prefix(3, length=4)
    max_tokens = 12
    inputs = build_inputs(embed, prompt, pre, REPORTS, max_report_tokens=max_tokens)

    n_before, n_after, n_prefix = len(prompt.before_ids), len(prompt.after_ids), 4
    n_prompt = n_before + n_prefix + n_after
    targets = [tok(r, add_special_tokens=False).input_ids[:max_tokens] + [tok.eos_token_id] for r in REPORTS]
    assert len(targets[2]) == max_tokens + 1  # the long report is truncated, then eos
    total = n_prompt + max(len(t) for t in targets)
    assert inputs.inputs_embeds.shape == (3, total, HIDDEN)
    assert inputs.attention_mask.shape == inputs.labels.shape == (3, total)

    with torch.no_grad():
        for b, target in enumerate(targets):
            n = n_prompt + len(target)
            expected = [IGNORE_INDEX] * n_prompt + target + [IGNORE_INDEX] * (total - n)
            assert inputs.labels[b].tolist() == expected
            assert inputs.attention_mask[b].tolist() == [1] * n + [0] * (total - n)  # right padding
            emb = inputs.inputs_embeds[b]
            torch.testing.assert_close(emb[:n_before], embed(torch.tensor(prompt.before_ids)))
            torch.testing.assert_close(emb[n_before : n_before + n_prefix], pre[b])
            torch.testing.assert_close(
                emb[n_before + n_prefix : n_prompt], embed(torch.tensor(prompt.after_ids))
            )
            torch.testing.assert_close(emb[n_prompt:n], embed(torch.tensor(target)))
    # The eos is learnt even where it equals pad (Qwen): masking goes by length, not by id.
    assert all((inputs.labels[b] == tok.eos_token_id).sum() == 1 for b in range(3))


def test_prefix_mask_drops_slots_and_generation_pads_left(tokenizers) -> None:
    tok = tokenizers["llama"]
    embed = tiny(tok).get_input_embeddings()
    prompt = ReportPrompt(tok)
    pre = prefix(2, length=3)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    n_prompt = len(prompt.before_ids) + len(prompt.after_ids)

    train = build_inputs(embed, prompt, pre, REPORTS[:2], prefix_mask=mask)
    n_report = len(tok(REPORTS[1], add_special_tokens=False).input_ids) + 1
    row = train.labels[1].tolist()
    assert row[: n_prompt + 2] == [IGNORE_INDEX] * (n_prompt + 2)  # 2 kept prefix slots
    assert row[n_prompt + 2 : n_prompt + 2 + n_report][-1] == tok.eos_token_id
    torch.testing.assert_close(train.inputs_embeds[1, len(prompt.before_ids) + 1], pre[1, 2])

    gen = build_generation_inputs(embed, prompt, pre, prefix_mask=mask)
    assert gen.labels is None
    assert gen.inputs_embeds.shape == (2, n_prompt + 3, HIDDEN)
    assert gen.attention_mask.tolist() == [[1] * (n_prompt + 3), [0] + [1] * (n_prompt + 2)]
    with torch.no_grad():
        tail = embed(torch.tensor(prompt.after_ids))
        for b in range(2):  # every prompt ends in the last column
            torch.testing.assert_close(gen.inputs_embeds[b, -len(prompt.after_ids) :], tail)
    assert set(gen.as_model_kwargs()) == {"inputs_embeds", "attention_mask"}
    assert set(train.as_model_kwargs()) == {"inputs_embeds", "attention_mask", "labels"}


@pytest.mark.parametrize("style", ["llama", "qwen"])
def test_findings_placeholder_writes_each_study_s_findings_into_the_prompt(tokenizers, style: str) -> None:
    tok = tokenizers[style]
    embed = tiny(tok).get_input_embeddings()
    prompt = ReportPrompt(tok, instruction=f"Findings: {FINDINGS_PLACEHOLDER}. Describe the image.")
    assert prompt.has_findings and not ReportPrompt(tok).has_findings
    assert tok.decode(prompt.after_ids).endswith("Findings: ")
    assert tok.decode(prompt.tail_ids).startswith(". Describe the image.")
    findings = [["Cardiomegaly", "Pleural Effusion"], []]
    ids = [prompt.encode_findings(f) for f in findings]
    assert [tok.decode(i) for i in ids] == ["cardiomegaly, pleural effusion", "none"]
    pre = prefix(2, length=3)
    n_fixed = len(prompt.before_ids) + 3 + len(prompt.after_ids) + len(prompt.tail_ids)

    train = build_inputs(embed, prompt, pre, REPORTS[:2], findings=findings)
    with torch.no_grad():
        for b in range(2):
            start = len(prompt.before_ids) + 3 + len(prompt.after_ids)
            row = train.inputs_embeds[b]
            torch.testing.assert_close(row[start : start + len(ids[b])], embed(torch.tensor(ids[b])))
            after = start + len(ids[b])
            torch.testing.assert_close(
                row[after : after + len(prompt.tail_ids)], embed(torch.tensor(prompt.tail_ids))
            )
            n_prompt = n_fixed + len(ids[b])
            assert train.labels[b, :n_prompt].eq(IGNORE_INDEX).all()  # no loss on the findings
            assert train.labels[b, n_prompt] != IGNORE_INDEX  # the report starts right after the tail

    gen = build_generation_inputs(embed, prompt, pre, findings=findings)
    longest = n_fixed + max(len(i) for i in ids)
    assert gen.inputs_embeds.shape[1] == longest
    assert gen.attention_mask.sum(dim=1).tolist() == [n_fixed + len(i) for i in ids]  # left padding
    with pytest.raises(ValueError, match="findings were not given"):
        build_generation_inputs(embed, prompt, pre)
    with pytest.raises(ValueError, match="has no '<FindingsHere>' but findings were given"):
        build_generation_inputs(embed, ReportPrompt(tok), pre, findings=findings)
    with pytest.raises(ValueError, match="findings for 1 studies"):
        build_inputs(embed, prompt, pre, REPORTS[:2], findings=findings[:1])
    with pytest.raises(ValueError, match="at most once, after the image"):
        ReportPrompt(tok, instruction=f"{FINDINGS_PLACEHOLDER} and {FINDINGS_PLACEHOLDER}")


def test_build_inputs_rejects_mismatches(tokenizers) -> None:
    tok = tokenizers["llama"]
    embed = tiny(tok).get_input_embeddings()
    prompt = ReportPrompt(tok)
    with pytest.raises(ValueError, match="does not match the LLM embedding width 32"):
        build_inputs(embed, prompt, prefix(2, width=16), REPORTS[:2])
    with pytest.raises(ValueError, match="got 3 reports for a prefix batch of 2"):
        build_inputs(embed, prompt, prefix(2), REPORTS)
    with pytest.raises(ValueError, match="prefix_mask must be"):
        build_generation_inputs(embed, prompt, prefix(2), prefix_mask=torch.ones(2, 5, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Training and generation


def _train(model: nn.Module, inputs_fn, steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs_fn().as_model_kwargs()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("style", "family"), [("llama", "llama"), ("qwen", "qwen2")])
def test_a_few_steps_lower_the_loss(tokenizers, style: str, family: str) -> None:
    tok = tokenizers[style]
    model = tiny(tok, family)
    prompt = ReportPrompt(tok)
    pre = prefix(3)
    losses = _train(
        model, lambda: build_inputs(model.get_input_embeddings(), prompt, pre, REPORTS), steps=8, lr=3e-3
    )
    # 8 AdamW steps at 3e-3 take a random tiny model from ~6.0 (about ln(vocab)) to ~4.9.
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_overfit_then_generation_reproduces_the_reports(tokenizers) -> None:
    """Teacher forcing (build_inputs) and generation (left-padded) line up token for token."""
    tok = tokenizers["qwen"]
    model = tiny(tok, "qwen2")
    prompt = ReportPrompt(tok)
    pre = prefix(2, length=3, seed=5) * 3  # two clearly different prefixes
    mask = torch.tensor([[True, True, True], [True, True, False]])  # different prompt lengths
    targets = REPORTS[:2]
    embed = model.get_input_embeddings()
    losses = _train(
        model, lambda: build_inputs(embed, prompt, pre, targets, prefix_mask=mask), steps=80, lr=1e-2
    )
    assert losses[-1] < 0.05, losses[-5:]
    gen = build_generation_inputs(embed, prompt, pre, prefix_mask=mask)
    texts = generate_reports(
        model,
        tok,
        gen.inputs_embeds,
        gen.attention_mask,
        num_beams=1,
        repetition_penalty=1.0,
        min_new_tokens=0,
        max_new_tokens=40,
    )
    assert texts == targets


def test_generate_returns_one_string_per_prompt_deterministically(tokenizers) -> None:
    tok = tokenizers["llama"]
    model = tiny(tok)
    model.train()
    gen = build_generation_inputs(model.get_input_embeddings(), ReportPrompt(tok), prefix(3))
    args = (model, tok, gen.inputs_embeds, gen.attention_mask)
    kwargs = {"num_beams": 2, "min_new_tokens": 3, "max_new_tokens": 8}
    first = generate_reports(*args, **kwargs)
    assert len(first) == 3 and all(isinstance(t, str) and t == t.strip() for t in first)
    assert any(first)
    assert generate_reports(*args, **kwargs) == first
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate_reports(*args, min_new_tokens=9, max_new_tokens=8)


@pytest.mark.parametrize(("style", "family"), [("llama", "llama"), ("qwen", "qwen2")])
def test_left_padded_batch_generates_what_one_by_one_does(tokenizers, style: str, family: str) -> None:
    tok = tokenizers[style]
    model = tiny(tok, family, seed=3)
    prompt = ReportPrompt(tok)
    embed = model.get_input_embeddings()
    pre = prefix(3, length=4, seed=7)
    mask = torch.tensor([[True] * 4, [True, False, True, False], [False, False, False, True]])
    kwargs = {"num_beams": 1, "min_new_tokens": 4, "max_new_tokens": 10}
    batch = build_generation_inputs(embed, prompt, pre, prefix_mask=mask)
    assert (batch.attention_mask == 0).any()  # the batch really is padded
    together = generate_reports(model, tok, batch.inputs_embeds, batch.attention_mask, **kwargs)
    alone = []
    for b in range(3):
        one = build_generation_inputs(embed, prompt, pre[b : b + 1], prefix_mask=mask[b : b + 1])
        alone += generate_reports(model, tok, one.inputs_embeds, one.attention_mask, **kwargs)
    assert together == alone


# --------------------------------------------------------------------------------------------------
# LoRA and freezing


def test_lora_trains_only_the_adapters(tokenizers) -> None:
    tok = tokenizers["llama"]
    model = apply_lora(tiny(tok), r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(trainable) == 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompt = ReportPrompt(tok)
    _train(model, lambda: build_inputs(model.get_input_embeddings(), prompt, prefix(2), REPORTS[:2]), 1, 1e-2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # LoRA starts with B = 0, so only B gets a gradient in the first step (A moves by weight decay).
    assert any("lora_B" in n for n in changed)
    # Generation works through the peft wrapper too.
    gen = build_generation_inputs(model.get_input_embeddings(), prompt, prefix(2))
    out = generate_reports(
        model, tok, gen.inputs_embeds, gen.attention_mask, num_beams=2, min_new_tokens=2, max_new_tokens=4
    )
    assert len(out) == 2


def test_lora_options_are_validated(tokenizers) -> None:
    assert LoRAConfig().target_modules == ("q_proj", "v_proj")
    assert LoRAConfig(target_modules=["o_proj"]).target_modules == ("o_proj",)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lora\.r must be an integer >= 1, got 0.*lora\.dropout"):
        LoRAConfig(r=0, dropout=1.5)
    with pytest.raises(ValueError, match=r"lora\.target_modules \['qkv'\] not found in LlamaForCausalLM"):
        apply_lora(tiny(tokenizers["llama"]), target_modules=("q_proj", "qkv"))


def _loss_and_grads(model: nn.Module, tok, checkpointing: bool) -> tuple[Tensor, dict[str, Tensor], int]:
    """Loss, gradients (LLM and a trainable prefix projection) and how often layer 0's attention ran."""
    if checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(11)
    proj = nn.Linear(16, HIDDEN)  # the prefix comes from a trainable projection, as in ReportGenerator
    raw = prefix(2, length=3, seed=4, width=16)
    calls = []
    layer0 = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
    hook = layer0.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    inputs = build_inputs(model.get_input_embeddings(), ReportPrompt(tok), proj(raw), REPORTS[:2])
    loss = model(**inputs.as_model_kwargs()).loss
    loss.backward()
    hook.remove()
    grads = {f"llm.{n}": p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads.update({f"proj.{n}": p.grad for n, p in proj.named_parameters()})
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("training", ["full", "lora"])
@pytest.mark.parametrize(("style", "family"), [("llama", "llama"), ("qwen", "qwen2")])
def test_gradient_checkpointing_keeps_loss_and_gradients(
    tokenizers, style: str, family: str, training: str
) -> None:
    tok = tokenizers[style]

    def model() -> nn.Module:
        m = tiny(tok, family, seed=2)
        if training == "lora":
            m = apply_lora(m, r=4, alpha=8, dropout=0.0)
            for name, p in m.named_parameters():  # B starts at 0; make A's gradient non-zero too
                if "lora_B" in name:
                    nn.init.normal_(p, std=0.1)
        return m

    loss, grads, calls = _loss_and_grads(model(), tok, checkpointing=False)
    loss_gc, grads_gc, calls_gc = _loss_and_grads(model(), tok, checkpointing=True)
    assert (calls, calls_gc) == (1, 2)  # checkpointing re-runs each layer once in the backward pass
    torch.testing.assert_close(loss_gc, loss)
    assert grads_gc.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grads_gc[name] is not None, name
        assert grad.abs().sum() > 0, name  # every trainable weight (LoRA A and B, the prefix) is reached
        torch.testing.assert_close(grads_gc[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_leaves_generation_alone(tokenizers) -> None:
    tok = tokenizers["llama"]
    plain, checkpointed = tiny(tok, seed=3), enable_gradient_checkpointing(tiny(tok, seed=3))
    outs = []
    for model in (plain, checkpointed):
        model.train()  # generate_reports switches to eval mode itself
        gen = build_generation_inputs(model.get_input_embeddings(), ReportPrompt(tok), prefix(2))
        outs.append(generate_reports(model, tok, gen.inputs_embeds, gen.attention_mask, 2, 1.5, 1.0, 3, 8))
    assert outs[0] == outs[1]


def test_freeze_freezes_everything(tokenizers) -> None:
    model = tiny(tokenizers["llama"])
    assert freeze(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    assert model.training  # mode untouched


# --------------------------------------------------------------------------------------------------
# Loading and dtypes


def test_load_causal_lm_round_trip(tokenizers, tmp_path: Path) -> None:
    tok = tokenizers["qwen"]
    model = tiny(tok, "qwen2").eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(tmp_path, dtype="float32")
    assert type(loaded) is type(model)
    assert (loaded_tok.pad_token_id, loaded_tok.eos_token_id, loaded_tok.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        None,
    )
    ids = torch.tensor([[5, 9, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    half, _ = load_causal_lm(str(tmp_path), dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_causal_lm_names_what_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-llm"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*config.json"):
        load_causal_lm(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing; no tokenizer file"):
        load_causal_lm(tmp_path / "empty")


def test_bfloat16_on_cpu(tokenizers) -> None:
    tok = tokenizers["llama"]
    model = tiny(tok, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    prompt = ReportPrompt(tok)
    pre = prefix(2).requires_grad_()  # float32 prefix, as a projection under fp32 would give
    inputs = build_inputs(model.get_input_embeddings(), prompt, pre, REPORTS[:2])
    assert inputs.inputs_embeds.dtype == torch.bfloat16
    loss = model(**inputs.as_model_kwargs()).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert pre.grad is not None and torch.isfinite(pre.grad).all()  # gradient reaches the prefix
    gen = build_generation_inputs(model.get_input_embeddings(), prompt, pre.detach())
    texts = generate_reports(
        model, tok, gen.inputs_embeds, gen.attention_mask, num_beams=2, min_new_tokens=2, max_new_tokens=5
    )
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_llm_inputs_is_a_plain_container() -> None:
    x = LLMInputs(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.long))
    assert x.labels is None and set(x.as_model_kwargs()) == {"inputs_embeds", "attention_mask"}


# --------------------------------------------------------------------------------------------------
# Memory estimate (benchmarks/stage2_memory.py)


def _memory_benchmark():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "stage2_memory.py"
    spec = importlib.util.spec_from_file_location("stage2_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stage2_memory"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_memory_estimate_runs_on_a_tiny_config_and_counts_on_meta(capsys) -> None:
    bench = _memory_benchmark()
    result = bench.main(["--tiny", "--no-network", "--batch", "2"])
    assert "LoRA stage 2 total" in capsys.readouterr().out
    shape = bench.TINY
    h, f, v, layers = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    # the parameters counted on meta, against the Llama architecture counted by hand
    per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorm weights
    assert result["llm"]["params"] == layers * per_layer + 2 * v * h + h  # + embeddings, lm_head, final norm
    assert result["llm"]["weight_bytes"] == 2 * result["llm"]["params"]  # bf16
    assert result["llm"]["lora_params"] == layers * 2 * 16 * (h + h)  # r=16 on q_proj and v_proj, h -> h
    assert result["seq_len"] == 91 + 26 + 101
    act = result["activation_bytes_per_token"]["lora"]
    assert act[True] < act[False]
    assert result["lora_total_bytes"][True] < result["lora_total_bytes"][False]
    assert result["fsdp_sharded_bytes"]["fp32"] == result["llm"]["params"] * 16 / 8


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_bounds_what_autograd_keeps(checkpointing: bool) -> None:
    """The activation formula against the tensors autograd saves in a bf16 Llama's forward (full fine-tune)."""
    from transformers import AutoModelForCausalLM

    bench = _memory_benchmark()
    shape = bench.LLMShape(hidden=256, layers=2, heads=4, intermediate=688, vocab=1000)
    config = shape.llama_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    batch, length = 2, 64
    x = torch.randn(batch, length, shape.hidden, dtype=torch.bfloat16, requires_grad=True)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs_embeds=x, labels=torch.randint(0, shape.vocab, (batch, length))).loss
    assert torch.isfinite(loss)
    measured = sum(saved.values()) / (batch * length)
    formula = bench.activation_bytes_per_token(shape, checkpointing)
    # an upper estimate (it also counts the logits' transient copies and, with checkpointing, the one layer
    # recomputed during the backward pass); without checkpointing it is within 25% here (0.89x measured)
    assert measured <= formula
    if not checkpointing:
        assert measured >= 0.75 * formula, (measured, formula)


def test_a_report_does_not_depend_on_the_other_prompts_of_its_batch(tokenizers) -> None:
    """transformers 5's own repetition penalty skips a left-padded row's first generated tokens when the
    prompt is embeddings; generate_reports penalises every generated token, so batching changes nothing."""
    tok = tokenizers["llama"]
    model = tiny(tok)
    embed = model.get_input_embeddings()
    prompt = ReportPrompt(tok)
    both = prefix(2, length=9)
    mask = torch.tensor([[True] * 2 + [False] * 7, [True] * 9])  # row 0: a 2-slot prefix, left-padded by 7
    alone = build_generation_inputs(embed, prompt, both[:1, :2])
    batch = build_generation_inputs(embed, prompt, both, prefix_mask=mask)
    assert batch.attention_mask[0, :7].sum() == 0
    options = dict(num_beams=1, repetition_penalty=2.0, min_new_tokens=12, max_new_tokens=12)
    single = generate_reports(model, tok, alone.inputs_embeds, alone.attention_mask, **options)
    batched = generate_reports(model, tok, batch.inputs_embeds, batch.attention_mask, **options)
    assert batched[0] == single[0]
    beams = dict(options, num_beams=3)
    assert (
        generate_reports(model, tok, batch.inputs_embeds, batch.attention_mask, **beams)[0]
        == (generate_reports(model, tok, alone.inputs_embeds, alone.attention_mask, **beams)[0])
    )


# --------------------------------------------------------------------------------------------------
# The training loss


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("style", "family"), [("llama", "llama"), ("qwen", "qwen2")])
def test_report_loss_is_the_models_loss_with_the_head_on_report_positions_only(
    tokenizers, style: str, family: str, lora: bool
) -> None:
    """Same value and gradients as ``model(**inputs).loss``, with the vocabulary projection applied only at the
    positions that predict a report token (a right-padded batch with prompts of different lengths)."""
    model = tiny(tokenizers[style], family)
    if lora:
        model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    prompt = ReportPrompt(tokenizers[style], instruction=DEFAULT_INSTRUCTION)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0, 2] = False
    pre = prefix(3).requires_grad_()
    inputs = build_inputs(model.get_input_embeddings(), prompt, pre, REPORTS, prefix_mask=mask)
    heads: list[int] = []
    hook = (
        llm_module.causal_lm(model)
        .get_output_embeddings()
        .register_forward_hook(lambda _m, args, _out: heads.append(args[0].shape[:-1].numel()))
    )
    try:
        ours = report_loss(model, inputs)
        ours_grads = torch.autograd.grad(
            ours, [pre, *(p for p in model.parameters() if p.requires_grad)], retain_graph=True
        )
        theirs = model(**inputs.as_model_kwargs()).loss
        theirs_grads = torch.autograd.grad(theirs, [pre, *(p for p in model.parameters() if p.requires_grad)])
    finally:
        hook.remove()
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b)
    labelled = int((inputs.labels[:, 1:] != IGNORE_INDEX).sum())
    assert heads == [labelled, inputs.labels.numel()]  # ours: the labelled positions; the model's: all


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_token_offset_adds_each_samples_vector_to_its_batched_tokens_only() -> None:
    model = _Embedder()
    offset = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])  # [B=2, H]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    plain = model.embed(ids)
    with token_offset(model, offset):
        torch.testing.assert_close(model.embed(ids), plain + offset[:, None])  # [B, T]: training reports
        shared = torch.tensor([7, 8])
        assert torch.equal(model.embed(shared), model.embed.weight[shared])  # [T]: the prompt's pieces
        beams = torch.tensor([[1], [1], [1], [2], [2], [2]])  # [B * 3, 1]: a sample's beams together
        expected = model.embed.weight[beams] + offset.repeat_interleave(3, dim=0)[:, None]
        torch.testing.assert_close(model.embed(beams), expected)
        with pytest.raises(ValueError, match="a batch of 3 rows for an offset of 2 samples"):
            model.embed(torch.tensor([[1], [2], [3]]))
    assert torch.equal(model.embed(ids), plain)  # gone after the block
    with token_offset(model, None):
        assert torch.equal(model.embed(ids), plain)
