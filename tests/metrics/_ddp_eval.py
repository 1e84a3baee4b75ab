"""Run a test loop with ReportMetricsCallback on a fixed toy set; run by tests/metrics/test_ddp.py.

Usage: python tests/metrics/_ddp_eval.py --devices 2 --out DIR

11 samples (an odd count) with batch size 2: under 2-process DDP, DistributedSampler pads to 12,
so one id reaches the metrics twice. Rank 0 writes the callback's files into DIR; every rank
writes what ``trainer.test`` returned and how many rows its test_step saw to
``DIR/rank{r}_results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from amrg.labels import label_index
from amrg.metrics.callback import ReportMetricsCallback

SAMPLES = [
    (
        "p01",
        "the heart is normal in size . the lungs are clear .",
        "heart size is normal . lungs are clear .",
    ),
    ("p02", "mild cardiomegaly . no pleural effusion .", "cardiomegaly . small pleural effusion ."),
    ("p03", "no acute cardiopulmonary abnormality .", "no acute cardiopulmonary abnormality ."),
    ("p04", "left pleural effusion . possible atelectasis .", "left pleural effusion with atelectasis ."),
    ("p05", "there is a right rib fracture .", "no fracture . the lungs are clear ."),
    ("p06", "possible edema . cardiomegaly .", "pulmonary edema . cardiomegaly ."),
    ("p07", "the lungs are clear . no pneumothorax .", "small right pneumothorax ."),
    ("p08", "stable support devices . no effusion .", "support devices in place . no effusion ."),
    ("p09", "possible consolidation in the right lower lobe .", "right lower lobe consolidation ."),
    ("p10", "", "the heart is normal . no focal consolidation ."),
    ("p11", "no acute disease .", "no acute disease ."),
]

_WORDS = {
    "cardiomegaly": "Cardiomegaly",
    "effusion": "Pleural Effusion",
    "atelectasis": "Atelectasis",
    "fracture": "Fracture",
    "edema": "Edema",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "support devices": "Support Devices",
}


class KeywordLabeler:
    """Keyword labels per sentence: 'no ' -> 0, 'possible ' -> -1, else 1; No Finding if nothing positive."""

    def label_batch(self, reports):
        rows = []
        for text in reports:
            labels: list[int | None] = [None] * 14
            for sentence in text.split(" . "):
                for word, name in _WORDS.items():
                    if word in sentence:
                        code = 0 if " no " in f" {sentence}" else -1 if "possible" in sentence else 1
                        labels[label_index(name)] = code
            if 1 not in labels:
                labels[label_index("No Finding")] = 1
            rows.append(labels)
        return rows


class EchoReporter(L.LightningModule):
    """'Generates' the fixed hypothesis of each sample."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

        self.rows_seen = 0

    def test_step(self, batch, batch_idx):
        self.rows_seen += len(batch["id"])
        return {"ids": list(batch["id"]), "hypotheses": list(batch["hyp"]), "references": list(batch["ref"])}


def run_eval(devices: int, out: Path) -> None:
    """Test the echo module on SAMPLES with the callback writing into ``out``."""
    data = [{"id": i, "hyp": h, "ref": r} for i, h, r in SAMPLES]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=[ReportMetricsCallback(dirpath=out, meteor=False, ce=True, labeler=KeywordLabeler())],
    )
    module = EchoReporter()
    results = trainer.test(module, dataloaders=DataLoader(data, batch_size=2), verbose=False)
    record = {"logged": results[0], "rows_seen": module.rows_seen}
    (out / f"rank{trainer.global_rank}_results.json").write_text(json.dumps(record, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_eval(args.devices, args.out)


if __name__ == "__main__":
    main()
