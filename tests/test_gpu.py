"""On a CUDA device, in bf16 (issue 15): both stages train with ``precision: bf16-mixed``, a bfloat16 stage-2 LLM
trains and generates, its checkpoint loads onto the GPU, and the generation fast path (static cache, compiled
decode step, CUDA graphs) writes the same tokens as the plain path.

Marked ``gpu``: skipped without ``--run-gpu`` and a CUDA device (``make test-full`` passes the flag). Tiny
models, a few steps each; single-device runs in process (no DDP child processes).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import amrg
from amrg.models.llm import ReportPrompt, build_generation_inputs, generate_reports
from amrg.modules.reporter import ReporterModule
from tests.checkpoints.test_stage2 import build, stage2_files
from tests.models.test_reporter import tiny_llm, tiny_tokenizer
from tests.modules.test_classifier_module import TinyData, _module
from tests.modules.test_classifier_module import _trainer as _cpu_trainer

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
ACCELERATOR = "gpu"


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    """The CPU tests' tiny trainer (tests/modules/test_classifier_module.py) on the GPU in bf16-mixed."""
    return _cpu_trainer(
        tmp_path, **{"accelerator": ACCELERATOR, "precision": "bf16-mixed", "max_steps": 3, **kwargs}
    )


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_stage1_trains_in_bf16_mixed_on_the_gpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _module(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    before = _trainable(module)
    trainer = _trainer(tmp_path)
    trainer.fit(module, TinyData())
    assert next(module.parameters()).device.type == CUDA.type
    losses = {k: v for k, v in trainer.callback_metrics.items() if k.endswith("loss")}
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    after = _trainable(module)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the optimiser stepped
    probs = trainer.predict(module, TinyData(n_batches=1))[0]["probs"]
    assert probs.shape == (4, 14) and torch.isfinite(probs).all()


@pytest.mark.parametrize("llm_dtype", ["float32", "bfloat16"])
def test_stage2_trains_and_writes_reports_in_bf16_on_the_gpu(tmp_path: Path, llm_dtype: str) -> None:
    """bf16-mixed over a float32 LLM (a full fine-tune's master weights) and a bfloat16 LLM (LoRA's frozen base
    dtype); the checkpoint loads with amrg.load onto the GPU in bfloat16 and writes the same reports."""
    from amrg.data.batch import Batch

    torch.manual_seed(0)
    files = stage2_files(tmp_path / "files")
    net = build(files, dtype=llm_dtype)
    module = ReporterModule(net, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    g = torch.Generator().manual_seed(0)

    def batch(n: int, seed: int) -> Batch:
        return Batch(
            ids=[f"s{seed}-{i}" for i in range(n)],
            images=torch.randn(n, 1, 3, 32, 32, generator=g),
            view_mask=torch.ones(n, 1, dtype=torch.bool),
            reports=["the heart is enlarged . no effusion ."] * n,
            labels=torch.zeros(n, 14),
        )

    loader = torch.utils.data.DataLoader([batch(2, i) for i in range(3)], batch_size=None)
    before = _trainable(module)
    trainer = _trainer(tmp_path, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    after = _trainable(module)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)

    model = amrg.load(ckpt, device=CUDA, dtype="bfloat16")
    views = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5))]  # one study, one view
    first = model.predict(views)
    again = model.predict(views)
    assert first.report and first.report == again.report  # deterministic search on the GPU


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_fast_path_writes_the_same_tokens_on_the_gpu(tmp_path: Path, mode: str, num_beams: int) -> None:
    """Static cache + compiled decode step (and CUDA graphs with reduce-overhead) against the plain path, twice
    (the second call replays the compiled step). float32: equal tokens need equal logits up to the argmax, and
    bf16 kernels fused differently by inductor may round a near-tie the other way."""
    tok = tiny_tokenizer(tmp_path, "llama")
    model = tiny_llm(tok, seed=0).to(CUDA)
    prefix = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1)) * 3  # [B, P, H]
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    gen = build_generation_inputs(
        model.get_input_embeddings(), ReportPrompt(tok), prefix.to(CUDA), prefix_mask=mask.to(CUDA)
    )
    settings = dict(num_beams=num_beams, min_new_tokens=4, max_new_tokens=16)
    plain = generate_reports(model, tok, gen.inputs_embeds, gen.attention_mask, **settings)
    for _ in range(2):
        fast = generate_reports(
            model, tok, gen.inputs_embeds, gen.attention_mask, cache="static", compile=mode, **settings
        )
        assert fast == plain
