"""Stage-2 checkpoint size at paper scale, computed on the meta device (nothing allocated, any CPU).

A stage-2 checkpoint is a whole model (amrg.checkpoints.stage2): the stage-1 Swin-B + BERT-base Q-Former +
head, both sampled memories, the retrievers, the prefix projections and the LoRA adapters; only the
frozen base LLM stays outside. This builds the paper's MIMIC-CXR stage 2 (the network of
benchmarks/stage2_throughput.py: Llama-2-7B shape in bfloat16, LoRA r=16 on q_proj/v_proj, 14 x 500
visual and 6,000 report memory rows, Hopfield 6 x 1024) on the meta device and adds up the bytes of
every tensor the checkpoint keeps, per part, and of the AdamW state a checkpoint written during
training also holds (``ModelCheckpoint`` saves the optimizer). Provenance JSON and tokenizer files are
not counted (a few MB: about 0.5 kB per report-memory row with its text, 0.2 kB per visual row, and
Llama-2's tokenizer.json is 1.8 MB).

Printed by ``python benchmarks/checkpoint_size.py`` (7 s on a 2-core AMD EPYC VM; MB = 10^6 bytes)::

    part                     kept (MB)
    classifier.qformer           400.2      BERT-base-sized Q-Former, float32
    classifier.encoder           347.0      Swin-B, float32
    visual_retriever              97.1      7,000 x 768 patterns + Hopfield 6 x 1024 projections
    report_retriever              94.0      6,000 x 768 patterns + projections
    prefix                        54.6      four projections into the LLM width 4096
    llm                           33.6      LoRA r=16 on q_proj/v_proj (peft keeps adapters in float32)
    weights in the ckpt         1026.5
    + AdamW state                478.7
    training checkpoint         1505.2
    base LLM, referenced       13476.8      (not in the checkpoint)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from amrg.checkpoints.stage2 import base_llm_keys

_PARTS = (
    "classifier.encoder",
    "classifier.qformer",
    "classifier.head",
    "visual_retriever",
    "report_retriever",
    "prefix_",
    "llm",
)


def _throughput_module():
    path = Path(__file__).resolve().parent / "stage2_throughput.py"
    spec = importlib.util.spec_from_file_location("stage2_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _part(key: str) -> str:
    return next((p.rstrip("_.") for p in _PARTS if key.startswith(p)), "other")


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny network instead (seconds; for tests)")
    args = parser.parse_args(argv)
    throughput = _throughput_module()
    build_args = argparse.Namespace(
        tiny=args.tiny,
        llm_layers=2 if args.tiny else 32,
        report_tokens=100,
        num_beams=3,
        min_new_tokens=80,
        max_new_tokens=120,
    )
    with tempfile.TemporaryDirectory() as tmp:
        net = throughput.build(build_args, torch.device("meta"), Path(tmp))
    net.build_record = {
        "llm": {"kind": "pretrained"}
    }  # a base LLM loaded from a folder: referenced, not kept
    left_out = base_llm_keys(net)
    kept: dict[str, int] = {}
    base: dict[str, int] = {}
    for key, tensor in net.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        target = base if key in left_out else kept
        target[_part(key)] = target.get(_part(key), 0) + size
    adam = sum(2 * p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    rows = [(name, kept[name]) for name in sorted(kept, key=lambda n: -kept[n])]
    print(f"{'part':<22}{'kept (MB)':>12}")
    for name, size in rows:
        print(f"{name:<22}{size / 1e6:>12.1f}")
    total = sum(kept.values())
    print(f"{'weights in the ckpt':<22}{total / 1e6:>12.1f}")
    print(f"{'+ AdamW state':<22}{adam / 1e6:>12.1f}   (exp_avg + exp_avg_sq of the trainable parameters)")
    print(f"{'training checkpoint':<22}{(total + adam) / 1e6:>12.1f}")
    print(f"{'base LLM, referenced':<22}{sum(base.values()) / 1e6:>12.1f}   (not in the checkpoint)")
    return {"kept": kept, "base": base, "adam": {"all": adam}}


if __name__ == "__main__":
    main()
