"""notebooks/: committed without outputs, and executed headless (nbclient) against a tiny run built here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the notebook extra (make setup)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the notebook extra (make setup)")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXPLORE = NOTEBOOKS / "explore_checkpoint.ipynb"
TINY = [  # seconds-long stages, as `amrg demo --preset tiny` runs them
    "--data.init_args.n=40",
    "--data.init_args.batch_size=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_hold_no_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name} code cell {i} has outputs"
        assert "execution" not in cell.metadata, f"{path.name} code cell {i} keeps execution timings"


def _amrg(args: list[str], cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "amrg.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, " ".join(args) + "\n" + done.stderr[-4000:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stage 1 -> memory -> stage 2 with the demo recipes into one run folder (as `amrg demo` lays it out)."""
    run = tmp_path_factory.mktemp("tiny_run")
    data = REPO / "configs" / "demo" / "data.yaml"
    common = ["--run_root", str(run), f"--data.init_args.root={run / 'data'}"]
    for stage in ("stage1", "memory", "stage2"):
        recipe = ["-c", str(data), "-c", str(REPO / "configs" / "demo" / f"{stage}.yaml"), *common]
        command = ["memory", "build", *recipe, *TINY[:1]] if stage == "memory" else ["fit", *recipe, *TINY]
        _amrg(command, cwd=run)
    return run


@pytest.mark.slow
def test_explore_checkpoint_runs_on_a_tiny_run(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMRG_RUN", str(tiny_run))
    monkeypatch.setenv("AMRG_DATA_YAML", str(REPO / "configs" / "demo" / "data.yaml"))
    notebook = nbformat.read(EXPLORE, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "Predictor(stage=1" in text and "Predictor(stage=2" in text and "test studies from" in text
    assert "MemoryBank(kind='visual'" in text
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(pictures) == 5  # CAM per disease, one study's evidence, ROI patches, attention, ROC curves
    tables = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert len(tables) == 1 and tables[0].startswith("| study | generated | reference | labels that differ")
    assert len(tables[0].splitlines()) == 2 + 4  # header, rule, the 4 test studies of a 40-study run
