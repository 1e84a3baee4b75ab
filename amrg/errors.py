"""amrg's own errors: one base type, subclassed by kind, each message one line that names the file or record.

The ``amrg`` command catches :class:`AmrgError` (and the wrapped errors below) and prints
``amrg: error: <message>`` with exit status 1; ``--debug`` or ``AMRG_DEBUG=1`` shows the traceback.
Library users catch :class:`AmrgError`, or the built-in type each kind also is (``ValueError`` for bad
input, ``OSError`` for an output that cannot be written), so older ``except ValueError`` code keeps working.

A leaf module: it imports nothing from amrg, so every layer may raise these.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "AmrgError",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "OutputError",
    "reading",
    "writing",
]


class AmrgError(Exception):
    """Base of every error amrg raises on purpose; its message is meant for the user as it stands."""


class InputError(AmrgError, ValueError):
    """A user's file or record is missing, unreadable or malformed (the message names it)."""


class ConfigError(AmrgError, ValueError):
    """Options or a recipe that do not fit together."""


class CheckpointError(InputError):
    """A file given as a checkpoint is not one amrg can load (not a checkpoint, the wrong stage, damaged)."""


class OutputError(AmrgError, OSError):
    """An output cannot be written: a read-only or full folder, a path that is a folder, an input's path."""


@contextmanager
def reading(path: str | os.PathLike[str], what: str = "file") -> Iterator[None]:
    """Turn the OS, decoding and JSON errors of reading ``path`` into one :class:`InputError` naming it.

    Args:
        path: the file being read.
        what: what it is, for the message (``"annotation"``, ``"image"``...).

    Raises:
        InputError: from ``FileNotFoundError``, ``IsADirectoryError``, ``PermissionError`` and other
            ``OSError``, ``UnicodeDecodeError`` (with the line of the bad byte when the file is text) and
            ``json.JSONDecodeError`` (with line and column). amrg's own errors pass through unchanged.
    """
    try:
        yield
    except AmrgError:
        raise
    except json.JSONDecodeError as err:
        raise InputError(
            f"{what} '{path}': not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    except UnicodeDecodeError as err:
        raise InputError(f"{what} '{path}': not UTF-8 text ({_decode_position(path, err)})") from err
    except FileNotFoundError as err:
        raise InputError(f"{what} '{path}' not found") from err
    except IsADirectoryError as err:
        raise InputError(f"{what} '{path}' is a folder, expected a file") from err
    except PermissionError as err:
        raise InputError(f"{what} '{path}' cannot be read: permission denied") from err
    except OSError as err:
        raise InputError(f"{what} '{path}' cannot be read: {err.strerror or err}") from err


@contextmanager
def writing(path: str | os.PathLike[str], what: str = "output") -> Iterator[None]:
    """Turn the OS errors of writing ``path`` (or a temp file beside it) into one :class:`OutputError`.

    Raises:
        OutputError: naming ``path`` (never the hidden temp file) and why: permission denied, no space
            left, a read-only file system, a folder in the way, a file too large.
    """
    try:
        yield
    except AmrgError:
        raise
    except OSError as err:
        reason = {
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system",
            errno.EISDIR: "it is a folder",
            errno.EFBIG: "file too large for the file system",
            errno.ENOENT: "its folder does not exist",
            errno.EEXIST: "a file is in the way (of it or of its folder)",
            errno.ENOTDIR: "a file is in the way of its folder",
        }.get(err.errno or -1, err.strerror or str(err))
        raise OutputError(f"cannot write {what} '{path}': {reason}") from err


def _decode_position(path: str | os.PathLike[str], err: UnicodeDecodeError) -> str:
    """``line N`` of the first undecodable byte, read back from the file (or the byte offset)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return f"byte {err.start}"
    bad = bytes(err.object[err.start : err.end])
    offset = err.start if len(err.object) == len(data) else max(data.find(bad), 0)
    line = data.count(b"\n", 0, offset) + 1
    return f"line {line}: byte {bad[:1].hex()} is not UTF-8"
