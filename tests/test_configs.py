"""Every recipe under configs/ parses composed with its dataset's data.yaml; stage-1 recipes build their model
(paper size on meta)."""

from pathlib import Path

import pytest
import torch
import yaml

from amrg import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATASETS = ("demo", "iu_xray", "mimic_cxr", "chexpert_plus")
STAGES = ("stage1", "memory", "stage2")
# data.yaml is not a recipe: it is composed with (and so parsed by) every recipe of its folder
RECIPES = sorted(
    p
    for p in CONFIGS.rglob("*.yaml")
    if p.parent.name not in ("trainer", "ablations") and p.name != "data.yaml"
)
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))
OVERLAYS = sorted((CONFIGS / "trainer").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch) -> None:
    # the recipes come from the args given here, not from pytest's own command line
    monkeypatch.setattr("sys.argv", ["amrg"])


def _id(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


def _composed(recipe: Path) -> list[str]:
    """``--config <folder>/data.yaml --config <recipe>``: how every recipe is run."""
    return ["--config", str(recipe.parent / "data.yaml"), "--config", str(recipe)]


def test_every_dataset_has_its_data_and_the_three_recipes() -> None:
    for folder in DATASETS:
        for stage in ("data", *STAGES):
            assert (CONFIGS / folder / f"{stage}.yaml").is_file(), f"configs/{folder}/{stage}.yaml"
    assert {p.parent.name for p in RECIPES} == set(DATASETS)
    assert len(RECIPES) == len(DATASETS) * len(STAGES), [_id(p) for p in RECIPES]


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_data_block_lives_in_data_yaml_only(dataset: str) -> None:
    data = yaml.safe_load((CONFIGS / dataset / "data.yaml").read_text())
    assert set(data) == {"data"} and data["data"]["class_path"].startswith("amrg.data.")
    for stage in STAGES:
        recipe = yaml.safe_load((CONFIGS / dataset / f"{stage}.yaml").read_text())
        block = recipe.get("data") or {}
        assert "class_path" not in block, f"configs/{dataset}/{stage}.yaml holds a data block of its own"
        # stage 2 may only change the batch sizes of the shared data
        assert set(block.get("init_args") or {}) <= {"batch_size", "eval_batch_size"}, (dataset, stage)


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_parses(path: Path, capsys) -> None:
    command = ["memory", "build"] if path.stem == "memory" else ["fit"]
    with pytest.raises(SystemExit) as info:
        cli.main([*command, *_composed(path), "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    printed = yaml.safe_load(captured.out)
    data = yaml.safe_load((path.parent / "data.yaml").read_text())["data"]
    assert printed["data"]["class_path"] == data["class_path"]  # the data block came from data.yaml
    for key, value in data["init_args"].items():
        if key not in (yaml.safe_load(path.read_text()).get("data") or {}).get("init_args", {}):
            assert printed["data"]["init_args"][key] == value, key


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem == "stage2"], ids=_id)
def test_stage2_overrides_only_the_batch_sizes(path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", *_composed(path), "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    printed = yaml.safe_load(captured.out)["data"]["init_args"]
    override = yaml.safe_load(path.read_text())["data"]["init_args"]
    assert override and all(printed[key] == value for key, value in override.items())


def _printed(command: list[str], args: list[str], capsys) -> dict:
    """The config `amrg <command> <args> --print_config` prints (every file merged, paths resolved)."""
    with pytest.raises(SystemExit) as info:
        cli.main([*command, *args, "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code == 0, captured.err
    return yaml.safe_load(captured.out)


@pytest.mark.parametrize("dataset", DATASETS)
def test_stage1_recipes_keep_best_and_the_last_epoch(dataset: str, capsys) -> None:
    recipe = CONFIGS / dataset / "stage1.yaml"
    printed = _printed(["fit"], [*_composed(recipe), "--run_root=/elsewhere/run"], capsys)
    checkpoints = {
        c["init_args"]["filename"]: c["init_args"]
        for c in printed["trainer"]["callbacks"]
        if c["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    }
    assert set(checkpoints) == {"best", "last"}, checkpoints
    best, last = checkpoints["best"], checkpoints["last"]
    # both under the run's root (what --run_root moved), where memory build and stage 2 look
    assert best["dirpath"] == last["dirpath"] == "/elsewhere/run/stage1/checkpoints"
    assert best["monitor"] and best["enable_version_counter"] is False and not best.get("save_last")
    assert last["monitor"] is None and last["save_top_k"] == 1 and last["enable_version_counter"] is False
    assert not last.get("save_last")


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_stages_of_a_dataset_share_one_run_root(dataset: str, capsys) -> None:
    folder = CONFIGS / dataset
    roots = {
        stage: _printed(
            ["memory", "build"] if stage == "memory" else ["fit"], _composed(folder / f"{stage}.yaml"), capsys
        )["run_root"]
        for stage in STAGES
    }
    assert set(roots.values()) == {f"runs/{dataset}"}, roots
    # memory build defaults its stage-1 checkpoint and out_dir under run_root (none given in the recipe)
    memory = _printed(["memory", "build"], _composed(folder / "memory.yaml"), capsys)
    assert memory["stage1_checkpoint"] is None and memory["out_dir"] is None
    # stage 2 reads what stage 1 and memory build wrote under the same root, moved by --run_root
    stage2 = _printed(["fit"], [*_composed(folder / "stage2.yaml"), "--run_root=/elsewhere/run"], capsys)
    net = stage2["model"]["init_args"]["net"]["init_args"]
    assert net["stage1_checkpoint"] == "/elsewhere/run/stage1/checkpoints/last.ckpt"
    assert net["memory"] == "/elsewhere/run/memory"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_id)
def test_trainer_overlays_parse(overlay: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(
            ["fit", *_composed(CONFIGS / "demo" / "stage1.yaml"), "--config", str(overlay), "--print_config"]
        )
    assert info.value.code == 0, capsys.readouterr().err


def test_demo_stage1_builds() -> None:
    built = cli.lightning_cli(
        [*_composed(CONFIGS / "demo" / "stage1.yaml"), "--trainer.logger=false", "--trainer.callbacks=[]"],
        run=False,
    )
    x = torch.zeros(2, 2, 3, 64, 64)
    assert built.model(x, torch.ones(2, 2, dtype=torch.bool)).shape == (2, 14)
    assert built.datamodule.hparams.image_size == built.model.net.encoder.img_size == 64


@pytest.mark.parametrize("dataset", ["iu_xray", "mimic_cxr", "chexpert_plus"])
def test_paper_stage1_builds_on_meta(dataset: str) -> None:
    # Swin-B + BERT-base Q-Former at paper size: built on the meta device (no memory, no weights).
    with torch.device("meta"):
        built = cli.lightning_cli(
            [
                *_composed(CONFIGS / dataset / "stage1.yaml"),
                "--config",
                str(CONFIGS / "trainer" / "cpu.yaml"),
                "--trainer.logger=false",
                "--trainer.callbacks=[]",
            ],
            run=False,
        )
    net = built.model.net
    assert net.qformer.hidden_size == 768 and net.qformer.num_layers == 12
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params > 150e6, n_params  # Swin-B (~87M) + BERT-base-sized Q-Former (~100M)
    assert built.datamodule.hparams.image_size == net.encoder.img_size


@pytest.mark.parametrize("stage", STAGES)
def test_iu_synth_data_composes_with_the_demo_recipes(stage: str, capsys) -> None:
    # configs/iu_synth/data.yaml replaces the demo's data block: same tiny models, real IU report text
    command = ["memory", "build"] if stage == "memory" else ["fit"]
    args = [
        "--config",
        str(CONFIGS / "iu_synth" / "data.yaml"),
        "--config",
        str(CONFIGS / "demo" / f"{stage}.yaml"),
    ]
    data = _printed(command, args, capsys)["data"]
    assert data["class_path"] == "amrg.data.datamodules.IUXrayDataModule"
    assert data["init_args"]["image_size"] == 64 and data["init_args"]["labels_from_reports"] is False


def test_every_ablation_of_the_issue_has_an_overlay() -> None:
    names = {p.stem for p in ABLATIONS}
    assert names == {"no_visual_memory", "no_report_memory", "no_memory", "cross_attention", "pooled_queries"}


@pytest.mark.parametrize("overlay", ABLATIONS, ids=_id)
def test_ablation_overlays_compose_with_a_stage2_recipe(overlay: Path, capsys) -> None:
    printed = _printed(
        ["fit"], [*_composed(CONFIGS / "demo" / "stage2.yaml"), "--config", str(overlay)], capsys
    )
    assert printed["trainer"]["default_root_dir"] == f"runs/demo/ablations/{overlay.stem}"
    net = printed["model"]["init_args"]["net"]["init_args"]
    assert net["stage1_checkpoint"] == "runs/demo/stage1/checkpoints/last.ckpt"  # the full model's inputs
    assert net["memory"] == "runs/demo/memory"
    retrievers = {net["visual_retriever"]["class_path"], net["report_retriever"]["class_path"]}
    expected = {
        "no_visual_memory": ("amrg.models.NoRetriever", "disease"),
        "no_report_memory": ("amrg.models.NoRetriever", "disease"),
        "no_memory": ("amrg.models.NoRetriever", "disease"),
        "cross_attention": ("amrg.models.CrossAttentionRetriever", "disease"),
        "pooled_queries": ("amrg.models.HopfieldRetriever", "pooled"),
    }[overlay.stem]
    assert expected[0] in retrievers and net["queries"] == expected[1]


# --------------------------------------------------------------------------------------------------
# Trainer overlays build (issue 15): every overlay gives a Trainer on the CPU; FSDP and DeepSpeed need GPUs
# (and FSDP a process group), so their strategy objects are instantiated from the YAML instead.

_GPU_ONLY = {"fsdp", "deepspeed_zero2", "deepspeed_zero3"}
_MULTI_GPU = ("ddp_gpu", "fsdp")  # what multinode.yaml composes after


def _strategy(overlay: Path):
    """The strategy object a YAML overlay names, instantiated the way LightningCLI does (jsonargparse)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    config = parser.parse_object({"strategy": yaml.safe_load(overlay.read_text())["trainer"]["strategy"]})
    # jsonargparse >= 4.49 names it instantiate (instantiate_classes is deprecated); pyproject allows 4.43
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config).strategy


@pytest.mark.parametrize("overlay", [p for p in OVERLAYS if p.stem not in _GPU_ONLY], ids=_id)
def test_trainer_overlays_build_a_trainer_on_cpu(overlay: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    extra = ["--config", str(CONFIGS / "trainer" / "ddp_gpu.yaml")] if overlay.stem == "multinode" else []
    built = cli.lightning_cli(
        [
            *_composed(CONFIGS / "demo" / "stage1.yaml"),
            *extra,
            "--config",
            str(overlay),
            "--trainer.accelerator=cpu",  # the GPU overlays' own settings, on the CPU
            "--trainer.logger=false",
            "--trainer.accumulate_grad_batches=4",  # gradient accumulation is a plain override
        ],
        run=False,
    )
    trainer = built.trainer
    assert trainer.accumulate_grad_batches == 4
    settings = yaml.safe_load(overlay.read_text())["trainer"]
    if "precision" in settings:
        assert trainer.precision == settings["precision"]
    if overlay.stem == "multinode":
        assert trainer.num_nodes == 2 and isinstance(trainer.strategy, DDPStrategy)
    if overlay.stem in ("ddp_gpu", "ddp_cpu"):
        assert isinstance(trainer.strategy, DDPStrategy)


def test_multinode_composes_with_every_multi_gpu_overlay(capsys) -> None:
    for base in _MULTI_GPU:
        printed = _printed(
            ["fit"],
            [
                *_composed(CONFIGS / "demo" / "stage2.yaml"),
                "--config",
                str(CONFIGS / "trainer" / f"{base}.yaml"),
                "--config",
                str(CONFIGS / "trainer" / "multinode.yaml"),
                "--trainer.num_nodes=4",  # as docs/cluster.md sets it from $SLURM_NNODES
            ],
            capsys,
        )["trainer"]
        assert printed["num_nodes"] == 4 and printed["strategy"]["class_path"].endswith(
            {"ddp_gpu": "DDPStrategy", "fsdp": "Stage2FSDPStrategy"}[base]
        )


def test_fsdp_overlay_shards_the_llm_decoder_layers_and_replicates_stage1() -> None:
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from amrg.modules.strategies import Stage2FSDPStrategy

    strategy = _strategy(CONFIGS / "trainer" / "fsdp.yaml")
    # keeps the frozen stage-1 network out of FSDP (tests/modules/test_strategies.py runs it)
    assert isinstance(strategy, Stage2FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert set(policy._module_classes) == {LlamaDecoderLayer, Qwen2DecoderLayer}
    # frozen and trainable parameters share the network: FSDP must keep the original parameters
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"  # one .ckpt that load_stage2 reads without FSDP
    assert (
        yaml.safe_load((CONFIGS / "trainer" / "fsdp.yaml").read_text())["trainer"]["precision"]
        == "bf16-mixed"
    )


def _deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_overlays_name_their_zero_stage(stage: int, capsys) -> None:
    overlay = CONFIGS / "trainer" / f"deepspeed_zero{stage}.yaml"
    printed = _printed(
        ["fit"], [*_composed(CONFIGS / "demo" / "stage2.yaml"), "--config", str(overlay)], capsys
    )
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == stage and printed["trainer"]["precision"] == "bf16-mixed"
    if _deepspeed_available():
        return
    # deepspeed is an optional extra: without it the strategy refuses to start and says what is missing
    with pytest.raises(Exception, match="(?i)deepspeed"):
        _strategy(overlay)


@pytest.mark.skipif(
    not _deepspeed_available(), reason="deepspeed not installed (optional extra: pip install deepspeed)"
)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_overlays_instantiate(stage: int) -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = _strategy(CONFIGS / "trainer" / f"deepspeed_zero{stage}.yaml")
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
