"""LightningModules that train the networks of amrg.models."""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "ClassifierModule": "amrg.modules.classifier",
    "ReporterModule": "amrg.modules.reporter",
}

__all__ = [
    "ClassifierModule",
    "ReporterModule",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
