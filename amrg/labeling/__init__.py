"""Report -> 14 CheXpert labels: the rule-based CheXpert labeler (offline) and CheXbert (local weights).

Used by the data layer (labels for studies without them) and by the metrics (clinical efficacy).
:func:`build_labeler` builds one by name; every labeler has ``label``, ``label_batch``, ``__call__``
and a ``name`` saying which labeler it is. Names are imported lazily (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "DEFAULT_PHRASES": "amrg.labeling.phrases",
    "LABELER_NAMES": "amrg.labeling.build",
    "CheXbertLabeler": "amrg.labeling.chexbert",
    "CheXbertNet": "amrg.labeling.chexbert",
    "CheXpertLabeler": "amrg.labeling.chexpert",
    "Mention": "amrg.labeling.chexpert",
    "build_labeler": "amrg.labeling.build",
    "clean_text": "amrg.labeling.text",
    "load_chexbert_state_dict": "amrg.labeling.chexbert",
}

__all__ = [
    "DEFAULT_PHRASES",
    "LABELER_NAMES",
    "CheXbertLabeler",
    "CheXbertNet",
    "CheXpertLabeler",
    "Mention",
    "build_labeler",
    "clean_text",
    "load_chexbert_state_dict",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from amrg.labeling.build import LABELER_NAMES, build_labeler
    from amrg.labeling.chexbert import CheXbertLabeler, CheXbertNet, load_chexbert_state_dict
    from amrg.labeling.chexpert import CheXpertLabeler, Mention
    from amrg.labeling.phrases import DEFAULT_PHRASES
    from amrg.labeling.text import clean_text
