"""amrg: AM-MRG radiology report generation.

``amrg.load(checkpoint)`` gives a :class:`~amrg.inference.Predictor` for a stage-1 or stage-2 checkpoint
(see :mod:`amrg.inference`); the rest lives in the sub-packages.
"""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "Predictor": "amrg.inference",
    "StudyPrediction": "amrg.inference",
    "load": "amrg.inference",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
