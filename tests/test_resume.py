"""Crash and resume through the `amrg` command: runs killed mid-epoch (SIGKILL) or stopped by a scheduler
(SIGTERM) and resumed with ``--ckpt_path last`` end with the weights and metrics of an uninterrupted run.

Every run adds ``configs/trainer/fault_tolerant.yaml`` (step checkpoints, ExactResume, CheckpointOnSigterm)
with the step interval shrunk to 4. A test-only callback, :class:`HangAtStep`, parks the run at a chosen
step so the kill lands at a known point; the test then sends the signal. Exact equality is expected: on the
CPU, with one thread and ``num_workers=0``, the resumed run replays the same batches and random draws.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from amrg.modules.resume import _ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# 40 studies -> 32 train -> 8 batches of 4 per epoch; 2 epochs = 16 optimiser steps
TINY = [
    "--data.init_args.n=40",
    "--data.init_args.batch_size=4",
    "--trainer.max_epochs=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]
EVERY = 4  # step checkpoints at steps 4, 8, 12, 16


class HangAtStep(Callback):
    """Test helper: at the start of the batch after optimiser step ``step``, write ``marker`` and wait.

    It waits until SIGTERM (then lets the batch run, so Lightning stops after it) or forever (SIGKILL).
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(trainer.global_step))
        while not trainer.received_sigterm:
            time.sleep(0.02)


def _overlay(tmp: Path) -> Path:
    """The fault-tolerant overlay with step checkpoints every ``EVERY`` steps (the recipe says 50)."""
    text = (CONFIGS / "trainer" / "fault_tolerant.yaml").read_text()
    assert "every_n_train_steps: 50" in text
    path = tmp / "fault_tolerant.yaml"
    path.write_text(text.replace("every_n_train_steps: 50", f"every_n_train_steps: {EVERY}"))
    return path


def _hang_overlay(tmp: Path, step: int) -> tuple[Path, Path]:
    marker = tmp / f"hanging_at_{step}"
    path = tmp / f"hang_{step}.yaml"
    spec = {"class_path": "tests.test_resume.HangAtStep", "init_args": {"step": step, "marker": str(marker)}}
    path.write_text("trainer:\n  callbacks+:\n    - " + json.dumps(spec) + "\n")
    return path, marker


def _env() -> dict[str, str]:
    # one thread: bit-identical CPU arithmetic between runs; the repo root: tests.test_resume importable
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "amrg.cli", "fit", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )


def _finish(proc: subprocess.Popen, log: Path, expect: int = 0) -> str:
    rc = proc.wait(timeout=600)
    text = log.read_text()
    assert rc == expect, f"exit status {rc}, expected {expect}\n{text[-6000:]}"
    return text


def _hang_then(proc: subprocess.Popen, marker: Path, log: Path, sig: signal.Signals) -> None:
    """Wait until the run parks at its step, then send ``sig``."""
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before reaching its step\n{log.read_text()[-6000:]}"
        assert time.monotonic() < deadline, "the run never reached its step"
        time.sleep(0.05)
    proc.send_signal(sig)


def _ckpt(path: Path) -> dict:
    with torch.serialization.safe_globals([type(Path())]):  # the datamodule's hparams hold paths
        return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _ckpt(a)["state_dict"], _ckpt(b)["state_dict"]
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} of {len(sa)} tensors differ, e.g. {differ[:3]}"


def _val_rows(run: Path) -> dict[str, dict[str, str]]:
    """The val rows of every metrics.csv under ``run`` (one log version per start), by epoch."""
    rows: dict[str, dict[str, str]] = {}
    for path in sorted(run.rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("val/loss"):
                rows[row["epoch"]] = {k: v for k, v in row.items() if k.startswith("val/") and v}
    return rows


def _recipe(stage: str) -> list[str]:
    return ["-c", str(CONFIGS / "demo" / "data.yaml"), "-c", str(CONFIGS / "demo" / f"{stage}.yaml")]


class _Background:
    """A run started now and waited for when its result is first needed (2 cores: runs overlap)."""

    def __init__(self, args: list[str], work: Path, log: Path) -> None:
        self.work, self.log = work, log
        self.proc = _start(args, work, log)
        self._done = False

    def result(self) -> Path:
        if not self._done:
            _finish(self.proc, self.log)
            self._done = True
        return self.work


@pytest.fixture(scope="module")
def stage1_reference(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted tiny stage-1 run with the overlay (also the stage-1 checkpoint stage 2 needs)."""
    tmp = tmp_path_factory.mktemp("stage1_reference")
    run = _Background([*_recipe("stage1"), "-c", str(_overlay(tmp)), *TINY], tmp / "work", tmp / "log.txt")
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def _share_data(work: Path, reference: Path) -> None:
    """Link the reference run's synthetic data (keyed by n and seed) instead of generating it again."""
    (work / ".cache").mkdir(parents=True)
    (work / ".cache" / "synthetic").symlink_to(reference / ".cache" / "synthetic", target_is_directory=True)


@pytest.mark.slow
def test_stage1_sigterm_then_sigkill_mid_epoch_resumes_exactly(
    stage1_reference: _Background, tmp_path: Path
) -> None:
    work, log = tmp_path / "work", tmp_path / "log.txt"
    # its own data: the reference run, alongside, may still be generating the shared cache
    base = [*_recipe("stage1"), "-c", str(_overlay(tmp_path)), *TINY]
    ckpts = work / "runs/demo/stage1/checkpoints"

    # 1. SIGTERM while step 6 waits (epoch 0, batch 6 of 8): Lightning finishes that batch, then
    #    CheckpointOnSigterm saves last-step.ckpt at step 6 (no step checkpoint falls there) and exits 143.
    hang, marker = _hang_overlay(tmp_path, 5)
    proc = _start([*base, "-c", str(hang)], work, log)
    _hang_then(proc, marker, log, signal.SIGTERM)
    out = _finish(proc, log, expect=143)
    assert "SIGTERM: saved" in out
    state = _ckpt(ckpts / "last-step.ckpt")
    assert state["global_step"] == 6 and state["epoch"] == 0
    assert not list(ckpts.glob(".*tmp*")), "the temp file was renamed into place"

    # 2. Resume from it; SIGKILL while step 14 waits (epoch 1): the newest last*.ckpt is the step-12
    #    checkpoint (epoch 1, batch 4 of 8), newer than the epoch-0 last.ckpt.
    hang, marker = _hang_overlay(tmp_path, 13)
    proc = _start([*base, "-c", str(hang), "--ckpt_path", "last"], work, log)
    _hang_then(proc, marker, log, signal.SIGKILL)
    _finish(proc, log, expect=-signal.SIGKILL)
    assert _ckpt(ckpts / "last-step.ckpt")["global_step"] == 12
    assert (ckpts / "last-step.ckpt").stat().st_mtime > (ckpts / "last.ckpt").stat().st_mtime

    # 3. Resume to the end.
    out = _finish(_start([*base, "--ckpt_path", "last"], work, log), log)
    assert "last-step.ckpt" in out.rsplit("Restoring states from the checkpoint path", 1)[-1].splitlines()[0]

    reference = stage1_reference.result()
    _assert_same_weights(reference / "runs/demo/stage1/checkpoints/last.ckpt", ckpts / "last.ckpt")
    ref, got = _val_rows(reference / "runs/demo/stage1"), _val_rows(work / "runs/demo/stage1")
    assert set(ref) == set(got) == {"0", "1"}
    assert got == ref  # every val metric of both epochs, as logged (the same strings)
    assert "not resumable" not in out  # ExactResume replaced the warning's cause, not only its text


@pytest.mark.slow
def test_stage2_sigkill_mid_epoch_resumes_exactly(stage1_reference: _Background, tmp_path: Path) -> None:
    work, stage1 = tmp_path / "work", stage1_reference.result()
    (work / "runs/demo/stage1/checkpoints").mkdir(parents=True)
    _share_data(work, stage1)
    last1 = stage1 / "runs/demo/stage1/checkpoints/last.ckpt"
    (work / "runs/demo/stage1/checkpoints/last.ckpt").symlink_to(last1)
    res = subprocess.run(
        [sys.executable, "-m", "amrg.cli", "memory", "build", *_recipe("memory"), "--data.init_args.n=40"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ref = tmp_path / "reference"
    shutil.copytree(work, ref, symlinks=True)  # the same memory folder; links stay links

    base = [
        *_recipe("stage2"),
        "-c",
        str(_overlay(tmp_path)),
        *TINY,
        "--trainer.max_epochs=1",  # 8 steps are enough to resume in the middle of
        "--trainer.check_val_every_n_epoch=1",
        "--model.init_args.net.init_args.decoding.min_new_tokens=2",  # short generations: a fast validation
        "--model.init_args.net.init_args.decoding.max_new_tokens=8",
    ]
    ref_proc = _start(base, ref, tmp_path / "ref.txt")  # the uninterrupted run, alongside (2 cores)
    log = tmp_path / "log.txt"
    hang, marker = _hang_overlay(tmp_path, 5)  # step checkpoint at 4: epoch 0, batch 4 of 8
    proc = _start([*base, "-c", str(hang)], work, log)
    _hang_then(proc, marker, log, signal.SIGKILL)
    _finish(proc, log, expect=-signal.SIGKILL)
    ckpts = work / "runs/demo/stage2/checkpoints"
    assert _ckpt(ckpts / "last-step.ckpt")["global_step"] == 4
    _finish(_start([*base, "--ckpt_path", "last"], work, log), log)
    _finish(ref_proc, tmp_path / "ref.txt")

    _assert_same_weights(ref / "runs/demo/stage2/checkpoints/last.ckpt", ckpts / "last.ckpt")
    ref_scores = json.loads(next((ref / "runs/demo/stage2").rglob("val_metrics_epoch*.json")).read_text())
    got_scores = json.loads(next((work / "runs/demo/stage2").rglob("val_metrics_epoch*.json")).read_text())
    assert got_scores["metrics"] == ref_scores["metrics"]


def test_resumable_sampler_skips_and_repeats_per_epoch() -> None:
    """The wrapped sampler: one order per (seed, epoch), a skip that applies to the next pass only."""
    data = list(range(10))
    sampler = _ResumableSampler(torch.utils.data.RandomSampler(data), seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(first) == data and list(sampler) == first
    sampler.skip_next(4)
    assert list(sampler) == first[4:] and list(sampler) == first
    sampler.set_epoch(2)
    assert list(sampler) != first and len(sampler) == 10
