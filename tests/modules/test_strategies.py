"""Stage2FSDPStrategy: which parts stay replicated, and a real 2-process FSDP fit on the CPU (gloo).

The fit goes through the `amrg` command in a subprocess (FSDP inside pytest would re-run pytest in the
child), with the tiny stage-2 recipe of tests/test_ddp.py. A callback of this file, imported by the run
through PYTHONPATH, saves each rank's view of the network right after FSDP wrapped it and after training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from transformers import PreTrainedTokenizerBase

from amrg.checkpoints.stage2 import load_stage2
from amrg.errors import ConfigError
from amrg.modules.classifier import ClassifierModule
from amrg.modules.reporter import ReporterModule
from amrg.modules.strategies import replicated_parts
from tests.models.test_reporter import make_generator, tiny_classifier, tiny_tokenizer
from tests.test_ddp import _amrg, _dataset, _recipe

REPO = Path(__file__).resolve().parents[2]
STAGE1_PARTS = ["net.classifier.encoder", "net.classifier.qformer", "net.classifier.head"]


class RankSnapshot(Callback):
    """Save, per rank, the stage-1 weights and the LLM's local parameter sizes (``rank{r}.pt``)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.seen: dict[str, dict] = {}

    def _take(self, pl_module: LightningModule) -> dict:
        net = pl_module.net
        return {
            "stage1": {k: p.detach().clone() for k, p in net.classifier.named_parameters()},
            "stage1_devices": {str(p.device) for p in net.classifier.parameters()},
            "root_device": str(pl_module.device),
            "llm_numel": {k: p.numel() for k, p in net.llm.named_parameters()},
        }

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seen["start"] = self._take(pl_module)  # after the strategy wrapped the model

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seen["end"] = self._take(pl_module)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.seen, self.dirpath / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    return tiny_tokenizer(tmp_path_factory.mktemp("strategies_tokenizer"))


@pytest.mark.parametrize(
    ("freeze", "replicated"),
    [
        ({}, STAGE1_PARTS),
        ({"freeze_qformer": False}, ["net.classifier.encoder", "net.classifier.head"]),
        ({"freeze_encoder": False, "freeze_qformer": False}, ["net.classifier.head"]),
    ],
    ids=["paper", "qformer_trains", "both_train"],
)
def test_only_the_frozen_stage1_parts_are_replicated(
    tokenizer: PreTrainedTokenizerBase, freeze: dict, replicated: list[str]
) -> None:
    module = ReporterModule(make_generator(tokenizer, **freeze))
    parts = replicated_parts(module)
    assert list(parts) == replicated  # the head always: stage 2 has no classification loss
    assert all(not p.requires_grad for part in parts.values() for p in part.parameters())


def test_a_trainable_parameter_in_a_frozen_part_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    module = ReporterModule(make_generator(tokenizer))
    module.net.classifier.head.requires_grad_(True)  # unfrozen behind the ReportGenerator's back
    with pytest.raises(ConfigError, match=r"net\.classifier\.head\..*would not synchronise"):
        replicated_parts(module)


def test_a_stage1_module_is_refused_naming_ddp() -> None:
    with pytest.raises(
        ConfigError, match=r"ClassifierModule holds no stage-2 ReportGenerator.*ddp_gpu\.yaml"
    ):
        replicated_parts(ClassifierModule(tiny_classifier()))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`amrg fit` of the tiny stage 2 with configs/trainer/fsdp.yaml on 2 CPU processes, validation included."""
    root = tmp_path_factory.mktemp("fsdp")
    annotation = _dataset(root / "dataset", {"train": 8, "val": 2, "test": 1})
    recipe = _recipe(root, annotation)
    config = yaml.safe_load(recipe.read_text())
    trainer = config["trainer"]
    trainer["limit_val_batches"] = 1  # one validation batch: generation under FSDP too
    snapshots = root / "snapshots"
    trainer["callbacks"].append(
        {"class_path": f"{__name__}.RankSnapshot", "init_args": {"dirpath": str(snapshots)}}
    )
    recipe.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        log = _amrg(
            [
                "fit",
                *("-c", str(recipe), "-c", str(REPO / "configs" / "trainer" / "fsdp.yaml")),
                # the overlay on 2 CPU processes (gloo); bf16 autocast is CUDA-only in Lightning's FSDP
                *("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true"),
                f"--trainer.default_root_dir={root / 'fit'}",
            ],
            cwd=root,
        )
    return {
        "log": log,
        "fit": root / "fit",
        "checkpoint": root / "checkpoints" / "last.ckpt",
        "stage1": root / "files" / "stage1.ckpt",
        "snapshots": snapshots,
    }


@pytest.mark.slow
def test_fsdp_fit_replicates_the_frozen_stage1_network_and_shards_the_llm(fsdp_run: dict) -> None:
    stage1_file = torch.load(fsdp_run["stage1"], map_location="cpu", weights_only=True)["state_dict"]
    stage1 = {k.removeprefix("net."): v for k, v in stage1_file.items() if k.startswith("net.")}
    replicated = sum(v.numel() for v in stage1.values())  # the whole tiny stage-1 network: all frozen
    assert f"Stage2FSDPStrategy: {replicated} of " in fsdp_run["log"]
    ckpt = torch.load(fsdp_run["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2  # 8 studies / 2 ranks / batch 2: the run trained
    llm_total = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net.llm."))
    ranks = [torch.load(fsdp_run["snapshots"] / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for snap in (s[when] for s in ranks for when in ("start", "end")):
        # full copies of the stage-1 weights on each rank, the same on both, unchanged by training
        assert snap["stage1"].keys() == stage1.keys()
        for name, weight in stage1.items():
            assert torch.equal(snap["stage1"][name], weight), name
        assert snap["stage1_devices"] == {snap["root_device"]}
        # the LLM is sharded: each rank holds only part of it
        assert 0 < sum(snap["llm_numel"].values()) < llm_total
    assert (
        sum(sum(s["end"]["llm_numel"].values()) for s in ranks) == llm_total
    )  # the two shards make it whole
    # validation generated a report for each study (one per rank) inside FSDP's root forward
    metrics = json.loads((fsdp_run["fit"] / "val_metrics_epoch0.json").read_text())
    assert metrics["num_reports"] == 2


@pytest.mark.slow
def test_fsdp_full_checkpoint_holds_every_key_and_loads_without_fsdp(fsdp_run: dict) -> None:
    state = torch.load(fsdp_run["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    net = load_stage2(fsdp_run["checkpoint"])  # strict: every missing or unexpected key is named
    assert set(state) == {f"net.{k}" for k in net.state_dict()}  # the keys of a checkpoint without FSDP
    stage1 = torch.load(fsdp_run["stage1"], map_location="cpu", weights_only=True)["state_dict"]
    for name, weight in net.classifier.state_dict().items():
        assert torch.equal(weight, stage1[f"net.{name}"]), name  # the replicated weights were saved
