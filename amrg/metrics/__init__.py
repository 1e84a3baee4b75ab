"""NLG and clinical-efficacy metrics, the offline CheXpert labeler and the metrics callback."""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "CheXbertLabeler": "amrg.metrics.labeler",
    "CheXpertLabeler": "amrg.metrics.labeler",
    "ClinicalEfficacy": "amrg.metrics.clinical",
    "NLGScores": "amrg.metrics.nlg",
    "ReportMetricsCallback": "amrg.metrics.callback",
}

__all__ = [
    "CheXbertLabeler",
    "CheXpertLabeler",
    "ClinicalEfficacy",
    "NLGScores",
    "ReportMetricsCallback",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
