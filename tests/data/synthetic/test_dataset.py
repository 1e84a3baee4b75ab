"""Synthetic datasets on disk: schema, determinism, prefix stability, argument checks."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from amrg.data.schema import load_annotation
from amrg.data.synthetic import synthesize, write_annotation
from amrg.errors import ConfigError, OutputError
from amrg.labels import NUM_LABELS


def _tree(root: Path, hidden: bool = True) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; ``hidden=False`` leaves out the lock file."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (hidden or not p.name.startswith("."))
    }


def test_synthesize_writes_a_valid_deterministic_dataset(tmp_path):
    ann = synthesize(tmp_path / "a", n=20, seed=4, image_size=32, progress=False)
    assert ann == tmp_path / "a" / "annotation.json"
    data = load_annotation(ann)
    assert data.counts() == {"train": 16, "val": 2, "test": 2}
    ids = [s.id for s in data]
    assert sorted(ids) == [f"synth_{i:06d}" for i in range(20)]
    for study in data:
        assert (
            len(study.image_paths) in (1, 2) and study.labels is not None and len(study.labels) == NUM_LABELS
        )
        for v, rel in enumerate(study.image_paths):
            assert rel == f"images/{study.id}/{v}.png"
            with Image.open(tmp_path / "a" / rel) as img:
                assert img.mode == "L" and img.size == (32, 32)
        assert all(b.view < len(study.image_paths) for b in study.boxes)
    raw = json.loads(ann.read_text())
    assert all(rec["split"] == split for split, recs in raw.items() for rec in recs)
    assert not list((tmp_path / "a").glob(".annotation.json.tmp*"))

    synthesize(tmp_path / "b", n=20, seed=4, image_size=32, progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    synthesize(tmp_path / "c", n=20, seed=5, image_size=32, progress=False)
    assert (tmp_path / "c" / "annotation.json").read_bytes() != ann.read_bytes()


def test_synthesize_prefix_stable_and_refuses_a_foreign_annotation(tmp_path):
    # Study i depends only on (seed, i): a smaller run is a prefix of a larger one.
    synthesize(
        tmp_path / "big",
        n=6,
        seed=1,
        image_size=24,
        two_view_prob=1.0,
        val_fraction=0,
        test_fraction=0,
        progress=False,
    )
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "annotation.json").write_text("stale")
    with pytest.raises(OutputError, match="it already holds an annotation.json without the synth.json"):
        synthesize(tmp_path / "small", n=3, seed=1, image_size=24, progress=False)
    assert (tmp_path / "small" / "annotation.json").read_text() == "stale"  # someone else's: left alone
    (tmp_path / "small" / "annotation.json").unlink()
    synthesize(
        tmp_path / "small",
        n=3,
        seed=1,
        image_size=24,
        two_view_prob=1.0,
        val_fraction=0,
        test_fraction=0,
        progress=False,
    )
    for i in range(3):
        for v in (0, 1):
            rel = f"images/synth_{i:06d}/{v}.png"
            assert (tmp_path / "big" / rel).read_bytes() == (tmp_path / "small" / rel).read_bytes()
    assert load_annotation(tmp_path / "small" / "annotation.json").counts() == {
        "train": 3,
        "val": 0,
        "test": 0,
    }


def test_synthesize_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="n must be >= 1.*val_fraction"):
        synthesize(tmp_path, n=0, val_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        synthesize(tmp_path, n=10, val_fraction=0.5, test_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="two_view_prob"):
        synthesize(tmp_path, n=10, two_view_prob=2.0, progress=False)
    assert not (tmp_path / "annotation.json").exists()


_WRITER = """
import logging, sys
from pathlib import Path
from amrg.data.synthetic import synthesize
from amrg.errors import AmrgError
logging.basicConfig(level=logging.INFO, format="%(message)s")
try:
    synthesize(Path(sys.argv[1]), n=30, seed=int(sys.argv[2]), image_size=32, progress=False)
except AmrgError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
"""


def _two_writers(out: Path, seeds: tuple[int, int]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(out), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[3],
        )
        for seed in seeds
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_two_writers_with_different_seeds_one_writes_and_the_other_refuses(tmp_path):
    out = tmp_path / "shared"
    results = _two_writers(out, (0, 1))
    assert sorted(r.returncode for r in results) == [0, 1], [r.stderr for r in results]
    winner, loser = sorted(results, key=lambda r: r.returncode)
    seed = int(winner.args[-1])
    lines = [line for line in loser.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: cannot write synthetic dataset '{out}': it holds a different one "
        f"(seed={seed} (asked {1 - seed})); delete it or choose another folder"
    ]
    # the annotation points at the winner's own images: byte-identical to a clean run with its seed
    synthesize(tmp_path / "clean", n=30, seed=seed, image_size=32, progress=False)
    assert _tree(out, hidden=False) == _tree(tmp_path / "clean", hidden=False)
    assert not list(out.glob(".synth-tmp-*"))


def test_two_writers_with_the_same_settings_both_succeed_and_one_reuses(tmp_path):
    out = tmp_path / "shared"
    results = _two_writers(out, (3, 3))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    logs = "".join(r.stderr for r in results)
    assert (
        logs.count("wrote 30 synthetic studies") == 1
        and logs.count("already holds this synthetic dataset") == 1
    )
    synthesize(tmp_path / "clean", n=30, seed=3, image_size=32, progress=False)
    assert _tree(out, hidden=False) == _tree(tmp_path / "clean", hidden=False)


def test_a_dead_writers_leftovers_are_replaced_but_foreign_images_are_not(tmp_path):
    out = tmp_path / "d"
    synthesize(out, n=4, seed=0, image_size=16, progress=False)
    (out / "annotation.json").unlink()  # as if killed between its last two renames
    (out / ".synth-tmp-999-dead").mkdir()
    (out / ".synth-tmp-999-dead" / "junk.png").write_bytes(b"x")
    (out / "images" / "stray").mkdir()
    synthesize(out, n=4, seed=0, image_size=16, progress=False)
    assert not (out / "images" / "stray").exists() and not list(out.glob(".synth-tmp-*"))
    synthesize(tmp_path / "clean", n=4, seed=0, image_size=16, progress=False)
    assert _tree(out, hidden=False) == _tree(tmp_path / "clean", hidden=False)

    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "mine.png").write_bytes(b"keep")
    with pytest.raises(OutputError, match="it holds an images folder without the synth.json"):
        synthesize(foreign, n=4, seed=0, image_size=16, progress=False)
    assert (foreign / "images" / "mine.png").read_bytes() == b"keep"


def test_write_annotation_failing_mid_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "annotation.json"
    write_annotation({"train": []}, path)
    before = path.read_bytes()

    def full_disk(obj, f, **kwargs):
        f.write('{"train": [')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    with pytest.raises(OutputError, match=f"cannot write annotation '{path}': no space left on the device"):
        write_annotation({"train": [{"id": "x"}]}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotation.json"]
