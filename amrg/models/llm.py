"""The LLM side of stage 2: a causal LM that writes the report after a prompt and a visual prefix.

AM-MRG (Wang et al., 2025, "Activating Associative Disease-Aware Vision Token Memory for LLM-Based
X-ray Report Generation", https://arxiv.org/abs/2501.03458) feeds the LLM a prompt with the visual
tokens (patch tokens, disease tokens and the two Hopfield recalls, projected to the LLM width)
spliced in where the image goes, and trains it to write the report. The prompt and the splicing follow
R2GenGPT (Wang et al., 2023, "R2GenGPT: Radiology Report Generation with Frozen LLMs",
https://arxiv.org/abs/2309.09812), on which the AM-MRG code is built; no code is copied from either.

This module knows nothing of vision, Lightning or files beyond the local LLM folder:

* :func:`load_causal_lm` loads a Hugging Face causal LM and its tokenizer from a local folder;
  :func:`build_tiny_llm` builds a random Llama or Qwen2 from a tokenizer for tests and the demo.
* :func:`apply_lora` (peft) and :func:`freeze` set up the two training modes; :class:`LoRAConfig`
  groups the LoRA options for YAML recipes; :func:`enable_gradient_checkpointing` trades compute for
  activation memory.
* :class:`ReportPrompt` renders the prompt in the tokenizer's own conventions (its chat template when
  it has one) and splits it at the image placeholder.
* :func:`build_inputs` (training, right padding, loss on report tokens only) and
  :func:`build_generation_inputs` (left padding) splice ``[prompt before, prefix, prompt after,
  report]`` into ``inputs_embeds``; :func:`generate_reports` runs batched beam search on them.

Departures from the reference code: pad, bos and eos always come from the loaded tokenizer (the
reference hard-codes Llama's ids, pad = bos = 0, which breaks Qwen, whose tokenizer has no bos and
pads with ``<|endoftext|>``); the label mask is built from lengths, never by comparing ids with the
pad id (so an eos that equals pad is still learnt); and generation inputs are left-padded, so prefixes
of different lengths can share a batch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    RepetitionPenaltyLogitsProcessor,
)

from amrg.models.decoding import CacheKind, CompileMode, causal_lm, check_fast_path, compiled_decode

__all__ = [
    "DEFAULT_INSTRUCTION",
    "FINDINGS_PLACEHOLDER",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "DType",
    "LLMInputs",
    "LoRAConfig",
    "ReportPrompt",
    "SpecialTokenIds",
    "TOKENIZER_FILES",
    "apply_lora",
    "build_generation_inputs",
    "build_inputs",
    "build_tiny_llm",
    "enable_gradient_checkpointing",
    "freeze",
    "generate_reports",
    "load_causal_lm",
    "report_loss",
    "token_offset",
]

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]

IGNORE_INDEX = -100
"""Label value that ``transformers`` (and ``nn.CrossEntropyLoss``) leave out of the loss."""

IMAGE_PLACEHOLDER = "<ImageHere>"
"""Marks where the visual prefix goes in the prompt text (R2GenGPT's marker); never tokenized."""

FINDINGS_PLACEHOLDER = "<FindingsHere>"
"""Marks, in an instruction, where each study's stage-1 findings are written as text (a diagnosis
prompt, as PromptMRG's; Jin et al., 2024, https://arxiv.org/abs/2308.12604); optional."""

DEFAULT_INSTRUCTION = "Generate a comprehensive and detailed diagnosis report for this chest xray image."
"""The generation prompt of R2GenGPT and AM-MRG."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Files that hold a tokenizer's vocabulary: fast (tokenizer.json), sentencepiece (Llama-2's
# tokenizer.model) or byte-level BPE (Qwen's vocab.json + merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _resolve_dtype(dtype: DType | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------------------------------
# Special tokens


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids that input building and generation need, read from a tokenizer.

    Attributes:
        pad: id used to fill padded positions (the tokenizer's pad, or its eos when it has no pad, as
            Llama-2's tokenizer has none). Padded positions are also masked, so its value never
            reaches the loss or the attention.
        eos: end of sequence; appended to every training report and stops generation.
        bos: beginning of sequence, or ``None`` for tokenizers without one (Qwen).
    """

    pad: int
    eos: int
    bos: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
        """Read pad, eos and bos from ``tokenizer``.

        Raises:
            ValueError: when the tokenizer has no eos token (a report could never end).
        """
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path or 'in memory'}) has no "
                "eos token: reports need one to end; set eos_token in its tokenizer_config.json"
            )
        pad = tokenizer.pad_token_id
        if pad is None:
            logger.info("tokenizer has no pad token; padding with its eos token (id %d)", eos)
            pad = eos
        return cls(pad=int(pad), eos=int(eos), bos=tokenizer.bos_token_id)


# --------------------------------------------------------------------------------------------------
# Building and loading the LLM


def load_causal_lm(
    path: str | Path,
    dtype: DType = "float32",
    attn_implementation: AttnImplementation = "sdpa",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face causal LM and its tokenizer from a local folder, offline.

    Args:
        path: folder written by ``save_pretrained`` (or a Hub snapshot copied to disk) holding
            ``config.json``, the weights and the tokenizer files.
        dtype: parameter dtype; the paper trains in bfloat16.
        attn_implementation: attention kernel passed to ``from_pretrained``.
        trust_remote_code: allow model code shipped inside the folder; off unless a recipe turns it on.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError: when the folder, its ``config.json`` or its tokenizer files are missing.
        ValueError: when the tokenizer has ids beyond the model's embedding table.
    """
    path = Path(path).expanduser()
    torch_dtype = _resolve_dtype(dtype)
    if not path.is_dir():
        raise FileNotFoundError(
            f"LLM folder '{path}' not found: expected a local folder with config.json, the model weights "
            f"and tokenizer files ({' or '.join(TOKENIZER_FILES)}), as written by save_pretrained; "
            "models are never downloaded at run time"
        )
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json is missing")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer file ({', '.join(TOKENIZER_FILES)})")
    if problems:
        raise FileNotFoundError(
            f"LLM folder '{path}' is incomplete: {'; '.join(problems)} "
            "(save the model and its tokenizer there with save_pretrained)"
        )
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    _check_vocab(model, tokenizer, str(path))
    logger.info(
        "loaded %s from %s (%s, %s attention): %d parameters",
        type(model).__name__,
        path,
        torch_dtype,
        attn_implementation,
        _count_parameters(model)[1],
    )
    return model, tokenizer


def _check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer whose ids would index past the model's embedding table."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
            "they do not belong together (or the embeddings were not resized after adding tokens)"
        )


def build_tiny_llm(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    family: Literal["llama", "qwen2"] = "llama",
    dtype: DType = "float32",
    max_position_embeddings: int = 1024,
    attn_implementation: AttnImplementation = "sdpa",
) -> PreTrainedModel:
    """Build a randomly initialised Llama or Qwen2 causal LM sized for tests and the demo.

    The vocabulary size and the pad, bos and eos ids come from ``tokenizer``; nothing is assumed
    about either family's usual ids. Seed with ``torch.manual_seed`` before calling for
    reproducible weights.

    Args:
        tokenizer: the tokenizer the model will read and write (e.g. from
            :func:`amrg.models.tokenizer.train_report_tokenizer`).
        hidden_size: model width H; the visual prefix must be projected to it.
        num_layers: decoder layers.
        num_heads: attention heads (also key/value heads); must divide ``hidden_size`` into an even
            head size (rotary embeddings rotate pairs).
        intermediate_size: MLP width.
        family: ``"llama"`` (``LlamaConfig``) or ``"qwen2"`` (``Qwen2Config``, the Qwen1.5 architecture).
        dtype: parameter dtype.
        max_position_embeddings: longest sequence (prompt + prefix + report).
        attn_implementation: attention kernel.

    Returns:
        The causal LM, in train mode.
    """
    torch_dtype = _resolve_dtype(dtype)
    if hidden_size < 1 or num_layers < 1 or num_heads < 1 or intermediate_size < 1:
        raise ValueError(
            f"hidden_size, num_layers, num_heads and intermediate_size must be >= 1, got {hidden_size}, "
            f"{num_layers}, {num_heads}, {intermediate_size}"
        )
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(
            f"hidden_size={hidden_size} must split into num_heads={num_heads} heads of even size "
            "(rotary position embeddings rotate pairs of channels)"
        )
    config_cls: type[PretrainedConfig]
    if family == "llama":
        config_cls = LlamaConfig
    elif family == "qwen2":
        config_cls = Qwen2Config
    else:
        raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model = model.to(torch_dtype)
    logger.info(
        "built a tiny %s causal LM: vocab %d, width %d, %d layers, %d parameters (%s)",
        family,
        len(tokenizer),
        hidden_size,
        num_layers,
        _count_parameters(model)[1],
        torch_dtype,
    )
    return model


# --------------------------------------------------------------------------------------------------
# Training modes


@dataclass
class LoRAConfig:
    """LoRA options for the LLM (peft). The defaults are R2GenGPT's and AM-MRG's."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the linear layers that get adapters (last component of the module name)."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            problems.append(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            problems.append(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            problems.append(
                f"lora.target_modules must be a non-empty list of module names, got {self.target_modules!r}"
            )
        if problems:
            raise ValueError("invalid LoRA options: " + "; ".join(problems))


def apply_lora(
    model: PreTrainedModel,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model in which only the adapter weights are trainable.

    Args:
        model: the causal LM.
        r: LoRA rank.
        alpha: LoRA scaling numerator (update scaled by alpha / r).
        dropout: dropout on the LoRA branch.
        target_modules: names of the linear layers to adapt.

    Returns:
        A ``peft.PeftModelForCausalLM``; the base weights are frozen.

    Raises:
        ValueError: for invalid options or target modules that the model does not have.
    """
    from peft import LoraConfig, get_peft_model  # peft is slow to import; only LoRA runs need it

    options = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=tuple(target_modules))
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    missing = [t for t in options.target_modules if t not in leaf_names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.target_modules {missing} not found in {type(model).__name__}; its linear layers are {linear}"
        )
    peft_config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 reads the model's `is_gradient_checkpointing`, which transformers 5 renamed (it warns
        # once per build; peft then only hooks the input embeddings to require grads, which is harmless)
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        peft_model = get_peft_model(model, peft_config)
    trainable, total = _count_parameters(peft_model)
    logger.info(
        "LoRA r=%d alpha=%s dropout=%s on %s: %d trainable of %d parameters",
        options.r,
        options.alpha,
        options.dropout,
        list(options.target_modules),
        trainable,
        total,
    )
    return peft_model


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` (the frozen-LLM mode); returns the same module.

    The train/eval mode is left alone: the caller decides whether dropout runs.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    logger.info("froze %s: %d parameters", type(model).__name__, _count_parameters(model)[1])
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Uses the Hugging Face switch (``activation_checkpointing_enable`` in transformers >= 5, else
    ``gradient_checkpointing_enable``) with ``use_reentrant=False``: the non-reentrant
    ``torch.utils.checkpoint`` passes gradients to the LoRA adapters and to the visual prefix even when
    no input of a checkpointed layer requires a gradient (the reentrant form needs
    ``enable_input_require_grads`` for that). Loss and gradients are unchanged; only each layer's input
    is kept, so the activations of the 7B LoRA stage 2 drop from ~7.1 MB to ~0.8 MB per token in bf16
    (estimate: ``benchmarks/stage2_memory.py``), for about one more forward pass.

    Transformers checkpoints only modules in train mode: amrg keeps a wholly frozen LLM
    (``llm_training="frozen"``) in eval mode, where this switch has no effect. With FSDP use this switch
    rather than the strategy's ``activation_checkpointing_policy`` (not both).

    Args:
        model: a Hugging Face causal LM, plain or peft-wrapped (the base model is switched).

    Returns:
        The same module.

    Raises:
        ValueError: when the architecture does not support gradient checkpointing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # A training forward needs no KV cache (transformers would drop it with a warning); generate_reports
    # asks for one explicitly.
    base.config.use_cache = False
    logger.info("gradient checkpointing on for %s (non-reentrant)", type(base).__name__)
    return model


# --------------------------------------------------------------------------------------------------
# Prompt


class ReportPrompt:
    """The generation prompt, split at the image placeholder into token ids.

    With a tokenizer that has a chat template (Qwen chat, Llama-2-chat), the prompt is one user turn
    rendered by ``apply_chat_template(..., add_generation_prompt=True)``. Without one (base models, the
    "llama" toy tokenizer), it is R2GenGPT's plain format::

        Human: <Img>{prefix}</Img> Generate a comprehensive ... chest xray image. \\nAssistant:

    In the plain format the ids before the prefix start with the special tokens the tokenizer itself
    puts in front of a sequence (``<s>`` for Llama, nothing for Qwen); a chat template writes its own.

    Args:
        tokenizer: the LLM's tokenizer.
        instruction: the request after the image.
        template: ``"auto"`` uses the chat template when the tokenizer has one, ``"chat"`` requires
            it, ``"plain"`` always uses the plain format.
        system_prompt: optional system turn for the chat format (ignored by the plain one).

    Attributes:
        text: the whole prompt text with :data:`IMAGE_PLACEHOLDER` where the prefix goes.
        before_ids: token ids before the prefix, [T_before].
        after_ids: token ids after the prefix, up to where the report starts, [T_after].
        special: pad / eos / bos ids of the tokenizer.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        instruction: str = DEFAULT_INSTRUCTION,
        template: Literal["auto", "chat", "plain"] = "auto",
        system_prompt: str | None = None,
    ) -> None:
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ValueError(
                f"template='chat' but tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has no "
                "chat_template; use template='plain' or 'auto'"
            )
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.template: Literal["chat", "plain"] = (
            "chat" if template == "chat" or (template == "auto" and has_chat) else "plain"
        )
        self.special = SpecialTokenIds.from_tokenizer(tokenizer)
        user = f"<Img>{IMAGE_PLACEHOLDER}</Img> {instruction}"
        if self.template == "chat":
            messages = [{"role": "user", "content": user}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            self.text: str = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            leading: list[int] = []  # the template writes its own bos, as apply_chat_template(tokenize=True)
        else:
            self.text = f"Human: {user} \nAssistant:"
            leading = self._leading_special_ids(tokenizer)
        if self.text.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(
                f"the rendered prompt must hold {IMAGE_PLACEHOLDER!r} exactly once, found "
                f"{self.text.count(IMAGE_PLACEHOLDER)} times in {self.text!r} (check the chat template)"
            )
        if (
            self.text.count(FINDINGS_PLACEHOLDER) > 1
            or FINDINGS_PLACEHOLDER in self.text.split(IMAGE_PLACEHOLDER)[0]
        ):
            raise ValueError(
                f"the prompt may hold {FINDINGS_PLACEHOLDER!r} at most once, after the image; got {self.text!r}"
            )
        before, after = self.text.split(IMAGE_PLACEHOLDER)
        after, _, tail = after.partition(FINDINGS_PLACEHOLDER)
        self.before_ids: list[int] = leading + self._encode(before)
        self.after_ids: list[int] = self._encode(after)
        self.has_findings: bool = FINDINGS_PLACEHOLDER in self.text
        """Whether the prompt writes each study's findings (at :data:`FINDINGS_PLACEHOLDER`)."""
        self.tail_ids: list[int] = self._encode(tail)
        """Token ids after the findings (empty without a findings placeholder)."""

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    @staticmethod
    def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The ids the tokenizer puts before the text of a single sequence (e.g. ``[bos]``)."""
        probe = "a"
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def encode_findings(self, findings: Sequence[str]) -> list[int]:
        """Token ids of one study's findings at the placeholder: the names, lower case, comma-separated
        (``"none"`` for no name)."""
        return self._encode(", ".join(name.lower() for name in findings) or "none")

    def encode_report(self, report: str, max_tokens: int) -> list[int]:
        """Token ids of a target report: at most ``max_tokens`` report tokens, then eos."""
        ids = self._encode(report.strip())[:max_tokens]
        return ids + [self.special.eos]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(template={self.template!r}, text={self.text!r})"


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class LLMInputs:
    """What the causal LM receives.

    Attributes:
        inputs_embeds: [B, T, H], in the dtype of the LLM's embeddings.
        attention_mask: [B, T] long, 1 on real positions and 0 on padding.
        labels: [B, T] long, the report token ids at report positions and :data:`IGNORE_INDEX`
            elsewhere (not shifted: the model shifts them); ``None`` for generation.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    labels: Tensor | None = None
    loss_positions: Tensor | None = None
    """[N] long: the flat indices into [B, T - 1] of the positions whose next token is a label (known on
    the host when the inputs are built, so :func:`report_loss` needs no data-dependent indexing)."""

    def as_model_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for ``model(...)`` or ``model.generate(...)``."""
        kwargs = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
        if self.labels is not None:
            kwargs["labels"] = self.labels
        return kwargs


def _check_prefix(prefix_embeds: Tensor, prefix_mask: Tensor | None, width: int) -> Tensor:
    """Validate the prefix and return its mask, [B, P] bool."""
    if prefix_embeds.ndim != 3:
        raise ValueError(f"prefix_embeds must be [B, P, H], got shape {tuple(prefix_embeds.shape)}")
    batch, length, hidden = prefix_embeds.shape
    if hidden != width:
        raise ValueError(
            f"prefix_embeds width {hidden} does not match the LLM embedding width {width} "
            "(project the visual tokens to the LLM hidden size)"
        )
    if prefix_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=prefix_embeds.device)
    if tuple(prefix_mask.shape) != (batch, length):
        raise ValueError(
            f"prefix_mask must be [B, P] = {(batch, length)} like prefix_embeds, got {tuple(prefix_mask.shape)}"
        )
    return prefix_mask.to(device=prefix_embeds.device, dtype=torch.bool)


def _assemble(
    embed_tokens: nn.Module,
    prompt: ReportPrompt,
    prefix_embeds: Tensor,
    prefix_mask: Tensor | None,
    report_ids: list[list[int]] | None,
    padding_side: Literal["left", "right"],
    findings_ids: list[list[int]] | None = None,
) -> LLMInputs:
    """Splice ``[before, prefix[valid], after, findings, tail, report]`` per sample and pad the batch."""
    device = prefix_embeds.device

    def embed(ids: Sequence[int]) -> Tensor:
        return embed_tokens(torch.tensor(list(ids), dtype=torch.long, device=device))  # [len, H]

    before = embed(prompt.before_ids)  # [T_before, H]
    after = embed(prompt.after_ids)  # [T_after, H]
    tail = embed(prompt.tail_ids)  # [T_tail, H]
    pad = embed([prompt.special.pad])  # [1, H]
    mask = _check_prefix(prefix_embeds, prefix_mask, pad.shape[-1])
    prefix = prefix_embeds.to(pad.dtype)  # [B, P, H]
    batch, hidden = prefix.shape[0], pad.shape[-1]
    if prompt.has_findings != (findings_ids is not None):
        raise ValueError(
            f"the prompt {'holds' if prompt.has_findings else 'has no'} {FINDINGS_PLACEHOLDER!r} but findings "
            f"were {'not ' if findings_ids is None else ''}given"
        )
    if findings_ids is not None and len(findings_ids) != batch:
        raise ValueError(f"got findings for {len(findings_ids)} studies for a prefix batch of {batch}")

    reports: Tensor | None = None
    if report_ids is not None:
        longest = max(len(ids) for ids in report_ids)
        padded = torch.full((batch, longest), prompt.special.pad, dtype=torch.long, device=device)
        for b, ids in enumerate(report_ids):
            padded[b, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        reports = embed_tokens(padded)  # [B, R, H]

    sequences, labels = [], []
    for b in range(batch):
        parts = [before, prefix[b][mask[b]], after]  # [T_before | P_b | T_after, H]
        if findings_ids is not None:
            parts += [embed(findings_ids[b]), tail]  # [F_b | T_tail, H]
        label = [IGNORE_INDEX] * sum(p.shape[0] for p in parts)
        if reports is not None and report_ids is not None:
            parts.append(reports[b, : len(report_ids[b])])  # [R_b, H]
            label += report_ids[b]
        sequences.append(torch.cat(parts, dim=0))  # [T_b, H]
        labels.append(label)
    total = max(s.shape[0] for s in sequences)

    embeds, attention, targets = [], [], []
    for seq, label in zip(sequences, labels):
        n_pad = total - seq.shape[0]
        fill = pad.expand(n_pad, hidden)  # [n_pad, H]
        ones, zeros = [1] * seq.shape[0], [0] * n_pad
        if padding_side == "right":
            embeds.append(torch.cat([seq, fill], dim=0))
            attention.append(ones + zeros)
            targets.append(label + [IGNORE_INDEX] * n_pad)
        else:
            embeds.append(torch.cat([fill, seq], dim=0))
            attention.append(zeros + ones)
            targets.append([IGNORE_INDEX] * n_pad + label)
    positions = None
    if report_ids is not None:  # position t predicts token t + 1
        flat = [
            b * (total - 1) + t
            for b, row in enumerate(targets)
            for t in range(total - 1)
            if row[t + 1] != IGNORE_INDEX
        ]
        positions = torch.tensor(flat, dtype=torch.long, device=device)  # [N]
    return LLMInputs(
        inputs_embeds=torch.stack(embeds),  # [B, T, H]
        attention_mask=torch.tensor(attention, dtype=torch.long, device=device),  # [B, T]
        labels=torch.tensor(targets, dtype=torch.long, device=device) if report_ids is not None else None,
        loss_positions=positions,
    )


def build_inputs(
    embed_tokens: nn.Module,
    prompt: ReportPrompt,
    prefix_embeds: Tensor,
    reports: Sequence[str],
    max_report_tokens: int = 100,
    prefix_mask: Tensor | None = None,
    findings: Sequence[Sequence[str]] | None = None,
) -> LLMInputs:
    """Build right-padded training inputs with the loss on report tokens (and eos) only.

    Each sample is ``[prompt before, prefix, prompt after, report tokens, eos]`` (with a findings
    placeholder in the prompt, ``prompt after`` holds the study's findings); labels are
    :data:`IGNORE_INDEX` on the prompt, the prefix and the padding.

    Args:
        embed_tokens: the LLM's input embedding (``model.get_input_embeddings()``).
        prompt: the prompt, built on the LLM's tokenizer.
        prefix_embeds: visual prefix in the LLM width, [B, P, H]; cast to the embedding dtype.
        reports: target reports, one per sample.
        max_report_tokens: report tokens kept before eos (the paper: 60 for IU X-ray, 100 otherwise).
        prefix_mask: optional [B, P] bool, False on prefix slots to drop (e.g. a missing view).
        findings: the names written at the prompt's :data:`FINDINGS_PLACEHOLDER`, one list per sample;
            required exactly when the prompt holds it.

    Returns:
        :class:`LLMInputs` with inputs_embeds [B, T, H], attention_mask [B, T] and labels [B, T].
    """
    if len(reports) != prefix_embeds.shape[0]:
        raise ValueError(f"got {len(reports)} reports for a prefix batch of {prefix_embeds.shape[0]}")
    if max_report_tokens < 1:
        raise ValueError(f"max_report_tokens must be >= 1, got {max_report_tokens}")
    report_ids = [prompt.encode_report(r, max_report_tokens) for r in reports]
    return _assemble(
        embed_tokens, prompt, prefix_embeds, prefix_mask, report_ids, "right", _findings_ids(prompt, findings)
    )


def _findings_ids(prompt: ReportPrompt, findings: Sequence[Sequence[str]] | None) -> list[list[int]] | None:
    return None if findings is None else [prompt.encode_findings(names) for names in findings]


def build_generation_inputs(
    embed_tokens: nn.Module,
    prompt: ReportPrompt,
    prefix_embeds: Tensor,
    prefix_mask: Tensor | None = None,
    findings: Sequence[Sequence[str]] | None = None,
) -> LLMInputs:
    """Build left-padded generation inputs ``[prompt before, prefix, prompt after]``.

    Left padding puts every prompt's last token in the last column, so a batch of prompts of
    different lengths continues from the right place; ``generate`` derives position ids from the
    attention mask.

    Args:
        embed_tokens: the LLM's input embedding (``model.get_input_embeddings()``).
        prompt: the prompt, built on the LLM's tokenizer.
        prefix_embeds: visual prefix in the LLM width, [B, P, H].
        prefix_mask: optional [B, P] bool, False on prefix slots to drop.
        findings: as in :func:`build_inputs`.

    Returns:
        :class:`LLMInputs` with inputs_embeds [B, T, H], attention_mask [B, T] and no labels.
    """
    return _assemble(
        embed_tokens, prompt, prefix_embeds, prefix_mask, None, "left", _findings_ids(prompt, findings)
    )


# --------------------------------------------------------------------------------------------------
# Training loss


def report_loss(model: nn.Module, inputs: LLMInputs) -> Tensor:
    """Mean next-token cross-entropy over the labelled (report) positions: ``model(**inputs).loss``.

    The output layer runs only at the positions that predict a label, not over the prefix and prompt as the
    model's own forward does (its loss then discards them). The value is the same as transformers'
    (logits upcast to float32, the mean over the labelled tokens); the work saved is the vocabulary
    projection of every unlabelled position (about half of them at the paper's and the demo's lengths):
    little compute (~2 % of a 7B step's FLOPs), but at 7B the [B, T, V] float32 logits of the prefix and
    prompt (~0.1 GB at batch 8) are never made.

    Args:
        model: the causal LM (plain or peft-wrapped); one without ``get_decoder`` / ``get_output_embeddings``
            is called whole.
        inputs: :func:`build_inputs`' output, with labels.
    """
    if inputs.labels is None:
        raise ValueError("report_loss needs inputs with labels (build_inputs)")
    lm = causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is lm:
        return model(**inputs.as_model_kwargs()).loss
    hidden = decoder(
        inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=False
    ).last_hidden_state  # [B, T, H]
    targets = inputs.labels[:, 1:].to(hidden.device)  # position t predicts token t + 1: [B, T - 1]
    positions = inputs.loss_positions
    if positions is None:
        positions = (targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # [N]
    positions = positions.to(hidden.device)
    picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [N, H]
    logits = head(picked).float()  # [N, V]
    return nn.functional.cross_entropy(logits, targets.reshape(-1).index_select(0, positions))


@contextmanager
def token_offset(model: nn.Module, offset: Tensor | None) -> Iterator[None]:
    """Inside the block, add one vector per sample to every token ``model`` embeds as a batch.

    A conditioning path that needs no attention: the vector is part of each report token's input, in
    training (:func:`build_inputs` embeds the reports as one [B, R] batch) and in generation (``generate``
    embeds each new token as [B * beams, 1], a sample's beams in consecutive rows). Embeddings of another
    rank (the prompt's shared pieces, [T, H]) are left as they are.

    Args:
        model: the causal LM (plain or peft-wrapped); its ``get_input_embeddings()`` is hooked.
        offset: [B, H] in the embedding width, or None (nothing changes).

    Raises:
        ValueError: (inside the block) a batch of embeddings whose size is not a multiple of B.
    """
    if offset is None:
        yield
        return
    samples = offset.shape[0]

    def add(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        if out.dim() != 3:
            return None
        if out.shape[0] % samples:
            raise ValueError(f"embedded a batch of {out.shape[0]} rows for an offset of {samples} samples")
        rows = offset.to(out.dtype).repeat_interleave(out.shape[0] // samples, dim=0)  # [B * k, H]
        return out + rows.unsqueeze(1)

    handle = model.get_input_embeddings().register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate_reports(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    num_beams: int = 3,
    repetition_penalty: float = 2.0,
    length_penalty: float = 2.0,
    min_new_tokens: int = 40,
    max_new_tokens: int = 100,
    cache: CacheKind = "dynamic",
    compile: CompileMode = "off",
) -> list[str]:
    """Write one report per prompt with deterministic (beam or greedy) search.

    The defaults are the paper's IU X-ray settings (beam 3, repetition penalty 2.0, length penalty
    2.0, 40-100 new tokens); MIMIC-CXR and CheXpert Plus use 80-120 new tokens. The model is put in
    eval mode for the call (so LoRA dropout cannot make it random) and restored afterwards.

    Args:
        model: the causal LM (plain or peft-wrapped).
        tokenizer: its tokenizer; eos and pad come from it.
        inputs_embeds: left-padded prompts, [B, T, H] (see :func:`build_generation_inputs`).
        attention_mask: [B, T], 0 on the left padding.
        num_beams: beams per prompt; 1 is greedy.
        repetition_penalty: penalty on tokens already generated (the prompt is embeddings, so it is
            not penalised, as in the reference code).
        length_penalty: exponent on the length in beam scores; unused when ``num_beams == 1``.
        min_new_tokens: eos is blocked before this many tokens.
        max_new_tokens: upper bound on generated tokens.
        cache: ``"dynamic"`` (a KV cache that grows) or ``"static"`` (preallocated for the prompt and
            ``max_new_tokens``: fixed shapes); the reports are the same.
        compile: ``"off"``, or a ``torch.compile`` mode for the decode steps (needs ``cache="static"``;
            see :mod:`amrg.models.decoding`); the reports are the same.

    Returns:
        ``B`` decoded reports, special tokens removed, whitespace stripped.
    """
    problems = check_fast_path(cache, compile)
    if problems:
        raise ValueError("; ".join(problems))
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 0 <= min_new_tokens <= max_new_tokens or max_new_tokens < 1:
        raise ValueError(
            f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
            f"min_new_tokens={min_new_tokens}, max_new_tokens={max_new_tokens}"
        )
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    options: dict[str, object] = {
        "do_sample": False,
        "num_beams": num_beams,
        # Our own repetition-penalty processor, not generate's: given inputs_embeds, transformers 5 skips
        # each row's left-padding length of *generated* tokens (its prompt_ignore_length assumes the prompt
        # ids are in the history, which inputs_embeds are not), so a report depended on the other prompts
        # in its batch (batch size, DDP sharding). Ours penalises every generated token of every row.
        "repetition_penalty": 1.0,
        "logits_processor": LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty != 1.0 else []
        ),
        "min_new_tokens": min_new_tokens,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "use_cache": True,  # required by transformers to continue from inputs_embeds
        # transformers compiles a static cache's greedy loop on accelerators by itself; compile is ours
        "disable_compile": True,
    }
    if cache == "static":
        options["cache_implementation"] = "static"
    if num_beams > 1:
        options["length_penalty"] = length_penalty
    was_training = model.training
    model.eval()
    try:
        with compiled_decode(model, compile):
            sequences = model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **options)
    finally:
        model.train(was_training)
    # Decoder-only generate() with inputs_embeds returns only the new tokens, [B, new].
    return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]
