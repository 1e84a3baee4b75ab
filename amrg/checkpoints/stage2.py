"""Stage 2 assembled outside Lightning, saved whole, and loaded back from its checkpoint alone.

:func:`build_report_generator` assembles :class:`~amrg.models.reporter.ReportGenerator` from a stage-1
checkpoint, a memory folder (``amrg memory build``) and an LLM (a local folder, or a tiny random one);
the stage-2 recipe names it as the ``net`` of :class:`amrg.modules.reporter.ReporterModule`. The network
carries a plain-data ``build_record`` of how it was assembled.

A stage-2 checkpoint holds the network's whole state (stage-1 encoder, Q-Former and head, the sampled
memories, retrievers, prefix, LoRA or tiny-LLM weights) plus the record (:data:`RECORD_KEY`): the stage-1
net config, the retriever configs, the memory manifest and provenance, the tokenizer's files, the prompt
and decoding settings. Only a frozen base LLM loaded from a folder stays outside, named by path and
identity (:mod:`amrg.checkpoints.llm`). :func:`load_stage2` rebuilds the network from the checkpoint
without reading any other file of the run; class paths in the record are checked before any import,
and ``trust_remote_code`` comes only from the caller.
"""

from __future__ import annotations

import functools
import importlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from amrg._plain import is_plain
from amrg._state import load_state_strict
from amrg.checkpoints.llm import identity_mismatch, llm_identity
from amrg.checkpoints.memory import load_memory_folder
from amrg.checkpoints.safety import UntrustedCheckpointError, check_class_paths
from amrg.checkpoints.stage1 import (
    classifier_from_config,
    file_sha256,
    load_stage1,
    read_checkpoint,
    stage1_net_config,
)
from amrg.labels import LABELS
from amrg.models.decoding import CacheKind, CompileMode, check_fast_path
from amrg.models.llm import (
    DEFAULT_INSTRUCTION,
    TOKENIZER_FILES,
    AttnImplementation,
    DType,
    LoRAConfig,
    apply_lora,
    build_tiny_llm,
    enable_gradient_checkpointing,
    freeze,
    load_causal_lm,
)
from amrg.models.reporter import ReportGenerator
from amrg.models.retrievers import HopfieldRetriever
from amrg.models.tokenizer import train_report_tokenizer

__all__ = [
    "RECORD_KEY",
    "DecodingConfig",
    "RetrieverFactory",
    "TinyLLMConfig",
    "base_llm_keys",
    "build_report_generator",
    "checkpoint_record",
    "generator_from_checkpoint",
    "load_stage2",
]

_logger = logging.getLogger(__name__)

RECORD_KEY = "amrg_stage2"
"""Checkpoint entry holding everything needed to rebuild the stage-2 network besides its weights."""

_FORMAT_VERSION = 2
_TEXT_VOCABULARIES = ("tokenizer.json", "vocab.json")  # vocabularies a checkpoint can carry as text
_MAX_TOKENIZER_FILE = 64 * 1024 * 1024

RetrieverFactory = Callable[[int, Tensor], nn.Module]
"""Builds a retriever from the query width D and the stored patterns [M, D_m]: a retriever class from
:mod:`amrg.models.retrievers` (``class_path`` + ``init_args`` without ``dim`` and ``memory`` in YAML)."""


@dataclass
class TinyLLMConfig:
    """A randomly initialised causal LM trained from scratch (demo, tests, debugging).

    Its byte-level BPE tokenizer is trained on the distinct report texts of the memory folder's report
    memory (train-split reports only), so it needs no other file and is stored in the checkpoint.
    """

    family: Literal["llama", "qwen2"] = "llama"
    """Architecture; the tokenizer copies its special-token conventions (Llama-2 or Qwen1.5 style)."""
    hidden_size: int = 64
    """Model width H."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads; hidden_size / num_heads must be even."""
    intermediate_size: int = 128
    """MLP width."""
    max_position_embeddings: int = 512
    """Longest prompt + prefix + report."""
    vocab_size: int = 2000
    """Upper bound on the trained tokenizer's vocabulary."""
    min_frequency: int = 2
    """A BPE pair must occur this often to be merged."""
    seed: int = 0
    """Seed of the random initial weights."""

    def __post_init__(self) -> None:
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"tiny_llm.family must be 'llama' or 'qwen2', got {self.family!r}")
        small = [
            name
            for name in (
                "hidden_size",
                "num_layers",
                "num_heads",
                "intermediate_size",
                "max_position_embeddings",
            )
            if getattr(self, name) < 1
        ]
        if small:
            raise ValueError(f"tiny_llm: {', '.join(small)} must be >= 1")

    @property
    def tokenizer_style(self) -> Literal["llama", "qwen"]:
        return "llama" if self.family == "llama" else "qwen"


@dataclass
class DecodingConfig:
    """Beam-search settings. Defaults are the paper's for MIMIC-CXR and CheXpert Plus; IU X-ray uses
    min_new_tokens 40 and max_new_tokens 100."""

    num_beams: int = 3
    """Beams per report (paper: 3)."""
    repetition_penalty: float = 2.0
    """Penalty on repeated tokens (paper: 2.0)."""
    length_penalty: float = 2.0
    """Exponent on the length in beam scores (paper: 2.0)."""
    min_new_tokens: int = 80
    """eos is blocked before this many tokens."""
    max_new_tokens: int = 120
    """Longest report in tokens."""
    cache: CacheKind = "dynamic"
    """KV cache of generation: ``"dynamic"`` or ``"static"`` (preallocated; the same reports)."""
    compile: CompileMode = "off"
    """``torch.compile`` mode of the decode steps, with ``cache: static``: ``"default"``,
    ``"max-autotune-no-cudagraphs"`` or ``"reduce-overhead"`` (CUDA graphs); the same reports."""

    def __post_init__(self) -> None:
        problems = []
        if self.num_beams < 1:
            problems.append(f"decoding.num_beams must be >= 1, got {self.num_beams}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or self.max_new_tokens < 1:
            problems.append(
                "decoding needs 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
                f"{self.min_new_tokens} and {self.max_new_tokens}"
            )
        problems += [f"decoding.{problem}" for problem in check_fast_path(self.cache, self.compile)]
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Building from files


def build_report_generator(
    stage1_checkpoint: Path,
    memory: Path,
    visual_retriever: RetrieverFactory = HopfieldRetriever,
    report_retriever: RetrieverFactory = HopfieldRetriever,
    llm_path: Path | None = None,
    tokenizer_path: Path | None = None,
    tiny_llm: TinyLLMConfig | None = None,
    llm_training: Literal["lora", "frozen", "full"] = "lora",
    lora: LoRAConfig = LoRAConfig(),  # noqa: B008 - plain data
    dtype: DType = "float32",
    attn_implementation: AttnImplementation = "sdpa",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    freeze_encoder: bool = True,
    freeze_qformer: bool = True,
    instruction: str = DEFAULT_INSTRUCTION,
    prompt_template: Literal["auto", "chat", "plain"] = "auto",
    system_prompt: str | None = None,
    max_report_tokens: int = 100,
    decoding: DecodingConfig = DecodingConfig(),  # noqa: B008 - plain data
    queries: Literal["disease", "pooled"] = "disease",
    findings_threshold: float = 0.5,
    training_findings: Literal["stage1", "labels"] = "stage1",
    findings_embedding: bool = False,
    forbidden_ids: Sequence[str] = (),
) -> ReportGenerator:
    """Assemble the stage-2 network from a stage-1 checkpoint, a memory folder and an LLM.

    Args:
        stage1_checkpoint: the stage-1 ``.ckpt`` (``amrg fit`` with a ClassifierModule); its encoder,
            Q-Former and head are rebuilt from it alone and copied into the stage-2 checkpoint.
        memory: the folder ``amrg memory build`` wrote; its manifest must name this stage-1 checkpoint
            (sha256), and its memories are used as sampled there.
        visual_retriever: retriever over [disease-query embeddings ⊕ visual memory], called with
            (Q-Former width, stored patterns).
        report_retriever: retriever over the report memory, called the same way.
        llm_path: a local Hugging Face causal LM folder (``save_pretrained`` layout); never downloaded.
            Exactly one of llm_path and tiny_llm.
        tokenizer_path: a tokenizer folder to use instead of the LLM folder's (or, with tiny_llm, instead
            of training one on the report memory's texts).
        tiny_llm: build a random tiny LLM instead of loading one.
        llm_training: ``"lora"`` (adapters only; paper), ``"frozen"`` (prefix and retrievers only) or
            ``"full"`` (every LLM weight; what a tiny LLM from scratch needs).
        lora: LoRA options (paper: r=16 on q_proj/v_proj).
        dtype: LLM parameter dtype (paper: bfloat16).
        attn_implementation: attention kernel of an LLM loaded from llm_path.
        gradient_checkpointing: recompute the LLM's decoder-layer activations in the backward pass
            instead of storing them (less memory, about one more forward pass; same loss and gradients).
            No effect with ``llm_training="frozen"`` (a frozen LLM runs in eval mode). Recorded in the
            checkpoint, so a resumed or reloaded network keeps it.
        trust_remote_code: allow model code shipped in the LLM folder (only from your own config).
        freeze_encoder: keep the stage-1 vision encoder frozen (paper: frozen).
        freeze_qformer: keep the stage-1 Q-Former frozen (paper: frozen).
        instruction: the request in the prompt (paper / R2GenGPT wording by default).
        prompt_template: ``"auto"`` (the tokenizer's chat template when it has one), ``"chat"`` or
            ``"plain"``.
        system_prompt: optional system turn (chat template only).
        max_report_tokens: report tokens kept for teacher forcing (paper: 60 IU X-ray, 100 otherwise).
        decoding: beam-search settings for validation, test and prediction.
        queries: ``"disease"`` (paper) or ``"pooled"`` (ablation: pooled patch tokens instead of the
            disease tokens, see :class:`~amrg.models.reporter.ReportGenerator`).
        findings_threshold: with :data:`~amrg.models.llm.FINDINGS_PLACEHOLDER` in ``instruction``, the
            stage-1 probability from which a label is written there (see
            :class:`~amrg.models.reporter.ReportGenerator`).
        training_findings: ``"stage1"`` or ``"labels"``: what the findings placeholder states in the
            training loss (see :class:`~amrg.models.reporter.ReportGenerator`).
        findings_embedding: also state the findings as a learned vector added to every report token's
            embedding (see :class:`~amrg.models.reporter.ReportGenerator`; not with ``decoding.compile``).
        forbidden_ids: study ids the memories must not hold (the run's val/test ids; ReporterModule also
            checks the datamodule's own when a run starts).

    Returns:
        The network, with ``build_record`` set.

    Raises:
        FileNotFoundError: every missing file or folder, in one message.
        ValueError: inconsistent options, or a checkpoint, memory or LLM that does not fit (named).
    """
    tiny = _as_dataclass(tiny_llm, TinyLLMConfig, "tiny_llm") if tiny_llm is not None else None
    lora = _as_dataclass(lora, LoRAConfig, "lora")
    decoding = _as_dataclass(decoding, DecodingConfig, "decoding")
    problems = []
    if (llm_path is None) == (tiny is None):
        problems.append(
            "set exactly one of llm_path (a local Hugging Face causal LM folder) and tiny_llm (a random tiny "
            "LLM trained from scratch)"
        )
    if llm_training not in ("lora", "frozen", "full"):
        problems.append(f"llm_training must be 'lora', 'frozen' or 'full', got {llm_training!r}")
    if max_report_tokens < 1:
        problems.append(f"max_report_tokens must be >= 1, got {max_report_tokens}")
    if problems:
        raise ValueError("stage 2: " + "; ".join(problems))
    missing = []
    if not Path(stage1_checkpoint).is_file():
        missing.append(
            f"stage-1 checkpoint '{stage1_checkpoint}' not found (stage1_checkpoint): expected the .ckpt "
            "that `amrg fit` wrote for stage 1"
        )
    if not Path(memory).is_dir():
        missing.append(
            f"memory folder '{memory}' not found (memory): expected the out_dir of `amrg memory build`"
        )
    if llm_path is not None and not Path(llm_path).is_dir():
        missing.append(
            f"LLM folder '{llm_path}' not found (llm_path): expected a local folder written by save_pretrained; "
            "models are never downloaded at run time"
        )
    if tokenizer_path is not None and not _has_tokenizer(Path(tokenizer_path)):
        missing.append(f"tokenizer folder '{tokenizer_path}' not found or empty (tokenizer_path)")
    if missing:
        raise FileNotFoundError("stage 2 cannot be built:\n  - " + "\n  - ".join(missing))

    stage1_checkpoint = Path(stage1_checkpoint)
    source = f"stage-1 checkpoint '{stage1_checkpoint}'"
    ckpt = read_checkpoint(stage1_checkpoint, "stage-1 checkpoint")
    classifier_config = stage1_net_config(ckpt, source)
    classifier = load_stage1(stage1_checkpoint, ckpt=ckpt)
    del ckpt
    width = classifier.qformer.hidden_size
    stage1_sha256 = file_sha256(stage1_checkpoint)
    folder = load_memory_folder(
        memory, stage1_sha256=stage1_sha256, forbidden_ids=forbidden_ids, visual_dim=width
    )
    visual, _, visual_provenance = folder.bank("visual").stacked()
    report, _, report_provenance = folder.bank("report").stacked()
    for kind, patterns in (("visual", visual), ("report", report)):
        if patterns.shape[0] == 0:
            raise ValueError(f"memory folder '{memory}': the {kind} memory is empty; rebuild it")

    llm_record: dict[str, Any]
    if tiny is not None:
        if tokenizer_path is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        else:
            texts = sorted({str(r["text"]) for r in report_provenance if isinstance(r.get("text"), str)})
            tokenizer = _train_tokenizer(texts, tiny, where=f"memory folder '{memory}'")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tiny.seed)
            llm = _tiny_llm(tokenizer, tiny, dtype)
        llm_record = {"kind": "tiny", "config": asdict(tiny)}
    else:
        assert llm_path is not None
        llm_path = Path(llm_path).resolve()
        identity = llm_identity(llm_path)
        llm, tokenizer = load_causal_lm(llm_path, dtype, attn_implementation, trust_remote_code)
        if tokenizer_path is not None:
            tokenizer = AutoTokenizer.from_pretrained(
                str(tokenizer_path), local_files_only=True, trust_remote_code=trust_remote_code
            )
        rows = llm.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise ValueError(
                f"tokenizer '{tokenizer_path}' has {len(tokenizer)} tokens but the LLM '{llm_path}' embeds "
                f"only {rows}; they do not belong together"
            )
        llm_record = {
            "kind": "pretrained",
            "path": str(llm_path),
            "identity": identity,
            "attn_implementation": attn_implementation,
        }
    llm = _set_training(llm, llm_training, lora, gradient_checkpointing)

    retrievers = {}
    for name, factory, patterns in (
        ("visual_retriever", visual_retriever, visual),
        ("report_retriever", report_retriever, report),
    ):
        config = _factory_config(factory, name)
        try:
            retrievers[name] = factory(width, patterns)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot build the {name}: {err}") from err
        retrievers[name + "_config"] = config

    settings = {
        "freeze_encoder": freeze_encoder,
        "freeze_qformer": freeze_qformer,
        "instruction": instruction,
        "prompt_template": prompt_template,
        "system_prompt": system_prompt,
        "max_report_tokens": max_report_tokens,
        "queries": queries,
        "findings_threshold": findings_threshold,
        "training_findings": training_findings,
        "findings_embedding": findings_embedding,
        **asdict(decoding),
    }
    net = ReportGenerator(
        classifier=classifier,
        llm=llm,
        tokenizer=tokenizer,
        visual_retriever=retrievers["visual_retriever"],
        report_retriever=retrievers["report_retriever"],
        visual_provenance=visual_provenance,
        report_provenance=report_provenance,
        **settings,
    )
    net.build_record = {
        "format_version": _FORMAT_VERSION,
        "labels": list(LABELS),
        "classifier": classifier_config,
        "stage1_checkpoint": str(stage1_checkpoint.resolve()),
        "stage1_checkpoint_sha256": stage1_sha256,
        "memory": {"path": str(Path(memory).resolve()), "manifest": folder.manifest},
        "visual_retriever": retrievers["visual_retriever_config"],
        "report_retriever": retrievers["report_retriever_config"],
        "llm": {
            **llm_record,
            "dtype": dtype,
            "training": llm_training,
            "lora": asdict(lora),
            "gradient_checkpointing": gradient_checkpointing,
        },
        "tokenizer_files": _tokenizer_files(tokenizer),
        "settings": settings,
    }
    _logger.info(
        "stage 2 assembled from %s and %s: %d visual and %d report memory patterns, %s LLM (%s)",
        stage1_checkpoint,
        memory,
        visual.shape[0],
        report.shape[0],
        llm_record["kind"],
        llm_training,
    )
    return net


# --------------------------------------------------------------------------------------------------
# Checkpoints


def base_llm_keys(net: ReportGenerator) -> set[str]:
    """State-dict keys (without a ``net.`` prefix) of the frozen base LLM that a checkpoint leaves out.

    Only an LLM loaded from a folder is left out (a tiny LLM has no folder to come back from), and of it
    only what does not train: frozen parameters and the buffers of modules with no trainable parameter.
    """
    record = net.build_record or {}
    if (record.get("llm") or {}).get("kind") != "pretrained":
        return set()
    out = set()
    for name, module in net.llm.named_modules():
        own = list(module.named_parameters(recurse=False))
        trains = any(p.requires_grad for _, p in own)
        for pname, param in own:
            if not param.requires_grad:
                out.add(f"llm.{name}.{pname}" if name else f"llm.{pname}")
        if not trains:
            for bname, _ in module.named_buffers(recurse=False):
                out.add(f"llm.{name}.{bname}" if name else f"llm.{bname}")
    return out & set(net.state_dict())


def checkpoint_record(net: ReportGenerator) -> dict[str, Any]:
    """The :data:`RECORD_KEY` entry of a stage-2 checkpoint: the build record plus memory provenance."""
    if not net.build_record:
        raise ValueError(
            "this ReportGenerator has no build_record: build it with amrg.checkpoints.build_report_generator "
            "(or load it with load_stage2) so its checkpoint can be loaded without the run's files"
        )
    return {
        **net.build_record,
        "visual_memory": {"dim": net.visual_retriever.memory_dim, "provenance": net.visual_provenance},
        "report_memory": {"dim": net.report_retriever.memory_dim, "provenance": net.report_provenance},
    }


def load_stage2(
    path: Path | str,
    llm_path: Path | str | None = None,
    trust_remote_code: bool = False,
    map_location: str | torch.device = "cpu",
) -> ReportGenerator:
    """The stage-2 network from its checkpoint alone (plus the base LLM folder, when it used one).

    Args:
        path: a stage-2 ``.ckpt`` (``amrg fit`` with a ReporterModule).
        llm_path: where the base LLM is on this machine, when not where it was at training; it must be
            the same model (config and weight hashes).
        trust_remote_code: allow model code shipped in the LLM folder (never read from the checkpoint).
        map_location: where to put the tensors.

    Returns:
        The network in eval mode.
    """
    ckpt = read_checkpoint(path, "stage-2 checkpoint", map_location)
    return generator_from_checkpoint(ckpt, f"stage-2 checkpoint '{path}'", llm_path, trust_remote_code)


def generator_from_checkpoint(
    ckpt: dict[str, Any],
    source: str,
    llm_path: Path | str | None = None,
    trust_remote_code: bool = False,
) -> ReportGenerator:
    """Rebuild the network from a checkpoint already read with ``weights_only=True`` (see :func:`load_stage2`)."""
    record = ckpt.get(RECORD_KEY)
    if not isinstance(record, dict):
        module = ckpt.get("amrg_module")
        written = f" (written by {module})" if module else ""
        raise ValueError(
            f"{source} has no '{RECORD_KEY}' entry{written}: it is not a stage-2 checkpoint of this amrg "
            "(stage-2 checkpoints of amrg < 0.2 named files of their run and must be retrained)"
        )
    _check_record(record, source)
    # Only what is instantiated below names code; the memory manifest's data class is a record, never built.
    check_class_paths({k: record[k] for k in ("classifier", "visual_retriever", "report_retriever")}, source)
    classifier = classifier_from_config(record["classifier"], source)
    width = classifier.qformer.hidden_size
    memories = {
        kind: torch.zeros(len(record[f"{kind}_memory"]["provenance"]), int(record[f"{kind}_memory"]["dim"]))
        for kind in ("visual", "report")
    }
    files = record.get("tokenizer_files")
    llm_info = record["llm"]
    tokenizer = _tokenizer_from_files(files) if files else None
    if llm_info["kind"] == "tiny":
        tiny = TinyLLMConfig(**llm_info["config"])
        assert tokenizer is not None, "checked in _check_record"
        llm = _tiny_llm(tokenizer, tiny, llm_info["dtype"])
    else:
        folder = Path(llm_path) if llm_path is not None else Path(llm_info["path"])
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{source} was trained on the LLM in '{llm_info['path']}', which is not on this machine; give "
                "its folder with --llm_path (the same model: its hashes are checked)"
            )
        mismatch = identity_mismatch(llm_info["identity"], llm_identity(folder))
        if mismatch:
            raise ValueError(
                f"{source}: the LLM in '{folder}' is not the one this checkpoint was trained with: {mismatch}"
            )
        llm, own_tokenizer = load_causal_lm(
            folder, llm_info["dtype"], llm_info.get("attn_implementation", "sdpa"), trust_remote_code
        )
        tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    llm = _set_training(
        llm,
        llm_info["training"],
        LoRAConfig(**llm_info["lora"]),
        bool(
            llm_info.get("gradient_checkpointing", False)
        ),  # absent in checkpoints written before the switch
    )
    retrievers = {
        name: _retriever_from_config(record[name], width, memories[name.split("_")[0]], source)
        for name in ("visual_retriever", "report_retriever")
    }
    net = ReportGenerator(
        classifier=classifier,
        llm=llm,
        tokenizer=tokenizer,
        visual_retriever=retrievers["visual_retriever"],
        report_retriever=retrievers["report_retriever"],
        visual_provenance=record["visual_memory"]["provenance"],
        report_provenance=record["report_memory"]["provenance"],
        **record["settings"],
    )
    net.build_record = {k: v for k, v in record.items() if k not in ("visual_memory", "report_memory")}
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    load_state_strict(net, state, f"{source}: weights", optional=base_llm_keys(net))
    return net.eval()


def _check_record(record: dict[str, Any], source: str) -> None:
    problems = []
    if record.get("format_version") != _FORMAT_VERSION:
        problems.append(f"format_version {record.get('format_version')!r}, this amrg reads {_FORMAT_VERSION}")
    if record.get("labels") != list(LABELS):
        problems.append(f"labels {record.get('labels')!r} differ from the 14 CheXpert labels")
    for key in ("classifier", "visual_retriever", "report_retriever", "llm", "settings"):
        if not isinstance(record.get(key), dict):
            problems.append(f"'{key}' is missing")
    for key in ("visual_memory", "report_memory"):
        entry = record.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("provenance"), list) or "dim" not in entry:
            problems.append(f"'{key}' lacks its dim or provenance")
    llm = record.get("llm") if isinstance(record.get("llm"), dict) else {}
    if llm.get("kind") not in ("tiny", "pretrained"):
        problems.append(f"llm kind {llm.get('kind')!r} is neither 'tiny' nor 'pretrained'")
    if llm.get("kind") == "tiny" and not record.get("tokenizer_files"):
        problems.append("a tiny LLM without its tokenizer files")
    if problems:
        raise ValueError(f"{source}: the '{RECORD_KEY}' record is not usable: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Helpers


def _as_dataclass(value: Any, cls: type, name: str) -> Any:
    """Accept a dataclass instance or its dict form (as stored in a checkpoint or written in Python)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        from dataclasses import fields

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**value)
    raise ValueError(f"{name}: expected {cls.__name__} or a mapping, got {type(value).__name__}")


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in TOKENIZER_FILES)


def _train_tokenizer(texts: Sequence[str], tiny: TinyLLMConfig, where: str) -> PreTrainedTokenizerBase:
    if not texts:
        raise ValueError(
            f"{where}: the report memory holds no report texts to train the tiny LLM's tokenizer on"
        )
    with tempfile.TemporaryDirectory(prefix="amrg-tokenizer-") as tmp:
        tokenizer = train_report_tokenizer(
            texts,
            Path(tmp),
            vocab_size=tiny.vocab_size,
            style=tiny.tokenizer_style,
            min_frequency=tiny.min_frequency,
        )
    _logger.info(
        "trained a %s-style tokenizer (%d tokens) on %d report texts",
        tiny.tokenizer_style,
        len(tokenizer),
        len(texts),
    )
    return tokenizer


def _tiny_llm(tokenizer: PreTrainedTokenizerBase, tiny: TinyLLMConfig, dtype: DType) -> nn.Module:
    return build_tiny_llm(
        tokenizer,
        hidden_size=tiny.hidden_size,
        num_layers=tiny.num_layers,
        num_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        family=tiny.family,
        dtype=dtype,
        max_position_embeddings=tiny.max_position_embeddings,
    )


def _set_training(
    llm: nn.Module, mode: str, lora: LoRAConfig, gradient_checkpointing: bool = False
) -> nn.Module:
    if gradient_checkpointing:
        if mode == "frozen":
            _logger.warning(
                "gradient_checkpointing has no effect with llm_training='frozen': the frozen LLM runs in eval "
                "mode, where transformers does not checkpoint"
            )
        enable_gradient_checkpointing(llm)  # on the plain model, before peft wraps it
    if mode == "lora":
        return apply_lora(
            llm, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
        )
    if mode == "frozen":
        return freeze(llm)
    return llm


def _tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str] | None:
    """The tokenizer's text files, to store in a checkpoint (plain strings, no pickle); None when its
    vocabulary is binary only (a sentencepiece model), which then comes from the LLM folder."""
    with tempfile.TemporaryDirectory(prefix="amrg-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file() and path.stat().st_size <= _MAX_TOKENIZER_FILE:
                try:
                    files[path.name] = path.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    continue
    return files if any(name in files for name in _TEXT_VOCABULARIES) else None


def _tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory(prefix="amrg-tokenizer-") as tmp:
        for name, text in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"checkpoint tokenizer file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        # trust_remote_code stays off: a tokenizer stored in a checkpoint never brings code
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)


def _factory_config(factory: Any, name: str) -> dict[str, Any]:
    """The ``class_path``/``init_args`` form of a retriever factory (a class or a partial of one)."""
    if isinstance(factory, type):
        return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": {}}
    if isinstance(factory, functools.partial):
        # functools.partial(Class, **kw) in Python; jsonargparse wraps the class as the partial's last
        # positional argument (partial(call_without_instantiate_context, instantiator, Class, **kw)).
        cls = factory.func if isinstance(factory.func, type) else (factory.args or (None,))[-1]
        init_args = dict(factory.keywords)
        if isinstance(cls, type) and is_plain(init_args):
            return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
    raise ValueError(
        f"{name} must be a retriever class or a functools.partial of one with plain keyword arguments "
        f"(what a class_path + init_args in YAML gives), got {factory!r}; it is stored in the checkpoint"
    )


def _retriever_from_config(config: dict[str, Any], width: int, memory: Tensor, source: str) -> nn.Module:
    path = config.get("class_path")
    module_name, _, class_name = str(path).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)  # allow-listed in the caller
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise UntrustedCheckpointError(f"{source}: retriever class_path {path!r} is not an nn.Module class")
    return cls(width, memory, **dict(config.get("init_args") or {}))
