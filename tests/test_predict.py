"""amrg.predict: images or folders in, one JSONL line per study out; bad inputs named up front."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from amrg.errors import OutputError
from amrg.labels import LABELS
from amrg.predict import PredictInputError, collect_studies, partial_path, predict_images
from tests.checkpoints.test_stage2 import build, save, stage2_files
from tests.conftest import write_image
from tests.data.test_dicom import write_dicom
from tests.models.test_reporter import IMAGE_SIZE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 checkpoint of a tiny model (untrained beyond its random weights)."""
    root = tmp_path_factory.mktemp("predict_ckpt")
    return save(build(stage2_files(root)), root / "stage2.ckpt", explain_top_k=3)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """in/single.png, in/folder/a.png, in/folder/sub/b.jpg, in/folder/notes.txt (ignored in a folder)."""
    root = tmp_path / "in"
    write_image(root / "single.png", size=48, seed=1)  # any size: resized to the checkpoint's 32 px
    write_image(root / "folder" / "a.png", size=IMAGE_SIZE, seed=2)
    write_image(root / "folder" / "sub" / "b.jpg", size=IMAGE_SIZE, mode="RGB", seed=3)
    (root / "folder" / "notes.txt").write_text("not an image")
    return root


def test_predict_writes_one_jsonl_line_per_study(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    out = predict_images(
        checkpoint,
        [images / "single.png", images / "folder"],
        tmp_path / "out" / "pred.jsonl",
        batch_size=2,
        top_k_explanations=2,
        progress=False,
        max_new_tokens=5,
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "single", "sub/b"]  # sorted; folder-relative ids
    for line in lines:
        assert list(line) == ["id", "report", "probabilities", "explanation"]
        assert isinstance(line["report"], str)
        assert list(line["probabilities"]) == list(LABELS)
        assert all(0.0 <= p <= 1.0 for p in line["probabilities"].values())
        assert [e["memory"] for e in line["explanation"]] == ["visual", "visual", "report", "report"]
        for item in line["explanation"]:
            assert set(item) <= {"memory", "source_id", "label", "labels", "text", "view", "box", "weight"}
            assert item["source_id"].startswith("train_") and item["label"] in LABELS
            assert 0.0 < item["weight"] <= 1.0
        assert all(isinstance(e["text"], str) for e in line["explanation"] if e["memory"] == "report")
    # Deterministic: the same inputs give the same reports and explanations in batches of another size (the
    # float weights to float32 rounding: a batch is one matrix product, summed in a size-dependent order).
    again = predict_images(
        checkpoint,
        [images / "folder", images / "single.png"],
        tmp_path / "again.jsonl",
        batch_size=3,
        top_k_explanations=2,
        progress=False,
        max_new_tokens=5,
    )
    _assert_same_predictions(again, out)
    # the generation fast path (static KV cache) writes the same file
    static = predict_images(
        checkpoint,
        [images / "single.png", images / "folder"],
        tmp_path / "static.jsonl",
        batch_size=2,
        top_k_explanations=2,
        progress=False,
        max_new_tokens=5,
        cache="static",
    )
    _assert_same_predictions(static, out)
    # a compiled step without the static cache (the checkpoint's is dynamic) is refused before any study runs
    with pytest.raises(ValueError, match="--cache/--compile: compile='default' needs cache='static'"):
        predict_images(checkpoint, [images / "single.png"], tmp_path / "c.jsonl", compile="default")
    assert not (tmp_path / "c.jsonl").exists()


def _assert_same_predictions(path: Path, expected: Path) -> None:
    """The same ids, reports, labels and texts; the float weights and probabilities to 1e-6."""

    def check(a, b) -> None:
        if isinstance(b, dict):
            assert isinstance(a, dict) and list(a) == list(b)
            for key in b:
                check(a[key], b[key])
        elif isinstance(b, list):
            assert isinstance(a, list) and len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                check(x, y)
        elif isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-6)
        else:
            assert a == b

    def lines(p: Path) -> list:
        return [json.loads(line) for line in p.read_text().splitlines()]

    check(lines(path), lines(expected))


def test_group_views_makes_each_subfolder_one_study(images: Path) -> None:
    write_image(images / "folder" / "sub" / "c.png", size=IMAGE_SIZE, seed=4)
    studies = collect_studies([images / "folder"], group_views=True)
    assert [(s.id, [p.name for p in s.paths]) for s in studies] == [
        ("a", ["a.png"]),
        ("sub", ["b.jpg", "c.png"]),
    ]


def test_group_views_prediction_runs(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    write_image(images / "folder" / "sub" / "c.png", size=IMAGE_SIZE, seed=4)
    out = predict_images(
        checkpoint,
        [images / "folder"],
        tmp_path / "grouped.jsonl",
        group_views=True,
        top_k_explanations=0,
        progress=False,
        max_new_tokens=4,
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "sub"] and all(line["explanation"] == [] for line in lines)


def test_the_command_line_takes_one_folder_without_list_brackets(
    checkpoint: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from amrg import cli

    write_image(images / "folder" / "sub" / "c.png", size=IMAGE_SIZE, seed=4)
    out = tmp_path / "bare.jsonl"
    common = [
        "--group_views",
        "true",
        "--top_k_explanations",
        "0",
        "--progress",
        "false",
        "--max_new_tokens",
        "4",
    ]
    cli.main(["predict-images", str(checkpoint), str(images / "folder"), str(out), *common])
    listed = tmp_path / "listed.jsonl"
    cli.main(["predict-images", str(checkpoint), json.dumps([str(images / "folder")]), str(listed), *common])
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "sub"]
    assert out.read_text() == listed.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["predict-images", str(checkpoint), str(tmp_path / "nothere"), str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert info.value.code != 0 and len(err.strip().splitlines()) == 1
    assert "nothere' not found" in err and not (tmp_path / "x.jsonl").exists()


def test_a_non_image_file_stops_with_one_message(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    notes = images / "folder" / "notes.txt"
    broken = images / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    out = tmp_path / "never.jsonl"
    with pytest.raises(PredictInputError) as err:
        predict_images(
            checkpoint, [notes, broken, images / "missing.png", images / "single.png"], out, progress=False
        )
    message = str(err.value)
    assert message.startswith("cannot predict: 3 problem(s) with the inputs:")
    assert f"'{notes}' is not an image file: expected a radiograph image file (PNG, JPG" in message
    assert f"'{broken}' is not a readable image" in message
    assert f"'{images / 'missing.png'}' not found" in message
    assert not out.exists()


def test_dicom_files_are_found_by_suffix_or_marker(tmp_path: Path) -> None:
    stored = np.arange(IMAGE_SIZE * IMAGE_SIZE, dtype=np.uint16).reshape(IMAGE_SIZE, IMAGE_SIZE)
    folder = tmp_path / "in"
    write_dicom(folder / "a.dcm", stored, bits_stored=12)
    write_dicom(folder / "c.DICOM", stored, bits_stored=12)
    bare = write_dicom(folder / "sub" / "IM0001", stored, bits_stored=12)  # a PACS export without suffix
    (folder / "notes").write_text("no suffix, no DICOM marker: ignored")
    studies = collect_studies([folder])
    assert [(s.id, [p.name for p in s.paths]) for s in studies] == [
        ("a", ["a.dcm"]),
        ("c", ["c.DICOM"]),
        ("sub/IM0001", ["IM0001"]),
    ]
    assert [s.id for s in collect_studies([bare])] == ["IM0001"]
    frames = write_dicom(tmp_path / "cine.dcm", np.stack([stored, stored]), bits_stored=12, NumberOfFrames=2)
    with pytest.raises(PredictInputError) as err:
        collect_studies([bare, frames, folder / "notes"])
    message = str(err.value)
    assert message.startswith("cannot predict: 2 problem(s) with the inputs:")
    assert f"- image {frames} is a multi-frame DICOM (2 frames); expected one radiograph" in message
    suffixes = "(PNG, JPG, JPEG, BMP, TIF, TIFF, DCM, DICOM)"
    assert (
        f"'{folder / 'notes'}' is not an image file: expected a radiograph image file {suffixes}" in message
    )


def test_an_empty_folder_and_duplicate_ids_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "x" / "scan.png", seed=1)
    write_image(tmp_path / "y" / "scan.png", seed=2)
    with pytest.raises(PredictInputError) as err:
        collect_studies([tmp_path / "empty", tmp_path / "x" / "scan.png", tmp_path / "y" / "scan.png"])
    assert f"folder '{tmp_path / 'empty'}' holds no image files" in str(err.value)
    assert "study id 'scan' comes from both" in str(err.value)


def test_a_missing_checkpoint_is_named(images: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope.ckpt' not found: expected a .ckpt"):
        predict_images(tmp_path / "nope.ckpt", [images / "single.png"], tmp_path / "out.jsonl")


def test_figures_are_one_png_per_study_with_the_reference(
    checkpoint: Path, images: Path, tmp_path: Path, make_dataset
) -> None:
    annotation = make_dataset(n={"train": 2, "test": 1})  # ids train_000, train_001, test_000
    write_image(images / "folder" / "train_001" / "0.png", size=IMAGE_SIZE, seed=5)
    out = predict_images(
        checkpoint,
        [images / "folder"],
        tmp_path / "pred.jsonl",
        group_views=True,
        top_k_explanations=2,
        progress=False,
        max_new_tokens=4,
        figures=tmp_path / "figures",
        references=annotation,
    )
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == ["a", "sub", "train_001"]
    pngs = sorted(
        p.relative_to(tmp_path / "figures").as_posix() for p in (tmp_path / "figures").rglob("*.png")
    )
    assert pngs == ["a.png", "sub.png", "train_001.png"]


def test_figures_draw_the_reference_known_for_the_study(
    checkpoint: Path, images: Path, tmp_path: Path, make_dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amrg.figures

    drawn = {}
    monkeypatch.setattr(
        amrg.figures, "save_study_figure", lambda pred, path, root: drawn.setdefault(pred.id, (pred, path))
    )
    annotation = make_dataset(n={"train": 2})
    write_image(images / "folder" / "train_001" / "0.png", size=IMAGE_SIZE, seed=5)
    predict_images(
        checkpoint,
        [images / "folder"],
        tmp_path / "pred.jsonl",
        group_views=True,
        progress=False,
        max_new_tokens=4,
        figures=tmp_path / "figures",
        references=annotation,
    )
    assert drawn["train_001"][0].reference == "The heart is normal in size. No pleural effusion. Study 1."
    assert drawn["a"][0].reference is None and drawn["sub"][1] == tmp_path / "figures" / "sub.png"
    assert all(len(pred.cams) >= 1 for pred, _ in drawn.values())  # the top labels' Grad-CAM maps


def test_a_stage1_checkpoint_writes_probabilities(images: Path, tmp_path: Path) -> None:
    from tests.models.test_reporter import write_stage1_checkpoint

    stage1 = write_stage1_checkpoint(tmp_path / "stage1.ckpt")
    out = predict_images(stage1, [images / "single.png"], tmp_path / "p.jsonl", progress=False)
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert list(line) == ["id", "probabilities"] and list(line["probabilities"]) == list(LABELS)
    with pytest.raises(ValueError, match="is a stage-1 classifier: it writes no report"):
        predict_images(stage1, [images / "single.png"], tmp_path / "q.jsonl", max_new_tokens=3)


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: its header passes the up-front check, decoding it fails mid-run."""
    write_image(path, size=128, mode="RGB", seed=9)  # big enough that half is in the scan data
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_an_output_that_is_an_input_or_a_folder_is_refused_before_the_run(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    single = images / "single.png"
    before = single.read_bytes()
    with pytest.raises(OutputError, match=r"it is the input image '.*single.png' of this run; refusing"):
        predict_images(checkpoint, [images / "folder", single], single, progress=False)
    assert single.read_bytes() == before
    with pytest.raises(OutputError, match=r"it is the checkpoint '.*stage2.ckpt' of this run"):
        predict_images(checkpoint, [single], checkpoint, progress=False)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OutputError, match=r"cannot write predictions '.*out': it is a folder; give a file"):
        predict_images(checkpoint, [single], folder, progress=False)
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("a file where the output folder should be")
    with pytest.raises(
        OutputError, match=r"cannot write predictions '.*a_file/p.jsonl': '.*a_file' is a file"
    ):
        predict_images(checkpoint, [single], in_the_way / "p.jsonl", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in", "out"]  # no temp file left
    other = tmp_path / "annotation.json"
    other.write_text('{"train": []}\n')
    with pytest.raises(
        OutputError, match=r"annotation.json': it exists and is not a predictions file amrg wrote"
    ):
        predict_images(checkpoint, [single], other, progress=False)
    assert other.read_text() == '{"train": []}\n'
    other.unlink()


def test_a_corrupt_image_mid_run_keeps_the_finished_studies_in_a_partial_file(
    checkpoint: Path, images: Path, tmp_path: Path
) -> None:
    _truncated_jpeg(images / "folder" / "z_broken.jpg")  # sorts last: studies a, sub/b, then z_broken
    out = tmp_path / "pred.jsonl"
    earlier = '{"id": "old", "report": "an earlier run\'s predictions"}\n'
    out.write_text(earlier)
    with pytest.raises(PredictInputError) as err:
        predict_images(checkpoint, [images / "folder"], out, batch_size=2, progress=False, max_new_tokens=3)
    message = str(err.value)
    assert (
        message.startswith("study 'z_broken': image ") and "z_broken.jpg is unreadable or corrupt" in message
    )
    assert f"the 2 studies finished before it are in '{tmp_path / 'pred.partial.jsonl'}'" in message
    assert "\n" not in message
    assert out.read_text() == earlier  # the final name is never half-written
    partial = [json.loads(line)["id"] for line in partial_path(out).read_text().splitlines()]
    assert partial == ["a", "sub/b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "pred.jsonl", "pred.partial.jsonl"]


def test_skip_leaves_out_studies_whose_image_cannot_be_decoded(
    checkpoint: Path, images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _truncated_jpeg(images / "folder" / "m_broken.jpg")  # in the middle of a batch: a, m_broken | sub/b
    out = predict_images(
        checkpoint,
        [images / "folder"],
        tmp_path / "pred.jsonl",
        batch_size=2,
        progress=False,
        max_new_tokens=3,
        on_bad_image="skip",
    )
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "sub/b"]
    assert "skipped 1 of 3 studies with an image that cannot be decoded (on_bad_image=skip): 'm_broken'" in (
        caplog.text
    )
    with pytest.raises(PredictInputError, match=r"every one of the 1 studies has an image that cannot be"):
        predict_images(
            checkpoint, [images / "folder" / "m_broken.jpg"], tmp_path / "none.jsonl", on_bad_image="skip"
        )
    assert not (tmp_path / "none.jsonl").exists()


def test_an_image_over_the_pixel_cap_is_refused_up_front(tmp_path: Path) -> None:
    big = write_image(tmp_path / "big.png", size=64)
    write_image(tmp_path / "small.png", size=8)
    with pytest.raises(PredictInputError) as err:
        collect_studies([big, tmp_path / "small.png"], max_pixels=1000)  # 64 x 64 = 4096 pixels
    assert (
        "1 problem(s)" in str(err.value) and "big.png" in str(err.value) and "4,096 pixels" in str(err.value)
    )
    assert [s.id for s in collect_studies([big], max_pixels=None)] == ["big"]
