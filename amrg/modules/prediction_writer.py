"""``amrg predict``'s output: :class:`PredictionWriter` writes one JSONL line per study, whole, once.

Each rank streams its batches into a hidden shard beside the output; at the end of the epoch the ranks meet
at a barrier and rank 0 merges the shards in dataset order, keeps the first line of each study id (the
predict sampler of Lightning does not pad, but a ``DistributedSampler`` of one's own repeats studies to even
out the ranks) and writes the output through :func:`amrg.files.atomic_write`, then removes the shards.
Under multi-node DDP the output folder must be on a file system every node sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from amrg.errors import OutputError, writing
from amrg.files import atomic_write
from amrg.labels import LABELS

__all__ = ["DEFAULT_NAME", "PredictionWriter"]

_logger = logging.getLogger(__name__)

DEFAULT_NAME = "predictions.jsonl"
"""The output's name under ``trainer.default_root_dir`` when no ``output`` is given."""


class PredictionWriter(BasePredictionWriter):
    """Write ``predict_step`` outputs as JSONL: one ``{"id", "report", "probabilities", "explanation"}`` per study.

    ``predict_step`` returns a dict of per-study lists: ``ids`` (required), and any of ``reports``,
    ``probabilities`` [B, 14] (``probs`` in :class:`~amrg.modules.classifier.ClassifierModule`),
    ``explanations`` (lists of recalled-item dicts) and ``references``. A line holds the keys the module
    returned, in the order of ``amrg predict-images``' lines: ``id``, ``report``, ``probabilities`` (label
    name -> probability, rounded to 6 digits, :data:`amrg.labels.LABELS` order), ``explanation``, then
    ``reference`` (the cleaned dataset report, where it is not empty), so ``amrg eval`` scores the file as
    it stands. Stage 1 gives ``id`` and ``probabilities``; stage 2 all of them.

    Lines follow the order of the predict dataset, each study id once (the first prediction kept). The
    file is written whole after the last batch (a failed run leaves any previous file as it was).

    Args:
        output: the JSONL file; ``None`` writes ``predictions.jsonl`` under the trainer's
            ``default_root_dir`` (the recipe's run folder). Under multi-node DDP its folder must be
            shared by all nodes.
    """

    def __init__(self, output: Path | str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output) if output is not None else None
        self._path: Path | None = None
        self._token = ""
        self._shard: Path | None = None
        self._handle: IO[str] | None = None
        self._count = 0  # lines written to this rank's shard (the tie-break of equal positions)

    def path(self, trainer: L.Trainer) -> Path:
        """The file this writer writes for ``trainer``."""
        return self.output if self.output is not None else Path(trainer.default_root_dir) / DEFAULT_NAME

    # ------------------------------------------------------------------ hooks
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        if path.is_dir():
            raise OutputError(f"cannot write predictions '{path}': it is a folder (set the writer's output)")
        # one name per run, chosen by rank 0, so a shard left by a killed run is never read as this run's
        self._token = trainer.strategy.broadcast(uuid.uuid4().hex[:12], src=0)
        self._path = path
        self._shard = _shard_path(path, self._token, trainer.global_rank)
        self._count = 0
        with writing(path, "predictions"):  # an unwritable folder stops the run before the first batch
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self._shard.open("w", encoding="utf-8")
        rank_zero_info(f"predictions of the {_split_name(trainer)} go to {path}")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self._handle is not None and self._path is not None, "on_predict_start opens the shard"
        records = _records(prediction, batch_idx)
        positions = _positions(trainer, dataloader_idx, [r["id"] for r in records], batch_indices)
        with writing(self._path, "predictions"):
            for record, position in zip(records, positions, strict=True):
                key = [dataloader_idx, position, trainer.global_rank, self._count]
                self._handle.write(json.dumps({"key": key, "line": record}, ensure_ascii=False) + "\n")
                self._count += 1

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._handle is not None and self._path is not None
        with writing(self._path, "predictions"):
            self._handle.close()
        self._handle = None
        trainer.strategy.barrier("amrg-prediction-shards")
        error = None
        if trainer.is_global_zero:
            shards = [_shard_path(self._path, self._token, r) for r in range(trainer.world_size)]
            try:
                written, dropped = _merge(shards, self._path)
            except OutputError as err:
                error = str(err)
            else:
                extra = f" ({dropped} repeated studies dropped)" if dropped else ""
                rank_zero_info(f"wrote {written} predictions to {self._path}{extra}")
        # every rank raises rank 0's error rather than leaving the others waiting in a later collective
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            self._remove_shard()
            raise OutputError(error)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._remove_shard()

    def _remove_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._shard is not None:
            with contextlib.suppress(OSError):  # never hide the error that stopped the run
                self._shard.unlink(missing_ok=True)
            self._shard = None


def _shard_path(path: Path, token: str, rank: int) -> Path:
    return path.with_name(f".{path.name}.shard-{rank:05d}.{token}.jsonl")


def _split_name(trainer: L.Trainer) -> str:
    split = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("predict_split")
    return f"{split!r} split" if split else "predict dataloader"


def _records(prediction: Any, batch_idx: int) -> list[dict[str, Any]]:
    """The JSON lines of one ``predict_step`` output."""
    if not isinstance(prediction, Mapping) or "ids" not in prediction:
        found = sorted(prediction) if isinstance(prediction, Mapping) else type(prediction).__name__
        raise ValueError(
            f"PredictionWriter: predict_step (batch {batch_idx}) must return a dict with 'ids' and any of "
            f"'reports', 'probabilities', 'explanations', 'references'; found {found}"
        )
    ids = [str(i) for i in prediction["ids"]]
    probabilities = prediction.get("probabilities", prediction.get("probs"))
    if probabilities is not None:
        probabilities = probabilities.detach().float().cpu().tolist()
    columns = {
        "report": prediction.get("reports"),
        "probabilities": probabilities,
        "explanation": prediction.get("explanations"),
        "reference": prediction.get("references"),
    }
    for name, values in columns.items():
        if values is not None and len(values) != len(ids):
            raise ValueError(
                f"PredictionWriter: predict_step (batch {batch_idx}) returned {len(ids)} ids but "
                f"{len(values)} {name} values"
            )
    records = []
    for i, sid in enumerate(ids):
        record: dict[str, Any] = {"id": sid}
        if columns["report"] is not None:
            record["report"] = columns["report"][i]
        if probabilities is not None:
            record["probabilities"] = {
                label: round(float(p), 6) for label, p in zip(LABELS, probabilities[i], strict=True)
            }
        if columns["explanation"] is not None:
            record["explanation"] = columns["explanation"][i]
        if columns["reference"] is not None and columns["reference"][i]:
            record["reference"] = columns["reference"][i]
        records.append(record)
    return records


def _positions(
    trainer: L.Trainer, dataloader_idx: int, ids: list[str], batch_indices: Sequence[int] | None
) -> list[int | None]:
    """Each study's index in the predict dataset (None where it cannot be told)."""
    if not batch_indices:
        return [None] * len(ids)
    if len(batch_indices) == len(ids):
        return list(batch_indices)
    # a study with a bad image was dropped from the batch (on_bad_image="skip"): match by id
    dataset = _dataset(trainer, dataloader_idx)
    studies = getattr(dataset, "studies", None)
    if studies is None:
        return [None] * len(ids)
    by_id = {str(getattr(studies[i], "id", "")): i for i in batch_indices}
    return [by_id.get(sid) for sid in ids]


def _dataset(trainer: L.Trainer, dataloader_idx: int) -> Any:
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, Sequence):
        loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    return getattr(loaders, "dataset", None)


def _merge(shards: list[Path], path: Path) -> tuple[int, int]:
    """Merge the ranks' shards into ``path`` in dataset order, one line per id; remove the shards.

    Returns:
        Lines written and repeated lines dropped.
    """
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise OutputError(
            f"cannot write predictions '{path}': the shard(s) {', '.join(missing)} of other ranks are not in "
            f"{path.parent}; under multi-node DDP the output folder must be on a file system all nodes share"
        )
    entries = []
    for shard in shards:
        with writing(path, "predictions"):
            text = shard.read_text(encoding="utf-8")
        entries.extend(json.loads(line) for line in text.splitlines() if line)

    def order(entry: dict[str, Any]) -> tuple:
        dataloader_idx, position, rank, count = entry["key"]
        # unknown positions after the known ones, in the order they were written
        return (dataloader_idx, position is None, position or 0, rank, count)

    seen: set[str] = set()
    lines = []
    for entry in sorted(entries, key=order):
        sid = entry["line"]["id"]
        if sid in seen:
            continue
        seen.add(sid)
        lines.append(json.dumps(entry["line"], ensure_ascii=False))
    atomic_write(
        path, lambda f: f.write("".join(f"{line}\n" for line in lines).encode("utf-8")), "predictions"
    )
    for shard in shards:
        shard.unlink(missing_ok=True)
    return len(lines), len(entries) - len(lines)
