"""``amrg data iu-synth``: labels, reports, split, films, determinism, whole-or-absent output, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from amrg import cli
from amrg.data.check import check_dataset
from amrg.data.iu_synth import PROVENANCE, IUSynthResult, iu_synthesize, split_studies
from amrg.labels import LABELS, NUM_LABELS, label_index

SIZE = 32  # tiny films: the tests check structure, not looks


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(out: Path) -> dict[str, dict]:
    ann = json.loads((out / "annotation.json").read_text())
    return {r["id"]: r for recs in ann.values() for r in recs}


def _positive(rec: dict) -> set[str]:
    return {name for name, v in zip(LABELS, rec["labels"]) if v == 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory, make_tgz) -> tuple[Path, Path, IUSynthResult]:
    """The six-report archive and the dataset written from it (seed 0), shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("iu")
    tgz = make_tgz(tmp / "NLMCXR_reports.tgz")
    out = tmp / "iu_synth"
    return tgz, out, iu_synthesize(out, tgz, seed=0, image_size=SIZE, progress=False)


def test_dataset_passes_check_and_keeps_the_reports(built):
    tgz, out, res = built
    report = check_dataset(res.annotation, progress=False)
    assert report.ok, report.format()
    assert sum(res.counts.values()) == 5 and res.skipped == ["CXR4"]
    recs = _records(out)
    assert sorted(recs) == ["CXR1", "CXR2", "CXR3", "CXR5", "CXR6"]
    assert recs["CXR2"]["report"] == "The heart is enlarged. Small right pleural effusion. No pneumothorax."
    assert recs["CXR3"]["report"] == "Right lower lobe pneumonia."  # IMPRESSION where FINDINGS is empty
    for sid, rec in recs.items():
        assert set(rec) == {"id", "report", "image_path", "split", "labels", "boxes"}
        assert rec["image_path"] == [f"images/{sid}/0.png", f"images/{sid}/1.png"]
        for rel in rec["image_path"]:
            with Image.open(out / rel) as img:
                assert img.mode == "L" and img.size == (SIZE, SIZE)
    prov = json.loads((out / PROVENANCE).read_text())
    assert prov["written_by"] == "amrg data iu-synth" and prov["skipped"] == ["CXR4"]
    assert prov["reports"] == "NLMCXR_reports.tgz" and prov["seed"] == 0 and prov["image_size"] == SIZE
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_labels_from_mesh_and_the_labeler(built):
    recs = _records(built[1])
    assert all(len(r["labels"]) == NUM_LABELS for r in recs.values())
    assert _positive(recs["CXR1"]) == {"No Finding"}  # MeSH "normal"
    assert _positive(recs["CXR2"]) == {"Cardiomegaly", "Pleural Effusion"}
    assert (
        recs["CXR2"]["labels"][label_index("Pneumothorax")] == 0
    )  # MeSH silent: the labeler's "no pneumothorax"
    assert _positive(recs["CXR3"]) == {"Pneumonia"}
    # Nodule from MeSH (the text does not say it); the pacemaker from the labeler (MeSH does not)
    assert _positive(recs["CXR5"]) == {"Lung Opacity", "Lung Lesion", "Support Devices"}
    # MeSH "normal" wins over the labeler's uncertain "stable cardiomediastinal silhouette"
    assert recs["CXR6"]["labels"][label_index("Enlarged Cardiomediastinum")] is None
    assert _positive(recs["CXR6"]) == {"No Finding"}


def test_every_positive_finding_is_drawn_in_both_views(built):
    for rec in _records(built[1]).values():
        drawn = {(b["label"], b["view"]) for b in rec["boxes"]}
        findings = _positive(rec) - {"No Finding"}
        assert drawn == {(name, v) for name in findings for v in (0, 1)}, rec["id"]
        for b in rec["boxes"]:
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE


def test_split_is_7_1_2_deterministic_and_seeded():
    ids = [f"CXR{i}" for i in range(1, 101)]
    split = split_studies(ids, seed=0)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 10, "test": 20}
    assert split_studies(list(reversed(ids)), seed=0) == split  # input order does not matter
    assert split_studies(ids, seed=1) != split
    ten = split_studies(ids[:10], seed=3)
    assert sorted(ten.values()) == ["test"] * 2 + ["train"] * 7 + ["val"]
    with pytest.raises(ValueError, match="duplicate study ids"):
        split_studies(["CXR1", "CXR1"], seed=0)


def test_same_seed_same_bytes_and_a_wheel_gives_the_same_dataset(built, tmp_path, make_wheel):
    tgz, out, res = built
    wheel = make_wheel(tmp_path / "torchxrayvision-1.5.7-py3-none-any.whl", tgz)
    again = iu_synthesize(tmp_path / "from_wheel", wheel, seed=0, image_size=SIZE, progress=False)
    a, b = _tree(out), _tree(tmp_path / "from_wheel")
    assert a.pop(PROVENANCE) != b.pop(PROVENANCE)  # it names the file it was made from
    assert a == b and again.counts == res.counts
    other = iu_synthesize(tmp_path / "seed1", tgz, seed=1, image_size=SIZE, progress=False)
    assert other.annotation.read_bytes() != res.annotation.read_bytes()


def test_out_folder_rules(iu_tgz, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(
        ValueError, match=r"foreign: exists, is not empty and was not written by amrg data iu-synth"
    ):
        iu_synthesize(foreign, iu_tgz, image_size=SIZE, progress=False)
    assert _tree(foreign) == {"notes.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    iu_synthesize(empty, iu_tgz, image_size=SIZE, progress=False)
    (empty / "stale.txt").write_text("from an older run")
    iu_synthesize(empty, iu_tgz, image_size=SIZE, progress=False)  # ours: replaced whole
    assert not (empty / "stale.txt").exists() and (empty / "annotation.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NLMCXR_reports.tgz", "empty", "foreign"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        iu_synthesize(a_file, iu_tgz, image_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="--image-size must be >= 16"):
        iu_synthesize(tmp_path / "tiny", iu_tgz, image_size=8, progress=False)


def test_bad_input_leaves_nothing_and_names_the_flag(tmp_path, make_tgz):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"^--reports .*missing\.tgz: no such file"):
        iu_synthesize(out, tmp_path / "missing.tgz", progress=False)
    no_reports = make_tgz(tmp_path / "empty.tgz", {"readme.txt": b"hi"})
    with pytest.raises(ValueError, match=r"^--reports .*empty\.tgz: no Open-i XML reports"):
        iu_synthesize(out, no_reports, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.tgz"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "missing.tgz: no such file"),
        ("folder", "is a folder"),
        ("neither", "neither a .tgz (gzip) nor a wheel (zip)"),
    ],
)
def test_cli_prints_one_line_and_exits_1(tmp_path, capsys, kind, message):
    src = {"missing": tmp_path / "missing.tgz", "folder": tmp_path, "neither": tmp_path / "r.txt"}[kind]
    if kind == "neither":
        src.write_text("FINDINGS: clear lungs")
    with pytest.raises(SystemExit) as info:
        cli.main(["data", "iu-synth", "--out", str(tmp_path / "out"), "--reports", str(src)])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("amrg: error: data iu-synth: --reports ") and message in err and "\n" not in err


def test_cli_writes_the_dataset(iu_tgz, tmp_path, capsys):
    cli.main(
        ["data", "iu-synth", "--out", str(tmp_path / "out"), "--reports", str(iu_tgz), "--image-size", "24"]
    )
    out = capsys.readouterr().out
    assert "wrote 5 IU studies (train" in out and "1 skipped" in out
    assert check_dataset(tmp_path / "out" / "annotation.json", progress=False).ok
