"""The demo pipeline end to end through the `amrg` command: stage 1 -> memories -> stage 2 -> predict,
then the stage-2 checkpoint moved alone to another folder gives the same predictions."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amrg.checkpoints.memory import load_memory_folder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N = "--data.init_args.n=40"


def _amrg(args: list[str], cwd: Path) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "amrg.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, " ".join(args) + "\n" + res.stdout[-3000:] + res.stderr[-6000:]
    return res.stdout + res.stderr


def _recipe(stage: str) -> list[str]:
    return ["-c", str(CONFIGS / "demo" / "data.yaml"), "-c", str(CONFIGS / "demo" / f"{stage}.yaml")]


@pytest.mark.slow
def test_demo_pipeline_and_a_portable_stage2_checkpoint(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    limits = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    _amrg(["fit", *_recipe("stage1"), N, "--data.init_args.batch_size=4", *limits], cwd=work)
    assert (work / "runs/demo/stage1/checkpoints/last.ckpt").is_file()

    out = _amrg(["memory", "build", *_recipe("memory"), N], cwd=work)
    folder = load_memory_folder(work / "runs/demo/memory")
    assert len(folder.visual) > 0 and len(folder.report) > 0
    assert "Cardiomegaly" in out and "memory folder: runs/demo/memory" in out  # the per-label count table

    every_epoch = "--trainer.check_val_every_n_epoch=1"  # the recipe validates after its last (6th) epoch
    _amrg(["fit", *_recipe("stage2"), N, "--data.init_args.batch_size=4", *limits, every_epoch], cwd=work)
    run = work / "runs/demo/stage2"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    metrics = sorted(run.rglob("val_metrics_epoch*.json"))
    assert metrics, "the metrics callback wrote its JSON"
    scores = json.loads(metrics[-1].read_text())
    assert "bleu4" in json.dumps(scores) and "ce/micro_f1/14/u0" in json.dumps(scores)

    # a folder with one sub-folder per study, its views inside (no annotation file needed)
    inbox = tmp_path / "inbox"
    for study in sorted(p.parent for p in (work / ".cache/synthetic").rglob("0.png"))[:2]:
        shutil.copytree(study, inbox / study.name)
    first = tmp_path / "first.jsonl"
    _amrg(
        [
            "predict-images",
            str(ckpt),
            json.dumps([str(inbox)]),
            str(first),
            "--group_views=true",
            "--progress=false",
        ],
        cwd=work,
    )
    lines = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(lines) == 2
    for rec in lines:
        assert isinstance(rec["report"], str)
        assert set(rec["probabilities"]) >= {"Cardiomegaly", "No Finding"}
        assert rec["explanation"] and {"memory", "source_id", "weight"} <= set(rec["explanation"][0])

    # The checkpoint alone: copy it out, delete every other file of the run, predict from a third folder.
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(ckpt, shared / "reporter.ckpt")
    shutil.rmtree(work)
    third = tmp_path / "third"
    third.mkdir()
    second = tmp_path / "second.jsonl"
    _amrg(
        [
            "predict-images",
            "../shared/reporter.ckpt",
            json.dumps(["../inbox"]),
            "../second.jsonl",
            "--group_views=true",
            "--progress=false",
        ],
        cwd=third,
    )
    assert second.read_text() == first.read_text()
