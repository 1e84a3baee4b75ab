"""ReporterModule: fit, checkpoint hooks and reloads, the datamodule checks at run start, recipes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from amrg import cli
from amrg._plain import is_plain
from amrg.checkpoints.stage2 import RECORD_KEY
from amrg.data.batch import Batch
from amrg.data.datamodules import ReportDataModule
from amrg.modules.reporter import ReporterModule
from tests.checkpoints.test_stage2 import assert_same_network, build, read, save, stage2_files
from tests.models.test_reporter import RETRIEVER, batch, write_memory, write_stage1_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A stage-1 checkpoint and a memory folder, shared read-only by the tests of this file."""
    return stage2_files(tmp_path_factory.mktemp("stage2_files"))


def _trainer(tmp_path: Path, callbacks: list[Any] | None = None, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        default_root_dir=tmp_path,
        **kwargs,
    )


class _Outputs(L.Callback):
    def __init__(self) -> None:
        self.val: list[Any] = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.val.append(outputs)


# --------------------------------------------------------------------------------------------------
# Fit and reload


def test_fit_then_the_checkpoint_alone_reloads_the_module(tmp_path: Path, make_dataset) -> None:
    run = tmp_path / "run"
    files = stage2_files(run)
    annotation = make_dataset(n={"train": 6, "val": 2, "test": 2})
    data = ReportDataModule(str(annotation), image_size=32, batch_size=2, num_workers=0, augment=False)
    model = ReporterModule(build(files), explain_top_k=3)
    outputs = _Outputs()
    trainer = _trainer(tmp_path, [outputs], max_steps=4)
    trainer.fit(model, data)
    assert trainer.callback_metrics["train/loss"] > 0 and "val/loss" in trainer.callback_metrics
    (val,) = outputs.val
    assert val["ids"] == ["val_000", "val_001"] and len(val["hypotheses"]) == 2
    assert all(isinstance(h, str) for h in val["hypotheses"]) and val["references"][0].startswith("The heart")

    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = read(ckpt)
    assert checkpoint["amrg_module"] == "amrg.modules.reporter.ReporterModule"
    assert is_plain(checkpoint["hyper_parameters"]) and checkpoint["hyper_parameters"]["explain_top_k"] == 3
    assert RECORD_KEY in checkpoint
    # Resuming the run with its own recipe files restores every weight.
    again = ReporterModule(build(files))
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"])
    assert_same_network(model.net.eval(), again.net.eval())

    shutil.rmtree(run)  # the checkpoint alone: no stage-1 checkpoint, no memory folder
    reloaded = ReporterModule.load_from_checkpoint(ckpt)
    assert reloaded.explain_top_k == 3 and not reloaded.training
    assert_same_network(model.net, reloaded.net)


def test_association_weight_adds_the_association_loss_and_logs_both_parts(
    tmp_path: Path, make_dataset, files: dict[str, Path]
) -> None:
    annotation = make_dataset(n={"train": 6, "val": 2, "test": 2})
    data = ReportDataModule(str(annotation), image_size=32, batch_size=2, num_workers=0, augment=False)
    model = ReporterModule(build(files), association_weight=0.5)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert {"train/report_loss", "train/association_loss", "val/association_loss"} <= set(metrics)
    # the training loss is the report loss plus the weighted association loss (epoch means of equal batches)
    epoch = {k: float(v) for k, v in metrics.items()}
    assert epoch["train/association_loss_epoch"] > 0
    expected = epoch["train/report_loss"] + 0.5 * epoch["train/association_loss_epoch"]
    assert epoch["train/loss_epoch"] == pytest.approx(expected, rel=1e-5)
    plain = ReporterModule(build(files))
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(plain, data)
    assert "train/association_loss" not in trainer.callback_metrics  # weight 0: the paper's report loss
    with pytest.raises(ValueError, match="association_weight must be >= 0"):
        ReporterModule(build(files), association_weight=-1.0)


def test_lightning_cli_builds_the_net_from_the_recipe_and_reloads_without_it(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe's net is the builder function; a checkpoint written under LightningCLI reloads alone."""
    monkeypatch.setattr("sys.argv", ["amrg"])
    config = {
        "model": {
            "class_path": "amrg.modules.reporter.ReporterModule",
            "init_args": {
                "net": {
                    "class_path": "amrg.checkpoints.stage2.build_report_generator",
                    "init_args": {
                        "stage1_checkpoint": str(files["stage1"]),
                        "memory": str(files["memory"]),
                        "visual_retriever": {
                            "class_path": "amrg.models.retrievers.HopfieldRetriever",
                            "init_args": RETRIEVER,
                        },
                        "report_retriever": {
                            "class_path": "amrg.models.retrievers.CrossAttentionRetriever",
                            "init_args": {"num_heads": 2, "hidden_size": 8},
                        },
                        "tiny_llm": {
                            "family": "qwen2",
                            "hidden_size": 32,
                            "num_heads": 4,
                            "intermediate_size": 64,
                            "vocab_size": 400,
                            "min_frequency": 1,
                        },
                        "llm_training": "lora",
                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                        "decoding": {"num_beams": 2, "min_new_tokens": 2, "max_new_tokens": 6},
                        "max_report_tokens": 24,
                    },
                },
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
            },
        },
        "data": {
            "class_path": "amrg.data.datamodules.ReportDataModule",
            "init_args": {"annotation": "unused.json"},
        },
        "trainer": {"logger": False, "enable_checkpointing": False, "accelerator": "cpu"},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    built = cli.lightning_cli(["--config", str(recipe)], run=False)
    model = built.model
    assert type(model.net.report_retriever).__name__ == "CrossAttentionRetriever"
    assert model.net.prompt.template == "chat"  # Qwen-style tokenizer: ChatML template
    hparams = dict(model.hparams)
    assert hparams["net"]["class_path"] == "amrg.checkpoints.stage2.build_report_generator"
    built.trainer.strategy.connect(model)
    ckpt = tmp_path / "cli.ckpt"
    built.trainer.save_checkpoint(ckpt)
    reloaded = ReporterModule.load_from_checkpoint(ckpt)
    assert_same_network(model.net.eval(), reloaded.net)


def test_trainable_parameters_and_optimizer_groups(files: dict[str, Path]) -> None:
    model = ReporterModule(build(files, llm_training="frozen"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("net.prefix_", "net.visual_retriever.", "net.report_retriever.")) for n in trainable
    )
    optimizer = model.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # AdamW default; none on 1-D


def test_predict_step_returns_reports_probabilities_and_explanations(files: dict[str, Path]) -> None:
    model = ReporterModule(build(files), explain_top_k=2)
    images, view_mask = batch()
    out = model.predict_step(Batch(["a", "b"], images, view_mask, ["", ""], torch.zeros(2, 14)), 0)
    assert out["ids"] == ["a", "b"] and len(out["reports"]) == 2
    assert out["probabilities"].shape == (2, 14)
    assert [len(e) for e in out["explanations"]] == [4, 4]
    assert {e["memory"] for e in out["explanations"][0]} == {"visual", "report"}


# --------------------------------------------------------------------------------------------------
# Checks when a run starts or resumes


def test_the_leakage_guard_takes_the_ids_from_the_datamodule(tmp_path: Path, make_dataset) -> None:
    """A memory holding a val id of the run's own datamodule stops `fit` before the first step."""
    stage1 = write_stage1_checkpoint(tmp_path / "stage1.ckpt")
    memory = write_memory(tmp_path / "memory", stage1, ids=("val_001",))
    model = ReporterModule(build({"stage1": stage1, "memory": memory}))  # the builder was given no ids
    annotation = make_dataset(n={"train": 4, "val": 2, "test": 2})
    data = ReportDataModule(str(annotation), image_size=32, batch_size=2, num_workers=0, augment=False)
    with pytest.raises(
        ValueError, match=r"report memory .* holds 1 id\(s\) of the datamodule's val/test .*'val_001'"
    ):
        _trainer(tmp_path, max_steps=1).fit(model, data)


def test_a_datamodule_of_another_image_size_is_refused(
    files: dict[str, Path], tmp_path: Path, make_dataset
) -> None:
    annotation = make_dataset(n={"train": 4, "val": 2, "test": 2})
    data = ReportDataModule(str(annotation), image_size=48, batch_size=2, num_workers=0, augment=False)
    with pytest.raises(ValueError, match=r"image_size is 48 but the stage-1 encoder takes 32 px"):
        _trainer(tmp_path, max_steps=1).fit(ReporterModule(build(files)), data)


def test_resuming_with_another_stage1_model_or_memory_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = read(save(build(files), tmp_path / "a.ckpt"))
    other = stage2_files(tmp_path / "other", seed=3)
    with pytest.raises(ValueError, match="trained on another stage-1 checkpoint"):
        ReporterModule(build(other)).on_load_checkpoint(checkpoint)
    same_stage1 = {"stage1": files["stage1"], "memory": write_memory(tmp_path / "mem2", files["stage1"])}
    with pytest.raises(ValueError, match="trained on memory build"):
        ReporterModule(build(same_stage1)).on_load_checkpoint(checkpoint)


def test_ckpt_path_of_the_other_stage_is_refused_naming_both_classes(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["amrg"])
    stage2_ckpt = save(build(files), tmp_path / "stage2.ckpt")
    stage1 = ["-c", str(CONFIGS / "demo/data.yaml"), "-c", str(CONFIGS / "demo/stage1.yaml")]
    with pytest.raises(
        ValueError,
        match=r"written by amrg.modules.reporter.ReporterModule, but this run trains "
        r"amrg.modules.classifier.ClassifierModule",
    ):
        cli.lightning_cli(["fit", *stage1, "--ckpt_path", str(stage2_ckpt)])
    stage2 = ["-c", str(CONFIGS / "demo/data.yaml"), "-c", str(CONFIGS / "demo/stage2.yaml")]
    stage1_ckpt = read(files["stage1"])
    stage1_ckpt["amrg_module"] = "amrg.modules.classifier.ClassifierModule"
    torch.save(stage1_ckpt, tmp_path / "stage1.ckpt")
    # refused before the recipe's network is built (its files do not exist here)
    with pytest.raises(
        ValueError,
        match=r"written by amrg.modules.classifier.ClassifierModule, but this run trains "
        r"amrg.modules.reporter.ReporterModule",
    ):
        cli.lightning_cli(["fit", *stage2, "--ckpt_path", str(tmp_path / "stage1.ckpt")])
    with pytest.raises(ValueError, match="was written by amrg.modules.classifier.ClassifierModule"):
        ReporterModule.load_from_checkpoint(tmp_path / "stage1.ckpt")


# --------------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("dataset", ["demo", "iu_xray", "mimic_cxr", "chexpert_plus"])
def test_stage2_recipes_name_the_builder_and_the_paper_decoding(dataset: str) -> None:
    recipe = yaml.safe_load((CONFIGS / dataset / "stage2.yaml").read_text())
    model = recipe["model"]
    assert model["class_path"] == "amrg.modules.reporter.ReporterModule"
    net = model["init_args"]["net"]
    assert net["class_path"] == "amrg.checkpoints.stage2.build_report_generator"
    args = net["init_args"]
    # under the recipe's run_root, the files memory build and stage 1 wrote (memory.yaml defaults to them)
    assert args["stage1_checkpoint"] == "${run_path:stage1/checkpoints/last.ckpt}"
    assert args["memory"] == "${run_path:memory}"
    decoding = args["decoding"]
    assert decoding["num_beams"] == 3 and decoding["repetition_penalty"] == 2.0 == decoding["length_penalty"]
    if dataset != "demo":
        assert args["llm_training"] == "lora" and args["lora"]["r"] == 16 and args["dtype"] == "bfloat16"
        assert set(args["lora"]["target_modules"]) == {"q_proj", "v_proj"}
    memory = yaml.safe_load((CONFIGS / dataset / "memory.yaml").read_text())
    assert memory["run_root"] == recipe["run_root"] == f"runs/{dataset}"
    assert "out_dir" not in memory and "stage1_checkpoint" not in memory


def test_a_recipe_whose_files_are_missing_names_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder's message reaches the user, not jsonargparse's dump of the whole config."""
    monkeypatch.setattr("sys.argv", ["amrg"])
    monkeypatch.chdir(tmp_path)
    recipe = ["-c", str(CONFIGS / "demo/data.yaml"), "-c", str(CONFIGS / "demo/stage2.yaml")]
    with pytest.raises(FileNotFoundError) as err:
        cli.lightning_cli([*recipe, "--run_root", "elsewhere"], run=False)
    message = str(err.value)
    assert "stage-1 checkpoint 'elsewhere/stage1/checkpoints/last.ckpt' not found" in message
    assert "memory folder 'elsewhere/memory' not found" in message and "Union" not in message
