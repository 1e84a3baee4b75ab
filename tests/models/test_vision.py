"""VisionEncoder: shapes, multi-view fusion, strict checkpoint loading, freezing, Grad-CAM hooks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from amrg.models.vision import VisionEncoder, load_state_file

# A Swin small enough for CPU tests: 32 px, patch 4 -> 8x8 tokens, window 4, stages of width 16 and 32.
TINY = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)


def _encoder(**overrides) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(**{**TINY, **overrides})


def test_forward_shapes_no_nan_and_backward_reaches_every_parameter():
    enc = _encoder()
    images = torch.randn(2, 2, 3, 32, 32)
    tokens, pooled = enc(images, torch.ones(2, 2, dtype=torch.bool))
    # 32 px / patch 4 = 8x8 tokens, halved once by the second stage -> 4x4 = 16 tokens of width 32.
    assert tokens.shape == (2, 16, 32)
    assert pooled.shape == (2, 32)
    assert enc.num_features == 32
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    (tokens.square().mean() + pooled.sum()).backward()
    no_grad = [
        n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert no_grad == []


def test_masked_view_is_excluded_from_the_mean():
    enc = _encoder().eval()
    torch.manual_seed(1)
    images = torch.randn(2, 2, 3, 32, 32)
    mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        fused = enc.forward_features(images, mask)
        # Study 1's second view is masked: its tokens must equal those of its first view alone ...
        alone = enc.forward_features(images[1:, :1])
        assert torch.allclose(fused[1], alone[0], atol=1e-6)
        # ... and changing the masked pixels changes nothing.
        images2 = images.clone()
        images2[1, 1] = 100.0
        assert torch.equal(enc.forward_features(images2, mask), fused)
        # Study 0 keeps both views: the mean of the two single-view encodings.
        v0 = enc.forward_features(images[:1, :1])
        v1 = enc.forward_features(images[:1, 1:])
        assert torch.allclose(fused[0], (v0[0] + v1[0]) / 2, atol=1e-6)


def test_concat_mode_shape_and_token_mask():
    enc = _encoder(multi_view="concat").eval()
    images = torch.randn(2, 2, 3, 32, 32)
    mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        tokens, pooled = enc(images, mask)
    assert tokens.shape == (2, 32, 32)  # V * 16 tokens
    token_mask = enc.token_mask(mask, tokens.shape[1])
    assert token_mask.shape == (2, 32)
    assert token_mask[0].all() and token_mask[1, :16].all() and not token_mask[1, 16:].any()
    assert torch.equal(tokens[1, 16:], torch.zeros(16, 32))
    assert torch.allclose(pooled[1], tokens[1, :16].mean(0), atol=1e-6)
    assert _encoder().token_mask(mask, 16) is None  # mean mode: every fused token is real


def test_loads_a_local_safetensors_checkpoint_with_either_key_layout(tmp_path):
    src = _encoder()
    torch.manual_seed(5)
    for p in src.parameters():
        p.data.normal_()
    ours = tmp_path / "encoder.safetensors"
    save_file(src.state_dict(), str(ours))  # keys "backbone.*"
    raw = tmp_path / "swin.pt"
    torch.save({"model": src.backbone.state_dict()}, raw)  # a timm/Microsoft-style wrapped state dict
    for path in (ours, raw):
        dst = VisionEncoder(**TINY, checkpoint_path=path)
        for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
            assert torch.equal(a, b), name


def test_checkpoint_with_a_wrong_key_raises_naming_it(tmp_path):
    state = _encoder().backbone.state_dict()
    state["layers.0.blocks.0.not_a_weight"] = torch.zeros(3)
    del state["norm.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as err:
        VisionEncoder(**TINY, checkpoint_path=path)
    assert "layers.0.blocks.0.not_a_weight" in str(err.value)
    assert "norm.weight" in str(err.value)
    assert "bad.safetensors" in str(err.value)


def test_checkpoint_with_a_wrong_shape_raises_naming_it(tmp_path):
    state = _encoder().backbone.state_dict()
    state["norm.bias"] = torch.zeros(7)
    path = tmp_path / "shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"norm\.bias: checkpoint \(7,\) vs model \(32,\)"):
        VisionEncoder(**TINY, checkpoint_path=path)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_file(tmp_path / "nope.safetensors")


def test_freeze_stops_gradients_and_keeps_eval_mode():
    enc = _encoder(freeze=True, drop_path_rate=0.1)
    enc.train()
    assert not enc.backbone.training
    assert not any(p.requires_grad for p in enc.parameters())


def test_cam_target_layer_and_reshape_transform():
    enc = _encoder()
    assert enc.cam_target_layer is enc.backbone.norm
    seen = {}
    handle = enc.cam_target_layer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    enc(torch.randn(2, 1, 3, 32, 32))
    handle.remove()
    assert seen["out"].shape == (2, 4, 4, 32)  # channels last [K, h, w, C]
    assert VisionEncoder.reshape_transform(seen["out"]).shape == (2, 32, 4, 4)


def test_four_dim_input_is_one_view_and_other_ranks_are_rejected():
    enc = _encoder().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.forward_features(images), enc.forward_features(images[:, None]))
    with pytest.raises(ValueError, match=r"\[B, V, 3, H, W\]"):
        enc.forward_features(torch.randn(3, 32, 32))


def test_conv_stem_keeps_the_token_grid_and_trains_end_to_end():
    enc = _encoder(stem="conv")
    stem = enc.backbone.patch_embed.proj
    # patch 4 = two stride-2 3x3 convolutions (widths 16/4 and 16/2, floored at 8), then a 1x1 to 16.
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [
        ((3, 3), (2, 2), 8),
        ((3, 3), (2, 2), 8),
        ((1, 1), (1, 1), 16),
    ]
    tokens, _ = enc(torch.randn(2, 2, 3, 32, 32))
    assert tokens.shape == (2, 16, 32)  # the same grid and width as the patch stem
    tokens.square().mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in stem.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"stem": "resnet"}, "stem"), ({"patch_size": 6, "stem": "conv"}, "power-of-two")]
)
def test_bad_stem_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionEncoder(**{**TINY, "img_size": 48, **kwargs})


def test_cam_layer_names_the_final_norm_or_the_stem():
    enc = _encoder()
    assert enc.cam_layer("final_norm") == (enc.backbone.norm, VisionEncoder.reshape_transform)
    assert enc.cam_layer("stem") == (enc.backbone.patch_embed.proj, None)
    conv = _encoder(stem="conv")
    layer, reshape = conv.cam_layer("stem")
    assert (
        layer is conv.backbone.patch_embed.proj[-2] and isinstance(layer, torch.nn.GELU) and reshape is None
    )
    with pytest.raises(ValueError, match="'final_norm' or 'stem'"):
        enc.cam_layer("layers.0")
