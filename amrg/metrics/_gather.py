"""Gather generated reports across DDP ranks, deduplicate them, and score them once.

The reference code scores each rank's shard and averages the results, which is wrong for corpus
metrics (CIDEr's document frequencies, corpus BLEU) and counts the samples that
``DistributedSampler`` repeats to pad the last batch twice. Here every rank sends its
(id, hypothesis, reference) rows to every other rank, duplicate ids are dropped (the first copy
is kept), the rows are sorted by id, rank 0 scores them once and broadcasts the result, so every
rank holds the same numbers.

Strings are not tensors. Each rank JSON-encodes its rows to UTF-8 and sends the bytes as a uint8
tensor padded to the longest rank's length (``torch.distributed.all_gather`` needs equal shapes).
This keeps the exchange free of pickle (``all_gather_object`` pickles) and works on every backend
(gloo on CPU, NCCL with tensors on the rank's GPU).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ReportRow",
    "ReportTextMetric",
    "all_gather_json",
    "broadcast_json",
    "dedup_sort_rows",
    "is_distributed",
]

log = logging.getLogger(__name__)

ReportRow = tuple[str, str, str]
"""One sample: (id, hypothesis, reference)."""

_T = TypeVar("_T")
_TEXT_STATES = ("ids", "hypotheses", "references")


def is_distributed() -> bool:
    """Whether a default process group is initialised (i.e. we run under DDP)."""
    return dist.is_available() and dist.is_initialized()


def _encode(obj: Any, device: torch.device) -> Tensor:
    data = bytearray(json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8"))
    return torch.frombuffer(data, dtype=torch.uint8).to(device)  # [L] bytes


def _decode(buf: Tensor) -> Any:
    return json.loads(buf.cpu().numpy().tobytes().decode("utf-8"))


def all_gather_json(obj: Any, device: torch.device | str = "cpu", group: Any = None) -> list[Any]:
    """Gather a JSON-serialisable object from every rank.

    A collective: under DDP every rank of ``group`` must call it. Without a process group it
    returns ``[obj]``.

    Args:
        obj: this rank's object (lists, dicts, str, float, int, None).
        device: where the byte tensors live; must suit the backend (the rank's GPU for NCCL).
        group: process group; ``None`` is the world.

    Returns:
        One object per rank, in rank order.
    """
    if not is_distributed():
        return [obj]
    device = torch.device(device)
    world = dist.get_world_size(group)
    payload = _encode(obj, device)  # [L]
    size = torch.tensor([payload.numel()], dtype=torch.long, device=device)  # [1]
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    max_len = max(int(s.item()) for s in sizes)
    padded = torch.zeros(max_len, dtype=torch.uint8, device=device)  # [max_len]
    padded[: payload.numel()] = payload
    bufs = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return [_decode(buf[: int(n.item())]) for buf, n in zip(bufs, sizes)]


def broadcast_json(obj: Any, device: torch.device | str = "cpu", group: Any = None) -> Any:
    """Send a JSON-serialisable object from the group's first rank to every rank.

    A collective: under DDP every rank of ``group`` must call it. Without a process group it
    returns ``obj``. Floats survive exactly (JSON writes the shortest repr that round-trips).

    Args:
        obj: the object on the group's first rank; ignored on the others.
        device: where the byte tensors live; must suit the backend.
        group: process group; ``None`` is the world.

    Returns:
        The first rank's object.
    """
    if not is_distributed():
        return obj
    device = torch.device(device)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    is_src = dist.get_rank(group) == 0
    payload = _encode(obj, device) if is_src else None
    size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=group)
    if payload is None:
        payload = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)  # [L]
    dist.broadcast(payload, src=src, group=group)
    return _decode(payload)


def dedup_sort_rows(rows: Sequence[Sequence[str]]) -> tuple[list[ReportRow], int]:
    """Drop repeated ids (keeping the first copy) and sort by id.

    ``DistributedSampler`` pads the last batch by repeating samples, so a gathered set may hold an
    id twice. A repeat with a different reference means two distinct samples share an id and is
    logged as a warning; a repeat whose only difference is the hypothesis (the padded copy was
    generated again in another batch, e.g. with sampling) is logged at debug level.

    Args:
        rows: (id, hypothesis, reference) rows, ranks concatenated in rank order.

    Returns:
        The unique rows sorted by id, and the number of rows dropped.
    """
    kept: dict[str, ReportRow] = {}
    clashes: list[str] = []  # same id, different reference
    regenerated: list[str] = []  # same id and reference, different hypothesis
    for sid, hyp, ref in rows:
        if sid not in kept:
            kept[sid] = (sid, hyp, ref)
        elif kept[sid][2] != ref:
            clashes.append(sid)
        elif kept[sid][1] != hyp:
            regenerated.append(sid)
    if clashes:
        log.warning(
            "%d repeated report id(s) carry different reference text (e.g. id=%r); kept the first copy "
            "of each. Ids must be unique within a split.",
            len(clashes),
            clashes[0],
        )
    if regenerated:
        log.debug(
            "%d padded repeat(s) were generated differently (e.g. id=%r); kept the first",
            len(regenerated),
            regenerated[0],
        )
    dropped = len(rows) - len(kept)
    return [kept[k] for k in sorted(kept)], dropped


class ReportTextMetric(Metric):
    """Base for metrics over (id, hypothesis, reference) report triples.

    ``update`` only stores strings. ``compute`` (in subclasses) calls :meth:`_gathered_rows` to
    get the deduplicated, id-sorted rows of all ranks, and :meth:`_on_rank_zero` to score them
    once and share the result. torchmetrics' own state sync is off (``sync_on_compute=False``)
    because it only reduces tensors.

    Use ``update`` + ``compute``; ``forward`` would score every batch on its own.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    ids: list[str]
    hypotheses: list[str]
    references: list[str]

    def __init__(self) -> None:
        super().__init__(dist_sync_on_step=False, sync_on_compute=False)
        for name in _TEXT_STATES:
            self.add_state(name, default=[], dist_reduce_fx=None)
        self.last_rows: list[ReportRow] = []
        """Rows scored by the last ``compute``: deduplicated, sorted by id, the same on every rank."""

    def update(self, ids: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]) -> None:
        """Store one batch of reports.

        Args:
            ids: sample ids, [B].
            hypotheses: generated reports, [B].
            references: cleaned reference reports, [B].

        Raises:
            ValueError: the three sequences differ in length, or an item is not a string.
        """
        ids, hypotheses, references = list(ids), list(hypotheses), list(references)
        if not len(ids) == len(hypotheses) == len(references):
            raise ValueError(
                f"{type(self).__name__}.update: got {len(ids)} ids, {len(hypotheses)} hypotheses and "
                f"{len(references)} references; expected one of each per sample"
            )
        for sid, hyp, ref in zip(ids, hypotheses, references):
            for field, value in (("id", sid), ("hypothesis", hyp), ("reference", ref)):
                if not isinstance(value, str):
                    raise ValueError(
                        f"{type(self).__name__}.update: id={sid!r}: {field} must be a str, "
                        f"found {type(value).__name__} {value!r}"
                    )
        self.ids.extend(ids)
        self.hypotheses.extend(hypotheses)
        self.references.extend(references)

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> Metric:
        # String states cannot be moved with `.to(device)`; leave them out.
        extra = [exclude_state] if isinstance(exclude_state, str) and exclude_state else list(exclude_state)
        return super()._apply(fn, exclude_state=[*extra, *_TEXT_STATES])

    def _gathered_rows(self) -> list[ReportRow]:
        """All ranks' rows, deduplicated by id and sorted by id (a collective under DDP)."""
        local = [list(r) for r in zip(self.ids, self.hypotheses, self.references)]
        per_rank = all_gather_json(local, device=self.device, group=self.process_group)
        rows = [tuple(r) for rank_rows in per_rank for r in rank_rows]
        unique, dropped = dedup_sort_rows(rows)
        if dropped:
            log.debug("%s: dropped %d repeated id(s) (sampler padding)", type(self).__name__, dropped)
        self.last_rows = unique
        return unique

    def _on_rank_zero(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on rank 0 only and hand its JSON-serialisable result to every rank.

        If ``fn`` raises on rank 0, the other ranks raise too instead of waiting forever.
        """
        if not is_distributed():
            return fn()
        is_zero = dist.get_rank(self.process_group) == 0
        error: BaseException | None = None
        message: Any = None
        if is_zero:
            try:
                message = {"ok": True, "value": fn()}
            except Exception as exc:  # re-raised below, after the other ranks are told
                error = exc
                message = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        message = broadcast_json(message, device=self.device, group=self.process_group)
        if error is not None:
            raise error
        if not message["ok"]:
            raise RuntimeError(f"{type(self).__name__}.compute failed on rank 0: {message['error']}")
        return message["value"]
