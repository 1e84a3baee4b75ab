"""DiseaseQFormer: shapes, masking, cross-attention placement, visual projection, BERT initialisation."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import BertConfig, BertModel

from amrg.models.qformer import DiseaseQFormer

TINY = dict(vision_width=24, num_queries=14, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _qformer(**overrides) -> DiseaseQFormer:
    torch.manual_seed(0)
    return DiseaseQFormer(**{**TINY, **overrides})


def _tiny_bert(path, num_layers: int = 2, hidden: int = 32) -> BertModel:
    torch.manual_seed(3)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
    )
    bert = BertModel(cfg)
    for p in bert.parameters():  # non-default values, so a copied weight is recognisable
        p.data.normal_()
    bert.save_pretrained(path)
    return bert


def test_forward_shape_no_nan_and_backward_reaches_every_parameter():
    qf = _qformer()
    out = qf(torch.randn(2, 10, 24))
    assert out.shape == (2, 14, 32)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in qf.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


def test_cross_attention_every_second_layer():
    qf = _qformer(num_layers=4)
    assert [layer.has_cross_attention for layer in qf.qformer.encoder.layer] == [True, False, True, False]
    # Visual tokens are projected to D before the Q-Former, so its cross-attention works at width D.
    assert qf.qformer.encoder.layer[0].crossattention.attention.key.in_features == 32


def test_masked_visual_tokens_do_not_matter():
    qf = _qformer().eval()
    tokens = torch.randn(2, 10, 24)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        out = qf(tokens, mask)
        tokens2 = tokens.clone()
        tokens2[1, 6:] = 50.0
        assert torch.allclose(qf(tokens2, mask), out, atol=1e-5)
        assert torch.allclose(qf(tokens[1:, :6])[0], out[1], atol=1e-5)


def test_project_visual_is_the_named_trained_projection():
    qf = _qformer()
    tokens = torch.randn(2, 5, 24)
    projected = qf.project_visual(tokens)
    assert projected.shape == (2, 5, 32)
    expected = torch.nn.functional.layer_norm(
        tokens @ qf.visual_proj.fc.weight.T + qf.visual_proj.fc.bias,
        (32,),
        qf.visual_proj.norm.weight,
        qf.visual_proj.norm.bias,
    )
    assert torch.allclose(projected, expected, atol=1e-5)


def test_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        DiseaseQFormer(vision_width=8, hidden_size=30, num_heads=4)


def test_from_bert_copies_self_attention_and_feed_forward(tmp_path, caplog):
    bert = _tiny_bert(tmp_path / "bert")
    with caplog.at_level(logging.INFO, logger="amrg.models.qformer"):
        qf = DiseaseQFormer.from_bert(tmp_path / "bert", vision_width=24)
    assert (qf.hidden_size, qf.num_layers, qf.num_queries) == (32, 2, 14)
    b, q = bert.state_dict(), qf.qformer.state_dict()
    pairs = {
        "embeddings.LayerNorm.weight": "layernorm.weight",
        "encoder.layer.1.attention.self.query.weight": "encoder.layer.1.attention.attention.query.weight",
        "encoder.layer.0.attention.self.value.bias": "encoder.layer.0.attention.attention.value.bias",
        "encoder.layer.0.attention.output.dense.weight": "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.1.attention.output.LayerNorm.bias": "encoder.layer.1.attention.output.LayerNorm.bias",
        "encoder.layer.0.intermediate.dense.weight": "encoder.layer.0.intermediate_query.dense.weight",
        "encoder.layer.1.output.dense.weight": "encoder.layer.1.output_query.dense.weight",
        "encoder.layer.0.output.LayerNorm.weight": "encoder.layer.0.output_query.LayerNorm.weight",
    }
    for bert_key, q_key in pairs.items():
        assert torch.equal(b[bert_key], q[q_key]), (bert_key, q_key)
    # Cross-attention has no BERT counterpart: it stays random and the log names it.
    assert "encoder.layer.0.crossattention.attention.key.weight" in caplog.text
    assert "tensors copied" in caplog.text
    assert torch.isfinite(qf(torch.randn(2, 3, 24))).all()


def test_from_bert_with_more_layers_names_the_unused_ones(tmp_path, caplog):
    _tiny_bert(tmp_path / "bert", num_layers=3)
    with caplog.at_level(logging.WARNING, logger="amrg.models.qformer"):
        DiseaseQFormer.from_bert(tmp_path / "bert", vision_width=24, num_layers=2)
    assert "encoder.layer.2.attention.self.query.weight" in caplog.text
    # Text-only parts are skipped on purpose and not reported as unused.
    assert "word_embeddings" not in caplog.text


def test_from_bert_with_too_few_layers_raises_naming_the_keys(tmp_path):
    _tiny_bert(tmp_path / "bert", num_layers=1)
    qf = _qformer()
    with pytest.raises(ValueError) as err:
        qf.load_bert_weights(tmp_path / "bert")
    assert "encoder.layer.1.attention.attention.query.weight" in str(err.value)


def test_from_bert_with_wrong_width_raises_naming_shapes(tmp_path):
    _tiny_bert(tmp_path / "bert", hidden=16)
    with pytest.raises(ValueError, match=r"layernorm\.weight: BERT \(16,\) vs Q-Former \(32,\)"):
        _qformer().load_bert_weights(tmp_path / "bert")


def test_bert_path_in_the_constructor_loads_it(tmp_path):
    bert = _tiny_bert(tmp_path / "bert")
    qf = DiseaseQFormer(**TINY, bert_path=tmp_path / "bert")
    assert torch.equal(qf.qformer.layernorm.weight, bert.embeddings.LayerNorm.weight)


def test_missing_bert_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_bert"):
        _qformer().load_bert_weights(tmp_path / "no_bert")


def test_initializer_range_sets_how_much_the_image_reaches_the_disease_tokens():
    # Why the tiny recipes raise initializer_range: with BERT's 0.02 at width 32 the cross-attention
    # branch is ~1e-3 of the post-LN residual, so disease tokens barely differ between images at init.
    tokens = torch.randn(8, 16, 24)

    def spread(init: float) -> float:
        qf = _qformer(initializer_range=init).eval()
        with torch.no_grad():
            return qf(tokens).std(0).mean().item()  # variation across the 8 images

    assert spread(0.18) > 20 * spread(0.02)
    assert _qformer(initializer_range=0.18).qformer.config.initializer_range == 0.18
