"""MemoryBank: per-label stored patterns with provenance, saved as safetensors + JSON.

A bank holds, for each of the 14 labels (in :data:`amrg.labels.LABELS` order), a feature tensor
``[n_l, dim]`` and one provenance record per row: where the pattern came from (``source_id``, the
study id, and its ``split``) plus free fields such as ``box``, ``view``, ``cam_score`` (visual
memory) or ``text`` (report memory). It is sampled once with a recorded seed (the reference code
re-samples on every load) and refuses to load when it holds an evaluation id (the reference code
builds its report memory from the test split).

On disk a bank is two files next to each other, named after one stem ``<path>``:

- ``<path>.safetensors``: one tensor per label under the key ``label/<index:02d>`` (``label/03`` is
  Lung Lesion); empty labels are stored as ``[0, dim]``.
- ``<path>.json``: ``format``, ``format_version``, ``kind``, ``dim``, ``dtype``, ``labels``,
  ``counts``, ``metadata`` and ``provenance`` (a list of records per label name).

No pickle anywhere: both files are plain data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from amrg.errors import writing
from amrg.labels import LABELS

__all__ = ["FORMAT_VERSION", "MemoryBank", "check_no_leakage"]

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FORMAT = "amrg.memory_bank"
_KINDS = ("visual", "report")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_REQUIRED_FIELDS = ("source_id", "split")
_MAX_LISTED = 10


def _fsync(path: Path) -> None:
    """Flush a file written by another library (safetensors writes by path) to the disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"memory features must be one of {list(_DTYPES)}, got {dtype}")


def _tensor_key(index: int) -> str:
    return f"label/{index:02d}"


def _stem(path: str | os.PathLike[str]) -> Path:
    """Strip a ``.safetensors``/``.json`` suffix so either file or the stem names the bank."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix("")
    return path


def _files(stem: Path) -> tuple[Path, Path]:
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _nonfinite_rows(features: Tensor) -> list[int]:
    return torch.nonzero(~torch.isfinite(features).all(dim=1)).flatten().tolist()


def _listed(items: Sequence[Any]) -> str:
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    more = f", ... ({len(items)} in total)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


class MemoryBank:
    """Per-label stored patterns ``[n_l, dim]`` with one provenance record per row.

    Args:
        kind: ``"visual"`` (Grad-CAM ROI patches through the stage-1 encoder) or ``"report"``
            (text-encoder embeddings of train reports).
        dim: width of every stored pattern.
        labels: label names, in order; the default is the 14 CheXpert labels in CheXbert order.
        metadata: JSON-serialisable facts about how the bank was made (``seed``, ``encoder``,
            ``config``, ...); :meth:`sample` adds ``sample_seed``, ``sample_total`` and
            ``sample_per_label_max``.
        dtype: feature dtype (float32, bfloat16 or float16); ``None`` takes it from the first
            :meth:`add` and falls back to float32 for a bank that stays empty.

    Raises:
        ValueError: unknown kind, non-positive dim, duplicate labels or metadata that is not JSON.
    """

    def __init__(
        self,
        kind: Literal["visual", "report"],
        dim: int,
        labels: Sequence[str] = LABELS,
        metadata: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"MemoryBank kind must be one of {list(_KINDS)}, got {kind!r}")
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"MemoryBank dim must be a positive int, got {dim!r}")
        labels = tuple(labels)
        if len(set(labels)) != len(labels) or not labels:
            raise ValueError(f"MemoryBank labels must be unique and non-empty, got {list(labels)}")
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as err:
            raise ValueError(f"MemoryBank metadata must be JSON-serialisable: {err}") from None
        self.kind = kind
        self.dim = dim
        self.labels = labels
        self.metadata = metadata
        self._dtype = dtype
        if dtype is not None:
            _dtype_name(dtype)
        self._features: dict[str, Tensor] = {}
        self._provenance: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}

    # ------------------------------------------------------------------ contents

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored features (float32 until something is added, unless set)."""
        return self._dtype if self._dtype is not None else torch.float32

    def add(self, label: str, features: Tensor, provenance: Sequence[dict[str, Any]]) -> None:
        """Append patterns to one label.

        Args:
            label: one of :attr:`labels`.
            features: the patterns, [n, dim], float32/bfloat16/float16; stored detached on the CPU.
            provenance: one record per row with at least ``source_id`` (str, the study id) and
                ``split`` (str); ``label`` is filled in (and must match when given); any other
                JSON-serialisable fields are kept as they are.

        Raises:
            ValueError: unknown label, wrong shape or dtype, row/record count mismatch, NaN/Inf in a
                row, a record without ``source_id``/``split`` or not JSON-serialisable.
        """
        if label not in self._provenance:
            raise ValueError(
                f"{self.kind} memory: unknown label {label!r}; expected one of {list(self.labels)}"
            )
        where = f"{self.kind} memory label {label!r}"
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != self.dim:
            shape = list(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{where}: expected features [n, {self.dim}] (dim), got {shape}")
        dtype_name = _dtype_name(features.dtype)
        if self._dtype is not None and features.dtype != self._dtype:
            raise ValueError(
                f"{where}: features are {dtype_name} but the bank holds {_dtype_name(self._dtype)}; "
                "cast them first"
            )
        if len(provenance) != features.shape[0]:
            raise ValueError(
                f"{where}: {features.shape[0]} feature rows but {len(provenance)} provenance records"
            )
        bad = _nonfinite_rows(features)
        if bad:
            raise ValueError(f"{where}: NaN/Inf in feature rows {_listed(bad)}")
        records = [self._check_record(label, i, rec) for i, rec in enumerate(provenance)]

        self._dtype = features.dtype
        new = features.detach().to("cpu", copy=True).contiguous()
        old = self._features.get(label)
        self._features[label] = new if old is None else torch.cat([old, new], dim=0)
        self._provenance[label].extend(records)

    def _check_record(self, label: str, row: int, record: dict[str, Any]) -> dict[str, Any]:
        where = f"{self.kind} memory label {label!r} provenance row {row}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
        missing = [key for key in _REQUIRED_FIELDS if not isinstance(record.get(key), str)]
        if missing:
            raise ValueError(f"{where}: needs string field(s) {missing}, got {record!r}")
        if record.get("label", label) != label:
            raise ValueError(f"{where}: record says label {record['label']!r}")
        record = {"label": label, **record}
        try:
            json.dumps(record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: not JSON-serialisable ({err})") from None
        return record

    def features(self, label: str) -> Tensor:
        """Stored patterns of one label, [n_l, dim] (the bank's own tensor: do not modify it)."""
        self._require_label(label)
        found = self._features.get(label)
        return found if found is not None else torch.zeros(0, self.dim, dtype=self.dtype)

    def provenance(self, label: str) -> list[dict[str, Any]]:
        """Provenance records of one label, one per row of :meth:`features` (copies)."""
        self._require_label(label)
        return [dict(rec) for rec in self._provenance[label]]

    def _require_label(self, label: str) -> None:
        if label not in self._provenance:
            raise KeyError(
                f"{self.kind} memory: unknown label {label!r}; expected one of {list(self.labels)}"
            )

    def counts(self) -> dict[str, int]:
        """Number of patterns per label, in label order."""
        return {label: len(self._provenance[label]) for label in self.labels}

    def __len__(self) -> int:
        return sum(len(records) for records in self._provenance.values())

    def ids(self) -> set[str]:
        """All source (study) ids the bank's patterns come from."""
        return {rec["source_id"] for records in self._provenance.values() for rec in records}

    def __repr__(self) -> str:
        return (
            f"MemoryBank(kind={self.kind!r}, dim={self.dim}, dtype={_dtype_name(self.dtype)}, "
            f"size={len(self)}, labels={len(self.labels)})"
        )

    def stacked(self) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
        """All patterns concatenated in label order: what a retriever stores.

        Returns:
            patterns [M, dim], label_index [M] long (position in :attr:`labels`), and the M
            provenance records in the same order.
        """
        parts = [self.features(label) for label in self.labels]
        index = [
            torch.full((len(self._provenance[label]),), i, dtype=torch.long)
            for i, label in enumerate(self.labels)
        ]
        records = [rec for label in self.labels for rec in self.provenance(label)]
        return torch.cat(parts, dim=0), torch.cat(index), records

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        total: int | None = None,
        per_label_max: int | None = None,
        seed: int = 0,
    ) -> MemoryBank:
        """Draw a label-proportional subset, deterministically by ``seed``.

        Each label is first capped at ``per_label_max`` (paper, visual memory: at most 500 patches
        per label). Then ``min(total, available)`` patterns are shared out in proportion to each
        label's count in this bank (paper, report memory: 6,000 reports in proportion to label
        frequency) by the largest-remainder method, never above a label's cap, so the counts sum
        exactly; when the total allows, every non-empty label keeps at least one. Within a label the
        rows are the first k of a seeded permutation (kept in original order), so a smaller sample
        is a subset of a larger one with the same seed.

        Args:
            total: number of patterns to keep in all; ``None`` keeps everything under the cap.
            per_label_max: most patterns kept per label; ``None`` for no cap.
            seed: seed of the ``torch.Generator`` that picks the rows.

        Returns:
            A new bank; its metadata adds ``sample_seed``, ``sample_total``, ``sample_per_label_max``
            and ``sampled_from`` (the counts before sampling).

        Raises:
            ValueError: negative ``total`` or ``per_label_max``.
        """
        for name, value in (("total", total), ("per_label_max", per_label_max)):
            if value is not None and value < 0:
                raise ValueError(f"MemoryBank.sample: {name} must be >= 0, got {value}")
        counts = self.counts()
        caps = {label: n if per_label_max is None else min(n, per_label_max) for label, n in counts.items()}
        if total is None:
            quota = caps
        else:
            quota = _proportional_quota(counts, caps, min(total, sum(caps.values())))

        generator = torch.Generator().manual_seed(seed)
        metadata = {
            **self.metadata,
            "sample_seed": seed,
            "sample_total": total,
            "sample_per_label_max": per_label_max,
            "sampled_from": counts,
        }
        out = MemoryBank(self.kind, self.dim, self.labels, metadata=metadata, dtype=self.dtype)
        for label in self.labels:
            n = counts[label]
            if n == 0:
                continue
            # Draw a permutation for every non-empty label whatever its quota, so one label's rows
            # do not depend on how many another label keeps.
            order = torch.randperm(n, generator=generator)
            keep = order[: quota[label]].sort().values
            if keep.numel() == 0:
                continue
            records = self._provenance[label]
            out.add(label, self._features[label][keep], [records[i] for i in keep.tolist()])
        _logger.info(
            "sampled %s memory: %d of %d patterns (total=%s, per_label_max=%s, seed=%d)",
            self.kind,
            len(out),
            len(self),
            total,
            per_label_max,
            seed,
        )
        return out

    # ------------------------------------------------------------------ I/O

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``<path>.safetensors`` and ``<path>.json`` (a ``.safetensors``/``.json`` suffix on
        ``path`` is dropped). Parent directories are created; each file is written to a temporary
        name in the same folder, fsynced and then renamed, so a crash never leaves a half-written bank
        under the final name, and a failed save leaves no temp file.

        Returns:
            The paths of the tensor file and the JSON file.

        Raises:
            OutputError: the folder cannot be made or written (read-only, full), naming the file.
        """
        tensor_path, json_path = _files(_stem(path))
        with writing(tensor_path.parent, "memory folder"):
            tensor_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {_tensor_key(i): self.features(label).contiguous() for i, label in enumerate(self.labels)}
        header = {
            "format": _FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "dtype": _dtype_name(self.dtype),
            "labels": list(self.labels),
            "counts": self.counts(),
            "metadata": self.metadata,
            "provenance": {label: self._provenance[label] for label in self.labels},
        }
        # Temp names in the bank's own folder (a rename never crosses file systems), unique per writer;
        # on any failure both are removed and a previous bank stays whole.
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp_tensors = tensor_path.with_name(f".{tensor_path.name}{tag}")
        tmp_json = json_path.with_name(f".{json_path.name}{tag}")
        try:
            with writing(tensor_path, "memory bank"):
                save_file(
                    tensors,
                    str(tmp_tensors),
                    metadata={"format": _FORMAT, "format_version": str(FORMAT_VERSION)},
                )
                _fsync(tmp_tensors)
            with writing(json_path, "memory bank"):
                with tmp_json.open("w", encoding="utf-8") as f:
                    f.write(json.dumps(header, indent=1) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                # safetensors creates its file owner-only (0600); give it the mode the user's umask gives the JSON.
                os.chmod(tmp_tensors, tmp_json.stat().st_mode & 0o777)
                os.replace(tmp_tensors, tensor_path)
                os.replace(tmp_json, json_path)
        finally:
            tmp_tensors.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
        _logger.info(
            "saved %s memory (%d patterns) to %s(.safetensors|.json)", self.kind, len(self), _stem(path)
        )
        return tensor_path, json_path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_dim: int | None = None,
        expected_labels: Sequence[str] = LABELS,
        forbidden_ids: Iterable[str] = (),
        expected_kind: Literal["visual", "report"] | None = None,
        dim_name: str = "the expected width",
        forbidden_split: str = "evaluation (val/test)",
    ) -> MemoryBank:
        """Read a bank written by :meth:`save` and check it before anything uses it.

        Args:
            path: the stem ``<path>`` (or either file) of the bank.
            expected_dim: width the consumer needs; ``None`` skips the check.
            expected_labels: label names, in order, the consumer needs.
            forbidden_ids: source ids the bank must not hold (the run's val/test ids).
            expected_kind: ``"visual"`` or ``"report"``; ``None`` skips the check.
            dim_name: what ``expected_dim`` is, for the message (e.g. "the stage-1 Q-Former width").
            forbidden_split: what ``forbidden_ids`` are, for the message.

        Raises:
            FileNotFoundError: a file is missing (both paths named).
            ValueError: corrupt files, or every mismatch found (format version, kind, labels, dim,
                dtype, counts vs provenance vs tensors, NaN/Inf rows), listed in one message; or a
                source id among ``forbidden_ids``.
        """
        stem = _stem(path)
        tensor_path, json_path = _files(stem)
        missing = [str(p) for p in (tensor_path, json_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"memory bank {stem}: missing file(s) {missing}")
        try:
            header = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"memory bank {json_path}: corrupt JSON ({err})") from None
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"memory bank {tensor_path}: corrupt safetensors file ({err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"memory bank {json_path}: expected a JSON object, got {type(header).__name__}")

        problems = _check_header(header, expected_dim, tuple(expected_labels), expected_kind, dim_name)
        if not problems:
            problems = _check_tensors(header, tensors)
        if problems:
            raise ValueError(f"memory bank {stem} failed its checks:\n  - " + "\n  - ".join(problems))

        bank = cls(
            header["kind"],
            header["dim"],
            header["labels"],
            metadata=header["metadata"],
            dtype=_DTYPES[header["dtype"]],
        )
        for i, label in enumerate(bank.labels):
            records = header["provenance"][label]
            if records:
                try:
                    bank.add(label, tensors[_tensor_key(i)], records)
                except ValueError as err:
                    raise ValueError(f"memory bank {stem}: {err}") from None
        check_no_leakage(bank, forbidden_ids, forbidden_split, source=str(stem))
        _logger.info(
            "loaded %s memory from %s: %d patterns, counts %s", bank.kind, stem, len(bank), bank.counts()
        )
        return bank


def check_no_leakage(
    bank: MemoryBank,
    forbidden_ids: Iterable[str],
    split_name: str = "evaluation (val/test)",
    source: str | None = None,
) -> None:
    """Refuse a bank that holds any of ``forbidden_ids`` (the run's val/test study ids).

    Memories must come from the train split only; a pattern from an evaluation study leaks its
    report or image into the prediction for that very study.

    Args:
        bank: the bank to check.
        forbidden_ids: source ids that must not appear.
        split_name: what the forbidden ids are, for the message.
        source: where the bank came from (a path), for the message.

    Raises:
        ValueError: lists up to 10 offending ids and how many there are in total.
    """
    forbidden = set(forbidden_ids)
    if not forbidden:
        return
    leaked = sorted(bank.ids() & forbidden)
    if leaked:
        where = f"memory bank {source}" if source else f"{bank.kind} memory"
        raise ValueError(
            f"{where}: {len(leaked)} source id(s) belong to the {split_name} split, which memories "
            f"must not hold: {_listed(leaked)}; rebuild the memory from the train split only"
        )


def _proportional_quota(weights: dict[str, int], caps: dict[str, int], total: int) -> dict[str, int]:
    """Share ``total`` out in proportion to ``weights``, capped per label, summing exactly.

    Largest-remainder (Hamilton) apportionment; a label whose proportional share exceeds its cap is
    fixed at the cap and the rest re-shared among the others. Ties go to the earlier label. When
    ``total`` is at least the number of labels with ``caps > 0``, each of them gets at least one.
    """
    assert total <= sum(caps.values())
    quota = dict.fromkeys(weights, 0)
    open_labels = [label for label in weights if caps[label] > 0]
    remaining = total
    share: dict[str, float] = {}
    while open_labels and remaining > 0:
        weight_sum = sum(weights[label] for label in open_labels)
        share = {label: remaining * weights[label] / weight_sum for label in open_labels}
        full = [label for label in open_labels if share[label] >= caps[label]]
        if not full:
            break
        for label in full:
            quota[label] = caps[label]
            remaining -= caps[label]
        open_labels = [label for label in open_labels if label not in full]
    if open_labels and remaining > 0:
        for label in open_labels:
            quota[label] = math.floor(share[label])
        leftover = remaining - sum(quota[label] for label in open_labels)
        by_remainder = sorted(open_labels, key=lambda label: -(share[label] - quota[label]))
        for label in by_remainder[:leftover]:
            quota[label] += 1

    # Every non-empty label keeps at least one pattern when the total allows: take it from the label
    # that is most over its exact proportional share (among those with more than one).
    nonempty = [label for label in weights if caps[label] > 0]
    if total >= len(nonempty):
        exact = {label: total * weights[label] / sum(weights[x] for x in nonempty) for label in nonempty}
        for label in nonempty:
            if quota[label] == 0:
                donor = max(
                    (x for x in nonempty if quota[x] > 1),
                    key=lambda x: (quota[x] - exact[x], quota[x]),
                )
                quota[donor] -= 1
                quota[label] = 1
    assert sum(quota.values()) == total
    return quota


def _check_header(
    header: dict[str, Any],
    expected_dim: int | None,
    expected_labels: tuple[str, ...],
    expected_kind: str | None,
    dim_name: str,
) -> list[str]:
    """Every problem with the JSON header, as messages (empty when it is sound)."""
    problems: list[str] = []
    needed = ("format_version", "kind", "dim", "dtype", "labels", "counts", "metadata", "provenance")
    absent = [key for key in needed if key not in header]
    if absent:
        return [f"JSON lacks field(s) {absent}"]
    if header.get("format", _FORMAT) != _FORMAT:
        problems.append(f"format is {header['format']!r}, expected {_FORMAT!r}")
    if header["format_version"] != FORMAT_VERSION:
        problems.append(
            f"format_version is {header['format_version']!r}, this amrg reads version {FORMAT_VERSION}"
        )
    kind = header["kind"]
    if kind not in _KINDS:
        problems.append(f"kind is {kind!r}, expected one of {list(_KINDS)}")
    elif expected_kind is not None and kind != expected_kind:
        problems.append(f"this is a {kind} memory but a {expected_kind} memory was expected")
    dim = header["dim"]
    if not isinstance(dim, int) or dim <= 0:
        problems.append(f"dim is {dim!r}, expected a positive int")
    elif expected_dim is not None and dim != expected_dim:
        problems.append(f"{kind} memory dim {dim} but {dim_name} is {expected_dim}")
    if header["dtype"] not in _DTYPES:
        problems.append(f"dtype is {header['dtype']!r}, expected one of {list(_DTYPES)}")
    if not isinstance(header["metadata"], dict):
        problems.append("metadata is not a JSON object")

    labels = header["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        problems.append(f"labels is not a list of names: {labels!r}")
        return problems
    if tuple(labels) != expected_labels:
        absent_labels = [x for x in expected_labels if x not in labels]
        extra_labels = [x for x in labels if x not in expected_labels]
        if absent_labels or extra_labels:
            problems.append(
                f"labels differ from the expected ones: missing {absent_labels}, unexpected {extra_labels}"
            )
        else:
            problems.append(f"labels are in another order: {labels}, expected {list(expected_labels)}")
    counts, provenance = header["counts"], header["provenance"]
    if not isinstance(counts, dict) or not isinstance(provenance, dict):
        problems.append("counts and provenance must be JSON objects keyed by label")
        return problems
    for label in labels:
        n, records = counts.get(label), provenance.get(label)
        if not isinstance(n, int) or not isinstance(records, list):
            problems.append(f"label {label!r}: counts or provenance entry missing or malformed")
        elif n != len(records):
            problems.append(
                f"label {label!r}: counts says {n} but there are {len(records)} provenance records"
            )
    for key in sorted((set(counts) | set(provenance)) - set(labels)):
        problems.append(f"counts/provenance name {key!r}, which is not among the labels")
    return problems


def _check_tensors(header: dict[str, Any], tensors: dict[str, Tensor]) -> list[str]:
    """Every disagreement between the JSON header and the tensors (empty when they agree)."""
    problems: list[str] = []
    dtype = _DTYPES[header["dtype"]]
    expected_keys = {_tensor_key(i) for i in range(len(header["labels"]))}
    if set(tensors) != expected_keys:
        problems.append(
            f"tensor keys {sorted(tensors)} do not match the {len(expected_keys)} labels "
            f"({sorted(expected_keys)})"
        )
        return problems
    for i, label in enumerate(header["labels"]):
        t = tensors[_tensor_key(i)]
        n = header["counts"][label]
        if t.ndim != 2 or t.shape[0] != n or t.shape[1] != header["dim"]:
            problems.append(
                f"label {label!r} ({_tensor_key(i)}): tensor shape {list(t.shape)}, JSON says [{n}, {header['dim']}]"
            )
            continue
        if t.dtype != dtype:
            problems.append(
                f"label {label!r} ({_tensor_key(i)}): tensor dtype {t.dtype}, JSON says {header['dtype']}"
            )
            continue
        bad = _nonfinite_rows(t)
        if bad:
            records = header["provenance"][label]
            ids = [records[r].get("source_id") if isinstance(records[r], dict) else None for r in bad]
            problems.append(f"label {label!r}: NaN/Inf in rows {_listed(bad)} (source ids {_listed(ids)})")
    return problems
