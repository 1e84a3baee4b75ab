"""Look inside a checkpoint: load a stage-1 or stage-2 model in one call and predict from images.

::

    import amrg

    model = amrg.load("runs/demo/stage2/checkpoints/last.ckpt")  # stage 1 or stage 2, told apart by the file
    pred = model.predict(["frontal.png", "lateral.dcm"])  # one study, two views (paths, PIL images, tensors)
    pred.report  # stage 2: the generated report
    pred.probabilities["Cardiomegaly"]  # stage-1 head, every label in CheXbert order
    pred.cams["Cardiomegaly"]  # Grad-CAM of a predicted label, [V, H, W] in [0, 1]
    pred.recalled[0].box  # stage 2: the memory items the report's prefix attended to most

Everything runs through one path: ``amrg predict-images``, ``amrg serve`` and the notebook call
:meth:`Predictor.predict_many`. Views are read as in training (:mod:`amrg.data.images`, DICOM included),
the CAM maps are computed as the visual memory was mined (:func:`amrg.memory.cam.study_cams`, with the
memory build's CAM method and layer when the checkpoint records them), and nothing is read from the run
folder: a stage-2 checkpoint carries the stage-1 network, the memories and the tokenizer.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from amrg.data.images import (
    BadImageError,
    from_model_input,
    grayscale_from_pil,
    read_grayscale,
    to_model_input,
)
from amrg.labels import LABELS
from amrg.memory.cam import CAMMethod, study_cams
from amrg.models.classifier import DiseaseClassifier
from amrg.models.reporter import RecalledItem, ReportGenerator

__all__ = ["Predictor", "StudyPrediction", "ViewInput", "checkpoint_stage", "load"]

_logger = logging.getLogger(__name__)

ViewInput = str | os.PathLike | Image.Image | Tensor
"""One view: an image file (PNG, JPEG, DICOM, ...), a PIL image, or a tensor: ``[3, H, W]`` normalised as
:func:`amrg.data.images.load_image` returns, or ``[H, W]`` / ``[1, H, W]`` grayscale in [0, 1]."""

CAMLayer = Literal["final_norm", "stem"]
_DISPLAY_MAX = 1024  # longest side of the copy of each view kept for pictures


@dataclass
class StudyPrediction:
    """What a model says about one study.

    Attributes:
        id: the study id (a file stem, a folder, or the one given).
        probabilities: stage-1 probability of every label, CheXbert order (:data:`amrg.labels.LABELS`).
        report: the generated report (stage 2); None for a stage-1 model.
        recalled: the memory items the report's prefix attended to most (stage 2): visual first, then
            report, each by decreasing weight.
        cams: Grad-CAM maps of the explained labels (the predicted ones, most probable first), each
            ``[V, S, S]`` float32 in [0, 1] at the encoder input size S, one map per view.
        views: the views as read, grayscale ``[H, W]`` float32 in [0, 1] (longest side at most 1024 px).
        sources: the file of each view, or None for an image or tensor given in memory.
        reference: a known reference report (set by the caller), drawn beside the generated one.
    """

    id: str
    probabilities: dict[str, float]
    report: str | None = None
    recalled: list[RecalledItem] = field(default_factory=list)
    cams: dict[str, np.ndarray] = field(default_factory=dict)
    views: list[np.ndarray] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    reference: str | None = None

    def predicted(self, threshold: float = 0.5) -> list[str]:
        """Labels with probability >= ``threshold``, most probable first."""
        ranked = sorted(self.probabilities.items(), key=lambda kv: -kv[1])
        return [label for label, p in ranked if p >= threshold]

    def as_dict(self) -> dict[str, Any]:
        """The JSON line of ``amrg predict-images``: id, report and explanation (stage 2), probabilities."""
        out: dict[str, Any] = {"id": self.id}
        if self.report is not None:
            out["report"] = self.report
        out["probabilities"] = {label: round(float(p), 6) for label, p in self.probabilities.items()}
        if self.report is not None:
            out["explanation"] = [item.as_dict() for item in self.recalled]
        return out


@dataclass
class _View:
    tensor: Tensor  # [3, S, S] normalised
    display: np.ndarray  # [H, W] float32 in [0, 1]
    source: str | None


def checkpoint_stage(ckpt: dict[str, Any], source: str) -> Literal[1, 2]:
    """Which stage wrote a checkpoint read with :func:`amrg.checkpoints.read_checkpoint`.

    The module key (:data:`amrg.checkpoints.safety.MODULE_KEY`, LightningCLI's ``_class_path`` in older
    files) names the LightningModule; a checkpoint without one is stage 2 when it holds the stage-2 record
    and stage 1 when it holds a stage-1 net config.

    Raises:
        ValueError: neither (names the file and the module that wrote it).
    """
    from amrg.checkpoints.safety import written_by
    from amrg.checkpoints.stage2 import RECORD_KEY

    module = written_by(ckpt)
    name = str(module).rsplit(".", 1)[-1] if module else None
    if name == "ReporterModule":
        return 2
    if name == "ClassifierModule":
        return 1
    if module is None:
        if isinstance(ckpt.get(RECORD_KEY), dict):
            return 2
        if isinstance((ckpt.get("hyper_parameters") or {}).get("net"), dict):
            return 1
    written = f"written by {module}" if module else "no module key and neither model record"
    raise ValueError(
        f"{source}: not an amrg model checkpoint ({written}); expected a stage-1 (ClassifierModule) or "
        "stage-2 (ReporterModule) .ckpt written by `amrg fit`"
    )


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available (use 'cpu' or 'auto')")
    return target


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return value


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    llm_path: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    *,
    cam_method: CAMMethod | None = None,
    cam_layer: CAMLayer | None = None,
    memory_image_root: str | os.PathLike | None = None,
) -> Predictor:
    """Load a stage-1 or stage-2 checkpoint (told apart by the file) for prediction.

    Args:
        path: a ``.ckpt`` written by ``amrg fit`` (ClassifierModule or ReporterModule).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        dtype: cast the whole network (e.g. ``"bfloat16"``); None keeps the stored dtypes. Grad-CAM maps
            are computed in float32 either way.
        llm_path: stage 2: the base LLM's folder on this machine, when it is not where it was at training
            time (the same model, checked by hash).
        trust_remote_code: allow model code shipped in the LLM folder (never taken from the checkpoint).
        cam_method: CAM method for the maps; None: the one the visual memory was mined with (stage 2
            checkpoints record it), else the paper's ``gradcam``.
        cam_layer: CAM target layer; None: the memory's, else ``final_norm`` (paper).
        memory_image_root: the folder the visual memory's source images are relative to (its build
            records it; give it when the images moved).

    Returns:
        A :class:`Predictor` in eval mode.

    Raises:
        FileNotFoundError: no such checkpoint (or the LLM folder is missing).
        ValueError: not an amrg model checkpoint, or a bad device or dtype.
    """
    from amrg.checkpoints.stage1 import load_stage1, read_checkpoint
    from amrg.checkpoints.stage2 import generator_from_checkpoint

    path = Path(path)
    target, cast = _device(device), _dtype(dtype)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint '{path}' not found: expected a .ckpt that `amrg fit` wrote for stage 1 or stage 2"
        )
    ckpt = read_checkpoint(path, "checkpoint")
    stage = checkpoint_stage(ckpt, f"checkpoint '{path}'")
    memory: dict[str, Any] = {}
    net: DiseaseClassifier | ReportGenerator
    if stage == 1:
        net = load_stage1(path, ckpt=ckpt)
    else:
        net = generator_from_checkpoint(ckpt, f"stage-2 checkpoint '{path}'", llm_path, trust_remote_code)
        memory = ((net.build_record or {}).get("memory") or {}).get("manifest") or {}
    del ckpt
    cam = memory.get("cam") if isinstance(memory.get("cam"), dict) else {}
    root = memory_image_root if memory_image_root is not None else memory.get("image_root")
    net = net.to(target) if cast is None else net.to(device=target, dtype=cast)
    return Predictor(
        net.eval(),
        checkpoint=path,
        cam_method=cam_method or cam.get("method") or "gradcam",
        cam_layer=cam_layer or cam.get("target_layer") or "final_norm",
        memory_image_root=Path(root) if root else None,
    )


class Predictor:
    """A loaded model that predicts from images: reports (stage 2), probabilities, CAMs, recalled memory.

    Calls are serialised by a lock (Grad-CAM hooks the network), so one instance can serve a web app.

    Args:
        net: a stage-1 :class:`DiseaseClassifier` or a stage-2 :class:`ReportGenerator`.
        checkpoint: the file it came from (for messages), if any.
        cam_method: CAM method of the maps (see :class:`amrg.memory.cam.CAMConfig`).
        cam_layer: CAM target layer.
        memory_image_root: folder the visual memory's ``image`` paths are relative to, if known.
    """

    def __init__(
        self,
        net: DiseaseClassifier | ReportGenerator,
        checkpoint: Path | None = None,
        cam_method: CAMMethod = "gradcam",
        cam_layer: CAMLayer = "final_norm",
        memory_image_root: Path | None = None,
    ) -> None:
        if not isinstance(net, (DiseaseClassifier, ReportGenerator)):
            raise TypeError(f"net must be a DiseaseClassifier or a ReportGenerator, got {type(net).__name__}")
        self.net = net
        self.checkpoint = checkpoint
        self.cam_method: CAMMethod = cam_method
        self.cam_layer: CAMLayer = cam_layer
        self.memory_image_root = memory_image_root
        self._lock = threading.RLock()
        self._cam_net: DiseaseClassifier | None = None

    # ------------------------------------------------------------------ facts
    @property
    def stage(self) -> Literal[1, 2]:
        """1 for a disease classifier, 2 for a report generator."""
        return 2 if isinstance(self.net, ReportGenerator) else 1

    @property
    def classifier(self) -> DiseaseClassifier:
        """The stage-1 network (inside the stage-2 one for a report generator)."""
        return self.net.classifier if isinstance(self.net, ReportGenerator) else self.net

    @property
    def image_size(self) -> int:
        """Side in pixels of the views the encoder takes."""
        return int(self.classifier.encoder.img_size)

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.classifier.parameters()).dtype

    def __repr__(self) -> str:
        return (
            f"Predictor(stage={self.stage}, checkpoint={str(self.checkpoint)!r}, image_size={self.image_size}, "
            f"device={self.device}, cam={self.cam_method}@{self.cam_layer})"
        )

    # ------------------------------------------------------------------ inputs
    def _read_view(self, view: ViewInput, where: str) -> _View:
        size = self.image_size
        if isinstance(view, (str, os.PathLike)):
            gray = read_grayscale(view, size_hint=size)
            return _View(to_model_input(gray, size), _display(gray), str(view))
        if isinstance(view, Image.Image):
            gray = grayscale_from_pil(view, where)
            return _View(to_model_input(gray, size), _display(gray), None)
        if isinstance(view, Tensor):
            x = view.detach().float().cpu()
            if x.ndim == 3 and x.shape[0] == 3:  # normalised model input
                if x.shape[-2:] != (size, size):
                    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
                return _View(x, from_model_input(view.detach().cpu()).numpy(), None)
            if x.ndim == 3 and x.shape[0] == 1:
                x = x[0]
            if x.ndim == 2:
                gray = Image.fromarray(x.clamp(0.0, 1.0).numpy(), mode="F")
                return _View(to_model_input(gray, size), _display(gray), None)
            raise BadImageError(
                f"{where}: a tensor of shape {list(view.shape)}; expected [3, H, W] (normalised, as "
                "amrg.data.images.load_image returns) or [H, W] / [1, H, W] grayscale in [0, 1]"
            )
        raise BadImageError(
            f"{where}: {type(view).__name__} is not an image; expected an image file path, a PIL image or a "
            "tensor"
        )

    def _read_study(self, study: ViewInput | Sequence[ViewInput], study_id: str) -> list[_View]:
        views = [study] if isinstance(study, (str, os.PathLike, Image.Image, Tensor)) else list(study)
        if not views:
            raise BadImageError(f"study {study_id!r}: no views given")
        return [self._read_view(v, f"study {study_id!r} view {i}") for i, v in enumerate(views)]

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        views: ViewInput | Sequence[ViewInput],
        *,
        id: str = "study",
        reference: str | None = None,
        top_k: int = 5,
        cam_labels: int = 3,
        threshold: float = 0.5,
        **decoding: Any,
    ) -> StudyPrediction:
        """Predict one study from its views (one view, or a list of them).

        Args:
            views: the study's views: image files (DICOM too), PIL images or tensors (see :data:`ViewInput`).
            id: the study's id in the result.
            reference: a known reference report, kept in the result for pictures.
            top_k: recalled items per memory (stage 2; 0 for none).
            cam_labels: Grad-CAM maps for at most this many predicted labels (0 for none).
            threshold: probability at which a label counts as predicted (the most probable label is
                explained when none reaches it).
            **decoding: stage 2: ``num_beams``, ``min_new_tokens``, ``max_new_tokens``, ... (None keeps the
                checkpoint's).

        Returns:
            The :class:`StudyPrediction`.

        Raises:
            amrg.data.images.BadImageError: a view that cannot be read (one line naming it).
        """
        return self.predict_many(
            [views],
            ids=[id],
            references=[reference],
            top_k=top_k,
            cam_labels=cam_labels,
            threshold=threshold,
            **decoding,
        )[0]

    def predict_many(
        self,
        studies: Sequence[ViewInput | Sequence[ViewInput]],
        *,
        ids: Sequence[str] | None = None,
        references: Sequence[str | None] | None = None,
        batch_size: int = 8,
        max_views: int | None = None,
        top_k: int = 5,
        cam_labels: int = 3,
        threshold: float = 0.5,
        **decoding: Any,
    ) -> list[StudyPrediction]:
        """Predict many studies, ``batch_size`` at a time (see :meth:`predict`).

        Args:
            studies: each study's views (one view, or a list of them).
            ids: one id per study (default ``study0``, ``study1``, ...).
            references: one known reference report (or None) per study.
            batch_size: studies per forward pass.
            max_views: keep at most this many views per study (the first ones); None keeps all.
            top_k: recalled items per memory (stage 2; 0 for none).
            cam_labels: Grad-CAM maps for at most this many predicted labels per study (0 for none).
            threshold: probability at which a label counts as predicted.
            **decoding: stage-2 decoding overrides (None keeps the checkpoint's).

        Returns:
            One :class:`StudyPrediction` per study, in order.
        """
        ids = [f"study{i}" for i in range(len(studies))] if ids is None else list(ids)
        references = [None] * len(studies) if references is None else list(references)
        decoding = {k: v for k, v in decoding.items() if v is not None}
        problems = []
        if len(ids) != len(studies) or len(references) != len(studies):
            problems.append(f"{len(studies)} studies but {len(ids)} ids and {len(references)} references")
        if batch_size < 1 or top_k < 0 or cam_labels < 0 or (max_views is not None and max_views < 1):
            problems.append(
                f"need batch_size >= 1, top_k >= 0, cam_labels >= 0 and max_views >= 1, got {batch_size}, "
                f"{top_k}, {cam_labels} and {max_views}"
            )
        if decoding and self.stage == 1:
            problems.append(f"decoding options {sorted(decoding)} need a stage-2 checkpoint")
        if problems:
            raise ValueError("predict: " + "; ".join(problems))
        out: list[StudyPrediction] = []
        with self._lock:
            for start in range(0, len(studies), batch_size):
                chunk = range(start, min(start + batch_size, len(studies)))
                read = [self._read_study(studies[i], ids[i])[:max_views] for i in chunk]
                out += self._predict_batch(
                    read,
                    [ids[i] for i in chunk],
                    [references[i] for i in chunk],
                    top_k,
                    cam_labels,
                    threshold,
                    decoding,
                )
        return out

    def _predict_batch(
        self,
        studies: list[list[_View]],
        ids: list[str],
        references: list[str | None],
        top_k: int,
        cam_labels: int,
        threshold: float,
        decoding: dict[str, Any],
    ) -> list[StudyPrediction]:
        size, device, dtype = self.image_size, self.device, self.dtype
        num_views = max(len(views) for views in studies)
        images = torch.zeros(len(studies), num_views, 3, size, size)
        view_mask = torch.zeros(len(studies), num_views, dtype=torch.bool)
        for b, views in enumerate(studies):
            for v, view in enumerate(views):
                images[b, v] = view.tensor  # [3, S, S]
                view_mask[b, v] = True
        images, view_mask = images.to(device=device, dtype=dtype), view_mask.to(device)
        if isinstance(self.net, ReportGenerator):
            prediction = self.net.predict(images, view_mask, top_k=top_k, **decoding)
            probabilities = prediction.probabilities.float().cpu()  # [B, Q]
            reports: list[str | None] = list(prediction.reports)
            recalled = prediction.explanations
        else:
            probabilities = self.net.predict_proba(images, view_mask).float().cpu()  # [B, Q]
            reports = [None] * len(studies)
            recalled = [[] for _ in studies]
        out = []
        for b, views in enumerate(studies):
            probs = dict(zip(LABELS, probabilities[b].tolist(), strict=True))
            pred = StudyPrediction(
                id=ids[b],
                probabilities=probs,
                report=reports[b],
                recalled=list(recalled[b]),
                views=[v.display for v in views],
                sources=[v.source for v in views],
                reference=references[b],
            )
            if cam_labels > 0:
                labels = _explained(probs, threshold, cam_labels)
                maps = self._cams(torch.stack([v.tensor for v in views]), labels)  # [L, V, S, S]
                pred.cams = {label: maps[i].numpy() for i, label in enumerate(labels)}
            out.append(pred)
        return out

    # ------------------------------------------------------------------ Grad-CAM
    def cams(
        self, views: ViewInput | Sequence[ViewInput], labels: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Grad-CAM maps of one study, one per view, for the given labels (default: the predicted ones).

        Each view is explained alone, as the visual memory was mined (:func:`amrg.memory.cam.study_cams`),
        with this predictor's ``cam_method`` and ``cam_layer``.

        Args:
            views: the study's views (see :meth:`predict`).
            labels: label names (:data:`amrg.labels.LABELS`); None explains the labels with probability
                >= 0.5 (the most probable one when none).

        Returns:
            label -> maps ``[V, S, S]`` float32 in [0, 1] (S: the encoder input size), in the given order.

        Raises:
            ValueError: an unknown label name.
        """
        with self._lock:
            read = self._read_study(views, "study")
            stacked = torch.stack([v.tensor for v in read])  # [V, 3, S, S]
            if labels is None:
                view_mask = torch.ones(1, len(read), dtype=torch.bool, device=self.device)
                probs = self.classifier.predict_proba(
                    stacked[None].to(device=self.device, dtype=self.dtype), view_mask
                )[0].float()  # [Q]
                labels = _explained(dict(zip(LABELS, probs.tolist(), strict=True)), 0.5, len(LABELS))
            unknown = [label for label in labels if label not in LABELS]
            if unknown:
                raise ValueError(f"unknown label(s) {unknown}; expected some of {list(LABELS)}")
            maps = self._cams(stacked, list(labels))
        return {label: maps[i] for i, label in enumerate(labels)}

    def _cams(self, views: Tensor, labels: list[str]) -> Tensor:
        """[L, V, S, S] maps of ``labels`` on the views [V, 3, S, S]."""
        net = self.classifier
        if self.dtype != torch.float32:
            # grad-cam reads activations as numpy, which has no bfloat16: explain a float32 copy
            if self._cam_net is None:
                self._cam_net = copy.deepcopy(net).float()
            net = self._cam_net
        index = [LABELS.index(label) for label in labels]
        return study_cams(
            net,
            views.to(self.device, torch.float32),
            index,
            method=self.cam_method,
            target_layer=self.cam_layer,
        )


def _explained(probabilities: dict[str, float], threshold: float, most: int) -> list[str]:
    """The labels to explain: predicted ones (>= threshold) by probability, else the most probable one."""
    ranked = sorted(probabilities, key=lambda label: -probabilities[label])
    chosen = [label for label in ranked if probabilities[label] >= threshold] or ranked[:1]
    return chosen[:most]


def _display(gray: Image.Image) -> np.ndarray:
    """A copy of a grayscale "F" view for pictures, longest side at most 1024 px, [H, W] in [0, 1]."""
    scale = _DISPLAY_MAX / max(gray.size)
    if scale < 1:
        size = (max(1, round(gray.size[0] * scale)), max(1, round(gray.size[1] * scale)))
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)
