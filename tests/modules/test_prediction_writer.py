"""PredictionWriter: one JSONL line per study for both stages, dataset order, repeats dropped, whole files;
`amrg predict` adds it and asks for --ckpt_path (DDP runs: tests/test_ddp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from amrg import cli
from amrg.data.datamodules import ReportDataModule
from amrg.errors import OutputError
from amrg.labels import LABELS
from amrg.models.classifier import DiseaseClassifier
from amrg.models.qformer import DiseaseQFormer
from amrg.models.vision import VisionEncoder
from amrg.modules.classifier import ClassifierModule
from amrg.modules.prediction_writer import DEFAULT_NAME, PredictionWriter, _merge, _shard_path
from amrg.modules.reporter import ReporterModule
from tests.checkpoints.test_stage2 import build, stage2_files
from tests.models.test_reporter import ENCODER, QFORMER


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return stage2_files(tmp_path_factory.mktemp("stage2_files"))


def _data(annotation: Path, batch_size: int = 2) -> ReportDataModule:
    return ReportDataModule(
        str(annotation), image_size=32, batch_size=batch_size, num_workers=0, augment=False
    )


def _trainer(tmp_path: Path, writer: PredictionWriter) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
        default_root_dir=tmp_path,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage2_writes_report_probabilities_explanation_and_reference(
    tmp_path: Path, make_dataset, files: dict[str, Path]
) -> None:
    annotation = make_dataset(n={"train": 4, "val": 2, "test": 5})
    model = ReporterModule(build(files), explain_top_k=2)
    trainer = _trainer(tmp_path, PredictionWriter())
    trainer.predict(model, _data(annotation), return_predictions=False)
    out = tmp_path / DEFAULT_NAME  # default: under the trainer's default_root_dir
    lines = _lines(out)
    assert [r["id"] for r in lines] == [f"test_{i:03d}" for i in range(5)]  # the predict split: test
    for record in lines:
        assert list(record) == ["id", "report", "probabilities", "explanation", "reference"]
        assert isinstance(record["report"], str)
        assert list(record["probabilities"]) == list(LABELS)
        assert all(0.0 <= p <= 1.0 for p in record["probabilities"].values())
        assert [e["memory"] for e in record["explanation"]] == ["visual", "visual", "report", "report"]
        assert record["reference"].startswith("The heart is normal")  # as the data module gives it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no shard left behind

    # the same studies in batches of 3 give the same reports and explanations (batch composition changes
    # nothing but the last bits of a float: batched matmuls sum in another order)
    again = tmp_path / "again.jsonl"
    _trainer(tmp_path, PredictionWriter(again)).predict(model, _data(annotation, 3), return_predictions=False)
    for a, b in zip(_lines(again), lines, strict=True):
        assert (a["id"], a["report"], a["reference"]) == (b["id"], b["report"], b["reference"])
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        for x, y in zip(a["explanation"], b["explanation"], strict=True):
            assert {k: v for k, v in x.items() if k != "weight"} == {
                k: v for k, v in y.items() if k != "weight"
            }
            assert x["weight"] == pytest.approx(y["weight"], abs=1e-6)


def test_stage1_writes_ids_and_probabilities(tmp_path: Path, make_dataset) -> None:
    annotation = make_dataset(n={"train": 2, "val": 1, "test": 3})
    torch.manual_seed(0)
    module = ClassifierModule(DiseaseClassifier(VisionEncoder(**ENCODER), DiseaseQFormer(**QFORMER)))
    out = tmp_path / "sub" / "stage1.jsonl"  # its folder is made
    _trainer(tmp_path, PredictionWriter(out)).predict(module, _data(annotation), return_predictions=False)
    lines = _lines(out)
    assert [list(r) for r in lines] == [["id", "probabilities"]] * 3
    assert [r["id"] for r in lines] == ["test_000", "test_001", "test_002"]


def test_merge_keeps_dataset_order_and_each_study_once(tmp_path: Path) -> None:
    """Two ranks of a padding DistributedSampler over 5 studies: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and
    study 0 again (the padding); the file has 0..4 once each, in dataset order."""
    out = tmp_path / "p.jsonl"
    shards = [_shard_path(out, "t", rank) for rank in (0, 1)]
    for rank, positions in ((0, [0, 2, 4]), (1, [1, 3, 0])):
        lines = [
            {"key": [0, pos, rank, n], "line": {"id": f"s{pos}", "report": f"r{pos}"}}
            for n, pos in enumerate(positions)
        ]
        shards[rank].write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _merge(shards, out) == (5, 1)
    assert [r["id"] for r in _lines(out)] == ["s0", "s1", "s2", "s3", "s4"]
    assert not any(s.exists() for s in shards)


def test_merge_names_a_missing_shard_and_leaves_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    out.write_text("previous\n")
    shards = [_shard_path(out, "t", rank) for rank in (0, 1)]
    shards[0].write_text("")
    with pytest.raises(OutputError, match=r"shard\(s\) .*shard-00001.* file system all nodes share"):
        _merge(shards, out)
    assert out.read_text() == "previous\n"


def test_an_unwritable_output_stops_before_the_first_batch(
    tmp_path: Path, make_dataset, files: dict[str, Path]
) -> None:
    annotation = make_dataset(n={"train": 4, "val": 1, "test": 2})
    model = ReporterModule(build(files))
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(OutputError, match=r"cannot write predictions '.*a_folder': it is a folder"):
        _trainer(tmp_path, PredictionWriter(folder)).predict(model, _data(annotation))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match=r"cannot write predictions '.*file/p.jsonl'"):
        _trainer(tmp_path, PredictionWriter(blocker / "p.jsonl")).predict(model, _data(annotation))


def test_predict_without_ckpt_path_is_one_line_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["amrg"])  # LightningCLI warns when given both args and sys.argv
    recipe = Path(__file__).resolve().parents[2] / "configs" / "demo"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "-c", str(recipe / "data.yaml"), "-c", str(recipe / "stage2.yaml")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("amrg: error: predict: --ckpt_path is required") and "\n" not in err
