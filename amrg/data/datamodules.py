"""LightningDataModules: one validated path from ``annotation.json`` to :class:`Batch`.

``ReportDataModule`` is the base; the dataset classes fix its presets (report cleaning, views).
``batch_size`` is per device (Lightning and the paper's scripts count it that way).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from amrg.data.cleaning import CleaningStyle
from amrg.data.dataset import FillMissingView, OnBadImage, ReportDataset, collate_studies
from amrg.data.images import DEFAULT_MAX_PIXELS, train_augmentation
from amrg.data.schema import Annotation, Study, load_annotation
from amrg.files import atomic_write_text

__all__ = [
    "CheXpertPlusDataModule",
    "IUXrayDataModule",
    "MIMICCXRDataModule",
    "ReportDataModule",
    "SyntheticDataModule",
    "datamodule_from_recipe",
]

log = logging.getLogger(__name__)

Stage = Literal["fit", "validate", "test", "predict"]


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


class ReportDataModule(L.LightningDataModule):
    """Train/val/test loaders over an R2Gen-style annotation.

    Args:
        annotation: the ``annotation.json``.
        image_root: folder the image paths are relative to (default: the annotation's folder).
        image_size: square side of each view.
        max_views: views per study (V); extra views are dropped, missing ones filled.
        fill_missing_view: "zeros" or "repeat" (see :class:`ReportDataset`).
        cleaning: report cleaning rules: "iu_xray", "mimic_cxr" or "none".
        batch_size: studies per device per step.
        eval_batch_size: per-device batch size for val/test/predict (default: batch_size).
        num_workers: DataLoader worker processes per device.
        augment: mild affine/exposure jitter on training views.
        on_bad_image: "error" stops at the first missing/corrupt/too-large image naming it; "skip"
            drops such studies and logs each one with a running count.
        max_pixels: refuse (or skip) an image file with more pixels than this (width x height, read
            from its header before decoding); None for no cap. Large JPEGs are decoded at reduced
            size towards ``image_size`` either way.
        allow_outside_root: read image paths that are absolute or climb out of the image root with
            ``..`` (refused by default, when the datasets are built).
        labels_from_reports: where a study has no ``labels``, compute them with the offline
            CheXpert labeler from its raw report; otherwise they stay NaN (not mentioned).
        cache_dir: where computed labels are cached (written once, in ``prepare_data``); None
            computes them in ``setup`` on every process.
        predict_split: split served by ``predict_dataloader``.
        pin_memory: pin host memory for faster copies to the GPU.
    """

    def __init__(
        self,
        annotation: Path,
        image_root: Path | None = None,
        image_size: int = 224,
        max_views: int = 2,
        fill_missing_view: FillMissingView = "zeros",
        cleaning: CleaningStyle = "none",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        augment: bool = True,
        on_bad_image: OnBadImage = "error",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        allow_outside_root: bool = False,
        labels_from_reports: bool = True,
        cache_dir: Path | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(logger=False)
        # Paths stored as text, so checkpoints load with torch.load(weights_only=True).
        for key, value in list(self.hparams.items()):
            if isinstance(value, Path):
                self.hparams[key] = str(value)
        self.annotation_path = Path(annotation)
        self.image_root = Path(image_root) if image_root is not None else None
        self.annotation: Annotation | None = None
        self.datasets: dict[str, ReportDataset] = {}

    # -- locations ------------------------------------------------------------------------
    def _annotation_file(self) -> Path:
        return self.annotation_path

    def _image_root(self) -> Path:
        return self.image_root if self.image_root is not None else self._annotation_file().parent

    def _label_cache(self) -> Path | None:
        cache_dir = self.hparams.cache_dir
        if cache_dir is None or not self.hparams.labels_from_reports:
            return None
        ann = self._annotation_file()
        return Path(cache_dir) / f"{ann.stem}.{_file_key(ann)}.labels.json"

    # -- label filling ----------------------------------------------------------------------
    @staticmethod
    def _unlabelled(annotation: Annotation) -> list[Study]:
        return [s for s in annotation if s.labels is None]

    @staticmethod
    def _compute_labels(studies: list[Study]) -> dict[str, list[int | None]]:
        from amrg.labeling.chexpert import CheXpertLabeler  # the data layer never imports models

        rank_zero_info(f"labelling {len(studies)} reports without labels with the CheXpert labeler")
        labels = CheXpertLabeler().label_batch([s.report for s in studies], progress=True)
        return {s.id: lab for s, lab in zip(studies, labels, strict=True)}

    def _fill_labels(self, annotation: Annotation, computed: dict[str, list[int | None]]) -> None:
        from dataclasses import replace

        for split, studies in annotation.splits.items():
            annotation.splits[split] = [
                replace(s, labels=tuple(computed[s.id])) if s.labels is None and s.id in computed else s
                for s in studies
            ]

    # -- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Compute and cache labels for unlabelled studies (one process per node writes)."""
        cache = self._label_cache()
        if cache is None or cache.exists():
            return
        annotation = load_annotation(self._annotation_file())
        unlabelled = self._unlabelled(annotation)
        if not unlabelled:
            return
        computed = self._compute_labels(unlabelled)
        # whole or absent: nodes sharing cache_dir may write it at once (same content, last rename wins)
        atomic_write_text(cache, json.dumps(computed), "label cache")

    def setup(self, stage: Stage | None = None) -> None:
        """Load and validate the annotation once; build the datasets (no image is read)."""
        if self.annotation is None:
            annotation = load_annotation(self._annotation_file())
            if self.hparams.labels_from_reports and self._unlabelled(annotation):
                cache = self._label_cache()
                if cache is not None and cache.exists():
                    computed = json.loads(cache.read_text())
                else:
                    computed = self._compute_labels(self._unlabelled(annotation))
                self._fill_labels(annotation, computed)
            self.annotation = annotation
            rank_zero_info(
                f"{self._annotation_file()}: " + ", ".join(f"{k}={v}" for k, v in annotation.counts().items())
            )
        for split in ("train", "val", "test"):
            if split in self.annotation.splits and split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def _dataset(self, split: str) -> ReportDataset:
        hp = self.hparams
        return ReportDataset(
            self.annotation[split],
            image_root=self._image_root(),
            image_size=hp.image_size,
            max_views=hp.max_views,
            fill_missing_view=hp.fill_missing_view,
            cleaning=hp.cleaning,
            augment=train_augmentation() if (hp.augment and split == "train") else None,
            on_bad_image=hp.on_bad_image,
            split=split,
            max_pixels=hp.max_pixels,
            allow_outside_root=hp.allow_outside_root,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(
                f"{self._annotation_file()}: no {split!r} split to load (it has {sorted(self.datasets)})"
            )
        hp = self.hparams
        batch_size = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=train,
            num_workers=hp.num_workers,
            collate_fn=collate_studies,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split, train=False)


class IUXrayDataModule(ReportDataModule):
    """IU X-ray (Open-i): two views per study, IU cleaning (R2Gen preset)."""

    def __init__(
        self,
        annotation: Path,
        image_root: Path | None = None,
        cleaning: CleaningStyle = "iu_xray",
        max_views: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(
            annotation=annotation, image_root=image_root, cleaning=cleaning, max_views=max_views, **kwargs
        )


class MIMICCXRDataModule(ReportDataModule):
    """MIMIC-CXR: one or more views per study (first view by default, as R2Gen), MIMIC cleaning."""

    def __init__(
        self,
        annotation: Path,
        image_root: Path | None = None,
        cleaning: CleaningStyle = "mimic_cxr",
        max_views: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(
            annotation=annotation, image_root=image_root, cleaning=cleaning, max_views=max_views, **kwargs
        )


class CheXpertPlusDataModule(ReportDataModule):
    """CheXpert Plus: the same schema with PNG images, MIMIC-style cleaning, one view."""

    def __init__(
        self,
        annotation: Path,
        image_root: Path | None = None,
        cleaning: CleaningStyle = "mimic_cxr",
        max_views: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(
            annotation=annotation, image_root=image_root, cleaning=cleaning, max_views=max_views, **kwargs
        )


class SyntheticDataModule(ReportDataModule):
    """Procedural chest films (``amrg data synth``), generated into ``root`` on first use.

    Generation happens in ``prepare_data`` (one process per node) into a folder named by the
    parameters, so a changed ``n`` or ``seed`` never reuses stale data. Nodes that share ``root``
    (one file system) are serialised by :func:`amrg.data.synthetic.synthesize`'s lock: the first
    writes the folder whole, the others wait and reuse it.

    Args:
        root: cache folder for generated datasets.
        n: number of studies.
        seed: generation seed (images, labels, reports and the split).
        image_size: side of the generated PNGs and of the loaded views.
        two_view_prob: probability a study has a second view.
        max_views: V.
        cleaning: report cleaning rules (the synthetic reports are MIMIC-style prose).
        labels_from_reports: synthetic studies carry their true labels, so the labeler is off.
        **kwargs: any other :class:`ReportDataModule` argument (batch_size, num_workers, ...).
    """

    def __init__(
        self,
        root: Path = Path(".cache/synthetic"),
        n: int = 1000,
        seed: int = 0,
        image_size: int = 64,
        two_view_prob: float = 0.5,
        max_views: int = 2,
        cleaning: CleaningStyle = "mimic_cxr",
        labels_from_reports: bool = False,
        **kwargs,
    ) -> None:
        kwargs.update(cleaning=cleaning, labels_from_reports=labels_from_reports)
        self.root = Path(root)
        self.n, self.seed, self.two_view_prob = n, seed, two_view_prob
        data_dir = self.root / f"n{n}_seed{seed}_px{image_size}_v{two_view_prob:g}"
        super().__init__(
            annotation=data_dir / "annotation.json", image_size=image_size, max_views=max_views, **kwargs
        )
        self.data_dir = data_dir

    def prepare_data(self) -> None:
        """Generate the dataset unless it is already there."""
        if not self.annotation_path.exists():
            from amrg.data.synthetic import synthesize

            rank_zero_info(f"generating {self.n} synthetic studies into {self.data_dir}")
            synthesize(
                self.data_dir,
                n=self.n,
                seed=self.seed,
                image_size=self.hparams.image_size,
                two_view_prob=self.two_view_prob,
            )
        super().prepare_data()


def datamodule_from_recipe(data_yaml: Path, **overrides: object) -> ReportDataModule:
    """The ``data:`` block of a recipe file (``configs/<dataset>/data.yaml``), built as ``amrg fit`` builds it.

    Args:
        data_yaml: the YAML file holding the ``data`` block (``class_path`` + ``init_args``).
        **overrides: ``init_args`` to replace (e.g. ``root=``, ``num_workers=0``).
    """
    import yaml
    from jsonargparse import ArgumentParser

    block = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))["data"]
    block["init_args"] = {**block.get("init_args", {}), **overrides}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ReportDataModule, "data")
    return parser.instantiate(parser.parse_object({"data": block})).data
