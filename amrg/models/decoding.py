"""The generation fast path: a static KV cache and a compiled decode step (issue 15).

``generate_reports`` runs the LLM's own ``generate`` (batched beam search or greedy, KV cache). Two
settings make it faster where the hardware allows, and leave the reports unchanged (the tests compare the
tokens on a tiny model, greedy and beam):

* ``cache="static"``: transformers' ``StaticCache``, preallocated for the prompt and ``max_new_tokens``, so
  every decode step has the same tensor shapes (a requirement for a compiled step; on its own it saves
  the re-allocation of a growing cache).
* ``compile``: the LLM's forward is compiled with ``torch.compile`` for the decode steps (one new token per
  row), while the prefill (the whole prompt, a new length for every batch) stays eager, so the compiled
  graph sees one shape per batch size. transformers compiles only greedy and sampling decode loops on
  accelerators (its ``beam_search`` calls the eager forward), so the step is compiled here for every
  search and device: the causal LM's ``forward`` is replaced for the duration of the call by a dispatcher
  that sends one-token steps to the compiled function. The compiled function is kept on the model, so
  later calls reuse it (it recompiles for a new batch size or cache length, up to dynamo's limit).

  ``"reduce-overhead"`` adds CUDA graphs. A CUDA graph writes each replay's outputs into the same memory, so
  an output still held when the next step replays is overwritten (with plain transformers, a static cache
  and ``torch.compile(mode="reduce-overhead")``, ``generate`` failed that way). The dispatcher therefore
  marks a new step before every replay (``torch.compiler.cudagraph_mark_step_begin``) and hands
  ``generate`` a copy of the logits, which is the only output it keeps (the static cache's tensors are
  updated in place and are graph inputs, not outputs). ``"default"`` and ``"max-autotune-no-cudagraphs"``
  compile without CUDA graphs.

``benchmarks/stage2_throughput.py --cache static --compile MODE`` times these settings against the plain
path (docs/cluster.md has the CPU numbers; the GPU ones are still open).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from torch import nn

CacheKind = Literal["dynamic", "static"]
CompileMode = Literal["off", "default", "max-autotune-no-cudagraphs", "reduce-overhead"]

CACHE_KINDS: tuple[str, ...] = get_args(CacheKind)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)

_COMPILED = "_amrg_compiled_decode"  # attribute on the causal LM: {mode: compiled forward}


def check_fast_path(cache: str, compile: str) -> list[str]:
    """The problems with a ``cache`` / ``compile`` pair (empty when it is valid)."""
    problems = []
    if cache not in CACHE_KINDS:
        problems.append(f"cache must be one of {list(CACHE_KINDS)}, got {cache!r}")
    if compile not in COMPILE_MODES:
        problems.append(f"compile must be one of {list(COMPILE_MODES)}, got {compile!r}")
    elif compile != "off" and cache != "static":
        problems.append(
            f"compile={compile!r} needs cache='static' (a compiled decode step needs the fixed shapes of a "
            f"static KV cache), got cache={cache!r}"
        )
    return problems


def causal_lm(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` ``generate`` calls: the causal LM under a peft wrapper, else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_decode_step(kwargs: dict[str, Any]) -> bool:
    ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:  # the prefill of an embedding prompt
        return False
    return ids is not None and ids.shape[-1] == 1


def _eager_forward(lm: nn.Module) -> Callable[..., Any]:
    """The forward ``generate`` would call: an instance attribute set by someone else (accelerate's
    offloading hooks set one), else the class's forward bound to ``lm``."""
    own = lm.__dict__.get("forward")
    return own if own is not None else type(lm).forward.__get__(lm, type(lm))


def _compiled_forward(lm: nn.Module, mode: str) -> Callable[..., Any]:
    compiled: dict[str, Callable[..., Any]] = lm.__dict__.setdefault(_COMPILED, {})
    if mode not in compiled:
        compiled[mode] = torch.compile(_eager_forward(lm), mode=mode, fullgraph=False, dynamic=False)
    return compiled[mode]


@contextmanager
def compiled_decode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run ``model``'s one-token decode steps through ``torch.compile(mode=mode)`` inside the block.

    Args:
        model: the causal LM, plain or peft-wrapped.
        mode: a ``torch.compile`` mode (see :data:`CompileMode`); ``"off"`` changes nothing.
    """
    if mode == "off":
        yield
        return
    lm = causal_lm(model)
    previous = lm.__dict__.get("forward")
    eager = _eager_forward(lm)
    step = _compiled_forward(lm, mode)
    graphs = mode == "reduce-overhead"

    def forward(*args: Any, **kwargs: Any) -> Any:
        if args or not _is_decode_step(kwargs):
            return eager(*args, **kwargs)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = step(**kwargs)
        if graphs:  # the next replay overwrites the graph's output memory: keep a copy
            out.logits = out.logits.clone()
        return out

    lm.forward = forward  # nn.Module.__call__ calls self.forward: the instance attribute wins
    try:
        yield
    finally:
        if previous is None:
            del lm.forward
        else:
            lm.forward = previous
