"""The one stage-1 loader: a :class:`~amrg.models.classifier.DiseaseClassifier` from its checkpoint alone.

``amrg fit`` (LightningCLI) stores the net config (``hyper_parameters["net"]``: ``class_path`` +
``init_args``) next to the weights. It is instantiated here with its class paths checked
(:mod:`amrg.checkpoints.safety`) and its pretrained-weight sources cleared, then the ``net.*`` weights
are loaded strictly. Memory building, stage 2 and notebooks all come through :func:`load_stage1`.
"""

from __future__ import annotations

import hashlib
import pathlib
from pathlib import Path
from typing import Any

import torch

from amrg._state import state_dict_mismatch
from amrg.checkpoints.safety import MODULE_KEY, check_class_paths, instantiate_checked
from amrg.labels import LABELS, NUM_LABELS
from amrg.models.classifier import DiseaseClassifier

__all__ = [
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

    Args:
        path: the ``.ckpt`` file.
        what: what it should be, for messages (e.g. ``"stage-1 checkpoint"``).
        map_location: where to put the tensors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable checkpoint, or no ``state_dict`` in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' not found")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load's own errors on a file that is no checkpoint (or not plain data)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ValueError(
            f"{what} '{path}' could not be read as a checkpoint ({type(err).__name__}: {first}); expected a "
            ".ckpt file written by `amrg fit`"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{what} '{path}': not a Lightning checkpoint (no 'state_dict')")
    return ckpt


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
        raise ValueError(f"{source} was written by {module}, not by a stage-1 ClassifierModule")
    config = (ckpt.get("hyper_parameters") or {}).get("net")
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(
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
        ValueError: no net config and no ``net`` given, another label set, or weights that do not fit.
    """
    source = f"stage-1 checkpoint '{path}'"
    if ckpt is None:
        ckpt = read_checkpoint(path, "stage-1 checkpoint", map_location)
    if net is None:
        net = classifier_from_config(stage1_net_config(ckpt, source), source)
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    bad = state_dict_mismatch(net, state)
    if bad:
        raise ValueError(
            f"{source}: weights do not fit {type(net).__name__}: missing {bad.missing}, "
            f"unexpected {bad.unexpected}, mis-shaped {bad.mismatched}"
        )
    net.load_state_dict(state, strict=True)
    if net.num_labels != NUM_LABELS:
        raise ValueError(
            f"{source} predicts {net.num_labels} labels, but amrg needs the {NUM_LABELS} CheXpert labels "
            f"({', '.join(LABELS)})"
        )
    return net.eval()
