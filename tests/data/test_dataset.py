"""ReportDataset and collate: image kinds, views, labels, and bad images named or counted."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amrg.data.dataset import ReportDataset, collate_studies
from amrg.data.images import IMAGENET_MEAN, IMAGENET_STD, BadImageError, load_image, read_grayscale
from amrg.data.schema import Study, load_annotation
from tests.conftest import write_image


def _study(i: str, n_views: int = 1, labels=None) -> Study:
    return Study(i, "Heart normal. 1. No effusion.", tuple(f"{i}/{v}.png" for v in range(n_views)), "train", labels)


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA"])
def test_image_kinds_become_normalised_rgb(tmp_path: Path, mode: str) -> None:
    path = write_image(tmp_path / "x.png", size=40, mode=mode)
    x = load_image(path, image_size=24)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # channels are the same luminance, normalised per channel
    gray = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(gray[0], gray[1])
    assert 0.0 <= gray.min() and gray.max() <= 1.0 + 1e-6


def test_16bit_png_is_min_max_scaled(tmp_path: Path) -> None:
    # 12-bit data stored in 16 bits would be nearly black if divided by 65535
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    got = np.asarray(read_grayscale(tmp_path / "d.png"))
    np.testing.assert_allclose(got, arr / 4000.0, rtol=1e-6)


def test_jpeg_reads(tmp_path: Path) -> None:
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "x.jpg")
    assert load_image(tmp_path / "x.jpg", 16).shape == (3, 16, 16)


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
