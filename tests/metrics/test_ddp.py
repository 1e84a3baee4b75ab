"""Metrics under 2-process DDP on CPU equal the single-process metrics exactly (run in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.metrics._ddp_eval import run_eval

SCRIPT = Path(__file__).with_name("_ddp_eval.py")


def _run_subprocess(devices: int, out: Path) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", str(devices), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (
        f"_ddp_eval.py --devices {devices} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


@pytest.mark.slow
def test_ddp_metrics_equal_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # One process needs no subprocess (and saves an interpreter start-up); DDP always gets one.
    single.mkdir()
    run_eval(1, single)
    _run_subprocess(2, ddp)

    # Rank 0 wrote the same files: 11 unique reports (the sampler's padded repeat dropped), same scores.
    for name in ("test_metrics_epoch0.json", "test_predictions_epoch0.jsonl"):
        assert (ddp / name).read_text() == (single / name).read_text(), name
    summary = json.loads((ddp / "test_metrics_epoch0.json").read_text())
    assert summary["num_reports"] == 11
    assert len(summary["metrics"]) == 6 + 36
    assert 0.0 < summary["metrics"]["test/bleu4"] < 1.0
    assert 0.0 < summary["metrics"]["test/ce/micro_f1/14/u0"] < 1.0
    assert summary["metrics"]["test/ce/micro_f1/14/u0"] != summary["metrics"]["test/ce/micro_f1/14/u1"]

    # Every rank logged the same values as the single process.
    solo = json.loads((single / "rank0_results.json").read_text())
    ranks = [json.loads((ddp / f"rank{r}_results.json").read_text()) for r in (0, 1)]
    assert ranks[0]["logged"] == ranks[1]["logged"] == solo["logged"]
    # The padding really happened: 2 x 6 rows seen for 11 samples.
    assert solo["rows_seen"] == 11 and [r["rows_seen"] for r in ranks] == [6, 6]
