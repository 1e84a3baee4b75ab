"""Data layer: annotation schema, report cleaning, datasets, datamodules, synthetic data.

Names are imported lazily (PEP 562) so that schema validation and ``amrg data check`` do not pay
for importing torch and Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "Annotation": "amrg.data.schema",
    "AnnotationError": "amrg.data.schema",
    "Study": "amrg.data.schema",
    "load_annotation": "amrg.data.schema",
    "clean_report": "amrg.data.cleaning",
    "clean_report_iu_xray": "amrg.data.cleaning",
    "clean_report_mimic_cxr": "amrg.data.cleaning",
    "Batch": "amrg.data.batch",
    "ReportDataset": "amrg.data.dataset",
    "collate_studies": "amrg.data.dataset",
    "ReportDataModule": "amrg.data.datamodules",
    "IUXrayDataModule": "amrg.data.datamodules",
    "MIMICCXRDataModule": "amrg.data.datamodules",
    "CheXpertPlusDataModule": "amrg.data.datamodules",
    "SyntheticDataModule": "amrg.data.datamodules",
}

__all__ = [
    "Annotation",
    "AnnotationError",
    "Batch",
    "CheXpertPlusDataModule",
    "IUXrayDataModule",
    "MIMICCXRDataModule",
    "ReportDataModule",
    "ReportDataset",
    "Study",
    "SyntheticDataModule",
    "clean_report",
    "clean_report_iu_xray",
    "clean_report_mimic_cxr",
    "collate_studies",
    "load_annotation",
]

if TYPE_CHECKING:  # pragma: no cover
    from amrg.data.batch import Batch
    from amrg.data.cleaning import clean_report, clean_report_iu_xray, clean_report_mimic_cxr
    from amrg.data.datamodules import (
        CheXpertPlusDataModule,
        IUXrayDataModule,
        MIMICCXRDataModule,
        ReportDataModule,
        SyntheticDataModule,
    )
    from amrg.data.dataset import ReportDataset, collate_studies
    from amrg.data.schema import Annotation, AnnotationError, Study, load_annotation


__getattr__ = lazy_getattr(__name__, _EXPORTS)
