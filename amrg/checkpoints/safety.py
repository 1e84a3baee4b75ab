"""Checkpoints never run code: class paths read from an artifact must resolve inside amrg or an allow-list.

A Lightning checkpoint written through LightningCLI stores its configuration as ``class_path`` +
``init_args`` pairs, and instantiating one imports its module, so a crafted checkpoint could run any
installed code on load. Every class path read from an artifact is checked here, as a string, *before*
anything is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from amrg.errors import CheckpointError, reading

__all__ = [
    "ALLOWED_CLASS_PREFIXES",
    "CHECKPOINT_EXPECTED",
    "MODULE_KEY",
    "check_checkpoint_file",
    "check_written_by",
    "UntrustedCheckpointError",
    "allowed_prefixes",
    "check_class_paths",
    "class_paths",
    "instantiate_checked",
]

ALLOWED_CLASS_PREFIXES: tuple[str, ...] = ("amrg.", "torch.optim.", "torch.nn.")
"""Module prefixes a class path stored in a checkpoint may name (amrg itself, torch optimisers and
schedulers, torch.nn layers). Extend it for one process with the ``AMRG_TRUSTED_CLASSES`` environment
variable (comma-separated prefixes, e.g. ``mylab.models.``)."""

_ENV = "AMRG_TRUSTED_CLASSES"

MODULE_KEY = "amrg_module"
"""Checkpoint entry naming the LightningModule class that wrote it (``--ckpt_path`` checks it)."""


class UntrustedCheckpointError(CheckpointError):
    """An artifact asks for code outside amrg's allow-list (a class path) or for remote code."""


CHECKPOINT_EXPECTED = "expected a .ckpt file written by `amrg fit`"

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE2_MAGIC = b"\x80\x02"


def is_deepspeed_checkpoint(path: Path | str) -> bool:
    """Whether ``path`` is the folder DeepSpeed writes for one checkpoint (a ``latest`` file, ``checkpoint/``)."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir())


def check_checkpoint_file(path: Path | str, what: str) -> None:
    """Check, from its first bytes only, that ``path`` is a file ``torch.save`` wrote (no unpickling).

    Cheap and free of torch, so a command can refuse random bytes before its slow imports; the full
    check is :func:`amrg.checkpoints.stage1.read_checkpoint`, which calls this first.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a folder (a DeepSpeed checkpoint is named as one), an empty file, or one that starts
            with neither a zip nor a pickle header.
    """
    path = Path(path)
    if path.is_dir():
        if is_deepspeed_checkpoint(path):
            raise CheckpointError(
                f"{what} '{path}' is a DeepSpeed checkpoint folder (configs/trainer/deepspeed_zero*.yaml); "
                'convert it to one .ckpt first (needs deepspeed): python -c "from lightning.pytorch.utilities.'
                "deepspeed import convert_zero_checkpoint_to_fp32_state_dict as c; "
                f"c('{path}', '{path.with_name(path.stem + '-fp32.ckpt')}')\""
            )
        raise CheckpointError(f"{what} '{path}' is a folder; {CHECKPOINT_EXPECTED}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' not found")
    with reading(path, what):
        with path.open("rb") as f:
            head = f.read(4)
    if not head:
        raise CheckpointError(
            f"{what} '{path}' could not be read as a checkpoint: the file is empty; {CHECKPOINT_EXPECTED}"
        )
    # torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a protocol-2 pickle
    if not head.startswith((_ZIP_MAGIC, _PICKLE2_MAGIC)):
        raise CheckpointError(
            f"{what} '{path}' could not be read as a checkpoint: not a file torch.save wrote (neither a zip "
            f"nor a pickle header); {CHECKPOINT_EXPECTED}"
        )


def allowed_prefixes() -> tuple[str, ...]:
    """:data:`ALLOWED_CLASS_PREFIXES` plus the prefixes in ``$AMRG_TRUSTED_CLASSES``."""
    extra = tuple(p.strip() for p in os.environ.get(_ENV, "").split(",") if p.strip())
    return ALLOWED_CLASS_PREFIXES + extra


def class_paths(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``class_path`` / ``_class_path`` / ``_instantiator`` value in a nested config, with its key path."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if key in ("class_path", "_class_path", "_instantiator"):
                yield here, item
            else:
                yield from class_paths(item, here)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from class_paths(item, f"{where}[{i}]")


def check_class_paths(value: Any, source: str, allowed: Sequence[str] | None = None) -> None:
    """Refuse a config (read from ``source``) that names a class outside the allow-list.

    ``lightning.pytorch.cli.instantiate_module`` (Lightning's own instantiator name) is accepted as
    an ``_instantiator`` entry: Lightning writes it, and amrg never calls it from a checkpoint.

    Raises:
        UntrustedCheckpointError: lists every offending key path and class path, and how to trust one.
    """
    prefixes = tuple(allowed) if allowed is not None else allowed_prefixes()
    bad = []
    for key, path in class_paths(value):
        if key.endswith("_instantiator") and path == "lightning.pytorch.cli.instantiate_module":
            continue
        if not isinstance(path, str) or not path.startswith(prefixes) or "." not in path:
            bad.append(f"{key}={path!r}")
    if bad:
        raise UntrustedCheckpointError(
            f"{source}: refused to load: it names code outside amrg's allow-list {list(prefixes)}: "
            f"{', '.join(bad)}. Loading a checkpoint never imports other code; if you trust this file, add "
            f"the module prefix to ${_ENV}"
        )


def instantiate_checked(config: dict[str, Any], base: type, source: str) -> Any:
    """Instantiate a ``class_path``/``init_args`` config as ``base`` (or a subclass) after checking it.

    Raises:
        UntrustedCheckpointError: a class path outside the allow-list (nothing is imported).
        CheckpointError: the config does not parse (names ``source``).
    """
    check_class_paths(config, source)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "obj", required=True)
    try:
        cfg = parser.parse_object({"obj": config})
    except Exception as err:  # jsonargparse raises its own error types; re-raise naming the file
        raise CheckpointError(f"{source}: cannot parse the stored {base.__name__} config: {err}") from err
    # jsonargparse >= 4.49 renamed instantiate_classes to instantiate.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(cfg).obj


def written_by(ckpt: dict[str, Any]) -> str | None:
    """The class path of the LightningModule that wrote a checkpoint (amrg's record, else LightningCLI's)."""
    module = ckpt.get(MODULE_KEY)
    if module is None:
        module = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    return str(module) if module is not None else None


def check_written_by(ckpt: dict[str, Any], expected: str, source: str) -> None:
    """Refuse a checkpoint written by another LightningModule class than ``expected`` (a class path).

    Raises:
        CheckpointError: names both classes (e.g. a stage-2 checkpoint given to a stage-1 run).
    """
    found = written_by(ckpt)
    # Full class paths when both are (a recipe may name the class alone, which jsonargparse resolves).
    same = (
        found == expected
        if "." in str(found) and "." in expected
        else str(found).split(".")[-1] == expected.split(".")[-1]
    )
    if found is not None and not same:
        raise CheckpointError(
            f"{source} was written by {found}, but this run trains {expected}; give a checkpoint of the same "
            "stage (stage 1: ClassifierModule, stage 2: ReporterModule)"
        )
