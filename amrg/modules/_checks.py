"""What both stage modules share: their hyper-parameter policy, the checks of the datamodule a run brings,
and the options of their checkpoint loaders."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule

from amrg._plain import is_plain

__all__ = ["check_image_size", "evaluation_ids", "lightning_load_options", "save_plain_hyperparameters"]

try:  # Lightning >= 2.3 sets this while LightningCLI instantiates the model (changelog #18105).
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older Lightning: treat every construction as plain Python
    _given_hyperparameters = None


def save_plain_hyperparameters(module: LightningModule, objects: Mapping[str, Any]) -> None:
    """``save_hyperparameters`` of the calling ``__init__``, keeping checkpoints loadable with ``weights_only``.

    Under LightningCLI the parsed config (``class_path``/``init_args``, plain data) is stored. Built in
    Python, the arguments in ``objects`` that are not plain data (a network, optimiser factories) are left
    out, so no pickled class reaches the checkpoint.
    """
    given = _given_hyperparameters.get() if _given_hyperparameters is not None else None
    ignore = [] if given is not None else [name for name, value in objects.items() if not is_plain(value)]
    module.save_hyperparameters(ignore=ignore, frame=inspect.currentframe().f_back)


def evaluation_ids(datamodule: Any) -> set[str]:
    """Study ids of the datamodule's val and test splits (empty without an annotation)."""
    annotation = getattr(datamodule, "annotation", None)
    ids = getattr(annotation, "ids", None)
    return set(ids(["val", "test"])) if callable(ids) else set()


def check_image_size(datamodule: Any, img_size: int) -> None:
    """Refuse a datamodule whose views are not the size the stage-1 encoder was built for.

    Raises:
        ValueError: names both settings (``data.init_args.image_size`` and the encoder's ``img_size``).
    """
    hparams = getattr(datamodule, "hparams", None)
    size = getattr(hparams, "image_size", None) if hparams is not None else None
    if size is None and isinstance(hparams, dict):
        size = hparams.get("image_size")
    if size is not None and int(size) != int(img_size):
        raise ValueError(
            f"data.init_args.image_size is {size} but the stage-1 encoder takes {img_size} px views "
            "(encoder init_args.img_size); set them to the same size"
        )


def lightning_load_options(kwargs: dict[str, Any]) -> None:
    """Accept Lightning's ``load_from_checkpoint`` options that amrg's loaders already fix: checkpoints are
    always read with ``weights_only=True`` and loaded strictly; settings never come from a YAML file."""
    if kwargs.pop("weights_only", None) is False:
        raise ValueError("amrg checkpoints load with weights_only=True only (no pickle)")
    kwargs.pop("strict", None)
    if kwargs.pop("hparams_file", None) is not None:
        raise ValueError("hparams_file is not supported: the checkpoint rebuilds its own network")
