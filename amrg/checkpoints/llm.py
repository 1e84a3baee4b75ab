"""Which base LLM a stage-2 checkpoint was trained on: an identity that is checked on load.

A stage-2 checkpoint carries everything but the frozen base LLM, which it names by folder plus an
identity: the sha256 of the folder's ``config.json`` and of each weight file. On another machine the
folder may sit elsewhere (``--llm_path``), but a different model is refused, naming both identities.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from amrg.checkpoints.stage1 import file_sha256

__all__ = ["identity_mismatch", "llm_identity"]

_logger = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")


def llm_identity(folder: Path | str) -> dict[str, Any]:
    """``{"config_sha256": ..., "weights": {file name: sha256}}`` of a ``save_pretrained`` folder.

    Every weight file is hashed in full (one read; a 7B model's 13.5 GB take about 10 s on a fast disk,
    little next to loading it).

    Raises:
        FileNotFoundError: no folder, no ``config.json`` or no weight file in it.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"LLM folder '{folder}' has no config.json: expected a folder written by save_pretrained"
        )
    weights = sorted({p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not weights:
        raise FileNotFoundError(f"LLM folder '{folder}' holds no weight file ({', '.join(_WEIGHT_PATTERNS)})")
    _logger.info("hashing %d weight file(s) of %s to check its identity", len(weights), folder)
    return {"config_sha256": file_sha256(config), "weights": {p.name: file_sha256(p) for p in weights}}


def _short(identity: dict[str, Any]) -> str:
    weights = identity.get("weights") or {}
    parts = [f"config {str(identity.get('config_sha256'))[:12]}"]
    parts += [f"{name} {str(digest)[:12]}" for name, digest in sorted(weights.items())]
    return ", ".join(parts)


def identity_mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """None when two identities agree, else a sentence naming both."""
    if expected.get("config_sha256") == found.get("config_sha256") and expected.get("weights") == found.get(
        "weights"
    ):
        return None
    return f"trained with [{_short(expected)}], found [{_short(found)}]"
