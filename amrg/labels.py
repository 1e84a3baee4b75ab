"""The 14 CheXpert labels in CheXbert order.

MIMIC-CXR's ``chexpert.csv`` and the CheXpert labeler's CSV use other column orders:
map by name with :func:`label_index`, never by position.
"""

from __future__ import annotations

__all__ = ["COMMON5", "LABELS", "NUM_LABELS", "label_index"]

LABELS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
NUM_LABELS: int = len(LABELS)

# The five labels most CE papers report besides the 14 (CheXpert competition set).
COMMON5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

_INDEX = {name.lower(): i for i, name in enumerate(LABELS)}


def label_index(name: str) -> int:
    """Position of a label in :data:`LABELS`, matched case-insensitively.

    Raises:
        KeyError: the name is not one of the 14 labels; the message lists them.
    """
    try:
        return _INDEX[name.strip().lower()]
    except KeyError:
        raise KeyError(f"unknown CheXpert label {name!r}; expected one of {list(LABELS)}") from None
