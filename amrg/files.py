"""Files written whole or not at all: a temp file in the target's own folder, fsynced, then renamed over it.

A leaf module (it imports only :mod:`amrg.errors`), so every layer writes its artifacts through it: data
caches, memory banks, metrics, predictions, and checkpoints (:mod:`amrg.checkpoints.atomic_io`).

:func:`atomic_write` writes to ``.<name>.tmp-<host>-<pid>-<random>`` in the target's folder (so the rename is
always on one file system and atomic), fsyncs the file, ``os.replace``\\ s it over the target and fsyncs the
folder. On any error the temp file is removed and the previous file is left whole; the error is an
:class:`~amrg.errors.OutputError` naming the final path. A process killed with SIGKILL cannot remove its
temp file; the next write of the same target on the same host removes temp files whose writer is no
longer running.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from amrg.errors import writing

__all__ = ["atomic_write", "atomic_write_text"]

_logger = logging.getLogger(__name__)


def _host() -> str:
    # no '-' inside the host part, so the pid can be read back from the name
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_dead_temps(path: Path) -> None:
    """Remove temp files of ``path`` left by writers on this host that are no longer running."""
    prefix = f".{path.name}.tmp-{_host()}-"
    try:
        leftovers = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for temp in leftovers:
        pid_text = temp.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            _logger.info("removing %s, left by a writer that died", temp)
            with contextlib.suppress(OSError):
                temp.unlink()
        except OSError:  # alive but not ours (EPERM): leave it
            continue


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse to open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], what: str = "file") -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temp file beside it, which is fsynced and
    renamed over ``path``.

    Args:
        path: the final file; its folder is created.
        write: called once with the open binary temp file.
        what: what the file is, for the error message (``"checkpoint"``, ``"metrics"``...).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: the folder cannot be made or written (read-only, full, quota, a folder in the way),
            naming ``path``. Whatever ``write`` raises otherwise passes through. Either way the temp
            file is gone and a previous ``path`` is unchanged.
    """
    path = Path(path)
    with writing(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        _remove_dead_temps(path)
        temp = _temp_name(path)
        try:
            # 0o666 and the umask, as open() gives; mkstemp would make it owner-only
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, what: str = "file") -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), what)
