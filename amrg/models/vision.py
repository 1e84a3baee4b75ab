"""Vision encoder: a timm backbone (Swin by default) that turns one or more X-ray views into patch tokens.

Paper: Wang et al., 2025, "Activating Associative Disease-Aware Vision Token Memory for LLM-Based X-ray
Report Generation" (AM-MRG), https://arxiv.org/abs/2501.03458 — stage 1 uses a Swin Transformer
(Liu et al., 2021, https://arxiv.org/abs/2103.14030) as the visual backbone.

The backbone itself is timm's (``timm.create_model``, Apache-2.0); checkpoint key conversion reuses the
``checkpoint_filter_fn`` that timm ships next to each architecture (for Swin:
``timm.models.swin_transformer.checkpoint_filter_fn``, which converts the original Microsoft release).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from amrg._state import load_state_strict

__all__ = ["ConvPatchEmbed", "VisionEncoder", "load_state_file"]

_logger = logging.getLogger(__name__)

# Wrappers that training scripts put around a state dict (timm/Swin releases use "model", Lightning and
# many others "state_dict"); unwrapped in this order.
_WRAPPER_KEYS = ("state_dict", "model", "module")
# Prefixes that wrappers add to every key: DDP ("module."), our own VisionEncoder ("backbone.") and
# encoder-only exports of classifiers ("encoder.").
_KEY_PREFIXES = ("module.", "encoder.backbone.", "backbone.", "encoder.")


def load_state_file(path: Path | str) -> dict[str, Tensor]:
    """Read a state dict from a local file without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

    Args:
        path: a local checkpoint file.

    Returns:
        The flat tensor state dict.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no tensor state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint file {str(path)!r} does not hold a tensor state dict")
    return dict(state)


class ConvPatchEmbed(PatchEmbed):
    """Patch embedding by a stack of stride-2 3x3 convolutions instead of one patch-sized convolution.

    Xiao et al., 2021, "Early Convolutions Help Transformers See Better", https://arxiv.org/abs/2106.14881:
    a convolutional stem makes a small transformer trained from scratch learn local detail faster. Used
    by the demo's from-scratch Swin (small signs on 64 px films); the paper's Swin keeps timm's stem.
    log2(patch_size) conv-BN-GELU layers, widths doubling up to ``embed_dim`` (at least 8), then a 1x1 projection;
    the output grid, format and norm are timm's ``PatchEmbed``'s.

    Shapes: [B, 3, H, W] -> [B, H/p, W/p, embed_dim] (Swin asks for NHWC).
    """

    def __init__(self, *args: object, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, **kwargs):
        super().__init__(*args, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        size = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or size < 2 or size & (size - 1):
            raise ValueError(f"the conv stem needs a square power-of-two patch_size, got {self.patch_size}")
        layers: list[nn.Module] = []
        width, n = in_chans, size.bit_length() - 1
        for i in range(n):
            out = max(embed_dim // 2 ** (n - i), 8)
            layers += [
                nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.GELU(),
            ]
            width = out
        layers.append(nn.Conv2d(width, embed_dim, 1))
        self.proj = nn.Sequential(*layers)


class VisionEncoder(nn.Module):
    """A timm backbone applied to every view of a study, giving one set of patch tokens per study.

    Views are encoded independently by the shared backbone. ``multi_view="mean"`` averages the views'
    patch tokens position by position (the paper's fusion), so N is the per-view patch count;
    ``"concat"`` keeps every view's tokens, so N is V times that. Views marked False in ``view_mask`` are
    never encoded and never contribute.

    Grad-CAM: hook :attr:`cam_target_layer` (the backbone's final norm), pass :meth:`reshape_transform`
    to ``pytorch_grad_cam`` and feed single views as [B, 3, H, W]; :meth:`cam_layer` also offers the
    stem's last activation. The hooked activations hold one row
    per encoded view, in row-major (B, V) order over the views that ``view_mask`` keeps (all B*V when
    it is None).

    Weights: the constructor builds random weights; ``checkpoint_path`` / ``pretrained`` then load
    pretrained ones. That file read is the one deliberate I/O in a constructor, so that a YAML recipe
    can name the ImageNet weights; checkpoints of trained models store these as null/false (see
    ``amrg.modules.classifier``) so rebuilding never reads the file again.
    """

    def __init__(
        self,
        model_name: str = "swin_tiny_patch4_window7_224",
        img_size: int = 224,
        embed_dim: int | None = None,
        depths: tuple[int, ...] | None = None,
        num_heads: tuple[int, ...] | None = None,
        window_size: int | None = None,
        patch_size: int | None = None,
        drop_path_rate: float = 0.0,
        checkpoint_path: Path | None = None,
        pretrained: bool = False,
        multi_view: Literal["mean", "concat"] = "mean",
        freeze: bool = False,
        stem: Literal["patch", "conv"] = "patch",
    ) -> None:
        """Build the backbone with random weights, then optionally load weights.

        Args:
            model_name: any timm model name; its architecture defaults apply unless overridden below.
            img_size: input height and width in pixels (the data module's ``image_size``); passed to
                timm, so the family must accept it (Swin, ViT and most transformer families do).
            embed_dim: override of the stem width (Swin ``embed_dim``), e.g. 32 for a tiny test model.
            depths: override of blocks per stage (Swin ``depths``), e.g. ``(1, 1)``.
            num_heads: override of attention heads per stage (Swin ``num_heads``), e.g. ``(1, 2)``.
            window_size: override of the attention window (Swin ``window_size``); must divide the token
                grid of every stage.
            patch_size: override of the patch-embedding stride (Swin ``patch_size``).
            drop_path_rate: stochastic depth rate (the reference SwinCheX recipe uses 0.1).
            checkpoint_path: a local weights file (``.safetensors`` or a ``torch.save`` state dict, e.g.
                the Microsoft Swin release or a timm export) loaded strictly after construction; the
                head and Swin's non-persistent buffers are dropped and key formats converted by timm.
            pretrained: let timm fetch its default pretrained weights from the Hugging Face Hub. Needs a
                network connection at construction, so keep False offline; prefer ``checkpoint_path``.
            multi_view: how to fuse views: ``"mean"`` of the views' patch tokens (paper) or ``"concat"``
                along the token axis.
            freeze: stop gradients into the backbone and keep it in eval mode.
            stem: ``"patch"`` (timm's patch-sized convolution, the paper's Swin) or ``"conv"``
                (:class:`ConvPatchEmbed`, stride-2 3x3 convolutions; for small models trained from
                scratch; Swin-family backbones only, and pretrained stem weights do not fit it).
        """
        super().__init__()
        if multi_view not in ("mean", "concat"):
            raise ValueError(f"multi_view must be 'mean' or 'concat', got {multi_view!r}")
        overrides: dict[str, object] = {
            "embed_dim": embed_dim,
            "depths": tuple(depths) if depths is not None else None,
            "num_heads": tuple(num_heads) if num_heads is not None else None,
            "window_size": window_size,
            "patch_size": patch_size,
        }
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        if stem == "conv":
            kwargs["embed_layer"] = ConvPatchEmbed
        # num_classes=0: the backbone has no classifier; the disease head lives in DiseaseClassifier.
        self.backbone = timm.create_model(
            model_name, pretrained=pretrained, num_classes=0, img_size=img_size, **kwargs
        )
        self.model_name = model_name
        self.stem = stem
        self.img_size = img_size
        self.multi_view = multi_view
        self.frozen = freeze
        self.num_features: int = int(self.backbone.num_features)
        self._output_fmt: str = str(getattr(self.backbone, "output_fmt", "NCHW"))
        self._num_prefix_tokens: int = int(getattr(self.backbone, "num_prefix_tokens", 0))
        if checkpoint_path is not None:
            self.load_backbone_checkpoint(checkpoint_path)
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    # ------------------------------------------------------------------ weights
    def load_backbone_checkpoint(self, path: Path | str) -> None:
        """Load backbone weights from a local file, strictly.

        Accepts raw timm/Microsoft Swin state dicts and state dicts of this class (``backbone.``
        prefix), optionally wrapped in ``{"model": ...}`` / ``{"state_dict": ...}``.

        Args:
            path: ``.safetensors`` or ``torch.save`` file.

        Raises:
            ValueError: names every missing, unexpected and mis-shaped key.
        """
        state = self._filter_checkpoint(load_state_file(path))
        what = f"cannot load {str(path)!r} into {type(self.backbone).__name__}"
        load_state_strict(self.backbone, state, what)
        _logger.info("loaded %d backbone tensors from %s", len(state), path)

    def _filter_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename and convert checkpoint keys to this backbone's (timm) layout."""
        for prefix in _KEY_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
        # timm keeps an architecture-specific converter next to each model (e.g. Swin: old downsample
        # positions, relative-position tables resized to the window, patch-embedding resampling).
        filter_fn = getattr(sys.modules[type(self.backbone).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = dict(filter_fn(state, self.backbone))
        own = self.backbone.state_dict()
        classifier = getattr(self.backbone, "pretrained_cfg", {}).get("classifier") or "head"
        classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        dropped = [k for k in state if k not in own and k.startswith(classifiers)]
        if dropped:
            _logger.info("dropping classifier keys not used by the encoder: %s", dropped)
        return {k: v for k, v in state.items() if k not in dropped}

    # ------------------------------------------------------------------ forward
    def train(self, mode: bool = True) -> VisionEncoder:
        """Switch train/eval mode; a frozen backbone stays in eval mode (no dropout, no drop-path)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def _backbone_tokens(self, images: Tensor) -> Tensor:
        """Run the backbone on single images.

        Args:
            images: [K, 3, H, W].

        Returns:
            Patch tokens, [K, N, C] (prefix tokens such as a ViT class token removed).
        """
        feats = self.backbone.forward_features(images)
        if feats.ndim == 4:
            if self._output_fmt == "NHWC":
                feats = feats.flatten(1, 2)  # [K, h, w, C] -> [K, N, C]
            else:
                feats = feats.flatten(2).transpose(1, 2)  # [K, C, h, w] -> [K, N, C]
        elif feats.ndim == 3:
            feats = feats[:, self._num_prefix_tokens :]  # [K, P+N, C] -> [K, N, C]
        else:
            raise ValueError(f"{self.model_name}: unsupported forward_features shape {tuple(feats.shape)}")
        return feats

    def forward_features(self, images: Tensor, view_mask: Tensor | None = None) -> Tensor:
        """Encode every kept view and fuse the views.

        Args:
            images: normalised views, [B, V, 3, H, W]; a [B, 3, H, W] tensor is one view per study
                (what ``pytorch_grad_cam`` passes, since it reads a 5-D input as a volume).
            view_mask: which views are real, [B, V] bool; None keeps all.

        Returns:
            Patch tokens, [B, N, C]; for ``"concat"`` N = V * (patches per view) and the tokens of
            masked views are zero (see :meth:`token_mask`).
        """
        if images.ndim == 4:
            images = images.unsqueeze(1)  # [B, 3, H, W] -> [B, 1, 3, H, W]
        if images.ndim != 5:
            raise ValueError(
                f"images must be [B, V, 3, H, W] or [B, 3, H, W], got shape {tuple(images.shape)}"
            )
        b, v = images.shape[:2]
        flat = images.flatten(0, 1)  # [B*V, 3, H, W]
        if view_mask is None or bool(view_mask.all()):
            tokens = self._backbone_tokens(flat).unflatten(0, (b, v))  # [B, V, N, C]
            weights = images.new_ones(b, v)
        else:
            keep = view_mask.reshape(-1).bool()  # [B*V]
            kept = self._backbone_tokens(flat[keep])  # [K, N, C]
            tokens = kept.new_zeros(b * v, *kept.shape[1:])
            tokens = tokens.index_copy(0, keep.nonzero().squeeze(1), kept)  # [B*V, N, C]
            tokens = tokens.unflatten(0, (b, v))  # [B, V, N, C]
            weights = view_mask.to(tokens.dtype)
        if self.multi_view == "concat":
            return tokens.flatten(1, 2)  # [B, V*N, C]
        # Masked mean over views; a study with no real view gets zeros rather than NaN.
        denom = weights.sum(1).clamp_min(1.0)[:, None, None]  # [B, 1, 1]
        return (tokens * weights[:, :, None, None]).sum(1) / denom  # [B, N, C]

    def token_mask(self, view_mask: Tensor | None, num_tokens: int) -> Tensor | None:
        """Which fused tokens are real.

        Args:
            view_mask: [B, V] bool, or None.
            num_tokens: N of the fused tokens from :meth:`forward_features`.

        Returns:
            [B, N] bool for ``"concat"`` with a view mask; None (every token real) otherwise.
        """
        if view_mask is None or self.multi_view == "mean":
            return None
        b, v = view_mask.shape
        per_view = num_tokens // v
        return view_mask.bool()[:, :, None].expand(b, v, per_view).reshape(b, num_tokens)  # [B, N]

    def forward(self, images: Tensor, view_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Patch tokens and their (masked) mean.

        Args:
            images: [B, V, 3, H, W] (or [B, 3, H, W], one view).
            view_mask: [B, V] bool, or None.

        Returns:
            ``(tokens [B, N, C], pooled [B, C])``.
        """
        tokens = self.forward_features(images, view_mask)
        mask = self.token_mask(view_mask, tokens.shape[1])
        if mask is None:
            pooled = tokens.mean(1)
        else:
            w = mask.to(tokens.dtype)[:, :, None]  # [B, N, 1]
            pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)  # [B, C]
        return tokens, pooled

    # ------------------------------------------------------------------ Grad-CAM
    @property
    def cam_target_layer(self) -> nn.Module:
        """The backbone's final norm, the Grad-CAM target layer (DESIGN: "Grad-CAM on the final Swin norm")."""
        norm = getattr(self.backbone, "norm", None)
        if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
            raise ValueError(f"{self.model_name}: backbone has no final norm to use as Grad-CAM target layer")
        return norm

    def cam_layer(
        self, name: Literal["final_norm", "stem"]
    ) -> tuple[nn.Module, Callable[[Tensor], Tensor] | None]:
        """A Grad-CAM target layer by name, with the transform its activations need.

        Args:
            name: ``"final_norm"`` (the paper's: :attr:`cam_target_layer`, channels-last) or ``"stem"``: the
                last activation of the patch-embedding stem (the GELU before the 1x1 projection of a
                ``stem="conv"`` encoder; the patch convolution itself otherwise), channels-first, at the
                first stage's token grid. Stem features are local and non-negative, what Grad-CAM-family
                maps were designed for; gradients still flow back through every Swin stage.

        Returns:
            ``(layer, reshape_transform)``; the transform is None for channels-first activations.
        """
        if name == "final_norm":
            return self.cam_target_layer, self.reshape_transform
        if name == "stem":
            proj = getattr(getattr(self.backbone, "patch_embed", None), "proj", None)
            if isinstance(proj, nn.Sequential):
                return [m for m in proj if isinstance(m, nn.GELU)][-1], None
            if isinstance(proj, nn.Conv2d):
                return proj, None
            raise ValueError(f"{self.model_name}: backbone has no patch-embedding stem to use as CAM target")
        raise ValueError(f"CAM target layer must be 'final_norm' or 'stem', got {name!r}")

    @staticmethod
    def reshape_transform(activations: Tensor) -> Tensor:
        """Channels-last Swin activations to the channels-first layout ``pytorch_grad_cam`` expects.

        Args:
            activations: [K, h, w, C].

        Returns:
            [K, C, h, w].
        """
        return activations.permute(0, 3, 1, 2)  # [K, h, w, C] -> [K, C, h, w]
