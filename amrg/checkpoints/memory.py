"""Memory folders: the two banks of one ``amrg memory build`` as one verified unit.

A memory folder holds ``visual_memory.{safetensors,json}`` and/or ``report_memory.{safetensors,json}``
and a ``manifest.json`` written last::

    {"format": "amrg.memory_folder", "format_version": 1, "build_id": "...", "kinds": ["visual", "report"],
     "files": {"visual_memory.safetensors": "<sha256>", ...},
     "stage1_checkpoint": "...", "stage1_checkpoint_sha256": "...",
     "data": {...}, "split": "train", "sampling": {...}, "seed": 0}

The whole folder is written under a temporary name in the same parent and renamed into place, so a
killed build leaves either the previous folder or none. Loading checks every file against the
manifest, so a partial, mixed (a bank copied in from another build) or foreign folder (mined with
another stage-1 model) is refused, naming what does not match.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from amrg.checkpoints.stage1 import file_sha256
from amrg.errors import InputError
from amrg.labels import LABELS
from amrg.memory.bank import MemoryBank

__all__ = [
    "MANIFEST",
    "MemoryFolder",
    "MemoryFolderError",
    "bank_stem",
    "load_memory_folder",
    "write_memory_folder",
]

_logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = "amrg.memory_folder"
_FORMAT_VERSION = 1
_KINDS: tuple[Literal["visual", "report"], ...] = ("visual", "report")
_SUFFIXES = (".safetensors", ".json")


class MemoryFolderError(InputError):
    """A memory folder that is partial, mixed, foreign or changed since it was built."""


def bank_stem(kind: str) -> str:
    """File stem of one memory's bank inside a memory folder (``visual_memory``, ``report_memory``)."""
    return f"{kind}_memory"


@dataclass
class MemoryFolder:
    """A verified memory folder: its manifest and the banks it holds (None for a memory not built)."""

    path: Path
    manifest: dict[str, Any]
    visual: MemoryBank | None
    report: MemoryBank | None

    def bank(self, kind: Literal["visual", "report"]) -> MemoryBank:
        """The bank of one memory, or a :class:`MemoryFolderError` naming the folder when it was not built."""
        bank = self.visual if kind == "visual" else self.report
        if bank is None:
            raise MemoryFolderError(
                f"memory folder '{self.path}' has no {kind} memory (built with memories: "
                f"{self.manifest.get('kinds')}); rebuild it with memories: both"
            )
        return bank


def write_memory_folder(
    out_dir: Path | str, banks: Mapping[str, MemoryBank], info: Mapping[str, Any]
) -> Path:
    """Write the banks and their manifest into ``out_dir``, whole or not at all.

    Args:
        out_dir: the memory folder. An existing memory folder (one with a manifest) is replaced; any
            other existing, non-empty folder is refused, so nothing the user put there is overwritten.
        banks: ``{"visual": bank, "report": bank}`` (one or both).
        info: JSON facts for the manifest: ``stage1_checkpoint``, ``stage1_checkpoint_sha256``, ``data``,
            ``split``, ``sampling``, ``seed``, ...

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and is not a memory folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())
    ):
        raise FileExistsError(
            f"memory out_dir '{out_dir}' exists and is not a memory folder (no {MANIFEST}); choose another "
            "out_dir or remove it: memory build never overwrites files it did not write"
        )
    unknown = sorted(set(banks) - set(_KINDS))
    if unknown or not banks:
        raise ValueError(f"write_memory_folder: banks must be some of {list(_KINDS)}, got {sorted(banks)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build_id = uuid.uuid4().hex
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{build_id[:8]}")
    try:
        tmp.mkdir()
        files = {}
        for kind in _KINDS:
            bank = banks.get(kind)
            if bank is None:
                continue
            bank.metadata["build_id"] = build_id
            for path in bank.save(tmp / bank_stem(kind)):
                files[path.name] = file_sha256(path)
        manifest = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "build_id": build_id,
            "kinds": [k for k in _KINDS if k in banks],
            "files": files,
            **dict(info),
        }
        json.dumps(manifest)  # plain data only; fails before anything is moved
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{build_id[:8]}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _logger.info("wrote memory folder %s (%s)", out_dir, ", ".join(sorted(files)))
    return out_dir


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        hint = ""
        if folder.with_name(folder.name + ".safetensors").is_file() or folder.suffix in _SUFFIXES:
            hint = "; give the memory folder that `amrg memory build` wrote (its out_dir), not a bank file"
        raise FileNotFoundError(f"memory folder '{folder}' not found{hint}")
    if not path.is_file():
        raise MemoryFolderError(
            f"memory folder '{folder}' has no {MANIFEST}: a build was killed before it finished, or the folder "
            "was not written by `amrg memory build`; rebuild it"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MemoryFolderError(f"memory folder '{folder}': corrupt {MANIFEST} ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise MemoryFolderError(f"memory folder '{folder}': {MANIFEST} is not an amrg memory manifest")
    if manifest.get("format_version") != _FORMAT_VERSION:
        raise MemoryFolderError(
            f"memory folder '{folder}': manifest format_version {manifest.get('format_version')!r}, this amrg "
            f"reads {_FORMAT_VERSION}; rebuild it"
        )
    return manifest


def load_memory_folder(
    folder: Path | str,
    stage1_sha256: str | None = None,
    forbidden_ids: Iterable[str] = (),
    visual_dim: int | None = None,
    kinds: Iterable[Literal["visual", "report"]] = _KINDS,
) -> MemoryFolder:
    """Read a memory folder after checking every file against its manifest.

    Args:
        folder: the folder ``amrg memory build`` wrote.
        stage1_sha256: the sha256 of the stage-1 checkpoint that will use the visual memory; a folder
            mined with another stage-1 model is refused. None skips the check.
        forbidden_ids: study ids (the run's val/test splits) the memories must not hold.
        visual_dim: the width the visual memory must have (the stage-1 Q-Former width).
        kinds: the memories that must be there.

    Raises:
        FileNotFoundError: no such folder.
        MemoryFolderError: no manifest (killed build), a file missing, changed or not in the manifest
            (mixed banks), another stage-1 model, or a memory not built; every mismatch named.
        ValueError: a bank that fails its own checks (dims, labels, NaN, leakage).
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise MemoryFolderError(f"memory folder '{folder}': manifest has no file list")
    problems = []
    for name, digest in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != digest:
            problems.append(
                f"{name} is not the file this build wrote (sha256 {file_sha256(path)[:12]}…, manifest "
                f"{str(digest)[:12]}…): banks from different builds are mixed"
            )
    for path in sorted(folder.iterdir()):
        if path.suffix in _SUFFIXES and path.name not in files and path.name != MANIFEST:
            problems.append(f"{path.name} is not part of this build (not in {MANIFEST})")
    wanted = list(kinds)
    built = manifest.get("kinds", [])
    for kind in wanted:
        if kind not in built:
            problems.append(f"no {kind} memory (built: {built}); rebuild with memories: both")
    if stage1_sha256 is not None and "visual" in wanted and "visual" in built:
        mined = manifest.get("stage1_checkpoint_sha256")
        if mined != stage1_sha256:
            problems.append(
                f"the visual memory was mined with another stage-1 model: stage-1 checkpoint sha256 "
                f"{str(mined)[:12]}… ('{manifest.get('stage1_checkpoint')}') but stage 2 uses "
                f"{stage1_sha256[:12]}…; rebuild the memory with this stage-1 checkpoint"
            )
    if problems:
        raise MemoryFolderError(f"memory folder '{folder}' is refused:\n  - " + "\n  - ".join(problems))

    forbidden = set(forbidden_ids)
    banks: dict[str, MemoryBank | None] = {"visual": None, "report": None}
    for kind in built:
        bank = MemoryBank.load(
            folder / bank_stem(kind),
            expected_dim=visual_dim if kind == "visual" else None,
            expected_labels=LABELS,
            forbidden_ids=forbidden,
            expected_kind=kind,
            dim_name="the stage-1 Q-Former width",
        )
        if bank.metadata.get("build_id") != manifest.get("build_id"):
            raise MemoryFolderError(
                f"memory folder '{folder}': {kind} bank belongs to build {bank.metadata.get('build_id')!r}, the "
                f"manifest to {manifest.get('build_id')!r}: banks from different builds are mixed"
            )
        banks[kind] = bank
    return MemoryFolder(folder, manifest, banks["visual"], banks["report"])
