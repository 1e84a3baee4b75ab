"""Stage-2 throughput at paper scale, random weights: train samples/s, peak memory, beam-3 reports/s, FLOPs.

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
  * with ``--flops`` instead, a machine-independent version of that difference: the FLOPs of one
    training step (loss forward + backward, as timed, without the optimizer) at batch 8 and of the
    prefill of beam search (the visual prefix for 16 studies, then the LLM over the 16 x 3 beam rows,
    logits at the last position) for the network and for the bare LLM on inputs of the same shapes,
    split by module group. The model is built on the meta device (shapes only: nothing of the 7B
    weights is allocated). torch's FlopCounterMode counts matmuls, convolutions and attention (as two
    dense batched matmuls: the causal half is not subtracted); norms, softmax and elementwise ops are
    not counted. The same count on real tensors (``--device cpu``) is equal, which the tests check.

FLOPs at paper scale (``--flops``: meta device, 12 s and 0.96 GiB peak RSS on a 2-core AMD EPYC VM);
TF = 10^12 FLOP; "+" is each group's part of the overhead network / bare LLM - 1 (for the LLM, its
extra backward into the trainable prefix); both training steps use :func:`report_loss` (the output layer
at the report positions only)::

    step (LLM input)          network   bare LLM  overhead  vision  Q-Former  retrievers  prefix  LLM
    train, B=8 (8 x 218)      47.18 TF  46.11 TF  +2.34%    +0.54%  +0.06%    +1.33%      +0.03%  +0.39%
    prefill, B=16 (48 x 117)  74.07 TF  73.19 TF  +1.21%    +0.67%  +0.07%    +0.45%      +0.01%  +0.00%

The retrievers' cost is mostly the key/value projection of the 13,000 stored patterns (once per call,
so it shrinks per sample as the batch grows). On real tensors each distinct pattern is projected once (a
report stored under several labels is one pattern); the meta-device count has no values to compare and
projects every row, so the retrievers' share above is an upper bound. Each of the 80-120 decoding steps
after the prefill is LLM-only (the prefix sits in the KV cache), so generation's overhead is below the
prefill's.

Usage::

    python benchmarks/stage2_throughput.py --device cuda          # paper scale; needs a ~40 GB GPU
    python benchmarks/stage2_throughput.py --tiny --device cpu    # seconds-long smoke run of the same code
    python benchmarks/stage2_throughput.py --flops                # paper-scale FLOP count; any CPU, ~1 GB
    python benchmarks/stage2_throughput.py --tiny --flops --device cpu  # the same count on real tensors
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor
from torch._ops import OpOverload
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle
from transformers import AutoModelForCausalLM, LlamaConfig

from amrg.labels import NUM_LABELS
from amrg.models.classifier import DiseaseClassifier
from amrg.models.decoding import CACHE_KINDS, COMPILE_MODES, check_fast_path
from amrg.models.llm import (
    DEFAULT_INSTRUCTION,
    LLMInputs,
    apply_lora,
    build_generation_inputs,
    build_inputs,
    generate_reports,
    report_loss,
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


Autocast = Callable[[], AbstractContextManager[object]]
"""A context factory around the forward: bf16 autocast on the GPU, nullcontext elsewhere."""
Step = Callable[[], object]
Record = Callable[[str, int, float, str, "float | None"], None]  # measure, batch, value, unit, peak GB


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
    """The stage-2 network with random weights on ``device``.

    On the meta device every module is built under ``torch.device("meta")`` (shapes only, nothing of
    the 7B weights is allocated); the random memories are drawn on the CPU because ``set_memory``
    reads their values (a NaN check), and are moved to meta by the retriever.
    """
    with torch.device(device) if device.type == "meta" else nullcontext():
        # The prompt text is in the corpus so that it tokenizes about as compactly as with Llama-2's.
        prompt = f"Human: <Img></Img> {DEFAULT_INSTRUCTION} \nAssistant:"
        corpus = _reports(300, 60) + [prompt] * 50
        tokenizer = train_report_tokenizer(corpus, tmp / "tokenizer", vocab_size=2000, style="llama")
        parts = _tiny_parts if args.tiny else _paper_parts
        classifier, llm, visual_slots, report_slots = parts(device, tokenizer, args.llm_layers)
        llm = apply_lora(llm, r=16, alpha=32, dropout=0.05, target_modules=("q_proj", "v_proj"))
        width = classifier.qformer.hidden_size
        hopfield = dict(num_heads=2, hidden_size=8) if args.tiny else dict(num_heads=6, hidden_size=1024)
        visual_memory = torch.randn(visual_slots, width, device="cpu")  # [M_v, D]
        report_memory = torch.randn(report_slots, width, device="cpu")  # [M_r, D]
        visual = HopfieldRetriever(width, visual_memory, beta=4.0, dropout=0.1, **hopfield)
        report = HopfieldRetriever(width, report_memory, beta=4.0, dropout=0.1, **hopfield)
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


# --------------------------------------------------------------------------------------------------
# The steps, shared by the timing and the FLOP count


def _train_step(
    net: ReportGenerator, x: Tensor, mask: Tensor, reports: Sequence[str], autocast: Autocast
) -> None:
    """Loss forward and backward of the whole network: the timed training step minus the optimizer."""
    with autocast():
        loss = net(x, mask, reports)
    loss.backward()


def _bare_inputs(
    net: ReportGenerator, x: Tensor, mask: Tensor, reports: Sequence[str] | None, autocast: Autocast
) -> LLMInputs:
    """What the LLM receives inside the network (training inputs with reports, else generation inputs).

    Shapes: inputs_embeds [B, T, H], attention_mask [B, T] (and labels [B, T]); no graph.
    """
    with torch.no_grad(), autocast():
        prefix = net.encode(x, mask).prefix  # [B, P, H]
        embed = net.llm.get_input_embeddings()
        if reports is None:
            return build_generation_inputs(embed, net.prompt, prefix)
        return build_inputs(embed, net.prompt, prefix, reports, max_report_tokens=net.max_report_tokens)


def _bare_train_step(llm: torch.nn.Module, inputs: LLMInputs, autocast: Autocast) -> None:
    """The same step for the LLM alone, fed inputs of the network's shapes (no graph into them), with the
    network's loss (:func:`report_loss`: the output layer at the report positions only)."""
    with autocast():
        loss = report_loss(llm, replace(inputs, inputs_embeds=inputs.inputs_embeds.detach()))
    loss.backward()


def _bare_prefill(llm: torch.nn.Module, inputs: LLMInputs, num_beams: int) -> None:
    """The first forward of beam search: ``generate`` repeats each prompt per beam, then runs the LLM
    over the [B * beams, T] prompts with logits at the last position only (``logits_to_keep=1``)."""
    with torch.no_grad():
        llm(
            inputs_embeds=inputs.inputs_embeds.repeat_interleave(num_beams, dim=0),
            attention_mask=inputs.attention_mask.repeat_interleave(num_beams, dim=0),
            logits_to_keep=1,
        )


def _prefill(net: ReportGenerator, x: Tensor, mask: Tensor, num_beams: int) -> None:
    """Prefill of ``net.generate``: the visual prefix for B studies, then :func:`_bare_prefill`."""
    with torch.no_grad():
        visual = net.encode(x, mask)
        embed = net.llm.get_input_embeddings()
        inputs = build_generation_inputs(embed, net.prompt, visual.prefix, visual.prefix_mask)
        _bare_prefill(net.llm, inputs, num_beams)


# --------------------------------------------------------------------------------------------------
# FLOP count


class _MetaMasksAllTrue(TorchDispatchMode):
    """Read a boolean scalar of a meta tensor as True.

    Meta tensors hold no values, so the data-dependent branches of the step cannot be decided: the
    vision encoder's ``bool(view_mask.all())`` (every view present) and transformers' "no padding, use
    SDPA's is_causal" test on the attention mask. The benchmark's inputs make both True (one real view,
    reports all cut to the same length), which is the branch real tensors take. Other scalar reads on
    meta still raise. Boolean indexing (``nonzero``) is taken as all-true by torch's own switch.
    """

    def __torch_dispatch__(
        self, func: OpOverload, types: Sequence[type], args: tuple = (), kwargs: dict | None = None
    ) -> object:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            if args[0].dtype == torch.bool:
                return True
        return func(*args, **(kwargs or {}))


# Module groups of ReportGenerator (attribute paths) for the per-module FLOP breakdown.
_GROUPS: dict[str, tuple[str, ...]] = {
    "vision encoder": ("classifier.encoder",),
    "Q-Former": ("classifier.qformer",),
    "retrievers": ("visual_retriever", "report_retriever"),
    "prefix projection": ("prefix_proj", "prefix_norm"),
    "LLM": ("llm",),
}
_OTHER = "other"  # the stage-1 head and whatever runs outside the groups' modules


def _meta_values() -> ExitStack:
    """Context in which the steps run on meta tensors (boolean tests and boolean indexing all-true)."""
    stack = ExitStack()
    stack.enter_context(fx_config.patch(meta_nonzero_assume_all_nonzero=True))
    stack.enter_context(_MetaMasksAllTrue())
    return stack


class _GroupFlops(TorchDispatchMode):
    """Charges the FLOPs that ``counter`` counts for each op to a module group of ``net``.

    Forward: the group of the innermost module running. Backward: the group whose forward made the
    autograd node running (each module's forward hook tags the untagged nodes between its inputs and
    outputs, so inner modules' tags win). FlopCounterMode's own per-module split
    (``get_flop_counts()``) is right for a forward (the prefill split here equals it) but not for this
    backward: it leaves a module in backward when the gradient of a positional input arrives, so the
    LLM (called with keyword arguments only) and every module fed by frozen parts stay "entered" to
    the end of the backward and are charged for all the work after them as well.

    Args:
        net: the network whose ``named_modules`` define the groups (:data:`_GROUPS`).
        counter: the active FlopCounterMode, which must sit below this mode (entered before it).
    """

    _TAG = "flop_group"

    def __init__(self, net: ReportGenerator, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.flops: dict[str, int] = dict.fromkeys([*_GROUPS, _OTHER], 0)
        self.group_of: dict[torch.nn.Module, str] = {}
        for name, module in net.named_modules():
            self.group_of[module] = next(
                (
                    g
                    for g, paths in _GROUPS.items()
                    if any(name == p or name.startswith(p + ".") for p in paths)
                ),
                _OTHER,
            )
        self._stack: list[str] = []
        self._handles: list[RemovableHandle] = []

    def _enter(self, module: torch.nn.Module, args: object) -> None:
        if module in self.group_of:
            self._stack.append(self.group_of[module])

    def _leave(self, module: torch.nn.Module, args: object, kwargs: object, output: object) -> None:
        group = self.group_of.get(module)
        if group is None:
            return
        self._stack.pop()
        # Walk the graph this call added, back to its inputs; inner modules tagged their part first.
        leaves = tree_leaves((args, kwargs))
        seen = {t.grad_fn for t in leaves if isinstance(t, Tensor) and t.grad_fn is not None}
        todo = [t.grad_fn for t in tree_leaves(output) if isinstance(t, Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            node.metadata.setdefault(self._TAG, group)
            todo.extend(n for n, _ in node.next_functions if n is not None)

    def __enter__(self) -> _GroupFlops:
        self._handles = [
            register_module_forward_pre_hook(self._enter),
            register_module_forward_hook(self._leave, with_kwargs=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        super().__exit__(*exc)

    def __torch_dispatch__(
        self, func: OpOverload, types: Sequence[type], args: tuple = (), kwargs: dict | None = None
    ) -> object:
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        flops = self.counter.get_total_flops() - before
        if flops:
            node = torch._C._current_autograd_node()  # None in forward
            if node is not None:
                group = node.metadata.get(self._TAG, _OTHER)
            else:
                group = self._stack[-1] if self._stack else _OTHER
            self.flops[group] += flops
        return out


def _count_flops(net: ReportGenerator, fn: Step) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``fn``: the total and per module group of ``net`` (see :class:`_GroupFlops`).

    Attention runs SDPA's math backend, so it is counted as its two batched matmuls on every device
    (dense: the causal half is not subtracted, as FlopCounterMode counts the fused GPU kernels); the
    CPU's fused kernel is not in FlopCounterMode's table at all and would count as zero.
    """
    counter = FlopCounterMode(display=False)
    groups = _GroupFlops(net, counter)
    with sdpa_kernel(SDPBackend.MATH), counter, _meta_values(), groups:
        fn()
    total = counter.get_total_flops()
    if sum(groups.flops.values()) != total:
        raise RuntimeError(f"FLOPs by group {groups.flops} do not add up to the total {total}")
    return total, groups.flops


def _flops(
    args: argparse.Namespace, net: ReportGenerator, device: torch.device, name: str
) -> list[dict[str, object]]:
    """FLOPs of one training step and one generation prefill, of the network and of the bare LLM.

    Per step two records: ``<step>_flops`` (total, FLOPs per module group, the LLM's share, and each
    group's part of the overhead full / bare - 1) and ``<step>_flops_bare_llm``; both give the LLM's
    input shape [rows, T].
    """
    image_size = net.image_size
    results: list[dict[str, object]] = []

    def images(batch: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch, 1, 3, image_size, image_size, device=device)  # [B, V=1, 3, S, S]
        return x, torch.ones(batch, 1, dtype=torch.bool, device=device)

    def add(measure: str, batch: int, rows: int, inputs: LLMInputs, full: Step, bare: Step) -> None:
        total, groups = _count_flops(net, full)
        bare_total, _ = _count_flops(net, bare)
        # Each group's part of the overhead full / bare - 1; the LLM's is its own extra work inside
        # the network (the backward into the trainable prefix), so the parts add up to the total.
        overhead = {g: (f - bare_total if g == "LLM" else f) / bare_total for g, f in groups.items()}
        overhead["total"] = total / bare_total - 1.0
        common = {
            "batch": batch,
            "unit": "FLOP",
            "peak_gb": None,
            "device": name,
            "llm_input": [rows, int(inputs.inputs_embeds.shape[1])],
        }
        results.append(
            {
                "measure": measure,
                **common,
                "value": total,
                "llm_share": groups["LLM"] / total,
                "groups": groups,
                "overhead": overhead,
            }
        )
        results.append({"measure": f"{measure}_bare_llm", **common, "value": bare_total})

    no_autocast: Autocast = nullcontext  # FLOPs do not depend on the dtype
    reports = _reports(args.train_batch, args.report_tokens + 40, seed=1)  # longer than the cut: all get 100
    x, mask = images(args.train_batch)
    net.train()
    with _meta_values():
        train = _bare_inputs(net, x, mask, reports, no_autocast)
    add(
        "train_flops",
        args.train_batch,
        args.train_batch,
        train,
        lambda: _train_step(net, x, mask, reports, no_autocast),
        lambda: _bare_train_step(net.llm, train, no_autocast),
    )
    net.zero_grad(set_to_none=True)

    net.eval()  # as generate: no Hopfield or LoRA dropout
    batch = args.eval_batches[0]
    gx, gmask = images(batch)
    with _meta_values():
        gen = _bare_inputs(net, gx, gmask, None, no_autocast)
    add(
        "prefill_flops",
        batch,
        batch * args.num_beams,
        gen,
        lambda: _prefill(net, gx, gmask, args.num_beams),
        lambda: _bare_prefill(net.llm, gen, args.num_beams),
    )
    return results


def _print_flops(results: Sequence[dict[str, Any]], args: argparse.Namespace, name: str) -> None:
    """The FLOP table: per step, the module groups, the network's total and the bare LLM's."""
    print(
        f"\nstage-2 FLOPs per step ({'tiny' if args.tiny else 'paper-scale'} model, {name}; train: loss "
        f"forward + backward, {args.report_tokens} report tokens; prefill: first forward of beam "
        f"{args.num_beams})\nshare: of the network's total; vs bare LLM: the group's part of full / bare - 1"
    )
    print(f"| {'step':<18} | {'module group':<19} | {'GFLOP':>12} | {'share':>7} | {'vs bare LLM':>11} |")
    print(f"|{'-' * 20}|{'-' * 21}|{'-' * 14}|{'-' * 9}|{'-' * 13}|")
    by_measure = {r["measure"]: r for r in results}
    for measure in ("train_flops", "prefill_flops"):
        full, bare = by_measure[measure], by_measure[f"{measure}_bare_llm"]
        step = f"{measure.removesuffix('_flops')} (batch {full['batch']})"
        total, overhead = full["value"], full["overhead"]
        rows = [(g, f, f"{overhead[g]:+.2%}") for g, f in full["groups"].items()]
        rows += [("total", total, f"{overhead['total']:+.2%}"), ("bare LLM", bare["value"], "")]
        for group, flops, vs in rows:
            print(f"| {step:<18} | {group:<19} | {flops / 1e9:>12.3f} | {flops / total:>7.2%} | {vs:>11} |")
    for measure in ("train_flops", "prefill_flops"):
        rows, length = by_measure[measure]["llm_input"]
        print(f"LLM input of {measure.removesuffix('_flops')}: {rows} rows x {length} positions")


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (cuda, cuda:1, cpu, meta); default cuda, meta with --flops",
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="count FLOPs of a training step and a generation prefill instead of timing (no GPU needed)",
    )
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
    parser.add_argument(
        "--cache", choices=CACHE_KINDS, default="dynamic", help="KV cache of generation (both models)"
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="torch.compile mode of the decode steps (both models; needs --cache static)",
    )
    parser.add_argument("--no-train", dest="train", action="store_false", help="time generation only")
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
    problems = check_fast_path(args.cache, args.compile)
    if problems:
        parser.error("; ".join(problems))
    fast = {"cache": args.cache, "compile": args.compile}

    args.device = args.device or ("meta" if args.flops else "cuda")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --tiny --device cpu for a smoke run")
    torch.manual_seed(0)
    # bf16 autocast on the GPU (Lightning's bf16-mixed); plain float32 for the CPU smoke run.
    autocast: Autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    )
    with tempfile.TemporaryDirectory() as tmp:
        net = build(args, device, Path(tmp))
    image_size = net.image_size
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device: {name}; parameters: {total / 1e6:.1f} M ({trainable / 1e6:.2f} M trainable)")
    if args.flops:
        results = _flops(args, net, device, name)
        _print_flops(results, args, name)
        _write_json(args, results)
        return results

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
    if args.train:
        _time_training(args, net, images, record, autocast, device)

    # ---- generation
    net.eval()
    for batch in args.eval_batches:
        gx, gmask = images(batch)
        _reset_peak(device)
        with autocast():
            # warm-up: a compiled step is built for the timed call's shapes (the static cache's length
            # depends on max_new_tokens), so the warm-up runs the timed settings when compiling
            short = (
                args.max_new_tokens
                if args.compile != "off"
                else min(args.max_new_tokens, args.min_new_tokens + 1)
            )
            net.generate(gx, gmask, max_new_tokens=short, **fast)
            seconds = _timed(
                lambda gx=gx, gmask=gmask: net.generate(gx, gmask, **fast), args.gen_repeats, 0, device
            )
        record("generate", batch, batch / seconds, "reports/s", _peak_gb(device))
        if args.bare:
            gen = _bare_inputs(net, gx, gmask, None, autocast)

            def bare_generate(gen: LLMInputs = gen) -> None:
                generate_reports(
                    net.llm,
                    net.tokenizer,
                    gen.inputs_embeds,
                    gen.attention_mask,
                    num_beams=args.num_beams,
                    min_new_tokens=args.min_new_tokens,
                    max_new_tokens=args.max_new_tokens,
                    **fast,
                )

            with autocast():
                if args.compile != "off":
                    bare_generate()  # warm-up: the bare LLM's compiled step is its own
                seconds = _timed(bare_generate, args.gen_repeats, 0, device)
            record("generate_bare_llm", batch, batch / seconds, "reports/s", _peak_gb(device))

    # ---- table
    print(
        f"\nstage-2 throughput ({'tiny' if args.tiny else 'paper-scale'} model, random weights, {name}; "
        f"{NUM_LABELS} labels, beam {args.num_beams}, "
        f"{args.min_new_tokens}-{args.max_new_tokens} new tokens, "
        f"{args.report_tokens} report tokens; cache {args.cache}, compile {args.compile})"
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
    _write_json(args, results)
    return results


def _time_training(
    args: argparse.Namespace,
    net: ReportGenerator,
    images: Callable[[int], tuple[Tensor, Tensor]],
    record: Record,
    autocast: Autocast,
    device: torch.device,
) -> None:
    """Train samples/s of the network and, with ``--bare``, of the LLM alone on the same shapes."""
    reports = _reports(args.train_batch, args.report_tokens + 40, seed=1)  # longer than the cut: all get 100
    x, mask = images(args.train_batch)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    net.train()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _train_step(net, x, mask, reports, autocast)
        optimizer.step()

    _reset_peak(device)
    seconds = _timed(train_step, args.steps, args.warmup, device)
    record("train", args.train_batch, args.train_batch / seconds, "samples/s", _peak_gb(device))

    if args.bare:  # the LLM alone, fed inputs of exactly the same shapes
        inputs = _bare_inputs(net, x, mask, reports, autocast)
        llm_params = [p for p in net.llm.parameters() if p.requires_grad]
        llm_optimizer = torch.optim.AdamW(llm_params, lr=1e-4, fused=device.type == "cuda")

        def bare_step() -> None:
            llm_optimizer.zero_grad(set_to_none=True)
            _bare_train_step(net.llm, inputs, autocast)
            llm_optimizer.step()

        del optimizer
        _reset_peak(device)
        seconds = _timed(bare_step, args.steps, args.warmup, device)
        record("train_bare_llm", args.train_batch, args.train_batch / seconds, "samples/s", _peak_gb(device))
        del llm_optimizer
    net.zero_grad(set_to_none=True)


def _write_json(args: argparse.Namespace, results: list[dict[str, object]]) -> None:
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
