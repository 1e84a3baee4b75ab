"""CheXbert (Smit et al., 2020, "CheXbert: Combining Automatic Labelers and Expert Annotations for
Accurate Radiology Report Labeling Using BERT", arXiv:2004.09167; stanfordmlgroup/CheXbert, MIT
licence): the network, its checkpoint reader, and a labeler with the API of
:class:`amrg.labeling.chexpert.CheXpertLabeler`. Weights come from a local file only.
"""

from __future__ import annotations

import inspect
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from amrg._state import load_state_strict
from amrg.labeling.rows import rows_to_tensor
from amrg.labeling.text import as_text
from amrg.labels import NUM_LABELS

__all__ = ["CheXbertLabeler", "CheXbertNet", "load_chexbert_state_dict"]

log = logging.getLogger(__name__)

# Class indices of CheXbert's heads (stanfordmlgroup/CheXbert, src/constants.py): 0 blank, 1 positive,
# 2 negative, 3 uncertain; the No Finding head has 0 blank and 1 positive.
_CHEXBERT_VALUES: tuple[int | None, ...] = (None, 1, 0, -1)
# Older transformers saved this buffer; newer ones do not register it as persistent.
_OPTIONAL_KEYS = ("bert.embeddings.position_ids",)


class CheXbertNet(nn.Module):
    """CheXbert (Smit et al., 2020, "CheXbert: Combining Automatic Labelers and Expert Annotations for
    Accurate Radiology Report Labeling Using BERT", arXiv:2004.09167): BERT + 14 linear heads on [CLS].

    Parameter names match the released checkpoint and the f1chexbert package (``bert.*``,
    ``linear_heads.{0..13}.*``).

    Args:
        bert: the BERT encoder (``transformers.BertModel``, with its pooler so checkpoint keys match).
        dropout: dropout on [CLS] before the heads (CheXbert uses 0.1; inactive in eval mode).
    """

    def __init__(self, bert: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        hidden = int(bert.config.hidden_size)
        # 13 heads over (blank, positive, negative, uncertain), then No Finding over (blank, positive).
        self.linear_heads = nn.ModuleList(
            [nn.Linear(hidden, 4) for _ in range(NUM_LABELS - 1)] + [nn.Linear(hidden, 2)]
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """Class logits per label.

        Args:
            input_ids: token ids, [B, T].
            attention_mask: 1 for tokens, 0 for padding, [B, T].

        Returns:
            14 tensors in LABELS order: [B, 4] for the first 13, [B, 2] for No Finding.
        """
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]  # [B, T, D]
        cls = self.dropout(hidden[:, 0])  # [B, D]
        return [head(cls) for head in self.linear_heads]


def load_chexbert_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a CheXbert checkpoint (``{"model_state_dict": ...}`` or a bare state dict; ``module.``
    prefixes from DataParallel removed) with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read, or holds no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CheXbert checkpoint {path} not found (set checkpoint=)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        # A truncated download, an HTML error page saved as .pth, a file we may not read: one line.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"CheXbert checkpoint {path}: cannot be read with torch.load(weights_only=True) ({reason})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"CheXbert checkpoint {path}: expected a state dict of tensors "
            "(or a dict with 'model_state_dict'); got something else"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _wordpiece_from_vocab(cls: Any, path: Path) -> Any:
    """A lower-casing WordPiece tokenizer from a ``vocab.txt`` (one token per line, id = line number)."""
    if "vocab" in inspect.signature(cls.__init__).parameters:
        # transformers >= 5 builds the tokenizer from a dict and ignores vocab_file.
        tokens = path.read_text(encoding="utf-8").splitlines()
        return cls(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    return cls(vocab_file=str(path), do_lower_case=True)


class CheXbertLabeler:
    """CheXbert labels from local weights, with the same API as :class:`CheXpertLabeler`.

    Args:
        checkpoint: CheXbert weights (``chexbert.pth``: ``{"model_state_dict": {"module.bert...": ...}}``),
            read with ``torch.load(weights_only=True)``.
        tokenizer: a local tokenizer folder (``save_pretrained`` layout, e.g. bert-base-uncased's) or a
            WordPiece ``vocab.txt``.
        config: BERT config: a folder with ``config.json``, a JSON file, or ``None`` for bert-base-uncased's
            sizes (``transformers.BertConfig()`` defaults, which CheXbert uses).
        device: torch device to run on.
        batch_size: reports per forward pass.
        max_length: tokens per report, [CLS] and [SEP] included (CheXbert truncates at 512).

    Attributes:
        name: which labeler this is, for logs and result files: ``"chexbert:<weights file name>"``.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        tokenizer: str | Path,
        config: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 512,
    ) -> None:
        from transformers import BertConfig, BertModel, BertTokenizerFast

        if batch_size < 1 or max_length < 2:
            raise ValueError(
                f"CheXbertLabeler: batch_size={batch_size}, max_length={max_length}; expected >= 1 and >= 2"
            )
        state = load_chexbert_state_dict(checkpoint)  # first: a bad file fails before BERT is built
        tok_path = Path(tokenizer)
        if tok_path.is_file():
            self.tokenizer = _wordpiece_from_vocab(BertTokenizerFast, tok_path)
        elif tok_path.is_dir():
            self.tokenizer = BertTokenizerFast.from_pretrained(str(tok_path), local_files_only=True)
        else:
            raise FileNotFoundError(
                f"CheXbert tokenizer {tok_path} not found (set tokenizer= to a folder or vocab.txt)"
            )
        if config is None:
            bert_config = BertConfig()
        else:
            cfg_path = Path(config)
            if cfg_path.is_dir():
                bert_config = BertConfig.from_pretrained(str(cfg_path), local_files_only=True)
            elif cfg_path.is_file():
                bert_config = BertConfig.from_json_file(str(cfg_path))
            else:
                raise FileNotFoundError(f"CheXbert config {cfg_path} not found (set config=)")
        if len(self.tokenizer) > bert_config.vocab_size:
            raise ValueError(
                f"CheXbert tokenizer {tok_path} has {len(self.tokenizer)} tokens but the config's "
                f"vocab_size is {bert_config.vocab_size} (set config= or tokenizer=)"
            )
        self.max_length = min(max_length, int(bert_config.max_position_embeddings))
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.net = CheXbertNet(BertModel(bert_config, add_pooling_layer=True))
        load_state_strict(
            self.net,
            state,
            f"CheXbert checkpoint {Path(checkpoint)} does not fit the model (check config=)",
            optional=_OPTIONAL_KEYS,
        )
        self.net.eval().to(self.device)
        self.name = f"chexbert:{Path(checkpoint).name}"
        log.info(
            "CheXbertLabeler: loaded %s (%d parameters) on %s",
            checkpoint,
            sum(p.numel() for p in self.net.parameters()),
            self.device,
        )

    @torch.inference_mode()
    def label_batch(self, reports: Sequence[str | None], progress: bool = False) -> list[list[int | None]]:
        """Label many reports; one row of 14 values (1, 0, -1, None) per report, LABELS order."""
        texts = [" ".join(as_text(r).split()) for r in reports]
        rows: list[list[int | None]] = [[None] * NUM_LABELS for _ in texts]
        todo = [i for i, t in enumerate(texts) if t]  # an empty report has no labels, as for CheXpertLabeler
        batches = range(0, len(todo), self.batch_size)
        for b in tqdm(batches, desc="CheXbert", disable=not progress):
            idx = todo[b : b + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.net(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            classes = torch.stack([lg.argmax(dim=-1) for lg in logits], dim=1).tolist()  # [b, 14]
            for i, row in zip(idx, classes):
                rows[i] = [_CHEXBERT_VALUES[c] for c in row]
        return rows

    def label(self, report: str | None) -> list[int | None]:
        """Label one report: 14 values (1, 0, -1, None) in LABELS order."""
        return self.label_batch([report])[0]

    def __call__(self, reports: Sequence[str | None]) -> Tensor:
        """Labels as a float tensor, [N, 14], NaN where a label is not mentioned."""
        return rows_to_tensor(self.label_batch(reports))
