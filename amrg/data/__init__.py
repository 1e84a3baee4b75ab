"""Data layer: annotation schema, report cleaning, datasets, datamodules, synthetic data."""

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
