"""Whole runs of the demo recipes through the `amrg` command, in subprocesses (DDP included)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amrg.checkpoints.stage1 import load_stage1

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# a recipe runs composed with its dataset's one data block
DEMO_STAGE1 = ["-c", str(CONFIGS / "demo" / "data.yaml"), "-c", str(CONFIGS / "demo" / "stage1.yaml")]
SMALL = [
    "--data.init_args.n=40",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--data.init_args.batch_size=4",
]


def _amrg(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "amrg.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.mark.slow
def test_demo_stage1_fit_one_epoch_two_batches(tmp_path: Path) -> None:
    _amrg(["fit", *DEMO_STAGE1, *SMALL], cwd=tmp_path)
    run = tmp_path / "runs" / "demo" / "stage1"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert list(run.rglob("config.yaml")), "the resolved config is saved next to the run"
    metrics = list(run.rglob("metrics.csv"))
    assert metrics and "val/auroc_mean" in metrics[0].read_text()
    # the checkpoint alone rebuilds the network (weights_only load, hparams hold the class paths)
    with torch.serialization.safe_globals([type(Path())]):  # the datamodule's hparams hold paths
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "hyper_parameters" in state and "state_dict" in state
    assert state["epoch"] == 0 and (run / "checkpoints" / "best.ckpt").is_file()
    net = load_stage1(ckpt)
    assert net.encoder.img_size == state["datamodule_hyper_parameters"]["image_size"] == 64


@pytest.mark.slow
def test_demo_stage1_fit_ddp_two_cpu_processes(tmp_path: Path) -> None:
    res = _amrg(["fit", *DEMO_STAGE1, "-c", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), *SMALL], cwd=tmp_path)
    assert "generating 40 synthetic studies" in res.stderr + res.stdout  # once: prepare_data on rank 0 only
    assert (res.stderr + res.stdout).count("generating 40 synthetic studies") == 1
    assert (tmp_path / "runs" / "demo" / "stage1" / "checkpoints" / "last.ckpt").is_file()
