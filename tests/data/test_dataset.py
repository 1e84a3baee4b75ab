"""ReportDataset and collate: views, labels, DICOM views, and bad images named or counted."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amrg.data.dataset import ReportDataset, collate_studies
from amrg.data.images import BadImageError, ImageTooLargeError, OutsideRootError
from amrg.data.schema import Study, load_annotation
from tests.conftest import write_image
from tests.data.test_dicom import write_dicom


def _study(i: str, n_views: int = 1, labels=None) -> Study:
    return Study(
        i, "Heart normal. 1. No effusion.", tuple(f"{i}/{v}.png" for v in range(n_views)), "train", labels
    )


def test_views_masks_and_labels(tmp_path: Path) -> None:
    for v in range(3):
        write_image(tmp_path / "a" / f"{v}.png", seed=v)
    write_image(tmp_path / "b" / "0.png", seed=9)
    studies = [_study("a", 3, labels=(1, 0, -1) + (None,) * 11), _study("b", 1)]
    ds = ReportDataset(studies, tmp_path, image_size=16, max_views=2, cleaning="iu_xray")
    a, b = ds[0], ds[1]
    assert a["images"].shape == (2, 3, 16, 16)  # third view dropped
    assert a["view_mask"].tolist() == [True, True]
    assert b["view_mask"].tolist() == [True, False]
    assert torch.equal(b["images"][1], torch.zeros(3, 16, 16))  # "zeros" fill
    assert a["report"] == "heart normal . no effusion ."
    assert a["labels"][:3].tolist() == [1.0, 0.0, -1.0] and math.isnan(a["labels"][3])
    assert torch.isnan(b["labels"]).all()
    rep = ReportDataset(studies, tmp_path, image_size=16, max_views=2, fill_missing_view="repeat")
    assert torch.equal(rep[1]["images"][1], rep[1]["images"][0])
    batch = collate_studies([a, b])
    assert batch.images.shape == (2, 2, 3, 16, 16) and batch.view_mask.shape == (2, 2)
    assert batch.labels.shape == (2, 14) and batch.ids == ["a", "b"] and len(batch) == 2


def test_a_two_view_dicom_study_reads_as_its_png_twin(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frontal = rng.integers(0, 4096, size=(40, 36)).astype(np.uint16)
    frontal[0, 0], frontal[-1, -1] = 0, 4095  # full 12-bit range: the PNG's min-max scaling is /4095 too
    lateral = rng.integers(0, 256, size=(36, 40)).astype(np.uint8)
    write_dicom(tmp_path / "dcm" / "s1" / "0.dcm", frontal, bits_stored=12)
    write_dicom(tmp_path / "dcm" / "s1" / "1.dcm", 255 - lateral, photometric="MONOCHROME1")
    (tmp_path / "png" / "s1").mkdir(parents=True)
    Image.fromarray(frontal).save(tmp_path / "png" / "s1" / "0.png")
    Image.fromarray(lateral, mode="L").save(tmp_path / "png" / "s1" / "1.png")
    report = "Heart normal. No effusion."
    dcm = ReportDataset([Study("s1", report, ("s1/0.dcm", "s1/1.dcm"), "test")], tmp_path / "dcm", 16)
    png = ReportDataset([Study("s1", report, ("s1/0.png", "s1/1.png"), "test")], tmp_path / "png", 16)
    a, b = dcm[0], png[0]
    assert a["images"].shape == (2, 3, 16, 16) and a["view_mask"].tolist() == [True, True]
    torch.testing.assert_close(a["images"], b["images"], atol=1e-4, rtol=0)
    assert collate_studies([a]).images.shape == (1, 2, 3, 16, 16)


def test_missing_image_names_study_and_file(tmp_path: Path) -> None:
    ds = ReportDataset([_study("gone")], tmp_path, image_size=16, split="val")
    with pytest.raises(BadImageError, match=r"val id='gone': image .*gone/0.png not found"):
        ds[0]


def test_corrupt_image_names_study_and_file(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ReportDataset([_study("bad")], tmp_path, image_size=16, split="train")
    with pytest.raises(BadImageError, match=r"train id='bad': image .*bad/0.png is unreadable or corrupt"):
        ds[0]


def test_skip_bad_images_counts_and_logs(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "ok" / "0.png")
    ds = ReportDataset([_study("ok"), _study("gone")], tmp_path, image_size=16, on_bad_image="skip")
    with caplog.at_level(logging.WARNING):
        items = [ds[0], ds[1]]
        batch = collate_studies(items)
    assert items[1] is None and ds.skipped == 1
    assert batch.ids == ["ok"]
    assert "id='gone'" in caplog.text and "1 of 2 studies skipped" in caplog.text
    assert collate_studies([None]) is None


def test_building_touches_no_image(make_dataset) -> None:
    path = make_dataset()
    ann = load_annotation(path)
    for p in path.parent.rglob("*.png"):
        p.unlink()  # no image exists any more: building must still work
    ds = ReportDataset(ann["train"], path.parent, image_size=16)
    assert len(ds) == 4
    with pytest.raises(BadImageError):
        ds[0]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_views must be >= 1"):
        ReportDataset([], Path("."), max_views=0)
    with pytest.raises(ValueError, match="on_bad_image must be"):
        ReportDataset([], Path("."), on_bad_image="ignore")  # type: ignore[arg-type]


def test_image_paths_outside_the_root_are_refused_unless_allowed(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_image(root / "in" / "0.png")
    write_image(tmp_path / "secret.png", seed=3)
    studies = [
        _study("in"),
        Study("up", "r", ("../secret.png",), "train", None),
        Study("abs", "r", (str(tmp_path / "secret.png"),), "train", None),
    ]
    for mode in ("error", "skip"):  # a path escape is a refused annotation, not a bad image to skip
        with pytest.raises(OutsideRootError) as err:
            ReportDataset(studies, root, image_size=16, split="train", on_bad_image=mode)
        assert str(err.value) == (
            f"train id='up': image path '../secret.png' leaves the image root {root}; and 1 more such "
            "path(s) (set data.init_args.allow_outside_root=true to read such paths)"
        )
    ds = ReportDataset(studies, root, image_size=16, allow_outside_root=True)
    assert torch.equal(ds[1]["images"], ds[2]["images"])  # both read secret.png


def test_too_large_image_fails_naming_the_flag_or_is_skipped(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "big" / "0.png", size=40)
    write_image(tmp_path / "ok" / "0.png", size=20)
    studies = [_study("ok"), _study("big")]
    ds = ReportDataset(studies, tmp_path, image_size=16, split="val", max_pixels=1000)
    assert ds[0]["images"].shape == (2, 3, 16, 16)
    big = tmp_path / "big" / "0.png"
    msg = (
        f"val id='big': image {big} is 40x40 = 1,600 pixels, over the max_pixels cap of 1,000 pixels "
        "(set data.init_args.max_pixels)"
    )
    with pytest.raises(ImageTooLargeError) as err:
        ds[1]
    assert str(err.value) == msg
    skipping = ReportDataset(
        studies, tmp_path, image_size=16, split="val", max_pixels=1000, on_bad_image="skip"
    )
    with caplog.at_level(logging.WARNING):
        assert skipping[1] is None and skipping.skipped == 1
    assert msg in caplog.text
    with pytest.raises(ValueError, match="max_pixels must be >= 1 or None, got 0"):
        ReportDataset(studies, tmp_path, max_pixels=0)
