"""Tests for amrg.labeling.build: build_labeler by name, its name attribute, and its errors."""

from __future__ import annotations

import re

import pytest

from amrg.labeling import CheXbertLabeler, CheXpertLabeler, build_labeler
from amrg.labels import label_index
from tests.labeling.test_chexbert import tiny_chexbert


def test_chexpert_is_the_default() -> None:
    lab = build_labeler()
    assert isinstance(lab, CheXpertLabeler) and lab.name == "chexpert-rules"
    assert lab.label("No pleural effusion.")[label_index("Pleural Effusion")] == 0
    assert build_labeler("chexpert").name == "chexpert-rules"


def test_chexpert_name_says_what_differs(tmp_path) -> None:
    assert (
        CheXpertLabeler(match="substring", pre_window=4).name == "chexpert-rules:match=substring,pre_window=4"
    )
    from amrg.labeling import DEFAULT_PHRASES

    mine = tmp_path / "mine.json"
    mine.write_text(DEFAULT_PHRASES.read_text())
    assert CheXpertLabeler(phrases=mine).name == "chexpert-rules:phrases=mine.json"
    assert CheXpertLabeler(phrases=DEFAULT_PHRASES).name == "chexpert-rules"


def test_chexbert_finds_tokenizer_and_config_beside_the_weights(tmp_path) -> None:
    ckpt, vocab, config, _ = tiny_chexbert(tmp_path)
    (tmp_path / "config.json").write_text((config / "config.json").read_text())  # next to chexbert.pth
    lab = build_labeler("chexbert", chexbert_weights=ckpt, batch_size=2)
    assert isinstance(lab, CheXbertLabeler) and lab.name == "chexbert:chexbert.pth"
    assert lab.batch_size == 2 and lab.net.bert.config.hidden_size == 16
    explicit = build_labeler(
        "chexbert", chexbert_weights=ckpt, chexbert_tokenizer=vocab, chexbert_config=config
    )
    assert explicit.label("no pleural effusion") == lab.label("no pleural effusion")


def test_errors_are_one_line_naming_the_file_or_option(tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"labeler 'bert' is unknown; expected one of \['chexpert', 'chexbert'\]"
    ):
        build_labeler("bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labeler 'chexbert' needs its weights: set chexbert_weights"):
        build_labeler("chexbert")
    with pytest.raises(ValueError, match="labeler 'chexpert' takes no chexbert_weights"):
        build_labeler("chexpert", chexbert_weights=tmp_path / "chexbert.pth")
    missing = tmp_path / "nope" / "chexbert.pth"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"CheXbert weights {missing} not found (set chexbert_weights)")
    ):
        build_labeler("chexbert", chexbert_weights=missing)
    with pytest.raises(FileNotFoundError, match="is a folder, not a file"):
        build_labeler("chexbert", chexbert_weights=tmp_path)
    ckpt, vocab, config, _ = tiny_chexbert(tmp_path)
    vocab.unlink()  # no tokenizer beside the weights
    with pytest.raises(FileNotFoundError, match="has no vocab.txt or tokenizer.json .set chexbert_tokenizer"):
        build_labeler("chexbert", chexbert_weights=ckpt)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"CheXbert checkpoint {broken}: cannot be read")) as err:
        build_labeler(
            "chexbert", chexbert_weights=broken, chexbert_tokenizer=tmp_path, chexbert_config=config
        )
    assert "\n" not in str(err.value)
