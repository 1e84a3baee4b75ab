"""Stage 2 under 2-process CPU DDP through the `amrg` command (issue 15 item 5): `amrg fit` with 2 processes,
then `amrg test` with 1 and with 2 processes on its checkpoint score every study once and give the same
scores and reports, and `amrg predict` with 2 processes writes each study once, with those reports.
Subprocesses only: DDP inside pytest would re-run pytest in the child."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.checkpoints.test_stage2 import stage2_files
from tests.conftest import write_image

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DDP = ["-c", str(CONFIGS / "trainer" / "ddp_cpu.yaml")]
TEST_STUDIES = 5  # odd: the test sampler pads rank 1 with a repeat of study 0; predict's does not pad


def _amrg(args: list[str], cwd: Path) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "amrg.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, " ".join(args) + "\n" + res.stdout[-3000:] + res.stderr[-6000:]
    return res.stdout + res.stderr


def _recipe(tmp_path: Path, annotation: Path) -> Path:
    """The tiny stage-2 recipe of tests/modules/test_reporter_module.py, with the metrics callback."""
    files = stage2_files(tmp_path / "files")
    net = {
        "class_path": "amrg.checkpoints.stage2.build_report_generator",
        "init_args": {
            "stage1_checkpoint": str(files["stage1"]),
            "memory": str(files["memory"]),
            "visual_retriever": {
                "class_path": "amrg.models.retrievers.HopfieldRetriever",
                "init_args": {"num_heads": 2, "hidden_size": 8, "dropout": 0.0},
            },
            "report_retriever": {
                "class_path": "amrg.models.retrievers.HopfieldRetriever",
                "init_args": {"num_heads": 2, "hidden_size": 8, "dropout": 0.0},
            },
            "tiny_llm": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "intermediate_size": 64,
                "vocab_size": 400,
                "min_frequency": 1,
            },
            "llm_training": "full",
            "max_report_tokens": 24,
            "decoding": {"num_beams": 2, "min_new_tokens": 2, "max_new_tokens": 6},
            # each study's stage-1 positives in its prompt: prompts of different lengths share a batch (left
            # padding), so the reports differ per study and would change with the batching if anything leaked
            "instruction": "Findings: <FindingsHere>. Write the report.",
            "findings_threshold": 0.5,
        },
    }
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_val_batches": 0,  # fit only trains; the scores come from `amrg test`
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "checkpoints"), "filename": "last"},
                },
                {
                    "class_path": "amrg.metrics.callback.ReportMetricsCallback",
                    "init_args": {"meteor": False},
                },
            ],
        },
        "model": {
            "class_path": "amrg.modules.reporter.ReporterModule",
            "init_args": {
                "net": net,
                "explain_top_k": 2,
                # a tiny step: trained further, every study gets the same few words and a mix-up of
                # studies or batches would not show in the reports
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-6}},
            },
        },
        "data": {
            "class_path": "amrg.data.datamodules.ReportDataModule",
            "init_args": {
                "annotation": str(annotation),
                "image_size": 32,
                "batch_size": 2,
                "num_workers": 0,
                "augment": False,
                "pin_memory": False,
            },
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`amrg fit` with 2 processes, then `amrg test` with 1 and 2 and `amrg predict` with 2 on its checkpoint."""
    root = tmp_path_factory.mktemp("ddp")
    annotation = _dataset(root / "dataset", {"train": 8, "val": 1, "test": TEST_STUDIES})
    recipe = ["-c", str(_recipe(root, annotation))]
    _amrg(["fit", *recipe, *DDP, f"--trainer.default_root_dir={root / 'fit'}"], cwd=root)
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = {"test1": root / "test1", "test2": root / "test2", "predict2": root / "predict2"}
    for name, extra in (("test1", []), ("test2", DDP), ("predict2", DDP)):
        command = name[:-1]
        log = _amrg(
            [command, *recipe, *extra, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={out[name]}"],
            cwd=root,
        )
        (out[name] / "log.txt").write_text(log)
    return out


def _dataset(root: Path, counts: dict[str, int]) -> Path:
    """Studies of one or two 32-px views; a report per study (as tests/conftest.py's make_dataset)."""
    splits: dict[str, list] = {}
    for split, n in counts.items():
        splits[split] = []
        for i in range(n):
            views = [f"{split}_{i:03d}/{v}.png" for v in range(1 + i % 2)]
            for v, rel in enumerate(views):
                write_image(root / rel, size=32, seed=i * 10 + v)
            report = f"The heart is normal in size. No pleural effusion. Study {i}."
            splits[split].append({"id": f"{split}_{i:03d}", "report": report, "image_path": views})
    path = root / "annotation.json"
    path.write_text(json.dumps(splits))
    return path


def _test_outputs(run: Path) -> tuple[dict, dict[str, str]]:
    (metrics,) = run.glob("test_metrics_epoch*.json")
    (predictions,) = run.glob("test_predictions_epoch*.jsonl")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    return json.loads(metrics.read_text()), {row["id"]: row["hypothesis"] for row in rows}


@pytest.mark.slow
def test_two_processes_score_and_predict_each_study_once(runs: dict[str, Path]) -> None:
    ids = [f"test_{i:03d}" for i in range(TEST_STUDIES)]
    for name in ("test1", "test2"):
        scores, hypotheses = _test_outputs(runs[name])
        assert (
            scores["num_reports"] == TEST_STUDIES and sorted(hypotheses) == ids
        )  # the padding repeat dropped
        assert {"test/bleu4", "test/cider", "test/ce/micro_f1/14/u0"} <= set(scores["metrics"])
    run = runs["predict2"]
    assert f"wrote {TEST_STUDIES} predictions to {run / 'predictions.jsonl'}" in (run / "log.txt").read_text()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # the rank shards are gone
    lines = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ids  # each study once, in dataset order
    assert list(lines[0]) == ["id", "report", "probabilities", "explanation", "reference"]


@pytest.mark.slow
def test_two_processes_give_the_scores_and_reports_of_one(runs: dict[str, Path]) -> None:
    """Each rank batches other studies together than one process does; the reports must not change."""
    scores1, hypotheses1 = _test_outputs(runs["test1"])
    scores2, hypotheses2 = _test_outputs(runs["test2"])
    predicted = [
        json.loads(line) for line in (runs["predict2"] / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(set(hypotheses1.values())) > 1  # the reports differ per study, so a mix-up would show
    assert hypotheses2 == hypotheses1
    assert scores2["metrics"] == scores1["metrics"]  # gathered from both ranks and scored once
    assert {r["id"]: r["report"] for r in predicted} == hypotheses1
