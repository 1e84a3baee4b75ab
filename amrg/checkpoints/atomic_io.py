"""Atomic file writes: a temp file in the target's own folder, fsynced, then renamed over the target.

What goes wrong without it (Lightning 2.6, ``lightning.fabric.utilities.cloud_io._atomic_save``, which
``TorchCheckpointIO.save_checkpoint`` calls): the whole checkpoint is first ``torch.save``\\ d into a
``BytesIO`` (a second copy in RAM), then written inside an fsspec transaction. For a local path,
fsspec's ``LocalFileOpener`` writes the bytes to ``tempfile.mkstemp()``, that is into ``$TMPDIR``, not
next to the checkpoint, and ``commit`` moves it with ``shutil.move``. When ``$TMPDIR`` is on another
file system (a node-local ``/tmp`` and a shared checkpoint folder, the usual cluster layout) the
rename fails with ``EXDEV`` and ``shutil.move`` falls back to ``copy2``, which opens the final
checkpoint with truncation and copies into it: a kill during that copy leaves the previous good
``last.ckpt`` truncated (the probe of issue 14 found 16 of 600 MB). Nothing is fsynced, so a node
crash can leave a renamed but empty file, and a full or size-limited ``$TMPDIR`` fails the save even
when the checkpoint folder has room, with an error that names the hidden temp file. It also catches
``PermissionError`` from the commit and re-raises only the ``EXDEV`` case, so another permission
failure is dropped without a word.

Here checkpoints go through :func:`amrg.files.atomic_write`: a temp file in the checkpoint's own folder,
fsynced and renamed over it, so a kill or a full disk leaves the previous checkpoint whole.

:class:`AtomicCheckpointIO` plugs this into Lightning (``Trainer(plugins=[AtomicCheckpointIO()])``) and
streams ``torch.save`` straight into the temp file (no ``BytesIO`` copy). Remote (fsspec URL) paths
keep Lightning's own save. This is the one module of :mod:`amrg.checkpoints` that imports Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH

from amrg.files import atomic_write

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with local saves made by :func:`atomic_write`.

    Use as ``Trainer(plugins=[AtomicCheckpointIO()])`` (or ``trainer.plugins`` in a recipe). Loading
    and removal are Lightning's own.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` through a temp file in its folder and a rename.

        Raises:
            TypeError: ``storage_options`` given (as ``TorchCheckpointIO``).
            OutputError: the checkpoint folder cannot be written, naming ``path``.
        """
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__}"
            )
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        local = str(path).removeprefix("file://")
        atomic_write(local, lambda f: torch.save(checkpoint, f), "checkpoint")
