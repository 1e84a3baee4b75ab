"""Exact mid-epoch resume: a killed run restarted with ``--ckpt_path last`` trains as if never stopped.

Lightning 2.x restores weights, optimiser, scheduler and loop counters from a mid-epoch checkpoint, and its
epoch loop then draws only the batches the epoch still lacks (``data_fetcher.fetched`` starts at the
number already done). But a plain ``DataLoader`` is not resumable: the restarted epoch begins a *new*
shuffle (``RandomSampler`` draws its seed from the global torch RNG when iterated) and takes its first
batches, so some studies are seen twice in that epoch and others never; Lightning only warns ("your
dataloader is not resumable"). Nor does it store the RNG state, so dropout masks after the resume differ.

:class:`ExactResume` closes both gaps without touching the data module:

* the train sampler is wrapped (inside the ``BatchSampler`` the loader already has) so each epoch's order
  is a function of ``(seed, epoch)`` only, and a resumed epoch skips, by index, the samples of the batches
  already trained (no image is read for them);
* at the start of every epoch the torch, numpy and Python RNGs are re-seeded from ``(seed, epoch)``, and
  after every training batch their state is noted; the note travels in the checkpoint (as this callback's
  state, plain tensors and numbers, loadable with ``weights_only=True``) and is put back when a run resumes
  in the middle of that epoch.

Exact means bit-identical weights and metrics on the CPU for the same thread count, with
``num_workers=0``. Known limits: with ``num_workers > 0`` and random augmentation the workers' RNG cannot
be checkpointed, so the rest of the interrupted epoch augments differently; gradients of a partly
accumulated step (``accumulate_grad_batches > 1``) are not in a checkpoint; under DDP every rank gets the
noted RNG state of rank 0 (all ranks share it after ``seed_everything`` unless a module draws per rank).
Add the callback with ``configs/trainer/fault_tolerant.yaml``.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import RandomSampler, Sampler

__all__ = ["ExactResume"]

_logger = logging.getLogger(__name__)


def _epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """Two independent 32-bit seeds for ``(seed, epoch)``: the global RNGs' and the shuffle's."""
    rng_seed, shuffle_seed = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(rng_seed), int(shuffle_seed)


def _rng_state() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python RNG states as tensors, numbers and lists.

    Plain types only, so a checkpoint holding them still loads with ``torch.load(weights_only=True)``
    (numpy's state is a tuple with an ndarray, which that loader refuses).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`_rng_state` noted."""
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # seeds every CUDA device too
    np.random.seed(seed)
    random.seed(seed)


class _ResumableSampler(Sampler[int]):
    """Wraps a loader's sampler: a per-epoch order fixed by ``(seed, epoch)``, and a one-off skip.

    A ``RandomSampler`` gets a generator seeded from ``(seed, epoch)`` on each pass; a sampler with
    ``set_epoch`` (Lightning's ``DistributedSampler`` under DDP, itself seeded by seed + epoch) is told the
    epoch; a sequential sampler needs neither.
    """

    def __init__(self, inner: Sampler[int], seed: int) -> None:
        self.inner = inner
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_epoch = getattr(self.inner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def skip_next(self, n: int) -> None:
        """Leave out the first ``n`` indices of the next pass only (the batches a resumed epoch has done)."""
        self._skip = n

    def __iter__(self) -> Iterator[int]:
        if isinstance(self.inner, RandomSampler):
            # replaces any generator given to the loader: the order must not depend on earlier epochs
            self.inner.generator = torch.Generator().manual_seed(_epoch_seeds(self.seed, self.epoch)[1])
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        # the full length: Lightning sizes the epoch from it and counts the skipped batches as done
        return len(self.inner)  # type: ignore[arg-type]


class ExactResume(Callback):
    """Makes a resume from a mid-epoch checkpoint continue exactly as the uninterrupted run would.

    Put it in the trainer's callbacks with a ``ModelCheckpoint(every_n_train_steps=N)``; both come with
    ``configs/trainer/fault_tolerant.yaml``. The first run and every resumed run need it.
    """

    def __init__(self, seed: int | None = None) -> None:
        """Create the callback.

        Args:
            seed: base of the per-epoch seeds of the shuffle and the RNGs; None takes the run's
                ``seed_everything`` (``PL_GLOBAL_SEED``), or 0 if the run set none.
        """
        self.seed = seed
        self._note: dict[str, Any] | None = None  # RNG state after the last finished batch, and where
        self._loaded: dict[str, Any] | None = None  # the note of the checkpoint this run resumed from
        self._samplers: list[tuple[_ResumableSampler, int]] = []  # (sampler, batch size) per loader

    def _base_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # ------------------------------------------------------------------ the sampler
    def _wrap_loaders(self, trainer: Trainer) -> tuple[bool, bool]:
        """Wrap every train loader's sampler once; whether a loader has workers, whether all were wrapped."""
        self._samplers = []
        workers, all_wrapped = False, True
        combined = trainer.fit_loop._combined_loader  # the loaders Lightning iterates (after DDP wrapping)
        for loader in combined.flattened if combined is not None else []:
            batch_sampler = getattr(loader, "batch_sampler", None)
            if batch_sampler is None or not hasattr(batch_sampler, "sampler"):
                rank_zero_warn(
                    f"ExactResume: the train loader {type(loader).__name__} has no batch sampler to wrap; "
                    "a mid-epoch resume will not replay its order"
                )
                all_wrapped = False
                continue
            sampler = batch_sampler.sampler
            if not isinstance(sampler, _ResumableSampler):
                # DataLoader forbids replacing its samplers, but BatchSampler reads .sampler on each pass
                sampler = _ResumableSampler(sampler, self._base_seed())
                batch_sampler.sampler = sampler
            self._samplers.append((sampler, int(batch_sampler.batch_size)))
            workers |= getattr(loader, "num_workers", 0) > 0
        return workers, all_wrapped

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        workers, all_wrapped = self._wrap_loaders(trainer)
        if all_wrapped:
            # Lightning warns that a plain DataLoader cannot resume mid-epoch (training_epoch_loop.reset,
            # right after this hook); with every loader wrapped here it can, so the warning is wrong
            warnings.filterwarnings(
                "ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended"
            )
        epoch = trainer.current_epoch
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch already run
        note = self._loaded
        # after a checkpoint of an epoch's last batch Lightning starts the next epoch with the old count
        mid_epoch = 0 < done < trainer.num_training_batches and (note is None or note["epoch"] == epoch)
        for sampler, batch_size in self._samplers:
            sampler.set_epoch(epoch)
            if mid_epoch:
                sampler.skip_next(done * batch_size)
        # The epoch's seeds, as on_train_epoch_start sets them: Lightning does not call that hook when it
        # resumes from a checkpoint of an epoch's last batch (it counts the next epoch as restarted), and
        # a resumed epoch's workers draw their base seed now. Seeding twice with the same value is harmless.
        _seed_all(_epoch_seeds(self._base_seed(), epoch)[0])
        if workers and trainer.fit_loop._data_fetcher is not None:
            # worker processes already pre-fetched indices from the unwrapped sampler when Lightning made
            # the iterator (FitLoop.setup_data); make it again so they come from the wrapped one
            iter(trainer.fit_loop._data_fetcher)
        if not mid_epoch:
            return
        if note is None or note["batches"] != done:
            where = "none" if note is None else f"epoch {note['epoch']} after {note['batches']} batches"
            rank_zero_warn(
                f"ExactResume: resuming epoch {epoch} after {done} batches, but the checkpoint's RNG note is "
                f"{where} (was the first run without ExactResume?); the data order is replayed, random "
                "draws such as dropout are not"
            )
            return
        _set_rng_state(note["rng"])
        _logger.info(
            "ExactResume: epoch %d resumes after batch %d with the RNG state noted there", epoch, done
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not called when a run resumes mid-epoch (Lightning skips it); on_train_start restores instead.
        epoch = trainer.current_epoch
        _seed_all(_epoch_seeds(self._base_seed(), epoch)[0])
        self._note = {"epoch": epoch, "batches": 0, "rng": _rng_state()}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs before any ModelCheckpoint's on_train_batch_end (Lightning orders checkpoint callbacks last),
        # so a step checkpoint holds the state right after this batch.
        self._note = {
            "epoch": trainer.current_epoch,
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
            "rng": _rng_state(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._base_seed(), "note": self._note}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.seed is None and state_dict.get("seed") is not None:
            self.seed = int(
                state_dict["seed"]
            )  # replay the interrupted run's orders, whatever this run's seed
        self._loaded = state_dict.get("note")
