"""Synthetic datasets on disk: schema, determinism, prefix stability, argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from amrg.data.schema import load_annotation
from amrg.data.synthetic import synthesize
from amrg.labels import NUM_LABELS


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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


def test_synthesize_prefix_stable_and_overwrites(tmp_path):
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
    with pytest.raises(ValueError, match="n must be >= 1.*val_fraction"):
        synthesize(tmp_path, n=0, val_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        synthesize(tmp_path, n=10, val_fraction=0.5, test_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="two_view_prob"):
        synthesize(tmp_path, n=10, two_view_prob=2.0, progress=False)
    assert not (tmp_path / "annotation.json").exists()
