"""Grad-CAM ROI mining: the disease-aware visual patches that fill the visual memory.

Paper: Wang et al., 2025, "Activating Associative Disease-Aware Vision Token Memory for LLM-Based X-ray
Report Generation" (AM-MRG), https://arxiv.org/abs/2501.03458. For every positive label of every train
study, Grad-CAM on the stage-1 classifier (target layer: the final Swin norm; target: that label's logit)
gives a heat map; it is min-max normalised and cut into ``patch_size`` px patches; patches whose mean CAM
exceeds ``threshold`` (0.75) are kept, at most ``top_k`` (6) per label per image. Each kept patch is
cropped from the image, resized to the encoder input, encoded by the stage-1 vision encoder and mapped
into the Q-Former width by the stage-1 model's *own trained* projection (the reference code uses a
random, untrained projection here), then mean-pooled over tokens into one pattern of width D.

Grad-CAM is the ``grad-cam`` package (``pytorch_grad_cam``, MIT licence,
https://github.com/jacobgil/pytorch-grad-cam); ``CAMConfig.method`` can pick another of its
gradient-based methods (LayerCAM, HiResCAM, ...) for ablations.

Work is batched: the (view, label) pairs of many studies go through one CAM call (one
:class:`ClassifierOutputTarget` per pair; the backbone runs once per view, however many labels it has,
and the backward pass starts at the target layer), and the crops through the encoder in batches.
``CAMConfig(batch_size=1)`` runs the very same code one pair and one crop at a time (what
``benchmarks/memory_build.py`` compares against).

Validity on synthetic data (``benchmarks/pointing_accuracy.py``): with a model whose features are spatially
specific the mined patches land on the sign (tests/memory/test_cam.py). On the tiny from-scratch demo
Swin, the paper's Grad-CAM on the final norm points below random; LayerCAM on the stem's last activation
(``CAMConfig(method="layercam", target_layer="stem")``, the demo recipe) beats random several times over,
but stays under the issue's 0.6 (see that benchmark's docstring for the numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrg.labels import LABELS, NUM_LABELS
from amrg.memory.bank import MemoryBank

if TYPE_CHECKING:  # pragma: no cover
    from amrg.data.batch import Batch
    from amrg.data.schema import SignBox
    from amrg.models.classifier import DiseaseClassifier

__all__ = [
    "CAMConfig",
    "CAMMiner",
    "crop_patches",
    "encode_patches",
    "mine_visual_memory",
    "minmax_normalise",
    "pointing_accuracy",
    "select_patches",
    "study_cams",
]

_logger = logging.getLogger(__name__)

# CAM methods of the grad-cam package that need gradients (our backward starts at the target layer).
# "gradcam" is the paper's; the others are there because plain Grad-CAM can point away from the sign on
# transformer features (benchmarks/pointing_accuracy.py measures each on synthetic data).
CAMMethod = Literal["gradcam", "layercam", "xgradcam", "gradcam++", "hirescam", "gradcam_elementwise"]
_CAM_CLASSES: dict[str, str] = {
    "gradcam": "GradCAM",  # Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391
    "layercam": "LayerCAM",  # Jiang et al., 2021, IEEE TIP 30:5875, "LayerCAM: Exploring Hierarchical CAMs"
    "xgradcam": "XGradCAM",  # Fu et al., 2020, https://arxiv.org/abs/2008.02312
    "gradcam++": "GradCAMPlusPlus",  # Chattopadhyay et al., 2018, https://arxiv.org/abs/1710.11063
    "hirescam": "HiResCAM",  # Draelos & Carin, 2020, https://arxiv.org/abs/2011.08891
    "gradcam_elementwise": "GradCAMElementWise",
}

# Maps a (study id, view index) to the (width, height) in pixels of that view's original image file.
OriginalSize = Callable[[str, int], tuple[int, int]]
# Maps a (study id, view index) to that view's image file, relative to the data's image root.
ImagePath = Callable[[str, int], str]


@dataclass(frozen=True)
class CAMConfig:
    """Grad-CAM ROI mining options (``cam:`` in ``configs/*/memory.yaml``)."""

    patch_size: int = 16
    """Side in pixels, at the encoder input size, of the square patches the CAM is cut into (paper: 16)."""
    threshold: float = 0.75
    """A patch is kept when its mean min-max-normalised CAM is above this (paper: 0.75)."""
    top_k: int = 6
    """Most patches kept per positive label per image, highest mean CAM first (paper: 6)."""
    batch_size: int = 32
    """(view, label) pairs per Grad-CAM pass and crops per encoder pass; 1 runs one at a time."""
    method: CAMMethod = "gradcam"
    """CAM method of the grad-cam package (paper: ``gradcam``); ``layercam`` weights each location by its
    own positive gradient instead of the spatial mean, and points at the sign better on our models."""
    target_layer: Literal["final_norm", "stem"] = "final_norm"
    """Layer whose activations the CAM weighs (paper: ``final_norm``, the final Swin norm); ``stem`` is the
    patch-embedding stem's last activation (see :meth:`VisionEncoder.cam_layer`): local, non-negative
    features at the first stage's grid. With ``stem`` each (view, label) pair runs the whole backbone."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            problems.append(f"cam.patch_size must be a positive int, got {self.patch_size!r}")
        if not 0.0 <= float(self.threshold) < 1.0:
            problems.append(
                f"cam.threshold must be in [0, 1) (CAMs are min-max normalised), got {self.threshold!r}"
            )
        if not isinstance(self.top_k, int) or self.top_k < 1:
            problems.append(f"cam.top_k must be a positive int, got {self.top_k!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"cam.batch_size must be a positive int, got {self.batch_size!r}")
        if self.method not in _CAM_CLASSES:
            problems.append(f"cam.method must be one of {list(_CAM_CLASSES)}, got {self.method!r}")
        if self.target_layer not in ("final_norm", "stem"):
            problems.append(f"cam.target_layer must be 'final_norm' or 'stem', got {self.target_layer!r}")
        if problems:
            raise ValueError("invalid CAM options: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- pieces
def minmax_normalise(cams: Tensor) -> Tensor:
    """Scale each map to [0, 1]; a constant map becomes all zeros.

    Args:
        cams: [K, H, W].

    Returns:
        [K, H, W] with per-map minimum 0 and maximum 1 (or all 0).
    """
    flat = cams.flatten(1)  # [K, H*W]
    lo = flat.min(dim=1).values[:, None, None]  # [K, 1, 1]
    hi = flat.max(dim=1).values[:, None, None]  # [K, 1, 1]
    span = hi - lo
    out = (cams - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.zeros_like(out))


def select_patches(
    cams: Tensor, patch_size: int, threshold: float, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick the patches of each map whose mean CAM is above ``threshold``, at most ``top_k`` per map.

    Args:
        cams: min-max-normalised maps, [K, H, W]; H and W multiples of ``patch_size``.
        patch_size: patch side in pixels.
        threshold: keep a patch when its mean is strictly greater.
        top_k: most patches per map.

    Returns:
        ``(item [P], cell [P], score [P])``: which map, the patch's row-major index in the
        ``(H / patch_size) x (W / patch_size)`` grid, and its mean CAM; ordered by map, then by score
        (highest first; ties by cell index).
    """
    k, h, w = cams.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"cam.patch_size={patch_size} does not divide the CAM size {h}x{w} (the encoder input size)"
        )
    scores = F.avg_pool2d(cams[:, None], patch_size).flatten(1)  # [K, 1, G_h, G_w] -> [K, G]
    # Cells inside one upsampled token often tie up to float noise, and that noise differs between batch
    # sizes; rounding to 1e-5 makes such ties exact, and the stable sort then orders them by cell index.
    scores = torch.round(scores, decimals=5)
    ranked = torch.sort(scores, dim=1, descending=True, stable=True)
    top_scores = ranked.values[:, :top_k]  # [K, k']
    top_cells = ranked.indices[:, :top_k]  # [K, k']
    keep = top_scores > threshold  # [K, k']
    item = torch.arange(k, device=cams.device)[:, None].expand_as(keep)[keep]  # [P]
    return item, top_cells[keep], top_scores[keep]


def crop_patches(images: Tensor, item: Tensor, cell: Tensor, patch_size: int, out_size: int) -> Tensor:
    """Cut the chosen grid cells out of the images and resize them to the encoder input.

    Args:
        images: normalised views, [K, 3, H, W].
        item: which view each crop comes from, [P].
        cell: row-major grid cell of each crop, [P].
        patch_size: cell side in pixels.
        out_size: side the crops are resized to (the encoder input size).

    Returns:
        Crops, [P, 3, out_size, out_size].
    """
    k, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    grid = images[:, :, : gh * patch_size, : gw * patch_size]
    grid = grid.reshape(k, c, gh, patch_size, gw, patch_size)  # [K, 3, G_h, p, G_w, p]
    grid = grid.permute(0, 2, 4, 1, 3, 5)  # [K, G_h, G_w, 3, p, p]
    crops = grid[item, cell // gw, cell % gw]  # [P, 3, p, p]
    if patch_size == out_size:
        return crops.contiguous()
    return F.interpolate(crops, size=(out_size, out_size), mode="bilinear", align_corners=False)


@torch.no_grad()
def encode_patches(net: DiseaseClassifier, crops: Tensor) -> Tensor:
    """Encode crops with the stage-1 encoder and its trained projection, mean-pooled over tokens.

    Args:
        net: the stage-1 network.
        crops: [P, 3, S, S] at the encoder input size S.

    Returns:
        One pattern per crop, [P, D] (D = the Q-Former width).
    """
    tokens = net.encoder.forward_features(crops)  # [P, N, C]
    return net.qformer.project_visual(tokens).mean(dim=1)  # [P, N, D] -> [P, D]


# ---------------------------------------------------------------------------------------------- miner
@dataclass
class _Pair:
    """One (view, label) Grad-CAM job."""

    source_id: str
    view: int
    label: int
    image: Tensor  # [3, H, W]


class _GradientFromTargetLayer:
    """Make autograd start at the CAM target layer instead of the input.

    Grad-CAM only needs d(logit)/d(activations of the target layer). With every parameter frozen and a
    forward hook that re-roots the target layer's output as a leaf requiring grad, the backward pass runs
    through the Q-Former and head only: no weight gradients, no backward through the Swin stages. The
    hook must be registered before ``pytorch_grad_cam``'s own hooks, which then see the re-rooted tensor.
    """

    def __init__(self, net: nn.Module, layer: nn.Module) -> None:
        self.requires_grad = {name: p.requires_grad for name, p in net.named_parameters()}
        self.training = net.training
        self.net = net
        net.requires_grad_(False)
        self.handle = layer.register_forward_hook(self._hook)

    @staticmethod
    def _hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output.detach().requires_grad_(True)

    def restore(self) -> None:
        self.handle.remove()
        for name, p in self.net.named_parameters():
            p.requires_grad_(self.requires_grad[name])
            p.grad = None
        self.net.train(self.training)


class CAMMiner:
    """Grad-CAM ROI miner bound to one stage-1 network; use as a context manager (it hooks the network).

    Args:
        net: the trained stage-1 network; put in eval mode while mining, then restored (mode, grads).
        config: patch size, threshold, top-k, batch size and CAM method.
        device: where to run; None keeps the network's device.

    Raises:
        ValueError: the network does not predict the 14 labels, or ``patch_size`` does not divide its
            input size.
    """

    def __init__(
        self,
        net: DiseaseClassifier,
        config: CAMConfig | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        import pytorch_grad_cam

        self.config = config if config is not None else CAMConfig()
        if net.num_labels != NUM_LABELS:
            raise ValueError(
                f"the stage-1 network predicts {net.num_labels} labels but the memory has {NUM_LABELS} "
                f"({list(LABELS)})"
            )
        self.net = net if device is None else net.to(device)
        self.device = next(net.parameters()).device
        self.input_size = int(net.encoder.img_size)
        if self.input_size % self.config.patch_size:
            raise ValueError(
                f"cam.patch_size={self.config.patch_size} does not divide the encoder input size "
                f"{self.input_size} (net.encoder.img_size)"
            )
        target_layer, reshape = net.encoder.cam_layer(self.config.target_layer)
        self._target_layer = target_layer
        self._restore = _GradientFromTargetLayer(net, target_layer)
        cam_class = getattr(pytorch_grad_cam, _CAM_CLASSES[self.config.method])
        self._cam = cam_class(model=net, target_layers=[target_layer], reshape_transform=reshape)
        self.net.eval()
        self._warned_resize = False
        # Sharing one backbone pass between a view's labels needs the target layer to end the backbone;
        # from the stem on, every pair needs its own backward through the Swin stages anyway.
        self._share_trunk = self.config.target_layer == "final_norm"
        self._trunk_checked = False

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove every hook and restore the network's grad flags and train/eval mode."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None
            self._restore.restore()

    def __enter__(self) -> CAMMiner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- steps
    def cams(self, images: Tensor, labels: Sequence[int], index: Tensor | None = None) -> Tensor:
        """CAM maps of one label logit each, all in one pass.

        Args:
            images: normalised views at the encoder input size, [U, 3, S, S].
            labels: label index (CheXbert order) to explain for each map, K values.
            index: which view each map explains, [K] long; None when map k explains view k (K = U).
                With an index the backbone runs once per view, not once per map (see
                :meth:`_shared_trunk_cams`); the maps are the same.

        Returns:
            Min-max-normalised maps at the input resolution, [K, S, S] float32 on the CPU.
        """
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self._cam is None:
            raise RuntimeError("CAMMiner is closed")
        targets = [ClassifierOutputTarget(int(label)) for label in labels]
        images = images.to(self.device)
        maps = None
        if index is not None and self._share_trunk:
            maps = self._shared_trunk_cams(images, index.to(self.device), targets)
        if maps is None:
            inputs = images if index is None else images[index.to(self.device)]  # [K, 3, S, S]
            maps = self._cam(input_tensor=inputs, targets=targets)  # numpy [K, S, S]
        self._cam.activations_and_grads.clear()  # drop the graph and activations of this pass
        return minmax_normalise(torch.from_numpy(maps).float())

    def _shared_trunk_cams(self, images: Tensor, index: Tensor, targets: list) -> Any:
        """Run the backbone up to the target layer once per view, then CAM each (view, label) map.

        A view with several positive labels would otherwise go through the whole Swin once per label.
        The backbone is run without gradients on the U views, keeping the input of the target layer;
        for the CAM call, the backbone's ``forward_features`` is shadowed (on this instance, for this
        call only) by "apply the target layer to the kept input of view index[k]", so everything after
        it (the encoder's token handling, Q-Former, head) is the network's own code. This needs the
        target layer to be the last step of ``forward_features`` (true for timm Swin's final norm); that
        is checked on the first call, and the miner falls back to repeating the views if it fails.

        Returns:
            The package's maps, numpy [K, S, S], or None after a failed check.
        """
        backbone = self.net.encoder.backbone
        layer = self._target_layer
        kept: list[Tensor] = []
        handle = layer.register_forward_pre_hook(lambda module, args: kept.append(args[0]))
        try:
            with torch.no_grad():
                features = backbone.forward_features(images)  # [U, h, w, C]
        finally:
            handle.remove()
        trunk = kept[-1]  # input of the target layer, [U, h, w, C]
        if not self._trunk_checked:
            with torch.no_grad():
                last = layer(trunk)
            self._trunk_checked = True
            if last.shape != features.shape or not torch.allclose(last, features, atol=1e-5):
                self._share_trunk = False
                _logger.warning(
                    "the CAM target layer is not the last step of %s.forward_features: repeating each view "
                    "once per label instead of sharing the backbone pass",
                    type(backbone).__name__,
                )
                return None
        shadowed = vars(backbone).get("forward_features")  # an instance attribute already there, if any
        backbone.forward_features = lambda _images: layer(trunk[index])  # [K, h, w, C]
        try:
            # Only the batch size of the input matters now: a zero-stride stand-in allocates nothing.
            stand_in = images.new_zeros(()).expand(index.numel(), *images.shape[1:])  # [K, 3, S, S]
            return self._cam(input_tensor=stand_in, targets=targets)
        finally:
            if shadowed is not None:
                backbone.forward_features = shadowed
            else:
                del backbone.forward_features  # the class method is visible again

    def _to_input_size(self, images: Tensor) -> Tensor:
        if images.shape[-2:] == (self.input_size, self.input_size):
            return images
        if not self._warned_resize:
            _logger.warning(
                "views are %dx%d but the encoder takes %d px: resizing them for Grad-CAM "
                "(set data.init_args.image_size=%d to avoid this)",
                images.shape[-1],
                images.shape[-2],
                self.input_size,
                self.input_size,
            )
            self._warned_resize = True
        return F.interpolate(
            images,
            size=(self.input_size, self.input_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )

    def _process(self, pairs: list[_Pair]) -> Iterator[tuple[_Pair, Tensor, int, float]]:
        """Run Grad-CAM, selection and crop encoding for one chunk of pairs.

        Yields:
            ``(pair, feature [D], cell, score)`` for every kept patch, in pair order then score order.
        """
        cfg = self.config
        slot: dict[tuple[str, int], int] = {}  # (study id, view) -> row among the chunk's distinct views
        views: list[Tensor] = []
        for p in pairs:
            if (p.source_id, p.view) not in slot:
                slot[(p.source_id, p.view)] = len(views)
                views.append(p.image)
        index = torch.tensor([slot[(p.source_id, p.view)] for p in pairs])  # [K]
        images = self._to_input_size(torch.stack(views).to(self.device))  # [U, 3, S, S]
        cams = self.cams(images, [p.label for p in pairs], index)  # [K, S, S]
        item, cell, score = select_patches(cams, cfg.patch_size, cfg.threshold, cfg.top_k)  # [P] each
        if item.numel() == 0:
            return
        view_d = index[item].to(self.device)  # [P], the view each kept patch is cut from
        cell_d = cell.to(self.device)
        feats = []
        for start in range(0, item.numel(), cfg.batch_size):
            stop = start + cfg.batch_size
            crops = crop_patches(
                images, view_d[start:stop], cell_d[start:stop], cfg.patch_size, self.input_size
            )  # [p, 3, S, S]
            feats.append(encode_patches(self.net, crops).float().cpu())  # [p, D]
        features = torch.cat(feats)  # [P, D]
        for row, (i, c, s) in enumerate(zip(item.tolist(), cell.tolist(), score.tolist(), strict=True)):
            yield pairs[i], features[row], c, s

    def _record(
        self,
        pair: _Pair,
        cell: int,
        score: float,
        split: str,
        original_size: OriginalSize | None,
        image_path: ImagePath | None = None,
    ) -> dict:
        p, s = self.config.patch_size, self.input_size
        g = s // p
        x0, y0 = (cell % g) * p, (cell // g) * p
        if original_size is None:
            width, height = s, s
        else:
            width, height = (int(v) for v in original_size(pair.source_id, pair.view))
        sx, sy = width / s, height / s
        record = {
            "source_id": pair.source_id,
            "split": split,
            "label": LABELS[pair.label],
            "view": pair.view,
            # Patch box in pixels of the view's original image (views are resized whole, so the
            # mapping is a per-axis scale), the frame annotation boxes use.
            "box": [round(x0 * sx, 2), round(y0 * sy, 2), round((x0 + p) * sx, 2), round((y0 + p) * sy, 2)],
            "image_size": [width, height],
            "cam_score": round(score, 6),
        }
        if image_path is not None:
            # where the patch can be cut again from (figures, the web demo), relative to the image root
            record["image"] = str(image_path(pair.source_id, pair.view))
        return record

    # -------------------------------------------------------------- whole run
    def mine(
        self,
        batches: Iterable[Batch],
        split: str = "train",
        original_size: OriginalSize | None = None,
        total: int | None = None,
        progress: bool = True,
        metadata: Mapping[str, Any] | None = None,
        image_path: ImagePath | None = None,
    ) -> MemoryBank:
        """Mine every positive label (code 1) of every real view of every study in ``batches``.

        Args:
            batches: :class:`~amrg.data.batch.Batch` objects of the train split, un-augmented.
            split: split name written into each record (memories hold the train split only).
            original_size: ``(study id, view) -> (width, height)`` of the original image files, so that
                record boxes are in the annotation's pixel frame; None records them at the encoder
                input size.
            total: number of studies, for the progress bar.
            progress: show a tqdm bar (studies).
            metadata: extra JSON facts stored in the bank's metadata.
            image_path: ``(study id, view) -> image file`` relative to the data's image root, recorded as
                each record's ``image``; None records no path.

        Returns:
            A ``MemoryBank(kind="visual", dim=D)``, unsampled: every kept patch, labels in CheXbert order.
        """
        cfg = self.config
        dim = int(self.net.qformer.hidden_size)
        feats: dict[int, list[Tensor]] = {i: [] for i in range(NUM_LABELS)}
        records: dict[int, list[dict]] = {i: [] for i in range(NUM_LABELS)}
        pending: list[_Pair] = []
        n_pairs = n_studies = 0

        def flush(chunk: list[_Pair]) -> None:
            for pair, feature, cell, score in self._process(chunk):
                feats[pair.label].append(feature)
                records[pair.label].append(self._record(pair, cell, score, split, original_size, image_path))

        bar = tqdm(total=total, desc="grad-cam mining", unit="study", disable=not progress)
        try:
            for batch in batches:
                if batch is None:  # every study of the batch had a bad image (on_bad_image="skip")
                    continue
                positive = batch.labels == 1  # [B, 14]; NaN (not mentioned) compares False
                for b, study_id in enumerate(batch.ids):
                    labels = positive[b].nonzero().flatten().tolist()
                    for v in batch.view_mask[b].nonzero().flatten().tolist():
                        for label in labels:
                            pending.append(_Pair(study_id, v, label, batch.images[b, v]))
                n_studies += len(batch.ids)
                while len(pending) >= cfg.batch_size:
                    chunk, pending = pending[: cfg.batch_size], pending[cfg.batch_size :]
                    n_pairs += len(chunk)
                    flush(chunk)
                bar.update(len(batch.ids))
            if pending:
                n_pairs += len(pending)
                flush(pending)
        finally:
            bar.close()

        bank = MemoryBank(
            "visual",
            dim,
            metadata={
                "source": "grad-cam",
                "split": split,
                "cam": asdict(cfg),
                "input_size": self.input_size,
                "method": cfg.method,
                "target_layer": cfg.target_layer,
                "encoder": str(self.net.encoder.model_name),
                "projection": "qformer.visual_proj (stage-1 trained), mean over tokens",
                "studies": n_studies,
                "cam_pairs": n_pairs,
                **dict(metadata or {}),
            },
        )
        for i, label in enumerate(LABELS):
            if feats[i]:
                bank.add(label, torch.stack(feats[i]), records[i])
        _logger.info(
            "grad-cam mining: %d studies, %d (view, label) pairs, %d patches kept",
            n_studies,
            n_pairs,
            len(bank),
        )
        return bank


def mine_visual_memory(
    net: DiseaseClassifier,
    batches: Iterable[Batch],
    config: CAMConfig | None = None,
    device: str | torch.device | None = None,
    split: str = "train",
    original_size: OriginalSize | None = None,
    total: int | None = None,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    image_path: ImagePath | None = None,
) -> MemoryBank:
    """Grad-CAM ROI mining over ``batches`` into a visual :class:`MemoryBank` (see :meth:`CAMMiner.mine`).

    Args:
        net: the trained stage-1 network (restored afterwards: mode, grad flags).
        batches: un-augmented train-split batches.
        config: patch size, threshold, top-k, batch size.
        device: where to run; None keeps the network's device.
        split: split name written into each record.
        original_size: ``(study id, view) -> (width, height)`` of the original images, or None.
        total: number of studies, for the progress bar.
        progress: show a progress bar.
        metadata: extra JSON facts for the bank.
        image_path: ``(study id, view) -> image file`` relative to the image root, or None.

    Returns:
        The unsampled visual bank, [n_l, D] per label.
    """
    with CAMMiner(net, config, device) as miner:
        return miner.mine(batches, split, original_size, total, progress, metadata, image_path)


def study_cams(
    net: DiseaseClassifier,
    views: Tensor,
    labels: Sequence[int],
    method: CAMMethod = "gradcam",
    target_layer: Literal["final_norm", "stem"] = "final_norm",
) -> Tensor:
    """CAM maps of one study: each label's logit explained on each view alone, as the memory is mined.

    Args:
        net: the stage-1 network (restored afterwards: mode, grad flags).
        views: the study's real views, normalised, [V, 3, H, W] (resized to the encoder input if needed).
        labels: label indices (CheXbert order) to explain, L values.
        method: CAM method of the grad-cam package (paper: ``gradcam``).
        target_layer: ``final_norm`` (paper) or ``stem`` (see :class:`CAMConfig`).

    Returns:
        Min-max-normalised maps at the encoder input size S, [L, V, S, S] float32 on the CPU.
    """
    num_views, num_labels = views.shape[0], len(labels)
    if num_labels == 0 or num_views == 0:
        size = int(net.encoder.img_size)
        return torch.zeros(num_labels, num_views, size, size)
    # patch_size 1 divides any input size; no patch is selected here, only the maps are wanted
    config = CAMConfig(patch_size=1, method=method, target_layer=target_layer)
    index = torch.arange(num_views).repeat(num_labels)  # [L*V]: label-major, every view per label
    targets = [int(label) for label in labels for _ in range(num_views)]
    with torch.enable_grad(), CAMMiner(net, config) as miner:
        maps = miner.cams(miner._to_input_size(views), targets, index)  # [L*V, S, S]
    return maps.view(num_labels, num_views, *maps.shape[-2:])  # [L, V, S, S]


# ---------------------------------------------------------------------------------------------- validity
def _inside(x: float, y: float, box: Sequence[float]) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def pointing_accuracy(bank: MemoryBank, boxes: Mapping[str, Sequence[SignBox]]) -> dict[str, Any]:
    """How often mined patches point at the true sign: the patch centre lies inside a box of its label.

    Only patches whose (study, view, label) has at least one true box are scored (synthetic data knows
    where each sign is; "No Finding" has none). The random baseline is the exact expectation of choosing
    one grid cell uniformly at random in the same view for the same label.

    Args:
        bank: a visual bank from :func:`mine_visual_memory` (records carry ``box`` and ``image_size``;
            metadata carries ``input_size`` and ``cam.patch_size``).
        boxes: study id -> its sign boxes (``label``, ``view``, ``box`` in original image pixels).

    Returns:
        ``{"accuracy", "random", "scored", "hits", "per_label": {label: (hits, scored)}}``; accuracy and
        random are NaN when nothing could be scored.
    """
    size = int(bank.metadata["input_size"])
    patch = int(bank.metadata["cam"]["patch_size"])
    g = size // patch
    per_label: dict[str, tuple[int, int]] = {}
    hits = scored = 0
    random_sum = 0.0
    for label in bank.labels:
        h = n = 0
        for rec in bank.provenance(label):
            true = [
                sb.box
                for sb in boxes.get(rec["source_id"], ())
                if sb.label == label and sb.view == rec["view"]
            ]
            if not true:
                continue
            x0, y0, x1, y1 = rec["box"]
            h += any(_inside((x0 + x1) / 2, (y0 + y1) / 2, box) for box in true)
            n += 1
            width, height = rec["image_size"]
            sx, sy = width / size, height / size
            centres = [((c + 0.5) * patch * sx, (r + 0.5) * patch * sy) for r in range(g) for c in range(g)]
            random_sum += sum(any(_inside(cx, cy, box) for box in true) for cx, cy in centres) / len(centres)
        if n:
            per_label[label] = (h, n)
        hits += h
        scored += n
    nan = float("nan")
    return {
        "accuracy": hits / scored if scored else nan,
        "random": random_sum / scored if scored else nan,
        "scored": scored,
        "hits": hits,
        "per_label": per_label,
    }
