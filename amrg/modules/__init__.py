"""LightningModules that train the networks of amrg.models, and the strategy that shards stage 2."""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "ClassifierModule": "amrg.modules.classifier",
    "ReporterModule": "amrg.modules.reporter",
    "Stage2FSDPStrategy": "amrg.modules.strategies",
}

__all__ = [
    "ClassifierModule",
    "ReporterModule",
    "Stage2FSDPStrategy",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
