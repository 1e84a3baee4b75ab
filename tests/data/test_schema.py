"""Annotation validation: every bad input names the file, split, index, id and field."""

import json
from pathlib import Path

import pytest

from amrg.data.schema import AnnotationError, load_annotation


def _rec(i: str = "s1", **over) -> dict:
    rec = {"id": i, "report": "No acute disease.", "image_path": [f"{i}/0.png"]}
    rec.update(over)
    return rec


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "annotation.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_valid_annotation_loads(tmp_path: Path) -> None:
    labels = [1, 0, -1, None] + [None] * 10
    boxes = [{"label": "Cardiomegaly", "view": 0, "box": [1, 2, 3, 4]}]
    path = _write(
        tmp_path,
        {
            "train": [_rec("a", labels=labels, boxes=boxes)],
            "val": [_rec("b")],
            "test": [_rec("c", image_path="c/0.png", split="test")],
        },
    )
    ann = load_annotation(path)
    assert ann.counts() == {"train": 1, "val": 1, "test": 1}
    a = ann["train"][0]
    assert a.labels == (1, 0, -1) + (None,) * 11
    assert a.boxes[0].label == "Cardiomegaly" and a.boxes[0].box == (1.0, 2.0, 3.0, 4.0)
    assert ann["test"][0].image_paths == ("c/0.png",)  # a single string is one view
    assert ann.ids(["val", "test"]) == {"b", "c"}
    assert load_annotation(path, splits=["train"]).counts() == {"train": 1}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("{not json", r"annotation.json: malformed JSON at line 1"),
        ({"train": [_rec()], "dev": []}, r"unknown split name\(s\) \['dev'\]"),
        (
            {"train": [{"id": "s1", "image_path": ["x.png"]}]},
            r"train\[0\] id='s1': field 'report' is missing",
        ),
        ({"train": [_rec(report="   ")]}, r"train\[0\] id='s1': field 'report' is empty"),
        ({"train": [_rec(image_path=[])]}, r"train\[0\] id='s1': field 'image_path' is missing or empty"),
        ({"train": [_rec(id="")]}, r"train\[0\] id='': field 'id' is missing or empty"),
        (
            {"train": [_rec(labels=[0] * 13)]},
            r"train\[0\] id='s1': field 'labels' has 13 values, expected 14",
        ),
        (
            {"train": [_rec(labels=[2] + [0] * 13)]},
            r"train\[0\] id='s1': field 'labels'\[0\] \(Enlarged Cardiomediastinum\) is 2",
        ),
        ({"train": [_rec(labels=["yes"] + [0] * 13)]}, r"field 'labels'\[0\] .* is 'yes'"),
        (
            {"train": [_rec("x")], "test": [_rec("x")]},
            r"test\[0\] id='x': id also in split 'train' \(train/eval leakage\)",
        ),
        ({"train": [_rec("x"), _rec("x")]}, r"train\[1\] id='x': duplicate id within split 'train'"),
        (
            {"train": [_rec(split="val")]},
            r"train\[0\] id='s1': field 'split' is 'val' but the record is listed under 'train'",
        ),
        (
            {"train": [_rec(boxes=[{"label": "Nope", "box": [0, 0, 1, 1]}])]},
            r"train\[0\] id='s1': field 'boxes'\[0\]",
        ),
        ({"train": [_rec(boxes=[{"label": "Fracture", "view": 3, "box": [0, 0, 1, 1]}])]}, r"'view': 0\.\.0"),
        ({"train": {"id": "s1"}}, r"split 'train' must be a list of records, got dict"),
        ({"train": ["s1"]}, r"train\[0\]: a record must be an object, got str"),
        ([1, 2], r"top level must be an object"),
    ],
)
def test_bad_annotation_names_the_record(tmp_path: Path, data, match: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(AnnotationError, match=match) as info:
        load_annotation(path)
    assert str(path) in str(info.value)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    data = {"train": [_rec("a", report=""), _rec("b", labels=[0]), _rec("c", image_path=None)]}
    with pytest.raises(AnnotationError) as info:
        load_annotation(_write(tmp_path, data))
    assert len(info.value.problems) == 3
    for rec_id in ("'a'", "'b'", "'c'"):
        assert f"id={rec_id}" in str(info.value)


def test_missing_file_and_missing_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="annotation file .*nope.json not found"):
        load_annotation(tmp_path / "nope.json")
    path = _write(tmp_path, {"train": [_rec()]})
    with pytest.raises(AnnotationError, match=r"requested split\(s\) \['test'\] not in the file"):
        load_annotation(path, splits=["test"])


def test_labels_nan_means_not_mentioned(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(
        '{"train": [{"id": "a", "report": "r", "image_path": ["a.png"], "labels": [NaN, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}]}'
    )
    assert load_annotation(path)["train"][0].labels[:2] == (None, 1)


def test_a_non_utf8_annotation_names_the_line_and_record(tmp_path: Path) -> None:
    path = tmp_path / "annotation.json"
    path.write_bytes(
        b'{"train": [\n {"id": "a", "report": "ok", "image_path": ["a.png"]},\n'
        b' {"id": "b2", "report": "caf\xe9 lungs", "image_path": ["b.png"]}\n]}'
    )
    with pytest.raises(AnnotationError) as info:
        load_annotation(path)
    assert info.value.problems == [
        "annotation.json: not UTF-8 text at line 3, column 29 (split 'train', record id='b2'): byte e9 "
        "(invalid continuation byte); save the file as UTF-8"
    ]
    # the id comes after the bad byte: the record is not guessed from the one before
    path.write_bytes(
        b'{"test": [{"id": "a", "report": "r", "image_path": ["a"]}, {"report": "\xff", "id": 3}]}'
    )
    with pytest.raises(AnnotationError, match=r"at line 1, column 72 \(split 'test'\): byte ff"):
        load_annotation(path)


def test_an_empty_file_and_a_folder_are_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "  \n")
    with pytest.raises(AnnotationError, match=r"annotation.json: the file is empty; expected a JSON object"):
        load_annotation(path)
    with pytest.raises(AnnotationError, match=r"is a folder; expected the annotation.json file"):
        load_annotation(tmp_path)
