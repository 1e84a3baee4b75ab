"""SIGTERM, as a cluster scheduler sends it before a kill: save a checkpoint, then exit non-zero.

Lightning 2.x already catches SIGTERM (``trainer/connectors/signal_connector.py``): its handler only sets
``trainer.received_sigterm`` (and under DDP forwards the signal to the other ranks), and the loops raise
``SIGTERMException`` at the next safe point: after the running training batch and its
``on_train_batch_end`` hooks, at the end of an epoch, or between validation batches. That exception is a
``SystemExit`` with no code, so the process exits with status 0 and nothing is saved. This callback builds
on that: in ``on_exception`` it saves the whole training state as a ``last``-style checkpoint in the run's
checkpoint folder (written to a temp name and renamed, so a SIGKILL during the save leaves the previous
file whole), and gives the exit the conventional status 128 + 15 = 143, so a job script or scheduler sees
the run was cut short. ``amrg fit ... --ckpt_path last`` then picks the newest ``last*.ckpt`` and resumes;
with :class:`~amrg.modules.resume.ExactResume` exactly where the signal stopped it.

A signal that arrives while a single batch is still running is acted on when that batch ends, so a batch
must take less than the scheduler's grace period (Slurm's ``KillWait``, 30 s by default).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

__all__ = ["CheckpointOnSigterm"]

SIGTERM_EXIT_STATUS = 128 + 15  # what a shell reports for a process ended by SIGTERM


class CheckpointOnSigterm(Callback):
    """On SIGTERM during ``fit``, save ``<dirpath>/<filename>.ckpt`` and exit with status 143."""

    def __init__(
        self, dirpath: Path | None = None, filename: str = "last-step", exit_status: int = SIGTERM_EXIT_STATUS
    ) -> None:
        """Create the callback.

        Args:
            dirpath: folder of the checkpoint; None takes the ``dirpath`` of the trainer's first
                ``ModelCheckpoint`` (the recipe's checkpoint folder).
            filename: checkpoint name without ``.ckpt``. It must start with ``last`` so that
                ``--ckpt_path last`` finds it (Lightning looks for ``last*.ckpt`` in each
                ``ModelCheckpoint``'s folder and takes the newest); the default is the file
                ``configs/trainer/fault_tolerant.yaml``'s step checkpoints use.
            exit_status: the process's exit status after the save (143 = 128 + SIGTERM).
        """
        if not filename.startswith("last"):
            raise ValueError(
                f"CheckpointOnSigterm filename must start with 'last' so --ckpt_path last finds it, got {filename!r}"
            )
        if not 1 <= exit_status <= 255:
            raise ValueError(f"CheckpointOnSigterm exit_status must be in 1..255, got {exit_status}")
        self.dirpath = dirpath
        self.filename = filename
        self.exit_status = exit_status
        self.saved: Path | None = None

    def _path(self, trainer: Trainer) -> Path | None:
        if self.dirpath is not None:
            return Path(self.dirpath) / f"{self.filename}.ckpt"
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / f"{self.filename}.ckpt"
        return None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = self.exit_status  # SIGTERMException is a SystemExit: this is the exit status
        if trainer.state.fn != TrainerFn.FITTING:
            return
        path = self._path(trainer)
        if path is None:
            rank_zero_warn(
                "SIGTERM: no checkpoint saved (CheckpointOnSigterm has no dirpath and the trainer has no "
                "ModelCheckpoint with one)"
            )
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # not last*: never taken for a checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)  # every rank takes part (collective under DDP); rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, path)
        trainer.strategy.barrier("CheckpointOnSigterm")
        self.saved = path
        rank_zero_info(
            f"SIGTERM: saved {path} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            "resume with --ckpt_path last"
        )
