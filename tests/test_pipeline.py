"""The demo pipeline end to end through the `amrg` command: stage 1 -> memories -> stage 2 -> predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amrg.memory.bank import MemoryBank

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N = "--data.init_args.n=40"


def _amrg(args: list[str], cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "amrg.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, " ".join(args) + "\n" + res.stdout[-3000:] + res.stderr[-6000:]
    return res.stdout + res.stderr


@pytest.mark.slow
def test_demo_pipeline(tmp_path: Path) -> None:
    limits = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    _amrg(["fit", "-c", str(CONFIGS / "demo" / "stage1.yaml"), N, "--data.init_args.batch_size=4", *limits],
          cwd=tmp_path)
    assert (tmp_path / "runs/demo/stage1/checkpoints/last.ckpt").is_file()

    out = _amrg(["memory", "build", "--config", str(CONFIGS / "demo" / "memory.yaml"), N], cwd=tmp_path)
    for kind in ("visual", "report"):
        bank = MemoryBank.load(tmp_path / f"runs/demo/memory/{kind}_memory")
        assert len(bank) > 0 and bank.kind == kind
    assert "Cardiomegaly" in out  # the per-label count table

    _amrg(["fit", "-c", str(CONFIGS / "demo" / "stage2.yaml"), N, "--data.init_args.batch_size=4", *limits],
          cwd=tmp_path)
    run = tmp_path / "runs/demo/stage2"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    metrics = sorted(run.rglob("val_metrics_epoch*.json"))
    assert metrics, "the metrics callback wrote its JSON"
    scores = json.loads(metrics[-1].read_text())
    assert "bleu4" in json.dumps(scores) and "ce/micro_f1/14/u0" in json.dumps(scores)

    # a folder with one sub-folder per study, its views inside (no annotation file needed)
    inbox = tmp_path / "inbox"
    for study in sorted(p.parent for p in (tmp_path / ".cache/synthetic").rglob("0.png"))[:2]:
        shutil.copytree(study, inbox / study.name)
    out_jsonl = tmp_path / "pred.jsonl"
    _amrg(["predict-images", str(ckpt), json.dumps([str(inbox)]), str(out_jsonl),
           "--group_views=true", "--progress=false"], cwd=tmp_path)
    lines = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert len(lines) == 2
    for rec in lines:
        assert isinstance(rec["report"], str)
        assert set(rec["probabilities"]) >= {"Cardiomegaly", "No Finding"}
        assert rec["explanation"] and {"memory", "source_id", "weight"} <= set(rec["explanation"][0])
