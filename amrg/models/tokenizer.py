"""Byte-level BPE tokenizers trained on report text, for tiny offline LLMs.

The demo, the tiny recipes and the tests cannot download Llama-2 or Qwen1.5, so they train a
small byte-level BPE on the training reports and pair it with a randomly initialised causal LM
(:func:`amrg.models.llm.build_tiny_llm`). Two special-token styles copy the conventions of the two
LLM families the paper uses (AM-MRG, Wang et al., 2025, "Activating Associative Disease-Aware Vision
Token Memory for LLM-Based X-ray Report Generation", https://arxiv.org/abs/2501.03458), so that every
code path that reads pad/bos/eos from a tokenizer is exercised with both:

* ``"llama"``: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 at the start of the vocabulary, a ``<s>``
  prepended to every encoded sequence (``add_bos_token``), no chat template. There is no dedicated pad
  token: pad is ``<unk>``, as Llama-2 setups do (R2GenGPT and the AM-MRG code set ``pad_token_id = 0``,
  which is ``<unk>``). Nothing in amrg relies on pad being distinct: padding is found from lengths and
  attention masks, never by comparing token ids with the pad id.
* ``"qwen"``: no bos, eos = pad = ``<|endoftext|>``, chat markers ``<|im_start|>`` / ``<|im_end|>``,
  all three at the END of the vocabulary (as in Qwen1.5), and a ChatML ``chat_template``.

Only the ``tokenizers`` library and ``transformers.PreTrainedTokenizerFast`` are used; the result is a
plain Hugging Face tokenizer folder that ``AutoTokenizer.from_pretrained(out_dir)`` loads offline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from amrg.errors import ConfigError, InputError, writing

__all__ = ["CHATML_TEMPLATE", "TokenizerStyle", "train_report_tokenizer"]

logger = logging.getLogger(__name__)

TokenizerStyle = Literal["llama", "qwen"]

# ChatML, the format of Qwen1.5 chat models (without Qwen's default system message, which a report
# tokenizer has no use for).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_BYTE_ALPHABET = 256


def _non_empty(reports: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Yield the stripped, non-empty reports, counting them in ``counter[0]``."""
    for i, report in enumerate(reports):
        if not isinstance(report, str):
            raise InputError(f"report #{i} is a {type(report).__name__}, expected str")
        report = report.strip()
        if report:
            counter[0] += 1
            yield report


def _portable_tokenizer_class(config_file: Path) -> None:
    """Name the generic fast tokenizer class in ``tokenizer_config.json``.

    transformers 5 writes its internal ``TokenizersBackend``, which transformers 4 cannot resolve;
    ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in both.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def train_report_tokenizer(
    reports: Iterable[str],
    out_dir: Path,
    vocab_size: int = 2000,
    style: TokenizerStyle = "llama",
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on report text and save it as a Hugging Face tokenizer folder.

    Args:
        reports: training-split report texts (already cleaned). Use the train split only, so the
            vocabulary never sees evaluation reports.
        out_dir: folder to write ``tokenizer.json``, ``tokenizer_config.json`` and the special-token
            files into; created if missing.
        vocab_size: upper bound on the vocabulary, special tokens included. Training stops earlier
            when no pair reaches ``min_frequency``, so small corpora give smaller vocabularies.
        style: special-token conventions to copy, ``"llama"`` or ``"qwen"`` (see the module docstring).
        min_frequency: a pair must occur this many times to be merged.
        model_max_length: the longest sequence the tokenizer reports as supported.

    Returns:
        The trained tokenizer, as ``AutoTokenizer.from_pretrained(out_dir)`` would load it.

    Raises:
        ConfigError: an unknown style, a vocabulary too small for the byte alphabet, ``min_frequency`` < 1.
        InputError: no non-empty report.
        OutputError: ``out_dir`` cannot be written.
    """
    if style not in ("llama", "qwen"):
        raise ConfigError(f"style must be 'llama' or 'qwen', got {style!r}")
    specials = _LLAMA_SPECIALS if style == "llama" else _QWEN_SPECIALS
    if vocab_size < _BYTE_ALPHABET + len(specials) + 1:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs the {_BYTE_ALPHABET} byte "
            f"tokens, {len(specials)} special tokens and at least one merge"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be >= 1, got {min_frequency}")

    # Llama keeps its specials at ids 0..2, Qwen appends them after the BPE vocabulary.
    leading = list(specials) if style == "llama" else []
    bpe_size = vocab_size if style == "llama" else vocab_size - len(specials)
    tok = Tokenizer(models.BPE(unk_token="<unk>" if style == "llama" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=min_frequency,
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = [0]
    tok.train_from_iterator(_non_empty(reports, counter), trainer=trainer)
    if counter[0] == 0:
        raise InputError(f"no non-empty report to train the tokenizer for {out_dir} on")
    if style == "qwen":
        tok.add_special_tokens(list(specials))

    if style == "llama":
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<unk>",  # Llama-2 has no pad token; see the module docstring
            add_bos_token=True,
            add_eos_token=False,
            model_max_length=model_max_length,
            clean_up_tokenization_spaces=False,
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
            model_max_length=model_max_length,
            clean_up_tokenization_spaces=False,
        )
        hf.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    with writing(out_dir, "tokenizer folder"):
        out_dir.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
        _portable_tokenizer_class(out_dir / "tokenizer_config.json")
    # Hand back what every later run will see: the folder as AutoTokenizer loads it.
    loaded = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    logger.info(
        "trained a %s-style byte-level BPE tokenizer on %d reports: %d tokens, saved to %s",
        style,
        counter[0],
        len(loaded),
        out_dir,
    )
    return loaded
