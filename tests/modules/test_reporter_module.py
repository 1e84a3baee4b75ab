"""ReporterModule: building from files, fit, checkpoint contents and reloads, configs, bad input."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import instantiate_module
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

from amrg.data.datamodules import ReportDataModule
from amrg.labels import LABELS
from amrg.models.llm import LoRAConfig
from amrg.models.retrievers import HopfieldRetriever
from amrg.modules._hparams import is_plain
from amrg.modules.reporter import (
    CHECKPOINT_KEY,
    DecodingConfig,
    MemorySampling,
    ReporterModule,
    TinyLLMConfig,
)
from tests.models.test_reporter import (
    REPORT_DIM,
    REPORTS,
    RETRIEVER,
    WIDTH,
    batch,
    tiny_llm,
    tiny_tokenizer,
    train_reports,
    write_banks,
    write_stage1_checkpoint,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = TinyLLMConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=400)
DECODING = DecodingConfig(num_beams=2, min_new_tokens=2, max_new_tokens=6)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A stage-1 checkpoint and both memory banks, shared read-only by the tests of this file."""
    root = tmp_path_factory.mktemp("stage2_files")
    visual, report = write_banks(root)
    return {"stage1": write_stage1_checkpoint(root / "stage1.ckpt"), "visual": visual, "report": report}


def module(files: dict[str, Path], tmp_path: Path, **overrides: Any) -> ReporterModule:
    options: dict[str, Any] = dict(
        stage1_checkpoint=files["stage1"],
        visual_memory=files["visual"],
        report_memory=files["report"],
        visual_retriever=functools.partial(HopfieldRetriever, **RETRIEVER),
        report_retriever=functools.partial(HopfieldRetriever, **RETRIEVER),
        tokenizer_path=tmp_path / "tokenizer",
        tiny_llm=TINY,
        llm_training="full",
        max_report_tokens=24,
        decoding=DECODING,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
    )
    options.update(overrides)
    return ReporterModule(**options)


def save(module: ReporterModule, path: Path) -> Path:
    """Write a checkpoint the way a Trainer does (hooks included) without running a loop."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class _Outputs(L.Callback):
    def __init__(self) -> None:
        self.val: list[Any] = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.val.append(outputs)


# --------------------------------------------------------------------------------------------------
# Fit and reload


def test_fit_trains_the_tokenizer_from_train_reports_and_a_reload_writes_identical_text(
    files: dict[str, Path], tmp_path: Path, make_dataset
) -> None:
    annotation = make_dataset(n={"train": 6, "val": 2, "test": 2})
    data = ReportDataModule(str(annotation), image_size=32, batch_size=2, num_workers=0, augment=False)
    model = module(files, tmp_path)
    assert model.net is None  # built by configure_model, when the datamodule is ready
    outputs = _Outputs()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[outputs],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)

    tokenizer_dir = tmp_path / "tokenizer"
    assert (tokenizer_dir / "tokenizer.json").is_file()  # trained from the 6 training reports
    assert model.net is not None
    assert trainer.callback_metrics["train/loss"] > 0 and "val/loss" in trainer.callback_metrics
    (val,) = outputs.val
    assert set(val) == {"ids", "hypotheses", "references"}
    assert val["ids"] == ["val_000", "val_001"] and len(val["hypotheses"]) == 2
    assert all(isinstance(h, str) for h in val["hypotheses"]) and val["references"][0].startswith("The heart")

    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)
    state = load(ckpt)
    keys = set(state["state_dict"])
    assert not any(k.startswith("net.classifier.") for k in keys)  # frozen stage 1: rebuilt from its path
    assert state["state_dict"]["net.visual_retriever.memory"].shape == (15, WIDTH)  # memories travel along
    assert state["state_dict"]["net.report_retriever.memory"].shape == (10, REPORT_DIM)
    assert any(k.startswith("net.llm.") for k in keys)  # a tiny LLM trained from scratch is kept whole
    record = state[CHECKPOINT_KEY]
    assert (
        len(record["visual_memory"]["provenance"]) == 15 and len(record["report_memory"]["provenance"]) == 10
    )
    assert record["report_memory"]["sampling"] == {"total": 6000, "per_label_max": None, "seed": 0}
    assert "tokenizer.json" in record["tokenizer_files"] and record["image_size"] == 32
    assert is_plain(state["hyper_parameters"])

    images, view_mask = batch(3)
    expected = model.net.generate(images, view_mask)
    # The checkpoint alone (plus the stage-1 checkpoint) suffices: no memory file or tokenizer is read.
    shutil.rmtree(tokenizer_dir)
    reloaded = ReporterModule.load_from_checkpoint(
        ckpt, weights_only=True, visual_memory=tmp_path / "gone_v", report_memory=tmp_path / "gone_r"
    )
    assert reloaded.net is not None
    assert reloaded.net.generate(images, view_mask) == expected
    assert reloaded.net.report_provenance == model.net.report_provenance
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_lightning_cli_hyperparameters_round_trip(files: dict[str, Path], tmp_path: Path) -> None:
    """Built as LightningCLI builds it (parsed config stored), reloaded through its instantiator."""
    config = {
        "stage1_checkpoint": str(files["stage1"]),
        "visual_memory": str(files["visual"]),
        "report_memory": str(files["report"]),
        "visual_retriever": {
            "class_path": "amrg.models.retrievers.HopfieldRetriever",
            "init_args": RETRIEVER,
        },
        "report_retriever": {
            "class_path": "amrg.models.retrievers.CrossAttentionRetriever",
            "init_args": {"num_heads": 2, "hidden_size": 8},
        },
        "tokenizer_path": str(tmp_path / "tokenizer"),
        "tiny_llm": {
            "family": "qwen2",
            "hidden_size": 32,
            "num_heads": 4,
            "intermediate_size": 64,
            "vocab_size": 400,
        },
        "llm_training": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "decoding": {"num_beams": 2, "min_new_tokens": 2, "max_new_tokens": 6},
        "max_report_tokens": 24,
        "visual_sampling": {"per_label_max": 2, "seed": 3},
    }
    hparams = {"_class_path": "amrg.modules.reporter.ReporterModule", **config}
    with _given_hyperparameters_context(
        hparams=dict(hparams), instantiator="lightning.pytorch.cli.instantiate_module"
    ):
        model = instantiate_module(ReporterModule, dict(hparams))
    net = model.build(train_reports=train_reports())
    assert net.prompt.template == "chat"  # Qwen-style tokenizer: ChatML template
    assert net.visual_retriever.num_memories == 10  # 5 labels x at most 2
    images, view_mask = batch()
    expected = net.generate(images, view_mask)
    ckpt = save(model, tmp_path / "cli.ckpt")
    assert load(ckpt)["hyper_parameters"]["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    reloaded = ReporterModule.load_from_checkpoint(ckpt, weights_only=True)
    assert type(reloaded.net.report_retriever).__name__ == "CrossAttentionRetriever"
    assert reloaded.net.generate(images, view_mask) == expected


@pytest.mark.parametrize("llm_training", ["lora", "frozen"])
def test_llm_from_a_folder_is_referenced_not_copied(
    files: dict[str, Path], tmp_path: Path, llm_training: str
) -> None:
    tokenizer = tiny_tokenizer(tmp_path / "llm", "llama")
    tiny_llm(tokenizer).save_pretrained(tmp_path / "llm")
    model = module(
        files,
        tmp_path,
        llm_path=tmp_path / "llm",
        tokenizer_path=None,
        tiny_llm=None,
        llm_training=llm_training,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
    )
    net = model.build()
    images, view_mask = batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(images, view_mask, REPORTS[:2]).backward()
        optimizer.step()
    expected = net.generate(images, view_mask)
    ckpt = save(model, tmp_path / "stage2.ckpt")
    state = load(ckpt)
    llm_keys = [k for k in state["state_dict"] if k.startswith("net.llm.")]
    if llm_training == "lora":
        assert llm_keys and all(".lora_" in k for k in llm_keys)
    else:
        assert llm_keys == []
    assert state[CHECKPOINT_KEY]["tokenizer_files"] is None  # the LLM folder's own tokenizer
    reloaded = ReporterModule.load_from_checkpoint(ckpt, weights_only=True)
    assert reloaded.net.generate(images, view_mask) == expected


def test_a_checkpoint_meets_a_net_built_with_another_tokenizer(
    files: dict[str, Path], tmp_path: Path
) -> None:
    first = module(files, tmp_path / "a")
    first.build(train_reports=train_reports())
    ckpt = save(first, tmp_path / "a.ckpt")
    other = module(files, tmp_path / "b")
    other.build(train_reports=[r.upper() for r in train_reports()])  # another vocabulary
    with pytest.raises(
        ValueError, match=r"tokenizer in '.*b/tokenizer' .* differs from the one this checkpoint"
    ):
        other.on_load_checkpoint(load(ckpt))


def test_trainable_parameters_and_optimizer_groups(files: dict[str, Path], tmp_path: Path) -> None:
    model = module(files, tmp_path, llm_training="frozen")
    model.build(train_reports=train_reports())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("net.prefix_", "net.visual_retriever.", "net.report_retriever.")) for n in trainable
    )
    optimizer = model.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # AdamW default; none on 1-D


def test_predict_step_returns_reports_probabilities_and_explanations(
    files: dict[str, Path], tmp_path: Path
) -> None:
    from amrg.data.batch import Batch

    model = module(files, tmp_path, explain_top_k=2)
    model.build(train_reports=train_reports())
    images, view_mask = batch()
    out = model.predict_step(Batch(["a", "b"], images, view_mask, ["", ""], torch.zeros(2, 14)), 0)
    assert out["ids"] == ["a", "b"] and len(out["reports"]) == 2
    assert out["probabilities"].shape == (2, 14)
    assert [len(e) for e in out["explanations"]] == [4, 4]
    assert {e["memory"] for e in out["explanations"][0]} == {"visual", "report"}


# --------------------------------------------------------------------------------------------------
# Bad input: one clear message naming the path and what was expected


def test_missing_files_are_all_named_in_one_message(tmp_path: Path) -> None:
    model = ReporterModule(
        tmp_path / "stage1.ckpt",
        tmp_path / "mem/visual_memory",
        tmp_path / "mem/report_memory",
        llm_path=tmp_path / "Llama-2-7b-chat-hf",
        tokenizer_path=tmp_path / "tok",
    )
    with pytest.raises(FileNotFoundError) as err:
        model.build()
    message = str(err.value)
    for path in (
        "stage1.ckpt",
        "mem/visual_memory.safetensors",
        "mem/report_memory.json",
        "Llama-2-7b-chat-hf",
        f"{tmp_path / 'tok'}'",
    ):
        assert path in message
    assert "expected the .ckpt file that `amrg fit` wrote for stage 1" in message
    assert "written by `amrg memory build`" in message
    assert "never downloaded" in message and "tokenizer folder" in message
    assert message.count("\n  - ") == 5


def test_a_missing_tokenizer_outside_a_trainer_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder '.*nowhere' not found .*training reports"):
        module(files, tmp_path, tokenizer_path=tmp_path / "nowhere").build()


def test_a_stage1_checkpoint_with_another_label_set_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    bad = write_stage1_checkpoint(tmp_path / "thirteen.ckpt", num_queries=13)
    with pytest.raises(
        ValueError, match=r"thirteen.ckpt' predicts 13 labels, but stage 2 needs the 14 CheXpert"
    ):
        module(files, tmp_path, stage1_checkpoint=bad).build(train_reports=train_reports())


def test_a_stage1_checkpoint_of_another_width_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    wide = write_stage1_checkpoint(tmp_path / "wide.ckpt", hidden_size=48)
    with pytest.raises(ValueError) as err:
        module(files, tmp_path, stage1_checkpoint=wide).build(train_reports=train_reports())
    assert str(files["visual"]) in str(err.value)
    assert "visual memory dim 32 but the Q-Former width of stage-1 checkpoint" in str(err.value)
    assert "wide.ckpt' is 48" in str(err.value)


def test_a_file_that_is_no_checkpoint_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "stage1.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"stage1.ckpt' .* could not be read .*expected the .ckpt file"):
        module(files, tmp_path, stage1_checkpoint=junk).build(train_reports=train_reports())


def test_a_memory_holding_an_evaluation_id_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    visual, report = write_banks(tmp_path, ids=("val_001",))
    model = module(files, tmp_path, visual_memory=visual, report_memory=report)
    with pytest.raises(
        ValueError, match=r"report_memory: 1 source id\(s\) belong to the evaluation .*'val_001'"
    ):
        model.build(train_reports=train_reports(), forbidden_ids={"val_000", "val_001"})


def test_inconsistent_options_are_refused_at_construction(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of model.init_args.llm_path"):
        module(files, tmp_path, llm_path=tmp_path)
    with pytest.raises(ValueError, match="tiny_llm needs model.init_args.tokenizer_path"):
        module(files, tmp_path, tokenizer_path=None)
    with pytest.raises(ValueError, match="total must be >= 0"):
        MemorySampling(total=-1)
    with pytest.raises(ValueError, match="min_new_tokens <= max_new_tokens"):
        DecodingConfig(min_new_tokens=9, max_new_tokens=8)


# --------------------------------------------------------------------------------------------------
# Recipes


def _recipes() -> list[Path]:
    return sorted(CONFIGS.glob("*/stage2.yaml"))


def test_every_dataset_has_a_stage2_recipe() -> None:
    assert {p.parent.name for p in _recipes()} >= {"demo", "iu_xray", "mimic_cxr", "chexpert_plus"}


@pytest.mark.parametrize("recipe", _recipes(), ids=lambda p: p.parent.name)
def test_stage2_recipes_parse_and_build_the_module(recipe: Path) -> None:
    config = yaml.safe_load(recipe.read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    parser.add_class_arguments(L.Trainer, "trainer", fail_untyped=False)
    parser.add_argument("--seed_everything", type=int | bool | None, default=None)
    cfg = parser.parse_object(
        {k: config[k] for k in ("model", "data", "trainer", "seed_everything") if k in config}
    )
    assert cfg.model.class_path == "amrg.modules.reporter.ReporterModule"
    model = instantiate_module(
        ReporterModule, {"_class_path": cfg.model.class_path, **config["model"].get("init_args", {})}
    )
    assert model.net is None and model.decoding.num_beams == 3
    assert model.decoding.repetition_penalty == 2.0 and model.decoding.length_penalty == 2.0
    if recipe.parent.name != "demo":
        assert model.llm_training == "lora" and model.lora.r == 16
        assert set(model.lora.target_modules) == {"q_proj", "v_proj"} and model.dtype_name == "bfloat16"
    assert all(not str(p).startswith("/") for p in (model.stage1_checkpoint, model.visual_memory_path))
    assert len(LABELS) == 14
