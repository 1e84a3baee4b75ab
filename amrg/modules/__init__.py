"""LightningModules that train the networks of amrg.models."""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "DecodingConfig": "amrg.modules.reporter",
    "MemorySampling": "amrg.modules.reporter",
    "TinyLLMConfig": "amrg.modules.reporter",
    "ClassifierModule": "amrg.modules.classifier",
    "ReporterModule": "amrg.modules.reporter",
}

__all__ = [
    "DecodingConfig",
    "MemorySampling",
    "TinyLLMConfig",
    "ClassifierModule",
    "ReporterModule",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
