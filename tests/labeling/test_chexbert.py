"""Tests for amrg.labeling.chexbert: CheXbert's net, checkpoint reader and labeler on a tiny BERT."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from amrg.labeling.chexbert import (
    CheXbertLabeler,
    CheXbertNet,
    _wordpiece_from_vocab,
    load_chexbert_state_dict,
)
from amrg.labels import NUM_LABELS

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "no",
    "pleural",
    "effusion",
    "heart",
    "size",
    "is",
    "normal",
    "mild",
    "cardio",
    "##megaly",
    ".",
    ",",
]


def tiny_chexbert(tmp_path, prefix: str = "module.", extra: dict | None = None, drop: str | None = None):
    """Write a tiny CheXbert checkpoint (f1chexbert layout), config and vocab; return the paths and net."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config.save_pretrained(tmp_path / "config")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    net = CheXbertNet(BertModel(config, add_pooling_layer=True))
    with torch.no_grad():
        # Head i predicts class i % n_classes whatever the input: a known answer to check the mapping.
        for i, head in enumerate(net.linear_heads):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[i % head.out_features] = 5.0
    state = {prefix + k: v for k, v in net.state_dict().items()}
    state.update(extra or {})
    if drop is not None:
        del state[prefix + drop]
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "chexbert.pth")
    return tmp_path / "chexbert.pth", tmp_path / "vocab.txt", tmp_path / "config", net


def test_chexbert_labeler_maps_classes(tmp_path) -> None:
    # CheXbert's older checkpoints also hold the position_ids buffer; it is accepted.
    ckpt, vocab, config, _ = tiny_chexbert(
        tmp_path, extra={"module.bert.embeddings.position_ids": torch.arange(64)[None]}
    )
    lab = CheXbertLabeler(checkpoint=ckpt, tokenizer=vocab, config=config, batch_size=2, max_length=32)
    # Classes 0 blank, 1 positive, 2 negative, 3 uncertain; No Finding (head 13) 13 % 2 = 1 positive.
    expected = [[None, 1, 0, -1][i % 4] for i in range(13)] + [1]
    reports = ["No pleural effusion.", "Mild cardiomegaly, heart size is normal. " * 30, "", None]
    rows = lab.label_batch(reports)
    assert rows[:2] == [expected, expected]
    assert rows[2] == rows[3] == [None] * NUM_LABELS  # empty reports: no labels, as the rule labeler
    assert lab.label("normal heart size") == expected
    t = lab(reports)
    assert t.shape == (4, NUM_LABELS) and math.isnan(t[0, 0]) and t[0, 1] == 1 and torch.isnan(t[3]).all()


def test_chexbert_labeler_matches_the_net(tmp_path) -> None:
    ckpt, vocab, config, _ = tiny_chexbert(tmp_path)
    # Random heads this time: the labeler must give the argmax of the net it loaded.
    state = load_chexbert_state_dict(ckpt)
    torch.manual_seed(1)
    for k in [k for k in state if k.startswith("linear_heads")]:
        state[k] = torch.randn_like(state[k])
    torch.save(state, tmp_path / "bare.pth")  # a bare state dict without "module." works too
    lab = CheXbertLabeler(checkpoint=tmp_path / "bare.pth", tokenizer=vocab, config=config / "config.json")
    assert isinstance(lab.net, CheXbertNet)
    enc = lab.tokenizer(["No pleural effusion."], return_tensors="pt")
    with torch.no_grad():
        logits = lab.net(enc["input_ids"], enc["attention_mask"])
    want = [[None, 1, 0, -1][int(lg.argmax())] for lg in logits]
    assert lab.label("No pleural effusion.") == want


def test_chexbert_loading_is_strict_and_loud(tmp_path) -> None:
    ckpt, vocab, config, _ = tiny_chexbert(
        tmp_path, drop="linear_heads.13.bias", extra={"module.classifier.weight": torch.zeros(2)}
    )
    with pytest.raises(
        ValueError,
        match=r"missing keys \['linear_heads.13.bias'\].*unexpected keys "
        r"\['classifier.weight'\]",
    ):
        CheXbertLabeler(checkpoint=ckpt, tokenizer=vocab, config=config)
    ckpt, vocab, config, _ = tiny_chexbert(tmp_path)
    other = tmp_path / "other.json"
    cfg = json.loads((config / "config.json").read_text())
    cfg["hidden_size"], cfg["intermediate_size"] = 8, 16
    other.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mis-shaped keys"):
        CheXbertLabeler(checkpoint=ckpt, tokenizer=vocab, config=other)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        CheXbertLabeler(checkpoint=tmp_path / "nope.pth", tokenizer=vocab, config=config)
    # A tokenizer folder (save_pretrained layout) works like the vocab file.
    from transformers import BertTokenizerFast

    _wordpiece_from_vocab(BertTokenizerFast, vocab).save_pretrained(tmp_path / "tok")
    lab = CheXbertLabeler(checkpoint=ckpt, tokenizer=tmp_path / "tok", config=config)
    assert lab.tokenizer.convert_tokens_to_ids("effusion") == VOCAB.index("effusion")


def test_unreadable_weights_give_one_line_naming_the_file(tmp_path) -> None:
    ckpt, vocab, config, _ = tiny_chexbert(tmp_path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ckpt.read_bytes()[:100])  # an interrupted download
    html = tmp_path / "page.pth"
    html.write_text("<html>404 Not Found</html>")  # an error page saved as weights
    for bad in (truncated, html):
        with pytest.raises(ValueError, match=re.escape(f"CheXbert checkpoint {bad}: cannot be read")) as err:
            CheXbertLabeler(checkpoint=bad, tokenizer=vocab, config=config)
        assert "\n" not in str(err.value)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: expected a state dict of tensors"):
        load_chexbert_state_dict(tmp_path / "list.pth")


def test_name_says_which_weights(tmp_path) -> None:
    ckpt, vocab, config, _ = tiny_chexbert(tmp_path)
    lab = CheXbertLabeler(checkpoint=ckpt, tokenizer=vocab, config=config)
    assert lab.name == "chexbert:chexbert.pth"
