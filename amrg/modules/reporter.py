"""Stage-2 training: :class:`ReporterModule` builds and trains the stage-2 network,
:class:`~amrg.models.reporter.ReportGenerator` (Wang et al., 2025, AM-MRG, https://arxiv.org/abs/2501.03458).

The network depends on files (the stage-1 checkpoint, the two memory banks, the LLM folder or a
tokenizer trained on the training reports), so the module takes their paths as explicit arguments and
builds the network in Lightning's ``configure_model`` hook, where the datamodule is ready: its
training reports train a tiny LLM's tokenizer when none exists yet, and its val/test ids guard the
memories against leakage. ``load_from_checkpoint`` rebuilds it from the checkpoint (see
:meth:`ReporterModule.on_load_checkpoint`).

Checkpoints hold what training changed and what cannot be rebuilt: trainable weights (prefix
projection, retrievers, LoRA adapters or a tiny LLM), the sampled memory patterns (retriever buffers),
their provenance and the sampling record, and a trained tokenizer's files. Frozen stage-1 weights and a
frozen LLM loaded from ``llm_path`` are referenced by path and rebuilt from it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from amrg.data.batch import Batch
from amrg.labels import LABELS, NUM_LABELS
from amrg.memory.bank import MemoryBank
from amrg.models.classifier import DiseaseClassifier
from amrg.models.llm import (
    DEFAULT_INSTRUCTION,
    DType,
    LoRAConfig,
    apply_lora,
    build_tiny_llm,
    freeze,
    load_causal_lm,
)
from amrg.models.reporter import ReportGenerator
from amrg.models.retrievers import HopfieldRetriever
from amrg.models.tokenizer import train_report_tokenizer
from amrg.modules._hparams import is_plain
from amrg.modules._optim import configure_optimizer
from amrg.modules.classifier import load_classifier

__all__ = [
    "CHECKPOINT_KEY",
    "DecodingConfig",
    "MemorySampling",
    "ReporterModule",
    "RetrieverFactory",
    "TinyLLMConfig",
]

_logger = logging.getLogger(__name__)

try:  # Lightning >= 2.3 sets this while LightningCLI instantiates the model (changelog #18105).
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older Lightning: treat every construction as plain Python
    _given_hyperparameters = None


def _ignore_eval_mode_warning() -> None:
    """Stage 2 keeps the frozen stage-1 network (and a frozen LLM) in eval mode on purpose (no dropout in
    parts that do not train); Lightning >= 2.5 warns about every module in eval mode when fitting starts."""
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=UserWarning,
        module="lightning.pytorch.loops.fit_loop",
    )


_ignore_eval_mode_warning()

RetrieverFactory = Callable[[int, Tensor], nn.Module]
"""Builds a retriever from the query width D and the stored patterns [M, D_m]: a retriever class from
:mod:`amrg.models.retrievers` (``class_path`` + ``init_args`` without ``dim`` and ``memory`` in YAML)."""

CHECKPOINT_KEY = "amrg_reporter"
"""Checkpoint entry holding the memory provenance, the sampling record and a trained tokenizer's files."""

_CHECKPOINT_FORMAT = 1
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_MAX_TOKENIZER_FILE = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Option groups


@dataclass
class MemorySampling:
    """How a memory bank is sampled, once, when the stage-2 network is first built."""

    total: int | None = None
    """Patterns kept in all, shared out in proportion to each label's count (paper, report memory:
    6000); null keeps everything under per_label_max."""
    per_label_max: int | None = None
    """Most patterns kept per label (paper, visual memory: 500); null for no cap."""
    seed: int = 0
    """Seed of the sampling; recorded in the stage-2 checkpoint."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 0 or null, got {value!r}"
            for name, value in (("total", self.total), ("per_label_max", self.per_label_max))
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0)
        ]
        if problems:
            raise ValueError("invalid memory sampling: " + "; ".join(problems))


@dataclass
class TinyLLMConfig:
    """A randomly initialised causal LM trained from scratch, with a BPE tokenizer trained on the training
    reports (demo, tests, debugging; see :func:`amrg.models.llm.build_tiny_llm`)."""

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

    def __post_init__(self) -> None:
        problems = []
        if self.num_beams < 1:
            problems.append(f"decoding.num_beams must be >= 1, got {self.num_beams}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or self.max_new_tokens < 1:
            problems.append(
                "decoding needs 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
                f"{self.min_new_tokens} and {self.max_new_tokens}"
            )
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# The module


class ReporterModule(LightningModule):
    """Trains the stage-2 :class:`ReportGenerator` (teacher-forced report loss) and generates reports.

    Logs ``train/loss``, ``val/loss`` and ``test/loss``. ``validation_step`` and ``test_step`` generate
    reports and return ``{"ids", "hypotheses", "references"}`` for
    :class:`amrg.metrics.callback.ReportMetricsCallback`; ``predict_step`` returns ``{"ids", "reports",
    "probabilities", "explanations"}``.

    The network is built by :meth:`configure_model` inside a Trainer run, by ``load_from_checkpoint``,
    or by calling :meth:`build` directly; ``net`` is None until then.

    Args:
        stage1_checkpoint: the stage-1 ``.ckpt`` written by ``amrg fit`` (ClassifierModule); its encoder,
            Q-Former and head are rebuilt from it alone.
        visual_memory: stem of the visual memory bank (``<stem>.safetensors`` + ``<stem>.json``) from
            ``amrg memory build``; patterns in the stage-1 Q-Former width.
        report_memory: stem of the report memory bank (any text-encoder width).
        visual_retriever: retriever over [disease-query embeddings ⊕ visual memory], called with
            (Q-Former width, stored patterns).
        report_retriever: retriever over the report memory, called the same way.
        visual_sampling: one-time sampling of the visual memory (paper: at most 500 per label).
        report_sampling: one-time sampling of the report memory (paper: 6000 in proportion to labels).
        llm_path: a local Hugging Face causal LM folder (``save_pretrained`` layout); never downloaded.
            Exactly one of llm_path and tiny_llm.
        tokenizer_path: tokenizer folder. With llm_path: optional (default: the LLM folder). With
            tiny_llm: required; loaded when it exists, else trained there from the training reports.
        tiny_llm: build a random tiny LLM instead of loading one.
        llm_training: ``"lora"`` (adapters only; paper), ``"frozen"`` (prefix and retrievers only) or
            ``"full"`` (every LLM weight; what a tiny LLM from scratch needs).
        lora: LoRA options (paper: r=16 on q_proj/v_proj).
        dtype: LLM parameter dtype (paper: bfloat16).
        attn_implementation: attention kernel of an LLM loaded from llm_path.
        trust_remote_code: allow model code shipped in the LLM folder.
        freeze_encoder: keep the stage-1 vision encoder frozen (paper: frozen).
        freeze_qformer: keep the stage-1 Q-Former frozen (paper: frozen).
        instruction: the request in the prompt (paper / R2GenGPT wording by default).
        prompt_template: ``"auto"`` (the tokenizer's chat template when it has one), ``"chat"`` or
            ``"plain"``.
        system_prompt: optional system turn (chat template only).
        max_report_tokens: report tokens kept for teacher forcing (paper: 60 IU X-ray, 100 otherwise).
        decoding: beam-search settings for validation, test and prediction.
        explain_top_k: recalled items per memory that ``predict_step`` returns per study.
        optimizer: optimiser factory, called with the trainable parameter groups (no weight decay on
            parameters with fewer than 2 dimensions); paper: AdamW, lr 1e-4.
        scheduler: LR-scheduler factory called with the optimiser (e.g.
            ``amrg.modules._optim.WarmupCosineLR``; paper: cosine); None keeps the LR constant.
        scheduler_interval: step the scheduler every optimiser ``"step"`` or every ``"epoch"``.
    """

    def __init__(
        self,
        stage1_checkpoint: Path,
        visual_memory: Path,
        report_memory: Path,
        visual_retriever: RetrieverFactory = HopfieldRetriever,
        report_retriever: RetrieverFactory = HopfieldRetriever,
        visual_sampling: MemorySampling = MemorySampling(per_label_max=500),  # noqa: B008 - plain data
        report_sampling: MemorySampling = MemorySampling(total=6000),  # noqa: B008 - plain data
        llm_path: Path | None = None,
        tokenizer_path: Path | None = None,
        tiny_llm: TinyLLMConfig | None = None,
        llm_training: Literal["lora", "frozen", "full"] = "lora",
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008 - plain data
        dtype: DType = "float32",
        attn_implementation: AttnImplementation = "sdpa",
        trust_remote_code: bool = False,
        freeze_encoder: bool = True,
        freeze_qformer: bool = True,
        instruction: str = DEFAULT_INSTRUCTION,
        prompt_template: Literal["auto", "chat", "plain"] = "auto",
        system_prompt: str | None = None,
        max_report_tokens: int = 100,
        decoding: DecodingConfig = DecodingConfig(),  # noqa: B008 - plain data
        explain_top_k: int = 5,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        given = _given_hyperparameters.get() if _given_hyperparameters is not None else None
        super().__init__()
        args = dict(locals())
        for key in ("self", "given", "__class__"):
            args.pop(key, None)
        if given is not None:
            # Under LightningCLI the parsed config (class_path/init_args, plain data) is stored, so
            # load_from_checkpoint rebuilds the module through jsonargparse without the YAML.
            self.save_hyperparameters()
        else:
            # Built in Python: store a plain-data copy (dataclasses as dicts, classes as class paths) so
            # checkpoints load with weights_only=True; anything else is left out and must be passed to
            # load_from_checkpoint again.
            self.save_hyperparameters(_plain_hparams(args))

        self.stage1_checkpoint = Path(stage1_checkpoint)
        self.visual_memory_path = Path(visual_memory)
        self.report_memory_path = Path(report_memory)
        self.visual_retriever_factory = _as_callable(visual_retriever, RetrieverFactory, "visual_retriever")
        self.report_retriever_factory = _as_callable(report_retriever, RetrieverFactory, "report_retriever")
        self.visual_sampling = _as_dataclass(visual_sampling, MemorySampling, "visual_sampling")
        self.report_sampling = _as_dataclass(report_sampling, MemorySampling, "report_sampling")
        self.llm_path = Path(llm_path) if llm_path is not None else None
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.tiny_llm = _as_dataclass(tiny_llm, TinyLLMConfig, "tiny_llm") if tiny_llm is not None else None
        self.llm_training = llm_training
        self.lora = _as_dataclass(lora, LoRAConfig, "lora")
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.freeze_encoder = freeze_encoder
        self.freeze_qformer = freeze_qformer
        self.instruction = instruction
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.max_report_tokens = max_report_tokens
        self.decoding = _as_dataclass(decoding, DecodingConfig, "decoding")
        self.explain_top_k = explain_top_k
        self.optimizer_factory = _as_callable(optimizer, OptimizerCallable, "optimizer")
        self.scheduler_factory = (
            _as_callable(scheduler, LRSchedulerCallable, "scheduler") if scheduler is not None else None
        )
        self.scheduler_interval = scheduler_interval

        problems = []
        if (self.llm_path is None) == (self.tiny_llm is None):
            problems.append(
                "set exactly one of model.init_args.llm_path (a local Hugging Face causal LM folder) and "
                "model.init_args.tiny_llm (a random tiny LLM trained from scratch)"
            )
        if self.tiny_llm is not None and self.tokenizer_path is None:
            problems.append(
                "tiny_llm needs model.init_args.tokenizer_path: the folder its report tokenizer is loaded "
                "from, or trained into from the training reports"
            )
        if llm_training not in ("lora", "frozen", "full"):
            problems.append(f"llm_training must be 'lora', 'frozen' or 'full', got {llm_training!r}")
        if dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        if max_report_tokens < 1:
            problems.append(f"max_report_tokens must be >= 1, got {max_report_tokens}")
        if explain_top_k < 0:
            problems.append(f"explain_top_k must be >= 0, got {explain_top_k}")
        if problems:
            raise ValueError("ReporterModule: " + "; ".join(problems))

        self.net: ReportGenerator | None = None
        self._memory_records: dict[str, dict[str, Any]] = {}
        self._tokenizer_files: dict[str, str] | None = None

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Build the network inside a Trainer run (after the datamodule's ``setup``).

        Outside a Trainer (``load_from_checkpoint`` calls this hook first) nothing happens: the network
        is then built by :meth:`on_load_checkpoint`, or by an explicit :meth:`build`.
        """
        if self._trainer is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        forbidden = _evaluation_ids(datamodule)
        if self.net is not None:
            self._check_leakage(forbidden)
            return
        tiny = self.tiny_llm
        if tiny is not None and not _is_tokenizer_dir(self.tokenizer_path):
            # One process trains the tokenizer into the shared folder; the others wait, then load it.
            if self.trainer.is_global_zero:
                train_reports = _train_reports(datamodule, self.tokenizer_path)
                assert self.tokenizer_path is not None
                train_report_tokenizer(
                    train_reports,
                    self.tokenizer_path,
                    vocab_size=tiny.vocab_size,
                    style=tiny.tokenizer_style,
                    min_frequency=tiny.min_frequency,
                )
                rank_zero_info(
                    f"trained a {tiny.tokenizer_style}-style tokenizer on {len(train_reports)} training "
                    f"reports into {self.tokenizer_path}"
                )
            self.trainer.strategy.barrier("amrg_reporter_tokenizer")
        self.build(forbidden_ids=forbidden)

    def build(
        self,
        train_reports: Sequence[str] | None = None,
        forbidden_ids: Iterable[str] = (),
        restore: dict[str, Any] | None = None,
    ) -> ReportGenerator:
        """Load the stage-1 network, the memories and the LLM and assemble :attr:`net` (once).

        Args:
            train_reports: cleaned training-split reports to train a tiny LLM's tokenizer on when
                ``tokenizer_path`` holds none yet.
            forbidden_ids: study ids of the run's val/test splits; a memory holding one is refused.
            restore: the :data:`CHECKPOINT_KEY` entry of a stage-2 checkpoint: the memories are then
                sized from it (their patterns come with the checkpoint's state dict) and a trained
                tokenizer is taken from it, so the memory files and the tokenizer folder are not read.

        Returns:
            The network, also stored as :attr:`net`.

        Raises:
            FileNotFoundError: every missing file or folder, in one message.
            ValueError: a stage-1 checkpoint, memory or LLM that does not fit (named with its path).
        """
        if self.net is not None:
            return self.net
        if restore is not None:
            _check_restore_record(restore)
        self._check_files(
            restoring=restore is not None, can_train_tokenizer=bool(train_reports), restore=restore
        )
        classifier = self._load_stage1()
        width = classifier.qformer.hidden_size
        forbidden = set(forbidden_ids)
        visual, visual_provenance = self._memory("visual", width, forbidden, restore)
        report, report_provenance = self._memory("report", width, forbidden, restore)
        tokenizer, llm = self._load_llm(train_reports, restore)
        try:
            visual_retriever = self.visual_retriever_factory(width, visual)
            report_retriever = self.report_retriever_factory(width, report)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot build the retrievers (model.init_args.*_retriever): {err}") from err
        decoding = self.decoding
        self.net = ReportGenerator(
            classifier=classifier,
            llm=llm,
            tokenizer=tokenizer,
            visual_retriever=visual_retriever,
            report_retriever=report_retriever,
            freeze_encoder=self.freeze_encoder,
            freeze_qformer=self.freeze_qformer,
            instruction=self.instruction,
            prompt_template=self.prompt_template,
            system_prompt=self.system_prompt,
            max_report_tokens=self.max_report_tokens,
            num_beams=decoding.num_beams,
            repetition_penalty=decoding.repetition_penalty,
            length_penalty=decoding.length_penalty,
            min_new_tokens=decoding.min_new_tokens,
            max_new_tokens=decoding.max_new_tokens,
            visual_provenance=visual_provenance,
            report_provenance=report_provenance,
        )
        self._log_built()
        return self.net

    def _check_files(
        self, restoring: bool, can_train_tokenizer: bool, restore: dict[str, Any] | None
    ) -> None:
        """Check every path up front and raise once, naming each missing one and what was expected."""
        problems = []
        if not self.stage1_checkpoint.is_file():
            problems.append(
                f"stage-1 checkpoint '{self.stage1_checkpoint}' not found "
                "(model.init_args.stage1_checkpoint): "
                "expected the .ckpt file that `amrg fit` wrote for stage 1"
            )
        if not restoring:
            for kind, stem in (("visual", self.visual_memory_path), ("report", self.report_memory_path)):
                missing = [str(p) for p in _bank_files(stem) if not p.is_file()]
                if missing:
                    problems.append(
                        f"{kind} memory '{stem}' not found (model.init_args.{kind}_memory): expected "
                        f"{' and '.join(missing)}, written by `amrg memory build`"
                    )
        if self.llm_path is not None and not self.llm_path.is_dir():
            problems.append(
                f"LLM folder '{self.llm_path}' not found (model.init_args.llm_path): expected a local folder "
                "with config.json, the weights and the tokenizer files, as written by save_pretrained; "
                "models are never downloaded at run time"
            )
        has_stored_tokenizer = bool(restore and restore.get("tokenizer_files"))
        if self.tokenizer_path is not None and not has_stored_tokenizer:
            found = _is_tokenizer_dir(self.tokenizer_path)
            if self.llm_path is not None and not found:
                problems.append(
                    f"tokenizer folder '{self.tokenizer_path}' not found (model.init_args.tokenizer_path): "
                    f"expected a Hugging Face tokenizer folder ({' or '.join(_TOKENIZER_FILES)})"
                )
            elif self.tiny_llm is not None and not found and not can_train_tokenizer:
                problems.append(
                    f"tokenizer folder '{self.tokenizer_path}' not found (model.init_args.tokenizer_path): "
                    f"expected a Hugging Face tokenizer folder ({' or '.join(_TOKENIZER_FILES)}); a new one "
                    "is trained there from the training reports only inside a Trainer run whose datamodule "
                    "has a train split"
                )
        if problems:
            raise FileNotFoundError("ReporterModule cannot be built:\n  - " + "\n  - ".join(problems))

    def _load_stage1(self) -> DiseaseClassifier:
        path = self.stage1_checkpoint
        try:
            classifier = load_classifier(path)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # torch.load's own errors on a file that is no checkpoint
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise ValueError(
                f"stage-1 checkpoint '{path}' (model.init_args.stage1_checkpoint) could not be read as a "
                f"checkpoint ({type(err).__name__}: {first_line}); expected the .ckpt file that `amrg fit` "
                "wrote for stage 1"
            ) from err
        if classifier.num_labels != NUM_LABELS:
            raise ValueError(
                f"stage-1 checkpoint '{path}' predicts {classifier.num_labels} labels, but stage 2 needs the "
                f"{NUM_LABELS} CheXpert labels ({', '.join(LABELS)})"
            )
        return classifier

    def _memory(
        self,
        kind: Literal["visual", "report"],
        width: int,
        forbidden: set[str],
        restore: dict[str, Any] | None,
    ) -> tuple[Tensor, list[dict[str, Any]]]:
        """Stored patterns [M, D_m] and provenance of one memory, from its bank or a checkpoint record."""
        key = f"{kind}_memory"
        if restore is not None:
            record = restore[key]
            # The patterns arrive with the state dict; an empty [0, D_m] buffer is resized by the load.
            patterns = torch.zeros(0, int(record["dim"]))
            self._memory_records[kind] = record
            return patterns, list(record["provenance"])
        path = self.visual_memory_path if kind == "visual" else self.report_memory_path
        sampling = self.visual_sampling if kind == "visual" else self.report_sampling
        bank = MemoryBank.load(
            path,
            expected_dim=width if kind == "visual" else None,
            expected_labels=LABELS,
            forbidden_ids=forbidden,
            expected_kind=kind,
            dim_name=f"the Q-Former width of stage-1 checkpoint '{self.stage1_checkpoint}'",
        )
        sampled = bank.sample(total=sampling.total, per_label_max=sampling.per_label_max, seed=sampling.seed)
        if len(sampled) == 0:
            raise ValueError(
                f"{kind} memory '{path}' (model.init_args.{key}) holds no patterns after sampling "
                f"({asdict(sampling)}); rebuild it with `amrg memory build`"
            )
        patterns, _, provenance = sampled.stacked()
        self._memory_records[kind] = {
            "path": str(path),
            "dim": bank.dim,
            "sampling": asdict(sampling),
            "counts": sampled.counts(),
            "metadata": sampled.metadata,
            "provenance": provenance,
        }
        return patterns, provenance

    def _load_llm(
        self, train_reports: Sequence[str] | None, restore: dict[str, Any] | None
    ) -> tuple[PreTrainedTokenizerBase, nn.Module]:
        stored = restore.get("tokenizer_files") if restore is not None else None
        tokenizer: PreTrainedTokenizerBase | None = None
        if stored:
            tokenizer = _tokenizer_from_files(stored)
            self._tokenizer_files = dict(stored)
        if self.llm_path is not None:
            model, own_tokenizer = load_causal_lm(
                self.llm_path, self.dtype_name, self.attn_implementation, self.trust_remote_code
            )
            if tokenizer is None and self.tokenizer_path is not None:
                tokenizer = AutoTokenizer.from_pretrained(
                    str(self.tokenizer_path), local_files_only=True, trust_remote_code=self.trust_remote_code
                )
            tokenizer = tokenizer if tokenizer is not None else own_tokenizer
            rows = model.get_input_embeddings().weight.shape[0]
            if len(tokenizer) > rows:
                raise ValueError(
                    f"tokenizer '{self.tokenizer_path}' has {len(tokenizer)} tokens but the LLM "
                    f"'{self.llm_path}' "
                    f"embeds only {rows}; they do not belong together"
                )
        else:
            tiny = self.tiny_llm
            assert tiny is not None and self.tokenizer_path is not None
            if tokenizer is None:
                if _is_tokenizer_dir(self.tokenizer_path):
                    tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path), local_files_only=True)
                    rank_zero_info(f"loaded the report tokenizer from {self.tokenizer_path}")
                else:
                    assert train_reports, "checked in _check_files"
                    tokenizer = train_report_tokenizer(
                        train_reports,
                        self.tokenizer_path,
                        vocab_size=tiny.vocab_size,
                        style=tiny.tokenizer_style,
                        min_frequency=tiny.min_frequency,
                    )
                    rank_zero_info(
                        f"trained a {tiny.tokenizer_style}-style tokenizer on {len(train_reports)} training "
                        f"reports into {self.tokenizer_path}"
                    )
                self._tokenizer_files = _read_tokenizer_files(self.tokenizer_path)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tiny.seed)
                model = build_tiny_llm(
                    tokenizer,
                    hidden_size=tiny.hidden_size,
                    num_layers=tiny.num_layers,
                    num_heads=tiny.num_heads,
                    intermediate_size=tiny.intermediate_size,
                    family=tiny.family,
                    dtype=self.dtype_name,
                    max_position_embeddings=tiny.max_position_embeddings,
                )
        if self.llm_training == "lora":
            lora = self.lora
            model = apply_lora(
                model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
            )
        elif self.llm_training == "frozen":
            model = freeze(model)
        return tokenizer, model

    def _log_built(self) -> None:
        net = self.net
        assert net is not None

        def counts(module: nn.Module) -> tuple[int, int]:
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            return trainable, sum(p.numel() for p in module.parameters()) - trainable

        parts = {
            "classifier": net.classifier,
            "visual_retriever": net.visual_retriever,
            "report_retriever": net.report_retriever,
            "prefix": nn.ModuleList([net.prefix_proj, net.prefix_norm]),
            "llm": net.llm,
        }
        lines = []
        for name, module in parts.items():
            trainable, frozen = counts(module)
            lines.append(
                f"{name}={type(module).__module__}.{type(module).__name__} "
                f"({trainable} trainable, {frozen} frozen)"
            )
        trainable, frozen = counts(net)
        rank_zero_info(
            f"stage 2: built ReportGenerator: {'; '.join(lines)}; total {trainable} trainable, {frozen} "
            f"frozen parameters; memories: {len(net.visual_provenance)} visual and "
            f"{len(net.report_provenance)} report patterns"
        )

    def _check_leakage(self, forbidden: set[str]) -> None:
        if not forbidden or self.net is None:
            return
        for kind, provenance in (
            ("visual", self.net.visual_provenance),
            ("report", self.net.report_provenance),
        ):
            leaked = sorted({str(r.get("source_id")) for r in provenance} & forbidden)
            if leaked:
                shown = ", ".join(repr(x) for x in leaked[:10])
                raise ValueError(
                    f"{kind} memory of this stage-2 model holds {len(leaked)} id(s) of the datamodule's "
                    f"val/test splits ({shown}); memories must come from the train split only"
                )

    # ------------------------------------------------------------------ checkpoints
    def _require_net(self) -> ReportGenerator:
        if self.net is None:
            raise RuntimeError(
                "ReporterModule.net is not built yet: run it in a Trainer, load it with "
                "ReporterModule.load_from_checkpoint, or call build()"
            )
        return self.net

    def _rebuildable_keys(self, keys: Iterable[str]) -> set[str]:
        """State-dict keys of frozen weights that are rebuilt from a path and so not checkpointed."""
        prefixes = ["net.classifier."]
        if self.llm_path is not None:
            prefixes.append("net.llm.")
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        out = set()
        for key in keys:
            if not key.startswith(tuple(prefixes)):
                continue
            param = params.get(key)
            if param is not None:
                if not param.requires_grad:
                    out.add(key)
                continue
            owner = modules.get(key.rsplit(".", 1)[0])
            # A buffer of a module that trains (e.g. running statistics) changes and is kept.
            if owner is None or not any(p.requires_grad for p in owner.parameters(recurse=False)):
                out.add(key)
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop rebuildable frozen weights; record memory provenance, sampling and a trained tokenizer."""
        net = self._require_net()
        state = checkpoint.get("state_dict", {})
        dropped = self._rebuildable_keys(state.keys())
        checkpoint["state_dict"] = type(state)((k, v) for k, v in state.items() if k not in dropped)
        records = {}
        for kind in ("visual", "report"):
            record = dict(self._memory_records.get(kind, {}))
            record["provenance"] = net.visual_provenance if kind == "visual" else net.report_provenance
            record.setdefault(
                "dim", _memory_dim(net.visual_retriever if kind == "visual" else net.report_retriever)
            )
            records[f"{kind}_memory"] = record
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": _CHECKPOINT_FORMAT,
            "labels": list(LABELS),
            "image_size": net.image_size,
            "stage1_checkpoint": str(self.stage1_checkpoint),
            "llm_path": str(self.llm_path) if self.llm_path is not None else None,
            "tokenizer_files": self._tokenizer_files,
            **records,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the network from the checkpoint record if needed, and take its memory provenance."""
        record = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(record, dict):
            raise ValueError(
                f"this checkpoint has no '{CHECKPOINT_KEY}' entry: it was not written by ReporterModule"
            )
        _check_restore_record(record)
        if self.net is None:
            self.build(restore=record)
        else:
            stored = record.get("tokenizer_files")
            if (
                stored
                and self._tokenizer_files
                and stored.get("tokenizer.json") != self._tokenizer_files.get("tokenizer.json")
            ):
                raise ValueError(
                    f"the tokenizer in '{self.tokenizer_path}' (model.init_args.tokenizer_path) differs from the "
                    "one this checkpoint was trained with; point tokenizer_path at the run's own tokenizer "
                    "folder, or load the checkpoint with ReporterModule.load_from_checkpoint, which uses the "
                    "tokenizer stored in it"
                )
            for kind in ("visual", "report"):
                self._memory_records[kind] = dict(record[f"{kind}_memory"])
            self.net.set_provenance(
                visual=record["visual_memory"]["provenance"], report=record["report_memory"]["provenance"]
            )

    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load a (filtered) stage-2 state dict; frozen weights rebuilt from their paths may be absent."""
        self._require_net()
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        rebuildable = self._rebuildable_keys(result.missing_keys)
        missing = [k for k in result.missing_keys if k not in rebuildable]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ steps
    def on_fit_start(self) -> None:
        _ignore_eval_mode_warning()  # again here: test runners and notebooks reset warning filters

    def forward(self, images: Tensor, view_mask: Tensor | None, reports: Sequence[str]) -> Tensor:
        """Training loss, [B, V, 3, H, W] + [B, V] + B reports -> scalar."""
        return self._require_net()(images, view_mask, reports)

    def training_step(self, batch: Batch | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every study of the batch was skipped (on_bad_image="skip")
            return None
        loss = self(batch.images, batch.view_mask, batch.reports)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch))
        return loss

    def _eval_step(self, stage: str, batch: Batch | None) -> dict[str, list[str]]:
        if batch is None:
            return {"ids": [], "hypotheses": [], "references": []}
        net = self._require_net()
        visual = net.encode(batch.images, batch.view_mask)
        loss = net.loss_from_prefix(visual, batch.reports)
        self.log(
            f"{stage}/loss",
            loss,
            on_epoch=True,
            prog_bar=stage == "val",
            batch_size=len(batch),
            sync_dist=True,
        )
        hypotheses = net.generate_from_prefix(visual)
        return {"ids": list(batch.ids), "hypotheses": hypotheses, "references": list(batch.reports)}

    def validation_step(self, batch: Batch | None, batch_idx: int) -> dict[str, list[str]]:
        return self._eval_step("val", batch)

    def test_step(self, batch: Batch | None, batch_idx: int) -> dict[str, list[str]]:
        return self._eval_step("test", batch)

    def predict_step(self, batch: Batch | None, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"ids", "reports", "probabilities" [B, 14] (CheXbert order), "explanations"}``; each
        explanation is a list of ``{"memory", "source_id", "label", "text"?, "weight"}``."""
        if batch is None:
            return {"ids": [], "reports": [], "probabilities": torch.zeros(0, NUM_LABELS), "explanations": []}
        prediction = self._require_net().predict(batch.images, batch.view_mask, top_k=self.explain_top_k)
        return {
            "ids": list(batch.ids),
            "reports": prediction.reports,
            "probabilities": prediction.probabilities,
            "explanations": [[item.as_dict() for item in items] for items in prediction.explanations],
        }

    # ------------------------------------------------------------------ wiring
    def configure_optimizers(self) -> Any:
        self._require_net()
        model = self.trainer.model if self._trainer is not None else self
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        total_steps = int(total) if total is not None and math.isfinite(total) else None
        return configure_optimizer(
            model, self.optimizer_factory, self.scheduler_factory, total_steps, self.scheduler_interval
        )


# --------------------------------------------------------------------------------------------------
# Helpers


def _bank_files(stem: Path) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _is_tokenizer_dir(path: Path | None) -> bool:
    return path is not None and path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def _read_tokenizer_files(folder: Path) -> dict[str, str]:
    """The text files of a tokenizer folder, to store in a checkpoint (plain strings, no pickle)."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.stat().st_size <= _MAX_TOKENIZER_FILE:
            try:
                files[path.name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # a binary file (e.g. a sentencepiece model) stays referenced by path
    return files


def _tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer from the files stored in a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="amrg-tokenizer-") as tmp:
        for name, text in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"checkpoint tokenizer file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _check_restore_record(record: dict[str, Any]) -> None:
    problems = []
    if record.get("format_version") != _CHECKPOINT_FORMAT:
        problems.append(
            f"format_version {record.get('format_version')!r}, this amrg reads {_CHECKPOINT_FORMAT}"
        )
    if record.get("labels") != list(LABELS):
        problems.append(f"labels {record.get('labels')!r} differ from the 14 CheXpert labels {list(LABELS)}")
    for key in ("visual_memory", "report_memory"):
        entry = record.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("provenance"), list) or "dim" not in entry:
            problems.append(f"'{key}' lacks its dim or provenance")
    if problems:
        raise ValueError(
            f"stage-2 checkpoint record '{CHECKPOINT_KEY}' is not usable: " + "; ".join(problems)
        )


def _memory_dim(retriever: nn.Module) -> int:
    memory = getattr(retriever, "memory", None)
    return int(memory.shape[1]) if isinstance(memory, Tensor) and memory.ndim == 2 else 0


def _evaluation_ids(datamodule: Any) -> set[str]:
    """Study ids of the datamodule's val and test splits (empty without an annotation)."""
    annotation = getattr(datamodule, "annotation", None)
    ids = getattr(annotation, "ids", None)
    return set(ids(["val", "test"])) if callable(ids) else set()


def _train_reports(datamodule: Any, tokenizer_path: Path | None) -> list[str]:
    """Cleaned reports of the datamodule's train split, to train a tokenizer on."""
    datasets = getattr(datamodule, "datasets", None)
    dataset = datasets.get("train") if isinstance(datasets, dict) else None
    if dataset is None or not hasattr(dataset, "studies"):
        raise FileNotFoundError(
            f"tokenizer folder '{tokenizer_path}' not found (model.init_args.tokenizer_path), and it cannot "
            "be "
            f"trained: the datamodule ({type(datamodule).__name__}) has no train split to read reports from"
        )
    clean = getattr(dataset, "clean", lambda text: text)
    return [clean(study.report) for study in dataset.studies]


def _plain(value: Any) -> Any:
    """A plain-data form of a constructor argument, or ``_SKIP`` when it has none."""
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        data = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        return _SKIP if any(v is _SKIP for v in data.values()) else data
    if isinstance(value, type):
        return {"class_path": f"{value.__module__}.{value.__qualname__}"}
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        if is_plain(value.keywords):
            return {
                "class_path": f"{value.func.__module__}.{value.func.__qualname__}",
                "init_args": dict(value.keywords),
            }
        return _SKIP
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value if is_plain(value) else _SKIP


_SKIP = object()


def _plain_hparams(args: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in args.items():
        plain = _plain(value)
        if plain is _SKIP:
            _logger.debug("hyperparameter %s is not plain data; not stored in checkpoints", name)
            continue
        out[name] = plain
    return out


def _as_dataclass(value: Any, cls: type, name: str) -> Any:
    """Accept a dataclass instance or its dict form (as stored in a checkpoint)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"model.init_args.{name}: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        data = dict(value)
        if cls is LoRAConfig and isinstance(data.get("target_modules"), list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)
    raise ValueError(
        f"model.init_args.{name}: expected {cls.__name__} or a mapping, got {type(value).__name__}"
    )


def _as_callable(value: Any, type_: Any, name: str) -> Callable[..., Any]:
    """Accept a callable, or its ``{"class_path", "init_args"}`` form (as stored in a checkpoint).

    Only classes whose module is already imported are resolved, so a checkpoint cannot make this import
    arbitrary code (the same rule as Lightning's checkpoint instantiators).
    """
    if callable(value):
        return value
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise ValueError(f"model.init_args.{name}: expected a class_path/init_args mapping, got {value!r}")
    module = value["class_path"].rsplit(".", 1)[0]
    if module not in sys.modules:
        raise ValueError(
            f"model.init_args.{name}: class_path {value['class_path']!r} is in module {module!r}, which is "
            "not "
            "imported; import it before loading this checkpoint"
        )
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{name}", type=type_)
    try:
        cfg = parser.parse_object({name: json.loads(json.dumps(value))})
    except Exception as err:  # jsonargparse raises its own error types
        raise ValueError(f"model.init_args.{name}: cannot parse {value!r}: {err}") from err
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return getattr(instantiate(cfg), name)
