"""Stage-2 GPU memory, estimated on the meta device: a 7B LoRA run at batch 8, and an 8-GPU FSDP full fine-tune.

Nothing of the weights is allocated: the LLM is built from its config under ``torch.device("meta")`` (a
Llama-2-7B shape by default: hidden H 4096, 32 layers L, 32 heads, intermediate F 11008, vocabulary V
32,000) and LoRA (r=16 on q_proj/v_proj, peft, through ``amrg.models.llm.apply_lora``) is put on it there;
parameter counts and dtypes are read from those tensors. The rest of the stage-2 network (stage-1 Swin-B +
Q-Former, Hopfield retrievers, prefix projections, memories) is built on meta by
``benchmarks/stage2_throughput.py`` and counted the same way.

Training state (bytes a parameter):
  * LoRA: base LLM weights bf16 (2), frozen; adapters as peft keeps them (fp32) with a gradient (4) and two
    AdamW moments (8); the frozen stage-1 network as stored (fp32, 4); the trainable retrievers and prefix
    fp32 + gradient + AdamW (16).
  * FSDP full fine-tune over G GPUs: fp32 master weights (4) + fp32 gradients (4) + AdamW moments (8) =
    16 a parameter, sharded / G (recipe dtype float32; bf16-mixed computes in bf16), plus the gathered
    bf16 working copies: the root unit (embeddings + lm_head) and two decoder layers (one running, one
    prefetched), and the bf16 gradients of one layer before its reduce-scatter. The pure-bf16 variant
    (recipe dtype bfloat16: 2 + 2 + AdamW 2 + 2 = 8 a parameter) is shown too.

Activations, bytes a token (the tensors autograd keeps for the backward pass; bf16 = 2 bytes; SDPA
flash / memory-efficient attention, so no T x T score matrix), for one Llama decoder layer:
  * two RMSNorms, each its fp32 input (4H) and its bf16 output (2H): 12H
  * q, k, v after RoPE kept by attention (6H) and the attention output, the o_proj input (2H): 8H
  * SwiGLU MLP: gate output (2F), SiLU output (2F), up output (2F), down_proj input (2F): 8F
  * LoRA on a target module with input width H: dropout mask (H, bool), the dropped input cast to the
    adapter's fp32 (4H), lora_A output (4r): 5H + 4r each
so ``a_layer = 20H + 8F (+ (5H + 4r) per LoRA module)``. Outside the layers: the input embeddings (2H),
the final norm (6H) and the logits and loss: bf16 logits, their fp32 copy and the fp32 log-softmax
(2V + 4V + 4V = 10V). Without gradient checkpointing a token costs ``L * a_layer + 8H + 10V``; with it
(transformers, one checkpoint per decoder layer) only each layer's input is kept (2H a layer) and one
layer is recomputed at a time: ``L * 2H + a_layer + 8H + 10V``. This follows Korthikanti et al., 2022,
"Reducing Activation Recomputation in Large Transformer Models" (https://arxiv.org/abs/2205.05198),
Section 4.1, adapted to RMSNorm, SwiGLU, no dropout and flash attention. It is an upper estimate: torch
frees some of these early (a frozen weight's linear need not keep its input), and the allocator's
fragmentation and the CUDA context (~0.5-1 GB) come on top. The 10V of logits and loss is counted at every
position, though ``amrg.models.llm.report_loss`` computes them at the ~101 report positions only (of 218).

Sequence length, as the paper's MIMIC-CXR stage 2 (and ``stage2_throughput.py``) builds it: the visual
prefix (49 Swin-B patch tokens at 224 px + 3 x 14 disease, visual-recall and report-recall tokens = 91),
the prompt (26 tokens in R2GenGPT's plain format; Llama-2-chat's template adds a few) and 100 report
tokens + eos: T = 218. The target: the LoRA stage 2 at batch 8 fits in 35 GB (issue 15; the bare LLM
measured 25 GB on one H200).

Usage::

    python benchmarks/stage2_memory.py                  # the 7B estimate (meta device, ~10 s, ~1 GB RSS)
    python benchmarks/stage2_memory.py --tiny           # the same code on a tiny config (tests)
    python benchmarks/stage2_memory.py --batch 16 --gpus 4 --no-network
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from amrg.models.llm import apply_lora

GB = 1e9  # decimal gigabytes, as GPU memory is quoted (35 GB target, 40 GB cards)
TARGET_GB = 35.0


@dataclass(frozen=True)
class LLMShape:
    """A Llama-like decoder: the sizes the estimate needs."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    intermediate: int = 11008
    vocab: int = 32000

    def llama_config(self) -> LlamaConfig:
        """The Llama config of this shape (untied embeddings, no grouped-query attention)."""
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            tie_word_embeddings=False,
        )


PAPER = LLMShape()  # Llama-2-7B
TINY = LLMShape(hidden=32, layers=2, heads=4, intermediate=64, vocab=400)


def _count(module: nn.Module) -> dict[str, int]:
    """Parameter count and bytes, trainable and frozen."""
    out = {"trainable": 0, "frozen": 0, "trainable_bytes": 0, "frozen_bytes": 0}
    for p in module.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        out[kind] += p.numel()
        out[f"{kind}_bytes"] += p.numel() * p.element_size()
    return out


def llm_on_meta(shape: LLMShape, lora_r: int, lora_targets: Sequence[str]) -> dict[str, Any]:
    """Build the LLM in bf16 on the meta device, count it, then put LoRA on it and count the adapters."""
    config = shape.llama_config()
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        assert all(p.is_meta for p in llm.parameters())  # nothing allocated
        base = _count(llm)
        layer = _count(llm.model.layers[0])
        root = sum(p.numel() for p in (*llm.get_input_embeddings().parameters(), *llm.lm_head.parameters()))
        lora = apply_lora(llm, r=lora_r, alpha=16, dropout=0.1, target_modules=tuple(lora_targets))
    adapters = [p for n, p in lora.named_parameters() if "lora_" in n]
    return {
        "params": base["trainable"] + base["frozen"],
        "weight_bytes": base["trainable_bytes"] + base["frozen_bytes"],
        "layer_params": layer["trainable"] + layer["frozen"],
        "root_params": root,
        "lora_params": sum(p.numel() for p in adapters),
        "lora_bytes_per_param": adapters[0].element_size(),
        "lora_modules_per_layer": len(lora_targets),
    }


def rest_of_network(tiny: bool) -> dict[str, int]:
    """Frozen and trainable parameters of the stage-2 network outside the LLM (paper sizes, meta device)."""
    path = Path(__file__).resolve().parent / "stage2_throughput.py"
    spec = importlib.util.spec_from_file_location("stage2_throughput", path)
    assert spec is not None and spec.loader is not None
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    args = argparse.Namespace(
        tiny=tiny, llm_layers=1, report_tokens=100, num_beams=3, min_new_tokens=0, max_new_tokens=1
    )
    with tempfile.TemporaryDirectory() as tmp:
        net = throughput.build(args, torch.device("meta"), Path(tmp))
    total = _count(net)
    llm = _count(net.llm)
    buffers = sum(b.numel() * b.element_size() for n, b in net.named_buffers() if not n.startswith("llm."))
    return {
        "frozen": total["frozen"] - llm["frozen"],
        "frozen_bytes": total["frozen_bytes"] - llm["frozen_bytes"],
        "trainable": total["trainable"] - llm["trainable"],
        "trainable_bytes": total["trainable_bytes"] - llm["trainable_bytes"],
        "buffer_bytes": buffers,  # the memories
    }


def activation_bytes_per_token(
    shape: LLMShape, checkpointing: bool, lora_r: int = 0, lora_modules: int = 0
) -> float:
    """Bytes of activations kept for the backward pass per token (formula in the module docstring)."""
    h, f, v = shape.hidden, shape.intermediate, shape.vocab
    layer = 20 * h + 8 * f + lora_modules * (5 * h + 4 * lora_r)
    outside = 8 * h + 10 * v
    if checkpointing:
        return shape.layers * 2 * h + layer + outside
    return shape.layers * layer + outside


def estimate(
    shape: LLMShape,
    batch: int,
    seq_len: int,
    gpus: int,
    lora_r: int,
    lora_targets: Sequence[str],
    network: dict[str, int] | None,
) -> dict[str, Any]:
    """Every number of the table, in bytes (and parameter counts)."""
    llm = llm_on_meta(shape, lora_r, lora_targets)
    rest = network or {
        "frozen": 0,
        "frozen_bytes": 0,
        "trainable": 0,
        "trainable_bytes": 0,
        "buffer_bytes": 0,
    }
    tokens = batch * seq_len
    lora_state = (
        llm["lora_params"] * llm["lora_bytes_per_param"] * 2 + llm["lora_params"] * 8
    )  # w+g, AdamW fp32
    rest_state = rest["frozen_bytes"] + rest["buffer_bytes"] + rest["trainable"] * 16  # fp32 w+g+AdamW
    act = {
        gc: activation_bytes_per_token(shape, gc, lora_r, llm["lora_modules_per_layer"])
        for gc in (False, True)
    }
    act_full = {gc: activation_bytes_per_token(shape, gc) for gc in (False, True)}
    lora_total = {
        gc: llm["weight_bytes"] + lora_state + rest_state + tokens * act[gc] for gc in (False, True)
    }
    sharded = {"fp32": llm["params"] * 16 / gpus, "bf16": llm["params"] * 8 / gpus}
    working = (llm["root_params"] + 2 * llm["layer_params"]) * 2 + llm["layer_params"] * 2  # bf16 gathered
    fsdp = {
        (master, gc): sharded[master] + working + rest_state + tokens * act_full[gc]
        for master in ("fp32", "bf16")
        for gc in (False, True)
    }
    return {
        "shape": asdict(shape),
        "batch": batch,
        "seq_len": seq_len,
        "gpus": gpus,
        "llm": llm,
        "rest": rest,
        "lora_state_bytes": lora_state,
        "rest_state_bytes": rest_state,
        "activation_bytes_per_token": {"lora": act, "full": act_full},
        "lora_total_bytes": lora_total,
        "fsdp_sharded_bytes": sharded,
        "fsdp_working_bytes": working,
        "fsdp_total_bytes": {f"{m}{'_gc' if gc else ''}": v for (m, gc), v in fsdp.items()},
    }


def _table(e: dict[str, Any]) -> str:
    llm, act = e["llm"], e["activation_bytes_per_token"]
    tokens = e["batch"] * e["seq_len"]
    rows = [
        ("LLM weights, bf16", f"{llm['params'] / 1e9:.3f} B params", llm["weight_bytes"]),
        (
            f"LoRA r={e['llm_r']} adapters + grads + AdamW",
            f"{llm['lora_params'] / 1e6:.2f} M params (fp{8 * llm['lora_bytes_per_param']})",
            e["lora_state_bytes"],
        ),
        (
            "rest of stage 2 (frozen stage 1, memories; trainable retrievers + prefix + AdamW)",
            f"{e['rest']['frozen'] / 1e6:.1f} M frozen, {e['rest']['trainable'] / 1e6:.1f} M trainable",
            e["rest_state_bytes"],
        ),
        ("activations / token, LoRA, no checkpointing", f"{act['lora'][False] / 1e6:.3f} MB", None),
        ("activations / token, LoRA, gradient checkpointing", f"{act['lora'][True] / 1e6:.3f} MB", None),
        (
            f"activations, batch {e['batch']} x {e['seq_len']} tokens, no checkpointing",
            "",
            tokens * act["lora"][False],
        ),
        (
            f"activations, batch {e['batch']} x {e['seq_len']} tokens, checkpointing",
            "",
            tokens * act["lora"][True],
        ),
        (f"LoRA stage 2 total, batch {e['batch']}, no checkpointing", "", e["lora_total_bytes"][False]),
        (f"LoRA stage 2 total, batch {e['batch']}, checkpointing", "", e["lora_total_bytes"][True]),
        (
            f"FSDP {e['gpus']} GPUs full FT: fp32 master + grads + AdamW / {e['gpus']}",
            "16 B/param",
            e["fsdp_sharded_bytes"]["fp32"],
        ),
        ("FSDP: gathered bf16 root + 2 layers, 1 layer of grads", "", e["fsdp_working_bytes"]),
        (f"FSDP per GPU, batch {e['batch']}, no checkpointing", "", e["fsdp_total_bytes"]["fp32"]),
        (f"FSDP per GPU, batch {e['batch']}, checkpointing", "", e["fsdp_total_bytes"]["fp32_gc"]),
        (
            f"FSDP per GPU, pure bf16 (8 B/param), batch {e['batch']}, checkpointing",
            "",
            e["fsdp_total_bytes"]["bf16_gc"],
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'item':<{width}}  {'count':>34}  {'GB':>8}"]
    for name, count, value in rows:
        lines.append(f"{name:<{width}}  {count:>34}  {'' if value is None else f'{value / GB:8.2f}'}")
    fits = e["lora_total_bytes"][False] / GB <= TARGET_GB
    lines.append(
        f"target: LoRA stage 2 at batch {e['batch']} <= {TARGET_GB:.0f} GB: "
        f"{'fits' if fits else 'does not fit'} without checkpointing "
        f"({e['lora_total_bytes'][False] / GB:.1f} GB; {e['lora_total_bytes'][True] / GB:.1f} GB with), "
        "before the CUDA context (~0.5-1 GB) and allocator fragmentation"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama config (tests)")
    parser.add_argument("--batch", type=int, default=8, help="per-GPU batch (paper recipe: 8)")
    parser.add_argument("--prefix-tokens", type=int, default=91, help="49 Swin-B patch tokens + 3 x 14")
    parser.add_argument("--prompt-tokens", type=int, default=26, help="R2GenGPT's prompt in Llama-2 tokens")
    parser.add_argument("--report-tokens", type=int, default=101, help="100 report tokens + eos")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the FSDP full fine-tune shards over")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument(
        "--no-network", dest="network", action="store_false", help="count the LLM only (skip the rest)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    logging.getLogger("amrg").setLevel(logging.WARNING)
    shape = TINY if args.tiny else PAPER
    seq_len = args.prefix_tokens + args.prompt_tokens + args.report_tokens
    network = rest_of_network(args.tiny) if args.network else None
    result = estimate(shape, args.batch, seq_len, args.gpus, args.lora_r, args.lora_targets, network)
    result["llm_r"] = args.lora_r
    print(
        f"LLM {asdict(shape)}; sequence {args.prefix_tokens} prefix + {args.prompt_tokens} prompt + "
        f"{args.report_tokens} report = {seq_len} tokens; meta device (nothing allocated)"
    )
    print(_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
