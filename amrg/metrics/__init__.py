"""NLG and clinical-efficacy metrics and the metrics callback (the labelers are in amrg.labeling)."""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "ClinicalEfficacy": "amrg.metrics.clinical",
    "NLGScores": "amrg.metrics.nlg",
    "ReportMetricsCallback": "amrg.metrics.callback",
}

__all__ = [
    "ClinicalEfficacy",
    "NLGScores",
    "ReportMetricsCallback",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
