"""DiseaseHead and DiseaseClassifier: per-query tying, shapes, gradients, Grad-CAM compatibility."""

from __future__ import annotations

import pytest
import torch

from amrg.models.classifier import ClassifierOutput, DiseaseClassifier, DiseaseHead
from amrg.models.qformer import DiseaseQFormer
from amrg.models.vision import VisionEncoder


def _net(multi_view: str = "mean") -> DiseaseClassifier:
    torch.manual_seed(0)
    enc = VisionEncoder(
        img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, multi_view=multi_view
    )
    qf = DiseaseQFormer(
        vision_width=enc.num_features, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    return DiseaseClassifier(enc, qf)


def test_head_ties_query_i_to_label_i():
    torch.manual_seed(0)
    head = DiseaseHead(hidden_size=8, num_queries=14)
    torch.nn.init.normal_(head.bias)
    tokens = torch.randn(2, 14, 8)
    logits = head(tokens)
    assert logits.shape == (2, 14)
    expected = (tokens * head.weight).sum(-1) + head.bias  # hand computation of the einsum
    assert torch.allclose(logits, expected, atol=1e-6)
    changed = tokens.clone()
    changed[:, 3] += 1.0  # only query 3 changes -> only logit 3 changes
    diff = (head(changed) - logits).abs() > 0
    assert diff[:, 3].all() and not diff[:, [i for i in range(14) if i != 3]].any()


@pytest.mark.parametrize("multi_view", ["mean", "concat"])
def test_forward_shapes_no_nan_and_backward_reaches_every_parameter(multi_view):
    net = _net(multi_view)
    images = torch.randn(2, 2, 3, 32, 32)
    mask = torch.tensor([[True, True], [True, False]])
    out = net.forward_features(images, mask)
    assert isinstance(out, ClassifierOutput)
    n = 16 if multi_view == "mean" else 32
    assert out.patch_tokens.shape == (2, n, 32)
    assert out.disease_tokens.shape == (2, 14, 32)
    assert out.logits.shape == (2, 14)
    assert (out.token_mask is None) == (multi_view == "mean")
    assert torch.isfinite(out.logits).all()
    assert torch.equal(net.forward_head(out.disease_tokens), out.logits)
    out.logits.sum().backward()
    no_grad = [
        k for k, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert no_grad == []


def test_predict_proba_is_sigmoid_of_forward_without_grad():
    net = _net().eval()
    images = torch.randn(2, 1, 3, 32, 32)
    probs = net.predict_proba(images)
    assert not probs.requires_grad
    assert torch.allclose(probs, torch.sigmoid(net(images)).detach())
    assert ((probs > 0) & (probs < 1)).all()
    assert net.num_labels == 14


def test_mismatched_widths_are_named():
    enc = VisionEncoder(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    qf = DiseaseQFormer(vision_width=99, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="vision_width=99 does not match the encoder's num_features=32"):
        DiseaseClassifier(enc, qf)
    qf = DiseaseQFormer(vision_width=32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="head expects"):
        DiseaseClassifier(enc, qf, DiseaseHead(hidden_size=16))


def test_an_unset_vision_width_follows_the_encoder():
    enc = VisionEncoder(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    qf = DiseaseQFormer(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="built with vision_width=None"):
        qf.project_visual(torch.zeros(1, 4, 32))
    net = DiseaseClassifier(enc, qf)
    assert qf.vision_width == enc.num_features == 32
    assert qf.visual_proj.fc.weight.shape == (32, 32)
    assert net(torch.randn(2, 1, 3, 32, 32)).shape == (2, 14)


def test_grad_cam_runs_on_the_final_norm():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = _net().eval()
    images = torch.randn(2, 3, 32, 32)  # one view per study, 4-D as pytorch_grad_cam requires
    with GradCAM(
        model=net,
        target_layers=[net.encoder.cam_target_layer],
        reshape_transform=VisionEncoder.reshape_transform,
    ) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(9)])
    assert maps.shape == (2, 32, 32)  # one map per image, at the input resolution
    assert (maps >= 0).all() and (maps <= 1).all()
