"""Every recipe under configs/ parses; stage-1 recipes build their model (paper size on meta)."""

from pathlib import Path

import pytest
import torch

from amrg import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "trainer")
OVERLAYS = sorted((CONFIGS / "trainer").glob("*.yaml"))


def _id(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


def test_every_dataset_has_the_three_recipes() -> None:
    for folder in ("demo", "iu_xray", "mimic_cxr", "chexpert_plus"):
        for stage in ("stage1", "memory", "stage2"):
            assert (CONFIGS / folder / f"{stage}.yaml").is_file(), f"configs/{folder}/{stage}.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_parses(path: Path, capsys) -> None:
    command = ["memory", "build"] if path.stem == "memory" else ["fit"]
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--config", str(path), "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_id)
def test_trainer_overlays_parse(overlay: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", str(CONFIGS / "demo" / "stage1.yaml"), "--config", str(overlay),
                  "--print_config"])
    assert info.value.code == 0, capsys.readouterr().err


def test_demo_stage1_builds() -> None:
    built = cli.lightning_cli(["--config", str(CONFIGS / "demo" / "stage1.yaml"),
                               "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
    x = torch.zeros(2, 2, 3, 64, 64)
    assert built.model(x, torch.ones(2, 2, dtype=torch.bool)).shape == (2, 14)


@pytest.mark.parametrize("dataset", ["iu_xray", "mimic_cxr", "chexpert_plus"])
def test_paper_stage1_builds_on_meta(dataset: str) -> None:
    # Swin-B + BERT-base Q-Former at paper size: built on the meta device (no memory, no weights).
    with torch.device("meta"):
        built = cli.lightning_cli(["--config", str(CONFIGS / dataset / "stage1.yaml"),
                                   "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
                                   "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
    net = built.model.net
    assert net.qformer.hidden_size == 768 and net.qformer.num_layers == 12
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params > 150e6, n_params  # Swin-B (~87M) + BERT-base-sized Q-Former (~100M)
