"""Stage-2 throughput at paper scale with random weights: train samples/s, peak memory, beam-3 reports/s.

The model is the paper's MIMIC-CXR stage 2 (AM-MRG, https://arxiv.org/abs/2501.03458) with random
weights, so nothing is downloaded: Swin-B 224 px, a BERT-base-sized disease Q-Former (12 layers, 768
wide, 14 queries), paper-size memories (14 x 500 visual patches, 6,000 reports, 768 wide), Hopfield
retrievers (6 heads x 1024, beta 4), and a Llama-2-7B-shaped LLM (32 layers, 4096 wide, vocabulary
32,000) in bfloat16 with SDPA attention and LoRA r=16 on q_proj/v_proj. Training runs under bf16
autocast (what ``trainer.precision: bf16-mixed`` does) with AdamW on the trainable parameters.

Measured:
  * train samples/s at batch 8 with 100 report tokens per sample, and the peak GPU memory;
  * beam-3 reports/s (repetition penalty 2.0, length penalty 2.0, 80-120 new tokens) at batch 16 and 96;
  * with ``--bare`` (default on), the same LLM alone fed inputs of exactly the same shapes, so the
    cost of the vision encoder, Q-Former, memories and prefix is the difference.

Usage::

    python benchmarks/stage2_throughput.py --device cuda          # paper scale; needs a ~40 GB GPU
    python benchmarks/stage2_throughput.py --tiny --device cpu    # seconds-long smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from amrg.labels import NUM_LABELS
from amrg.models.classifier import DiseaseClassifier
from amrg.models.llm import (
    DEFAULT_INSTRUCTION,
    apply_lora,
    build_generation_inputs,
    build_inputs,
    generate_reports,
)
from amrg.models.qformer import DiseaseQFormer
from amrg.models.reporter import ReportGenerator
from amrg.models.retrievers import HopfieldRetriever
from amrg.models.tokenizer import train_report_tokenizer
from amrg.models.vision import VisionEncoder

_WORDS = (
    "the heart size is normal mediastinal contours are within limits there is no focal consolidation "
    "pleural effusion or pneumothorax mild cardiomegaly small left basilar atelectasis right lower lobe "
    "opacity concerning for pneumonia stable appearance of the chest lines and tubes in standard position "
    "degenerative changes of the spine no acute osseous abnormality interval improvement bilateral"
).split()


def _reports(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) + "." for _ in range(n)]


def _paper_parts(
    device: torch.device, tokenizer, llm_layers: int = 32
) -> tuple[DiseaseClassifier, torch.nn.Module, int, int]:
    encoder = VisionEncoder("swin_base_patch4_window7_224", img_size=224)
    qformer = DiseaseQFormer(vision_width=encoder.num_features)  # BERT-base sizes: 768 wide, 12 layers
    classifier = DiseaseClassifier(encoder, qformer)
    config = LlamaConfig(  # Llama-2-7B
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=llm_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.device(device):  # initialise the 7B weights where they will run, directly in bf16
        llm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    # Paper sizes: at most 500 ROI patches per label; 6,000 reports (Bio_ClinicalBERT, 768 wide).
    return classifier, llm, 14 * 500, 6000


def _tiny_parts(
    device: torch.device, tokenizer, llm_layers: int = 2
) -> tuple[DiseaseClassifier, torch.nn.Module, int, int]:
    encoder = VisionEncoder(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    qformer = DiseaseQFormer(vision_width=32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=llm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return DiseaseClassifier(encoder, qformer), llm, 14 * 8, 48


def build(args: argparse.Namespace, device: torch.device, tmp: Path) -> ReportGenerator:
    """The stage-2 network with random weights on ``device``."""
    # The prompt text is in the corpus so that it tokenizes about as compactly as with Llama-2's tokenizer.
    prompt = f"Human: <Img></Img> {DEFAULT_INSTRUCTION} \nAssistant:"
    corpus = _reports(300, 60) + [prompt] * 50
    tokenizer = train_report_tokenizer(corpus, tmp / "tokenizer", vocab_size=2000, style="llama")
    parts = _tiny_parts if args.tiny else _paper_parts
    classifier, llm, visual_slots, report_slots = parts(device, tokenizer, args.llm_layers)
    llm = apply_lora(llm, r=16, alpha=32, dropout=0.05, target_modules=("q_proj", "v_proj"))
    width = classifier.qformer.hidden_size
    hopfield = dict(num_heads=2, hidden_size=8) if args.tiny else dict(num_heads=6, hidden_size=1024)
    visual = HopfieldRetriever(width, torch.randn(visual_slots, width), beta=4.0, dropout=0.1, **hopfield)
    report = HopfieldRetriever(width, torch.randn(report_slots, width), beta=4.0, dropout=0.1, **hopfield)
    net = ReportGenerator(
        classifier,
        llm,
        tokenizer,
        visual,
        report,
        max_report_tokens=args.report_tokens,
        num_beams=args.num_beams,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        visual_provenance=[{"source_id": f"v{i}", "label": "x"} for i in range(visual_slots)],
        report_provenance=[{"source_id": f"r{i}", "label": "x"} for i in range(report_slots)],
    )
    return net.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (cuda, cuda:1, cpu)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model: a CPU smoke run of the same code"
    )
    parser.add_argument("--train-batch", type=int, default=None, help="train batch size (paper scale: 8)")
    parser.add_argument(
        "--eval-batches", type=int, nargs="+", default=None, help="generation batch sizes (16 96)"
    )
    parser.add_argument(
        "--llm-layers",
        type=int,
        default=None,
        help="LLM decoder layers (Llama-2-7B: 32; fewer for small GPUs)",
    )
    parser.add_argument("--report-tokens", type=int, default=100, help="report tokens per training sample")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--min-new-tokens", type=int, default=None, help="paper: 80 (MIMIC-CXR)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="paper: 120 (MIMIC-CXR)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--gen-repeats", type=int, default=1, help="timed generate calls per batch size")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare-LLM comparison")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.train_batch = args.train_batch or (2 if args.tiny else 8)
    args.llm_layers = args.llm_layers or (2 if args.tiny else 32)
    args.eval_batches = args.eval_batches or ([2, 4] if args.tiny else [16, 96])
    args.min_new_tokens = args.min_new_tokens if args.min_new_tokens is not None else (2 if args.tiny else 80)
    args.max_new_tokens = args.max_new_tokens or (6 if args.tiny else 120)
    if args.tiny:
        args.report_tokens = min(args.report_tokens, 20)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --tiny --device cpu for a smoke run")
    torch.manual_seed(0)
    # bf16 autocast on the GPU (Lightning's bf16-mixed); plain float32 for the CPU smoke run.
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else (lambda: nullcontext())
    )
    with tempfile.TemporaryDirectory() as tmp:
        net = build(args, device, Path(tmp))
    image_size = net.image_size
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; parameters: {total / 1e6:.1f} M ({trainable / 1e6:.2f} M trainable)")

    def images(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, 1, 3, image_size, image_size, device=device)  # MIMIC-CXR: one view
        return x, torch.ones(batch, 1, dtype=torch.bool, device=device)

    results: list[dict[str, object]] = []

    def record(measure: str, batch: int, value: float, unit: str, peak: float | None) -> None:
        results.append(
            {
                "measure": measure,
                "batch": batch,
                "value": value,
                "unit": unit,
                "peak_gb": peak,
                "device": name,
            }
        )

    # ---- training
    reports = _reports(args.train_batch, args.report_tokens + 40, seed=1)  # longer than the cut: all get 100
    x, mask = images(args.train_batch)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    net.train()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = net(x, mask, reports)
        loss.backward()
        optimizer.step()

    _reset_peak(device)
    seconds = _timed(train_step, args.steps, args.warmup, device)
    record("train", args.train_batch, args.train_batch / seconds, "samples/s", _peak_gb(device))

    if args.bare:  # the LLM alone, fed inputs of exactly the same shapes
        with torch.no_grad(), autocast():
            inputs = build_inputs(
                net.llm.get_input_embeddings(),
                net.prompt,
                net.encode(x, mask).prefix,
                reports,
                max_report_tokens=args.report_tokens,
            )
        embeds = inputs.inputs_embeds.detach()
        llm_params = [p for p in net.llm.parameters() if p.requires_grad]
        llm_optimizer = torch.optim.AdamW(llm_params, lr=1e-4, fused=device.type == "cuda")

        def bare_step() -> None:
            llm_optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = net.llm(
                    inputs_embeds=embeds, attention_mask=inputs.attention_mask, labels=inputs.labels
                ).loss
            loss.backward()
            llm_optimizer.step()

        del optimizer
        _reset_peak(device)
        seconds = _timed(bare_step, args.steps, args.warmup, device)
        record("train_bare_llm", args.train_batch, args.train_batch / seconds, "samples/s", _peak_gb(device))
        del llm_optimizer
    net.zero_grad(set_to_none=True)

    # ---- generation
    net.eval()
    for batch in args.eval_batches:
        gx, gmask = images(batch)
        _reset_peak(device)
        with autocast():
            net.generate(
                gx, gmask, max_new_tokens=min(args.max_new_tokens, args.min_new_tokens + 1)
            )  # warm-up
            seconds = _timed(lambda gx=gx, gmask=gmask: net.generate(gx, gmask), args.gen_repeats, 0, device)
        record("generate", batch, batch / seconds, "reports/s", _peak_gb(device))
        if args.bare:
            with torch.no_grad(), autocast():
                gen = build_generation_inputs(
                    net.llm.get_input_embeddings(), net.prompt, net.encode(gx, gmask).prefix
                )

                def bare_generate(gen=gen) -> None:
                    generate_reports(
                        net.llm,
                        net.tokenizer,
                        gen.inputs_embeds,
                        gen.attention_mask,
                        num_beams=args.num_beams,
                        min_new_tokens=args.min_new_tokens,
                        max_new_tokens=args.max_new_tokens,
                    )

                seconds = _timed(bare_generate, args.gen_repeats, 0, device)
            record("generate_bare_llm", batch, batch / seconds, "reports/s", _peak_gb(device))

    # ---- table
    print(
        f"\nstage-2 throughput ({'tiny' if args.tiny else 'paper-scale'} model, random weights, {name}; "
        f"{NUM_LABELS} labels, beam {args.num_beams}, "
        f"{args.min_new_tokens}-{args.max_new_tokens} new tokens, "
        f"{args.report_tokens} report tokens)"
    )
    print(f"| {'measure':<24} | {'batch':>5} | {'value':>10} | {'unit':<9} | {'peak GB':>8} |")
    print(f"|{'-' * 26}|{'-' * 7}|{'-' * 12}|{'-' * 11}|{'-' * 10}|")
    labels = {
        "train": "train samples/s",
        "train_bare_llm": "train samples/s (LLM)",
        "generate": "reports/s",
        "generate_bare_llm": "reports/s (LLM)",
    }
    for r in results:
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        print(
            f"| {labels[str(r['measure'])]:<24} | {r['batch']:>5} | {r['value']:>10.2f} "
            f"| {r['unit']:<9} | {peak:>8} |"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
            + "\n"
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
