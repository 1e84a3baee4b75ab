"""The `amrg` command: one table of subcommands, help from docstrings, data commands end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from amrg import cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _amrg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amrg.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_help_lists_every_command(capsys) -> None:
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"amrg {name}" in out


def test_table_matches_parsers() -> None:
    from lightning.pytorch.cli import LightningCLI

    lightning = {name for name, (fn, _) in cli.COMMANDS.items() if fn is None}
    assert lightning == set(LightningCLI.subcommands()) == set(cli.LIGHTNING_COMMANDS)
    for name, (fn, help_) in cli.COMMANDS.items():
        assert help_, name
        if fn is not None:
            assert cli._handler(name).__doc__, f"{name}: its handler needs a docstring (the help text)"


@pytest.mark.parametrize("name", [n for n, (fn, _) in cli.COMMANDS.items() if fn is not None])
def test_command_help_shows_docstring(name: str, capsys) -> None:
    fn = cli._handler(name)
    with pytest.raises(SystemExit) as info:
        cli.main([*name.split(), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert fn.__doc__.splitlines()[0].strip()[:40] in " ".join(out.split())


def test_unknown_command_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_dashed_options_are_accepted() -> None:
    assert cli._dashes_to_underscores(["--image-size", "64", "--two-view-prob=0.5", "x-y"]) == [
        "--image_size",
        "64",
        "--two_view_prob=0.5",
        "x-y",
    ]


def test_bare_bool_options_mean_true() -> None:
    bare = cli._bare_flags(cli.eval_predictions, ["--no_meteor", "p.jsonl", "--seed", "1", "--no_meteor"])
    assert bare == ["--no_meteor", "true", "p.jsonl", "--seed", "1", "--no_meteor", "true"]
    given = ["--no_meteor", "false", "p.jsonl"]
    assert cli._bare_flags(cli.eval_predictions, given) == given


def test_data_check_reports_and_fails_on_missing(make_dataset) -> None:
    path = make_dataset()
    ok = _amrg("data", "check", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "train" in ok.stdout and "missing images: 0" in ok.stdout
    (path.parent / "val_000" / "0.png").unlink()
    bad = _amrg("data", "check", str(path), "--image-root", str(path.parent))
    assert bad.returncode == 1
    assert "val id='val_000'" in bad.stdout


def test_data_synth_check_preview(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    res = _amrg("data", "synth", "--out", str(out), "--n", "12", "--seed", "3", "--image-size", "64")
    assert res.returncode == 0, res.stderr
    ann = json.loads((out / "annotation.json").read_text())
    assert sum(len(v) for v in ann.values()) == 12
    assert _amrg("data", "check", str(out / "annotation.json")).returncode == 0
    grid = tmp_path / "grid.png"
    res = _amrg("data", "preview", str(out / "annotation.json"), "--out", str(grid), "--n", "4")
    assert res.returncode == 0, res.stderr
    assert grid.stat().st_size > 0


def test_ckpt_path_aliases_are_left_to_lightning() -> None:
    for alias in ("last", "best", "hpc", "registry", "registry:model:latest", "s3://bucket/last.ckpt"):
        assert cli._lightning_ckpt_alias(alias), alias
    for path in ("last.ckpt", "runs/best", "/tmp/x.ckpt"):
        assert not cli._lightning_ckpt_alias(path), path


def test_a_multi_line_message_is_folded_into_one_line() -> None:
    message = "x.json: 2 problem(s) in the annotation:\n  a: bad\n  b: worse\n  ... and 3 more"
    assert (
        cli._one_line(message) == "x.json: 2 problem(s) in the annotation: a: bad; b: worse; ... and 3 more"
    )
    assert cli._one_line("refused:\n  - one\n  - two") == "refused: one; two"
    assert cli._one_line("one line") == "one line"


def test_ckpt_path_is_checked_before_lightning_reads_it(tmp_path: Path, monkeypatch) -> None:
    """A missing file, and a weights-only checkpoint that fit cannot resume from, fail before the trainer."""
    import torch

    from amrg.errors import CheckpointError

    monkeypatch.setattr("sys.argv", ["amrg"])
    recipe = ["-c", str(CONFIGS / "demo" / "data.yaml"), "-c", str(CONFIGS / "demo" / "stage1.yaml")]
    with pytest.raises(CheckpointError, match=r"--ckpt_path '.*nope.ckpt' not found: expected a .ckpt file"):
        cli.lightning_cli(["fit", *recipe, "--ckpt_path", str(tmp_path / "nope.ckpt")])
    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0"}, weights)
    with pytest.raises(CheckpointError, match=r"holds the weights only \(no \['optimizer_states', 'lr_sched"):
        cli.lightning_cli(["fit", *recipe, "--ckpt_path", str(weights)])
    torch.save({"state_dict": {}}, weights)
    with pytest.raises(
        CheckpointError, match=r"was not written by Lightning \(no \['pytorch-lightning_version'"
    ):
        cli.lightning_cli(["fit", *recipe, "--ckpt_path", str(weights)])


def test_attribute_docstrings_are_read_only_for_help() -> None:
    """Reading every recipe class's source for field help costs ~2 s a command: only --help and
    --print_config pay it (the help text itself is checked by test_command_help_shows_docstring)."""
    from jsonargparse._optionals import get_docstring_parse_options

    for args, wanted in (
        (["fit", "-c", "recipe.yaml"], False),
        (["memory", "build", "--help"], True),
        (["fit", "-c", "recipe.yaml", "--print_config"], True),
        (["test", "-h"], True),
    ):
        cli._parsing_settings(args)
        assert get_docstring_parse_options()["attribute_docstrings"] is wanted, args
