"""Tests for amrg.memory.bank: round trip, sampling, and every load-time rejection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from amrg.labels import LABELS
from amrg.memory.bank import FORMAT_VERSION, MemoryBank, check_no_leakage

DIM = 8
# Patterns per label for the test bank: 7, 14, ..., 35 for the first five labels, the rest empty.
COUNTS = {label: 7 * (i + 1) for i, label in enumerate(LABELS[:5])}


def _records(label: str, n: int, prefix: str = "train") -> list[dict]:
    return [
        {
            "source_id": f"{prefix}-{LABELS.index(label):02d}-{j}",
            "split": "train",
            "box": [0, 0, 16, 16],
            "view": j % 2,
        }
        for j in range(n)
    ]


def _bank(
    kind: str = "visual", dtype: torch.dtype = torch.float32, counts: dict[str, int] = COUNTS
) -> MemoryBank:
    generator = torch.Generator().manual_seed(0)
    bank = MemoryBank(kind, DIM, metadata={"seed": 0, "encoder": "tiny-swin"})
    for label, n in counts.items():
        bank.add(label, torch.randn(n, DIM, generator=generator).to(dtype), _records(label, n))
    return bank


def _edit_json(stem: Path, edit) -> None:
    path = stem.with_name(stem.name + ".json")
    header = json.loads(path.read_text())
    edit(header)
    path.write_text(json.dumps(header))


# ---------------------------------------------------------------------------- contents


def test_contents_and_accessors() -> None:
    bank = _bank()
    assert len(bank) == sum(COUNTS.values()) == 105
    assert bank.counts() == {label: COUNTS.get(label, 0) for label in LABELS}
    assert list(bank.counts()) == list(LABELS)
    assert bank.features("Edema").shape == (35, DIM)
    assert bank.features("Fracture").shape == (0, DIM)
    records = bank.provenance("Cardiomegaly")
    assert len(records) == 14 and records[0]["label"] == "Cardiomegaly" and records[0]["split"] == "train"
    assert "train-01-3" in bank.ids() and len(bank.ids()) == 105
    records[0]["source_id"] = "changed"  # provenance() hands out copies
    assert bank.provenance("Cardiomegaly")[0]["source_id"] == "train-01-0"


def test_stacked_concatenates_in_label_order() -> None:
    bank = _bank()
    patterns, label_index, records = bank.stacked()
    assert patterns.shape == (105, DIM) and label_index.dtype == torch.long and len(records) == 105
    assert torch.equal(
        label_index, torch.repeat_interleave(torch.arange(5), torch.tensor([7, 14, 21, 28, 35]))
    )
    assert torch.equal(patterns[7:21], bank.features("Cardiomegaly"))
    assert [r["label"] for r in records] == [LABELS[i] for i in label_index.tolist()]
    empty = MemoryBank("report", DIM).stacked()
    assert empty[0].shape == (0, DIM) and empty[1].shape == (0,) and empty[2] == []


def test_stacked_patterns_feed_a_retriever() -> None:
    from amrg.models.retrievers import HopfieldRetriever

    patterns, _, _ = _bank().stacked()
    retriever = HopfieldRetriever(16, patterns, num_heads=2, hidden_size=8).eval()
    assert retriever.memory_dim == DIM and retriever.num_memories == 105
    assert retriever(torch.randn(2, 14, 16)).shape == (2, 14, 16)


def test_add_rejects_bad_input_naming_label_and_row() -> None:
    bank = MemoryBank("visual", DIM)
    with pytest.raises(ValueError, match="unknown label 'Flu'"):
        bank.add("Flu", torch.randn(1, DIM), _records("Edema", 1))
    with pytest.raises(ValueError, match=r"label 'Edema': expected features \[n, 8\] \(dim\), got \[2, 4\]"):
        bank.add("Edema", torch.randn(2, 4), _records("Edema", 2))
    with pytest.raises(ValueError, match="label 'Edema': 3 feature rows but 2 provenance records"):
        bank.add("Edema", torch.randn(3, DIM), _records("Edema", 2))
    for bad_value in (float("nan"), float("inf")):
        features = torch.randn(4, DIM)
        features[2, 5] = bad_value
        with pytest.raises(ValueError, match=r"label 'Edema': NaN/Inf in feature rows \[2\]"):
            bank.add("Edema", features, _records("Edema", 4))
    with pytest.raises(
        ValueError, match=r"label 'Edema' provenance row 1: needs string field\(s\) \['split'\]"
    ):
        bank.add("Edema", torch.randn(2, DIM), [{"source_id": "a", "split": "train"}, {"source_id": "b"}])
    with pytest.raises(ValueError, match="row 0: record says label 'Cardiomegaly'"):
        bank.add(
            "Edema", torch.randn(1, DIM), [{"source_id": "a", "split": "train", "label": "Cardiomegaly"}]
        )
    with pytest.raises(ValueError, match="row 0: not JSON-serialisable"):
        bank.add("Edema", torch.randn(1, DIM), [{"source_id": "a", "split": "train", "box": torch.zeros(4)}])
    with pytest.raises(ValueError, match="must be one of"):
        bank.add("Edema", torch.randn(1, DIM, dtype=torch.float64), _records("Edema", 1))
    bank.add("Edema", torch.randn(1, DIM), _records("Edema", 1))
    with pytest.raises(ValueError, match="features are bfloat16 but the bank holds float32"):
        bank.add("Edema", torch.randn(1, DIM).bfloat16(), _records("Edema", 1))
    assert len(bank) == 1  # nothing half-added by the failures
    with pytest.raises(ValueError, match="kind must be one of"):
        MemoryBank("textual", DIM)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        MemoryBank("visual", DIM, metadata={"t": torch.zeros(1)})


# ---------------------------------------------------------------------------- sampling


def test_sample_is_label_proportional_with_exact_sum() -> None:
    bank = _bank()
    # Weights 7:14:21:28:35 (sum 105); total 20 gives exact shares 1.33, 2.67, 4, 5.33, 6.67 ->
    # floors 1, 2, 4, 5, 6 (18) and the two largest remainders (.67, .67) get +1: 1, 3, 4, 5, 7.
    assert list(bank.sample(total=20, seed=1).counts().values())[:5] == [1, 3, 4, 5, 7]
    # Total 3 < 5 non-empty labels: pure largest remainder over 0.2, 0.4, 0.6, 0.8, 1.0.
    assert list(bank.sample(total=3).counts().values())[:5] == [0, 0, 1, 1, 1]
    # Total 5: proportional gives 0, 1, 1, 1, 2 (remainders .33 .67 0 .33 .67); the empty first
    # label takes one from the label most over its share.
    assert list(bank.sample(total=5).counts().values())[:5] == [1, 1, 1, 1, 1]
    for total in range(0, 110):
        sampled = bank.sample(total=total, seed=3)
        assert len(sampled) == min(total, 105)
        counts = sampled.counts()
        assert all(counts[label] <= COUNTS.get(label, 0) for label in LABELS)
        if total >= 5:
            assert all(counts[label] >= 1 for label in COUNTS)
        assert all(counts[label] == 0 for label in LABELS[5:])


def test_sample_caps_per_label_and_reshares() -> None:
    bank = _bank()
    # Cap 10 -> available 7, 10, 10, 10, 10 (47). Total 30: shares 2, 4, 6, 8, 10; Edema hits its
    # cap, the other 20 re-shared over 7:14:21:28 -> 2, 4, 6, 8.
    assert list(bank.sample(total=30, per_label_max=10).counts().values())[:5] == [2, 4, 6, 8, 10]
    assert list(bank.sample(per_label_max=10).counts().values())[:5] == [7, 10, 10, 10, 10]
    # Total above what the caps allow: everything under the cap.
    assert len(bank.sample(total=1000, per_label_max=10)) == 47
    # Caps binding on several labels: total 40 of 47 -> Edema (11.4 > 10) and Lung Lesion capped.
    counts = bank.sample(total=40, per_label_max=10).counts()
    assert sum(counts.values()) == 40 and max(counts.values()) == 10


def test_sample_is_deterministic_nested_and_recorded() -> None:
    bank = _bank()
    first = bank.sample(total=30, per_label_max=20, seed=7)
    again = bank.sample(total=30, per_label_max=20, seed=7)
    other = bank.sample(total=30, per_label_max=20, seed=8)
    assert [r["source_id"] for r in first.stacked()[2]] == [r["source_id"] for r in again.stacked()[2]]
    assert torch.equal(first.stacked()[0], again.stacked()[0])
    assert first.ids() != other.ids()
    assert first.metadata == {
        "seed": 0,
        "encoder": "tiny-swin",
        "sample_seed": 7,
        "sample_total": 30,
        "sample_per_label_max": 20,
        "sampled_from": bank.counts(),
    }
    # A smaller sample with the same seed is a subset of a larger one (first k of one permutation).
    assert bank.sample(total=15, seed=7).ids() <= bank.sample(total=60, seed=7).ids()
    # Rows stay paired with their provenance and keep their original order.
    for label in COUNTS:
        rows = [int(r["source_id"].rsplit("-", 1)[1]) for r in first.provenance(label)]
        assert rows == sorted(rows)
        assert torch.equal(first.features(label), bank.features(label)[rows])
    with pytest.raises(ValueError, match="total must be >= 0"):
        bank.sample(total=-1)


# ---------------------------------------------------------------------------- save / load
def test_saved_tensor_file_gets_the_umask_mode_like_the_json(tmp_path: Path) -> None:
    """safetensors writes owner-only files; a bank shared on a cluster must be readable like its JSON."""
    import os

    old = os.umask(0o022)
    try:
        tensor_path, json_path = _bank().save(tmp_path / "visual")
    finally:
        os.umask(old)
    assert tensor_path.stat().st_mode & 0o777 == json_path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    bank = _bank(kind="report", dtype=dtype)
    tensor_path, json_path = bank.save(tmp_path / "mem" / "report")
    assert tensor_path == tmp_path / "mem" / "report.safetensors" and tensor_path.is_file()
    assert json_path == tmp_path / "mem" / "report.json" and json_path.is_file()
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["report.json", "report.safetensors"]
    assert set(load_file(str(tensor_path))) == {f"label/{i:02d}" for i in range(14)}

    for path in (tmp_path / "mem" / "report", json_path, tensor_path):  # the stem or either file
        loaded = MemoryBank.load(path, expected_dim=DIM, expected_kind="report")
        assert (loaded.kind, loaded.dim, loaded.dtype, loaded.labels) == ("report", DIM, dtype, LABELS)
        assert loaded.metadata == bank.metadata and loaded.counts() == bank.counts()
        for label in LABELS:
            assert torch.equal(loaded.features(label), bank.features(label))
            assert loaded.features(label).dtype == dtype
            assert loaded.provenance(label) == bank.provenance(label)


def test_sampled_bank_round_trips_with_its_seed(tmp_path: Path) -> None:
    sampled = _bank().sample(total=20, seed=11)
    sampled.save(tmp_path / "visual")
    loaded = MemoryBank.load(tmp_path / "visual")
    assert loaded.metadata["sample_seed"] == 11 and loaded.metadata["sample_total"] == 20
    assert torch.equal(loaded.stacked()[0], sampled.stacked()[0])


def test_load_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors.*nowhere\.json"):
        MemoryBank.load(tmp_path / "nowhere")
    _bank().save(tmp_path / "bank")
    (tmp_path / "bank.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file\(s\) \[.*bank\.json'\]"):
        MemoryBank.load(tmp_path / "bank")


def test_load_rejects_corrupt_files(tmp_path: Path) -> None:
    _bank().save(tmp_path / "bank")
    (tmp_path / "bank.json").write_text('{"kind": "visual", ')
    with pytest.raises(ValueError, match=r"bank\.json: corrupt JSON"):
        MemoryBank.load(tmp_path / "bank")
    _bank().save(tmp_path / "bank")
    (tmp_path / "bank.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bank\.safetensors: corrupt safetensors"):
        MemoryBank.load(tmp_path / "bank")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda h: h.update(format_version=FORMAT_VERSION + 1),
            r"format_version is 2, this amrg reads version 1",
        ),
        (lambda h: h.pop("provenance"), r"JSON lacks field\(s\) \['provenance'\]"),
        (lambda h: h.update(kind="text"), r"kind is 'text'"),
        (lambda h: h.update(dtype="int8"), r"dtype is 'int8'"),
        # JSON dtype disagrees with the tensors' dtype.
        (
            lambda h: h.update(dtype="float16"),
            r"label 'Enlarged Cardiomediastinum' \(label/00\): tensor dtype",
        ),
        (
            lambda h: h["counts"].update({"Edema": 36}),
            r"label 'Edema': counts says 36 but there are 35 provenance records",
        ),
        (
            lambda h: (h["counts"].update({"Edema": 34}), h["provenance"]["Edema"].pop()),
            r"label 'Edema' \(label/04\): tensor shape \[35, 8\], JSON says \[34, 8\]",
        ),
        (
            lambda h: h.update(labels=["Flu", *h["labels"][1:]]),
            r"missing \['Enlarged Cardiomediastinum'\], unexpected \['Flu'\]",
        ),
        (lambda h: h.update(labels=h["labels"][::-1]), "labels are in another order"),
        (
            lambda h: h["provenance"]["Edema"][3].pop("source_id"),
            r"label 'Edema' provenance row 3: needs string field\(s\) \['source_id'\]",
        ),
    ],
    ids=[
        "version",
        "missing_field",
        "kind",
        "dtype_name",
        "dtype_mismatch",
        "counts",
        "tensor_rows",
        "labels",
        "label_order",
        "record",
    ],
)
def test_load_rejects_inconsistent_header(tmp_path: Path, edit, message: str) -> None:
    _bank().save(tmp_path / "bank")
    _edit_json(tmp_path / "bank", edit)
    with pytest.raises(ValueError, match=message):
        MemoryBank.load(tmp_path / "bank")


def test_load_checks_dim_kind_and_labels_against_the_consumer(tmp_path: Path) -> None:
    _bank().save(tmp_path / "bank")
    with pytest.raises(ValueError, match="visual memory dim 8 but the stage-1 Q-Former width is 128"):
        MemoryBank.load(tmp_path / "bank", expected_dim=128, dim_name="the stage-1 Q-Former width")
    with pytest.raises(ValueError, match="this is a visual memory but a report memory was expected"):
        MemoryBank.load(tmp_path / "bank", expected_kind="report")
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['Support Devices', 'No Finding'\]"):
        MemoryBank.load(tmp_path / "bank", expected_labels=LABELS[:12])
    # All problems come in one message.
    with pytest.raises(ValueError, match="failed its checks") as info:
        MemoryBank.load(tmp_path / "bank", expected_dim=4, expected_kind="report")
    assert "dim 8 but the expected width is 4" in str(info.value)
    assert "a report memory was expected" in str(info.value)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_load_rejects_nonfinite_rows_naming_label_row_and_id(tmp_path: Path, bad_value: float) -> None:
    _bank().save(tmp_path / "bank")
    tensors = load_file(str(tmp_path / "bank.safetensors"))
    tensors["label/01"][5, 2] = bad_value
    save_file(tensors, str(tmp_path / "bank.safetensors"))
    with pytest.raises(
        ValueError, match=r"label 'Cardiomegaly': NaN/Inf in rows \[5\] \(source ids \['train-01-5'\]\)"
    ):
        MemoryBank.load(tmp_path / "bank")


def test_load_refuses_evaluation_ids(tmp_path: Path) -> None:
    bank = _bank()
    bank.add(
        "Fracture",
        torch.randn(2, DIM),
        [{"source_id": "test-42", "split": "test"}, {"source_id": "t", "split": "train"}],
    )
    bank.save(tmp_path / "bank")
    forbidden = {"test-42", "val-1", "val-2"}
    with pytest.raises(
        ValueError, match=r"bank: 1 source id\(s\) belong to the evaluation \(val/test\) split.*\['test-42'\]"
    ):
        MemoryBank.load(tmp_path / "bank", forbidden_ids=forbidden)
    assert len(MemoryBank.load(tmp_path / "bank", forbidden_ids={"val-1"})) == 107


def test_check_no_leakage_lists_at_most_ten_ids() -> None:
    bank = _bank()
    leaked = sorted(bank.ids())[:12]
    with pytest.raises(ValueError, match=r"12 source id\(s\) belong to the test split") as info:
        check_no_leakage(bank, [*leaked, "unrelated"], "test")
    message = str(info.value)
    assert "(12 in total)" in message
    assert sum(i in message for i in leaked) == 10
    check_no_leakage(bank, [], "test")  # nothing forbidden, nothing to say
    check_no_leakage(bank, {"val-1"}, "val")


@pytest.mark.parametrize("failing", ["tensors", "json"])
def test_a_full_disk_during_save_keeps_the_previous_bank_and_leaves_no_temp(
    tmp_path: Path, monkeypatch, failing: str
) -> None:
    import errno

    import amrg.memory.bank as bank_module
    from amrg.errors import OutputError

    _bank(counts={LABELS[0]: 3}).save(tmp_path / "visual")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(*args, **kwargs):
        if failing == "tensors":
            Path(args[1]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "tensors":
        monkeypatch.setattr(bank_module, "save_file", full_disk)
    else:
        monkeypatch.setattr(bank_module.os, "fsync", full_disk)  # the JSON's fsync, after the tensors'
        monkeypatch.setattr(bank_module, "_fsync", lambda path: None)
    name = "visual.safetensors" if failing == "tensors" else "visual.json"
    with pytest.raises(
        OutputError, match=f"^cannot write memory bank '{tmp_path / name}': no space left on the device$"
    ):
        _bank().save(tmp_path / "visual")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # whole, and no temp file
    assert MemoryBank.load(tmp_path / "visual").counts()[LABELS[0]] == 3
