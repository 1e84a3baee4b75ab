"""Build a report labeler by name: the rule-based CheXpert labeler (offline, the default) or CheXbert
from local weights. Every labeler it returns has a ``name`` saying which labeler it is."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from amrg.labeling.chexbert import CheXbertLabeler
from amrg.labeling.chexpert import CheXpertLabeler

__all__ = ["LABELER_NAMES", "build_labeler"]

LABELER_NAMES = ("chexpert", "chexbert")

# Files that make a folder a tokenizer folder (save_pretrained layout) or a WordPiece vocabulary.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_labeler(
    name: Literal["chexpert", "chexbert"] = "chexpert",
    chexbert_weights: str | Path | None = None,
    chexbert_tokenizer: str | Path | None = None,
    chexbert_config: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
) -> CheXpertLabeler | CheXbertLabeler:
    """The labeler called ``name``.

    Args:
        name: ``"chexpert"`` is the rule-based CheXpert labeler with the packaged phrases
            (``.name`` ``"chexpert-rules"``); ``"chexbert"`` is CheXbert from ``chexbert_weights``
            (``.name`` ``"chexbert:<weights file name>"``).
        chexbert_weights: CheXbert weights (``chexbert.pth``); needed for ``"chexbert"`` only.
        chexbert_tokenizer: a tokenizer folder or WordPiece ``vocab.txt`` (bert-base-uncased's);
            ``None`` looks next to the weights for ``vocab.txt`` or a tokenizer folder's files.
        chexbert_config: BERT ``config.json`` or its folder; ``None`` takes ``config.json`` next to the
            weights if there is one, else bert-base-uncased's sizes (which CheXbert uses).
        device: torch device CheXbert runs on.
        batch_size: reports per CheXbert forward pass.

    Raises:
        ValueError: an unknown ``name``, CheXbert options given to ``"chexpert"``, ``"chexbert"``
            without weights, or weights that cannot be read or do not fit.
        FileNotFoundError: the weights, tokenizer or config named do not exist.
    """
    if name not in LABELER_NAMES:
        raise ValueError(f"labeler {name!r} is unknown; expected one of {list(LABELER_NAMES)}")
    if name == "chexpert":
        given = [
            flag
            for flag, value in (
                ("chexbert_weights", chexbert_weights),
                ("chexbert_tokenizer", chexbert_tokenizer),
                ("chexbert_config", chexbert_config),
            )
            if value is not None
        ]
        if given:
            # A CheXbert path given to the rule labeler is a mistake in the call, not something to ignore.
            raise ValueError(
                f"labeler 'chexpert' takes no {', '.join(given)} (did you mean labeler 'chexbert'?)"
            )
        return CheXpertLabeler()
    if chexbert_weights is None:
        raise ValueError("labeler 'chexbert' needs its weights: set chexbert_weights to a local chexbert.pth")
    weights = Path(chexbert_weights)
    if not weights.is_file():
        what = "is a folder, not a file" if weights.is_dir() else "not found"
        raise FileNotFoundError(f"CheXbert weights {weights} {what} (set chexbert_weights)")
    tokenizer = Path(chexbert_tokenizer) if chexbert_tokenizer is not None else _tokenizer_beside(weights)
    config = chexbert_config
    if config is None and (weights.parent / "config.json").is_file():
        config = weights.parent / "config.json"
    return CheXbertLabeler(weights, tokenizer, config=config, device=device, batch_size=batch_size)


def _tokenizer_beside(weights: Path) -> Path:
    folder = weights.parent
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return folder
    if (folder / "vocab.txt").is_file():
        return folder / "vocab.txt"
    raise FileNotFoundError(
        f"CheXbert tokenizer: none given and {folder} (the weights' folder) has no vocab.txt or "
        "tokenizer.json (set chexbert_tokenizer to bert-base-uncased's vocab.txt or tokenizer folder)"
    )
