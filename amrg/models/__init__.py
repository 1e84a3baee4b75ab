"""Plain nn.Modules: each stage's network and its parts (no Lightning, no files)."""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "CrossAttentionRetriever": "amrg.models.retrievers",
    "DiseaseClassifier": "amrg.models.classifier",
    "DiseaseHead": "amrg.models.classifier",
    "DiseaseQFormer": "amrg.models.qformer",
    "HopfieldRetriever": "amrg.models.retrievers",
    "NoRetriever": "amrg.models.retrievers",
    "ReportGenerator": "amrg.models.reporter",
    "VisionEncoder": "amrg.models.vision",
}

__all__ = [
    "CrossAttentionRetriever",
    "DiseaseClassifier",
    "DiseaseHead",
    "DiseaseQFormer",
    "HopfieldRetriever",
    "NoRetriever",
    "ReportGenerator",
    "VisionEncoder",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
