"""amrg.figures: overlays, memory patches cut from their source images (or a placeholder), one page per study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amrg.figures import NOT_FOUND, cam_overlay, memory_patch, patch_picture, save_study_figure, study_figure
from amrg.inference import StudyPrediction
from amrg.labels import LABELS
from amrg.models.reporter import RecalledItem
from tests.conftest import write_image


def _prediction(views: int = 2, reference: str | None = "the heart is normal .") -> StudyPrediction:
    rng = np.random.default_rng(0)
    probabilities = {label: float(p) for label, p in zip(LABELS, rng.uniform(0, 1, len(LABELS)), strict=True)}
    cams = {
        label: rng.uniform(0, 1, (views, 16, 16)).astype(np.float32) for label in ("Edema", "Cardiomegaly")
    }
    recalled = [
        RecalledItem("visual", "train_001", "Edema", 0.4, 3, view=0, box=(8, 8, 24, 24), image="a/0.png"),
        RecalledItem("visual", "train_002", "Cardiomegaly", 0.3, 5, view=1, box=(0, 0, 16, 16)),  # no image
        RecalledItem("visual", "train_003", "Edema", 0.2, 7, view=0, box=(4, 4, 12, 12), image="gone/0.png"),
        RecalledItem("report", "train_004", "Edema", 0.5, 1, text="mild edema . " * 12),
        RecalledItem("report", "train_005", "Cardiomegaly", 0.1, 2, text="big heart ."),
    ]
    return StudyPrediction(
        id="sub/study",
        probabilities=probabilities,
        report="mild pulmonary edema . the heart is enlarged .",
        recalled=recalled,
        cams=cams,
        views=[rng.uniform(0, 1, (40, 32)).astype(np.float32) for _ in range(views)],
        sources=["/data/x/frontal.dcm", None][:views],
        reference=reference,
    )


def test_cam_overlay_is_the_view_tinted_where_the_map_is_high() -> None:
    view = np.full((20, 10), 0.5, dtype=np.float32)
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[:2] = 1.0  # the top half is hot
    out = cam_overlay(view, cam, alpha=0.5)
    assert out.shape == (20, 10, 3) and out.dtype == np.uint8
    top, bottom = out[1, 5].astype(int), out[-2, 5].astype(int)
    assert top[0] > top[2] and bottom[2] > bottom[0]  # jet: red where high, blue where low
    assert np.array_equal(cam_overlay(view, cam, alpha=0.0)[..., 0], np.full((20, 10), 128, np.uint8))


def test_a_memory_patch_comes_from_its_source_image_or_a_placeholder(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "0.png", size=32, seed=3)
    found = memory_patch({"image": "a/0.png", "box": [8, 8, 24, 24]}, tmp_path)
    assert found.found and found.image.shape == (32, 32) and found.box == (8.0, 8.0, 24.0, 24.0)
    expected = np.asarray(Image.open(tmp_path / "a" / "0.png"), dtype=np.float32) / 255
    assert np.allclose(found.image, expected)
    # older memories record no image path; a moved dataset has none at the path; no root is known
    old = memory_patch({"box": [0, 0, 16, 16], "image_size": [64, 48]}, tmp_path)
    assert not old.found and old.image.shape == (48, 64) and "records no image path" in old.reason
    gone = memory_patch(
        RecalledItem("visual", "s", "Edema", 0.1, 0, box=(4, 4, 12, 12), image="x.png"), tmp_path
    )
    assert not gone.found and "not found" in gone.reason and gone.image.shape == (16, 16)
    assert "image root is unknown" in memory_patch({"image": "a/0.png"}, None).reason
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert not memory_patch({"image": "broken.png", "box": [0, 0, 4, 4]}, tmp_path).found


def test_a_patch_picture_draws_the_box_on_the_enlarged_view(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "black.png")
    picture = patch_picture({"image": "black.png", "box": [8, 8, 16, 16]}, tmp_path, min_side=128)
    assert picture.shape == (128, 128, 3)  # 4x: the box is at [32, 32, 64, 64]
    assert tuple(picture[32, 48]) == (255, 48, 48) and tuple(picture[100, 100]) == (0, 0, 0)
    placeholder = patch_picture({"box": [8, 8, 16, 16]}, tmp_path, min_side=64)
    assert placeholder.shape[0] >= 64 and (placeholder > 200).all(axis=2).any()  # white "not found" text


def test_the_study_figure_shows_every_part(tmp_path: Path) -> None:
    write_image(tmp_path / "memory" / "a" / "0.png", size=32, seed=3)
    fig = study_figure(_prediction(), tmp_path / "memory")
    titles = [ax.get_title() for ax in fig.axes]
    assert "view 0: frontal.dcm" in titles and "view 1: in memory" in titles
    assert sum(t.startswith("Grad-CAM: Edema") for t in titles) == 2  # one overlay per view
    assert sum(t.startswith("Grad-CAM: Cardiomegaly") for t in titles) == 2
    patches = [t for t in titles if "w=" in t]
    assert patches == [
        "Edema  w=0.400\ntrain_001 view 0",
        "Cardiomegaly  w=0.300\ntrain_002 view 1",
        "Edema  w=0.200\ntrain_003 view 0",
    ]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count(NOT_FOUND) == 2  # no image recorded, image gone; the first one is found
    report = next(t for t in texts if t.startswith("generated:"))
    assert "mild pulmonary edema" in report and "reference:\nthe heart is normal ." in report
    recalled = next(t for t in texts if t.startswith("w=0.500"))
    assert "Edema  (train_004)" in recalled and "w=0.100  Cardiomegaly  (train_005)\nbig heart ." in recalled
    bars = next(ax for ax in fig.axes if ax.get_xlabel().startswith("probability"))
    assert [t.get_text() for t in bars.get_yticklabels()] == list(LABELS)

    out = save_study_figure(_prediction(), tmp_path / "figs" / "sub" / "study.png", tmp_path / "memory")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] == 1500
    assert sorted(p.name for p in out.parent.iterdir()) == ["study.png"]  # no temp file left


@pytest.mark.parametrize("views", [1, 3])
def test_a_stage1_prediction_draws_views_and_probabilities_only(tmp_path: Path, views: int) -> None:
    pred = _prediction(views=views, reference=None)
    pred.report, pred.recalled = None, []
    pred.sources = [None] * views
    fig = study_figure(pred)
    titles = [ax.get_title() for ax in fig.axes]
    assert sum(t.startswith("view ") for t in titles) == views and not any("w=" in t for t in titles)
    assert not any(t.get_text().startswith("generated:") for ax in fig.axes for t in ax.texts)
    save_study_figure(pred, tmp_path / "s.png")
