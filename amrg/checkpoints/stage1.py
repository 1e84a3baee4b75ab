"""The one stage-1 loader: a :class:`~amrg.models.classifier.DiseaseClassifier` from its checkpoint alone.

``amrg fit`` (LightningCLI) stores the net config (``hyper_parameters["net"]``: ``class_path`` +
``init_args``) next to the weights. It is instantiated here with its class paths checked
(:mod:`amrg.checkpoints.safety`) and its pretrained-weight sources cleared, then the ``net.*`` weights
are loaded strictly. Memory building, stage 2 and notebooks all come through :func:`load_stage1`.
"""

from __future__ import annotations

import hashlib
import pathlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from amrg._state import state_dict_mismatch
from amrg.checkpoints.safety import (
    CHECKPOINT_EXPECTED,
    MODULE_KEY,
    check_checkpoint_file,
    check_class_paths,
    instantiate_checked,
)
from amrg.errors import CheckpointError
from amrg.labels import LABELS, NUM_LABELS
from amrg.models.classifier import DiseaseClassifier

__all__ = [
    "check_lightning_checkpoint",
    "clear_weight_sources",
    "classifier_from_config",
    "file_sha256",
    "load_stage1",
    "read_checkpoint",
    "stage1_net_config",
]

# Constructor arguments that fetch pretrained weights. A stage-1 checkpoint already holds every weight in
# its state_dict, so the net config stored with it has these cleared: rebuilding never re-reads the
# ImageNet/BERT files (which may be gone) nor touches the network (``pretrained: true``).
_WEIGHT_SOURCES: dict[str, Any] = {"checkpoint_path": None, "pretrained": False, "bert_path": None}

# Lightning also stores the datamodule's hyperparameters, and ours hold paths (annotation, root): allow
# pathlib's plain path classes, nothing else, in the weights-only unpickler.
_SAFE_GLOBALS = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: Path | str, what: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` a Lightning checkpoint, naming the file on every failure.

    The file's first bytes are checked before torch reads it, so random bytes, an empty or truncated file
    and a pickle of arbitrary objects each get a message saying which it is (never torch's advice to retry
    with ``weights_only=False``).

    Args:
        path: the ``.ckpt`` file.
        what: what it should be, for messages (e.g. ``"stage-1 checkpoint"``).
        map_location: where to put the tensors.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a readable checkpoint, or no ``state_dict`` in it (a plain state dict).
    """
    path = Path(path)
    check_checkpoint_file(path, what)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # the weights-only unpickler warns about the pickle protocol of a non-torch pickle; the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load's own errors on a file that is no checkpoint (or not plain data)
        raise CheckpointError(
            f"{what} '{path}' could not be read as a checkpoint: {_load_failure(err)}; {CHECKPOINT_EXPECTED}"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            found = f"a plain state dict ({len(ckpt)} tensors, e.g. {next(iter(ckpt))!r})"
        elif isinstance(ckpt, dict):
            found = f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        else:
            found = f"a {type(ckpt).__name__}"
        raise CheckpointError(
            f"{what} '{path}' is {found}, not a Lightning checkpoint (no 'state_dict'); {CHECKPOINT_EXPECTED}"
        )
    return ckpt


def _load_failure(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in words."""
    text = " ".join(str(err).split())
    if isinstance(err, EOFError) or "central directory" in text or "truncated" in text.lower():
        return "it is truncated or damaged (torch.load could not read it whole)"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (
            f"it holds a Python object of class {found.group(1)}, not only tensors and plain data: refused, because "
            "unpickling it could run code (amrg reads checkpoints with weights_only=True)"
        )
    if isinstance(err, pickle.UnpicklingError) or "WeightsUnpickler" in text:
        return "its pickle is damaged or was not written by torch.save"
    return f"{type(err).__name__}: {text[:160]}"


def check_lightning_checkpoint(ckpt: dict[str, Any], source: str, resume: bool) -> None:
    """Refuse a checkpoint that Lightning cannot restore, before Lightning reads it.

    Args:
        ckpt: the checkpoint as :func:`read_checkpoint` returned it.
        source: how to name it (e.g. ``"--ckpt_path 'x.ckpt'"``).
        resume: ``fit`` resumes training, which also needs the optimiser and scheduler states.

    Raises:
        CheckpointError: names the keys Lightning needs that are missing.
    """
    needed = ["state_dict", "pytorch-lightning_version"]
    if resume:
        needed += ["optimizer_states", "lr_schedulers"]
    missing = [k for k in needed if k not in ckpt]
    if not missing:
        return
    if "pytorch-lightning_version" in missing:
        raise CheckpointError(
            f"{source} was not written by Lightning (no {missing}); give a .ckpt that `amrg fit` wrote"
        )
    raise CheckpointError(
        f"{source} holds the weights only (no {missing}: saved with save_weights_only), so training cannot "
        "resume from it; give a full checkpoint such as last.ckpt"
    )


def clear_weight_sources(config: Any) -> Any:
    """A copy of a net config with every pretrained-weight source reset (``checkpoint_path``, ...)."""
    if isinstance(config, dict):
        return {
            key: _WEIGHT_SOURCES[key]
            if key in _WEIGHT_SOURCES and not isinstance(value, dict)
            else clear_weight_sources(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [clear_weight_sources(v) for v in config]
    return config


def stage1_net_config(ckpt: dict[str, Any], source: str) -> dict[str, Any]:
    """The net config stored in a stage-1 checkpoint, weight sources cleared and class paths checked."""
    module = ckpt.get(MODULE_KEY)
    if module is not None and not str(module).endswith("ClassifierModule"):
        raise CheckpointError(f"{source} was written by {module}, not by a stage-1 ClassifierModule")
    config = (ckpt.get("hyper_parameters") or {}).get("net")
    if not isinstance(config, dict) or "class_path" not in config:
        raise CheckpointError(
            f"{source}: holds no net config (hyper_parameters['net'] with class_path/init_args); it was "
            "written by a ClassifierModule built in Python rather than by `amrg fit`. Build the "
            "DiseaseClassifier yourself and pass it as net="
        )
    check_class_paths(config, source)
    return clear_weight_sources(config)


def classifier_from_config(config: dict[str, Any], source: str) -> DiseaseClassifier:
    """Build a :class:`DiseaseClassifier` (random weights) from a checked ``class_path``/``init_args`` config."""
    return instantiate_checked(clear_weight_sources(config), DiseaseClassifier, source)


def load_stage1(
    path: Path | str,
    net: DiseaseClassifier | None = None,
    map_location: str | torch.device = "cpu",
    ckpt: dict[str, Any] | None = None,
) -> DiseaseClassifier:
    """Rebuild the trained stage-1 network from its checkpoint, without Lightning or the YAML.

    Args:
        path: a ``.ckpt`` written by ``ClassifierModule`` (``amrg fit`` or a ``Trainer``).
        net: an already built network to load the weights into, for checkpoints written by a
            ClassifierModule built in Python (those store no net config).
        map_location: where to put the tensors.
        ckpt: the checkpoint already read by :func:`read_checkpoint` (not read again).

    Returns:
        The network in eval mode.

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the stored config names a class outside the allow-list.
        CheckpointError: no net config and no ``net`` given, another label set, or weights that do not fit.
    """
    source = f"stage-1 checkpoint '{path}'"
    if ckpt is None:
        ckpt = read_checkpoint(path, "stage-1 checkpoint", map_location)
    if net is None:
        net = classifier_from_config(stage1_net_config(ckpt, source), source)
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    bad = state_dict_mismatch(net, state)
    if bad:
        raise CheckpointError(
            f"{source}: weights do not fit {type(net).__name__}: missing {bad.missing}, "
            f"unexpected {bad.unexpected}, mis-shaped {bad.mismatched}"
        )
    net.load_state_dict(state, strict=True)
    if net.num_labels != NUM_LABELS:
        raise CheckpointError(
            f"{source} predicts {net.num_labels} labels, but amrg needs the {NUM_LABELS} CheXpert labels "
            f"({', '.join(LABELS)})"
        )
    return net.eval()
