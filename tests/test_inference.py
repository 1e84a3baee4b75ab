"""amrg.load / Predictor: one call loads either stage; paths, DICOM, PIL images and tensors predict alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import amrg
from amrg.checkpoints.safety import MODULE_KEY
from amrg.checkpoints.stage2 import RECORD_KEY
from amrg.data.images import BadImageError, load_image
from amrg.inference import Predictor, StudyPrediction, checkpoint_stage, load
from amrg.labels import LABELS
from amrg.memory.cam import study_cams
from tests.checkpoints.test_stage2 import build, save, stage2_files
from tests.conftest import write_image
from tests.data.test_dicom import write_dicom
from tests.models.test_reporter import IMAGE_SIZE, write_stage1_checkpoint

DECODE = {"max_new_tokens": 4, "num_beams": 1}


@pytest.fixture(scope="module")
def stage2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stage-2 checkpoint whose memory manifest records the CAM recipe and the image root."""
    root = tmp_path_factory.mktemp("inference_ckpt")
    net = build(stage2_files(root))
    net.build_record["memory"]["manifest"].update(
        cam={"method": "layercam", "target_layer": "stem", "patch_size": 8}, image_root=str(root / "images")
    )
    return save(net, root / "stage2.ckpt")


@pytest.fixture(scope="module")
def model(stage2_ckpt: Path) -> Predictor:
    return amrg.load(stage2_ckpt)


@pytest.fixture
def films(tmp_path: Path) -> dict[str, Path]:
    stored = (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 7) % 4096
    return {
        "png": write_image(tmp_path / "frontal.png", size=IMAGE_SIZE, seed=1),
        "lateral": write_image(tmp_path / "lateral.jpg", size=48, mode="RGB", seed=2),
        "dicom": write_dicom(tmp_path / "scan.dcm", stored, bits_stored=12),
    }


def test_the_package_exports_the_api_lazily() -> None:
    assert amrg.load is load and amrg.Predictor is Predictor and amrg.StudyPrediction is StudyPrediction
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = amrg.nope


def test_a_stage2_checkpoint_predicts_a_two_view_study(model: Predictor, stage2_ckpt: Path, films) -> None:
    assert model.stage == 2 and model.image_size == IMAGE_SIZE and model.checkpoint == stage2_ckpt
    # the memory build's CAM recipe and image root travel in the checkpoint's manifest
    assert (model.cam_method, model.cam_layer) == ("layercam", "stem")
    assert model.memory_image_root == stage2_ckpt.parent / "images"
    pred = model.predict([films["png"], films["lateral"]], id="p1", top_k=2, cam_labels=2, **DECODE)
    assert pred.id == "p1" and isinstance(pred.report, str)
    assert list(pred.probabilities) == list(LABELS) and all(0 < p < 1 for p in pred.probabilities.values())
    assert [i.memory for i in pred.recalled] == ["visual", "visual", "report", "report"]
    visual = pred.recalled[0]
    assert visual.view == 0 and visual.box == (0.0, 0.0, 8.0, 8.0)  # tests.models.test_reporter.tiny_banks
    # CAMs: the predicted labels, most probable first (the top one when none reaches 0.5), [V, S, S]
    ranked = sorted(LABELS, key=lambda label: -pred.probabilities[label])
    expected = [label for label in ranked if pred.probabilities[label] >= 0.5][:2] or ranked[:1]
    assert list(pred.cams) == expected
    for maps in pred.cams.values():
        assert maps.shape == (2, IMAGE_SIZE, IMAGE_SIZE) and maps.dtype == np.float32
        assert 0.0 <= maps.min() and maps.max() <= 1.0
    assert [v.shape for v in pred.views] == [(IMAGE_SIZE, IMAGE_SIZE), (48, 48)]
    assert pred.sources == [str(films["png"]), str(films["lateral"])]
    line = pred.as_dict()
    assert list(line) == ["id", "report", "probabilities", "explanation"]
    assert line["explanation"][0] == visual.as_dict()


def test_paths_pil_images_tensors_and_dicom_give_the_same_probabilities(model: Predictor, films) -> None:
    path = films["png"]
    as_path = model.predict(str(path), top_k=0, cam_labels=0, **DECODE)
    as_pil = model.predict(Image.open(path), top_k=0, cam_labels=0, **DECODE)
    as_tensor = model.predict(load_image(path, IMAGE_SIZE), top_k=0, cam_labels=0, **DECODE)
    as_gray = model.predict(
        torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255), cam_labels=0
    )
    for other in (as_pil, as_tensor, as_gray):
        assert other.probabilities == pytest.approx(as_path.probabilities, abs=1e-6)
    assert as_path.report == as_pil.report == as_tensor.report
    assert as_pil.sources == [None] and as_tensor.views[0].shape == (IMAGE_SIZE, IMAGE_SIZE)
    dicom = model.predict(films["dicom"], cam_labels=1, **DECODE)
    assert dicom.sources == [str(films["dicom"])] and dicom.views[0].shape == (48, 48)
    assert next(iter(dicom.cams.values())).shape == (1, IMAGE_SIZE, IMAGE_SIZE)


def test_batches_give_what_one_study_at_a_time_gives(model: Predictor, films) -> None:
    studies = [[films["png"], films["lateral"]], films["dicom"], [films["lateral"]]]
    batched = model.predict_many(studies, ids=["a", "b", "c"], batch_size=3, top_k=1, cam_labels=0, **DECODE)
    for study, got in zip(studies, batched, strict=True):
        alone = model.predict(study, id=got.id, top_k=1, cam_labels=0, **DECODE)
        assert got.probabilities == pytest.approx(alone.probabilities, abs=1e-5)
        assert got.report == alone.report and [i.slot for i in got.recalled] == [
            i.slot for i in alone.recalled
        ]
    assert [p.id for p in batched] == ["a", "b", "c"]
    only_first = model.predict_many([studies[0]], max_views=1, cam_labels=0, **DECODE)[0]
    assert len(only_first.views) == 1 and only_first.id == "study0"


def test_cams_are_the_study_cams_of_the_classifier(model: Predictor, films) -> None:
    maps = model.cams([films["png"], films["lateral"]], labels=["Edema", "Cardiomegaly"])
    assert list(maps) == ["Edema", "Cardiomegaly"]
    views = torch.stack([load_image(films["png"], IMAGE_SIZE), load_image(films["lateral"], IMAGE_SIZE)])
    direct = study_cams(model.classifier, views, [4, 1], method="layercam", target_layer="stem")
    assert torch.allclose(torch.stack(list(maps.values())), direct, atol=1e-5)
    assert not model.classifier.training  # the network is back in eval mode
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['Edemma'\]"):
        model.cams(films["png"], labels=["Edemma"])


def test_a_stage1_checkpoint_gives_probabilities_and_cams(tmp_path: Path, films) -> None:
    path = write_stage1_checkpoint(tmp_path / "stage1.ckpt")  # no module key: told by its net config
    model = load(path, dtype="bfloat16")
    assert model.stage == 1 and model.dtype == torch.bfloat16
    assert (model.cam_method, model.cam_layer, model.memory_image_root) == ("gradcam", "final_norm", None)
    pred = model.predict(films["png"], id="x", cam_labels=1)
    assert pred.report is None and pred.recalled == [] and len(pred.cams) == 1
    assert list(pred.as_dict()) == ["id", "probabilities"]
    full = load(path).predict(films["png"], cam_labels=0)
    assert pred.probabilities == pytest.approx(full.probabilities, abs=0.02)  # bfloat16 vs float32
    with pytest.raises(ValueError, match=r"decoding options \['max_new_tokens'\] need a stage-2 checkpoint"):
        model.predict(films["png"], max_new_tokens=3)


def test_the_stage_comes_from_the_module_key() -> None:
    assert checkpoint_stage({MODULE_KEY: "amrg.modules.reporter.ReporterModule"}, "f") == 2
    assert checkpoint_stage({MODULE_KEY: "amrg.modules.classifier.ClassifierModule"}, "f") == 1
    assert checkpoint_stage({"hyper_parameters": {"_class_path": "amrg.modules.ClassifierModule"}}, "f") == 1
    assert checkpoint_stage({RECORD_KEY: {}}, "f") == 2
    with pytest.raises(ValueError, match=r"^checkpoint 'x.ckpt': not an amrg model checkpoint \(written by "):
        checkpoint_stage({MODULE_KEY: "mylab.Module"}, "checkpoint 'x.ckpt'")
    with pytest.raises(ValueError, match="no module key and neither model record"):
        checkpoint_stage({"state_dict": {}}, "checkpoint 'x.ckpt'")


def test_bad_inputs_are_named_in_one_line(model: Predictor, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope.ckpt' not found"):
        load(tmp_path / "nope.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint '.*notes.ckpt' could not be read as a checkpoint"):
        load(tmp_path / "notes.ckpt")
    with pytest.raises(ValueError, match="dtype='int8' is not a floating-point torch dtype"):
        load(tmp_path / "notes.ckpt", dtype="int8")
    with pytest.raises(BadImageError, match=r"^image .*missing.png not found$"):
        model.predict(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match=r"study 'study' view 0: a tensor of shape \[2, 5, 5\]; expected"):
        model.predict(torch.zeros(2, 5, 5))
    with pytest.raises(
        BadImageError, match=r"study 's' view 1: int is not an image; expected an image file path"
    ):
        model.predict([torch.zeros(8, 8), 3], id="s")
    with pytest.raises(ValueError, match="2 studies but 1 ids"):
        model.predict_many([torch.zeros(8, 8)] * 2, ids=["a"])
