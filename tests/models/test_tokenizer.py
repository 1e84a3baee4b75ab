"""Tests for amrg.models.tokenizer: byte-level BPE report tokenizers in Llama and Qwen styles."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from amrg.models.tokenizer import train_report_tokenizer

_PHRASES = (
    "the heart is normal in size.",
    "the mediastinum is unremarkable.",
    "the lungs are clear.",
    "there is no pleural effusion.",
    "no pneumothorax is seen.",
    "mild cardiomegaly is present.",
    "small left pleural effusion.",
    "right lower lobe opacity may represent atelectasis.",
    "degenerative changes of the thoracic spine.",
    "a dual-lead pacemaker is in place.",
)


def toy_reports(n: int = 50, seed: int = 0) -> list[str]:
    """``n`` short reports of 2-4 phrases, the same for a given seed."""
    rng = random.Random(seed)
    return [" ".join(rng.sample(_PHRASES, rng.randint(2, 4))) for _ in range(n)]


@pytest.mark.parametrize("style", ["llama", "qwen"])
def test_trained_tokenizer_reloads_with_autotokenizer(tmp_path: Path, style: str) -> None:
    trained = train_report_tokenizer(toy_reports(), tmp_path / style, vocab_size=2000, style=style)
    assert (tmp_path / style / "tokenizer.json").is_file()
    config = json.loads((tmp_path / style / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4 and 5

    tok = AutoTokenizer.from_pretrained(tmp_path / style)
    assert len(tok) == len(trained)
    # 256 byte tokens + 3 specials + merges; 50 reports of 10 phrases stop well short of 2000.
    assert 259 < len(tok) < 2000
    text = "mild cardiomegaly. no pneumothorax is seen."
    assert tok(text).input_ids == trained(text).input_ids
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    # Bytes outside the training text still round-trip (byte-level BPE has no unknowns).
    assert tok.decode(tok("éz 5%").input_ids, skip_special_tokens=True) == "éz 5%"
    # Frequent words become single tokens (byte-level BPE keeps the leading space in the token).
    assert len(tok(" pleural", add_special_tokens=False).input_ids) == 1


def test_llama_style_special_tokens(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(
        train_report_tokenizer(toy_reports(), tmp_path, style="llama").name_or_path
    )
    # Llama-2 layout: <unk>=0, <s>=1, </s>=2; pad is <unk> (see the module docstring).
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    ids = tok("the lungs are clear.").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    assert not tok.chat_template


def test_qwen_style_special_tokens(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(
        train_report_tokenizer(toy_reports(), tmp_path, style="qwen").name_or_path
    )
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    # Qwen keeps its specials at the end of the vocabulary, after the BPE tokens.
    n = len(tok)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [n - 3, n - 2, n - 1]
    ids = tok("the lungs are clear.").input_ids
    assert all(i < n - 3 for i in ids)  # nothing added around the text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    # The chat markers are single special tokens, dropped when decoding.
    marked = tok(chat, add_special_tokens=False).input_ids
    assert marked.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert tok.decode(marked, skip_special_tokens=True) == "user\nhello\nassistant\n"


def test_styles_differ_in_special_ids(tmp_path: Path) -> None:
    llama = train_report_tokenizer(toy_reports(), tmp_path / "l", style="llama")
    qwen = train_report_tokenizer(toy_reports(), tmp_path / "q", style="qwen")
    assert llama.pad_token_id != qwen.pad_token_id
    assert llama.eos_token_id != qwen.eos_token_id
    assert llama.bos_token_id is not None and qwen.bos_token_id is None


def test_accepts_a_generator_and_skips_blank_reports(tmp_path: Path) -> None:
    reports = (r for r in toy_reports(20) + ["", "   "])
    tok = train_report_tokenizer(reports, tmp_path, vocab_size=400, style="llama")
    assert len(tok) <= 400


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 200}, "vocab_size=200 is too small"),
        ({"style": "gpt2"}, "style must be"),
        ({"reports": ["", " "]}, "no non-empty report"),
        ({"reports": ["ok", 3]}, "report #1 is a int"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"reports": toy_reports(5), "out_dir": tmp_path} | kwargs
    with pytest.raises(ValueError, match=match):
        train_report_tokenizer(**args)
