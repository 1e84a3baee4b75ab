"""`amrg data check`: counts, missing/unreadable images (DICOM too), label distribution."""

import json

import numpy as np

from amrg.data.check import check_dataset
from tests.data.test_dicom import write_dicom


def test_check_finds_missing_and_unreadable(make_dataset) -> None:
    path = make_dataset()
    root = path.parent
    (root / "train_000" / "0.png").unlink()
    (root / "val_001" / "1.png").write_bytes(b"not an image")
    report = check_dataset(path, progress=False)
    assert not report.ok
    assert report.counts == {"train": 4, "val": 2, "test": 2}
    assert report.missing == [f"train id='train_000': {root / 'train_000' / '0.png'}"]
    assert len(report.unreadable) == 1 and "val id='val_001'" in report.unreadable[0]
    assert report.views["train"] == {1: 2, 2: 2}
    # odd studies are effusion-positive (see conftest)
    assert report.label_counts["train"]["Pleural Effusion"][1] == 2
    text = report.format()
    assert "missing images: 1" in text and "Pleural Effusion" in text


def test_check_clean_dataset_ok(make_dataset) -> None:
    report = check_dataset(make_dataset(), decode=True, progress=False)
    assert report.ok and not report.missing and not report.unreadable


def test_check_reads_dicom_and_names_a_bad_one(tmp_path) -> None:
    stored = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 4096
    write_dicom(tmp_path / "a" / "0.dcm", stored, bits_stored=12)
    write_dicom(tmp_path / "b" / "IM0001", stored, bits_stored=12)  # extensionless
    write_dicom(tmp_path / "c" / "0.dcm", np.stack([stored, stored]), bits_stored=12, NumberOfFrames=2)
    records = [
        {"id": s, "report": "No effusion.", "image_path": [f"{s}/{name}"]}
        for s, name in (("a", "0.dcm"), ("b", "IM0001"), ("c", "0.dcm"))
    ]
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"train": records}))
    for decode in (False, True):
        report = check_dataset(annotation, decode=decode, progress=False)
        assert report.unreadable == [
            f"train id='c': image {tmp_path / 'c' / '0.dcm'} is a multi-frame DICOM (2 frames); "
            "expected one radiograph"
        ]


def test_check_lists_paths_outside_the_root_and_images_over_the_pixel_cap(make_dataset) -> None:
    path = make_dataset(size=32)
    root = path.parent
    ann = json.loads(path.read_text())
    ann["val"][0]["image_path"] = ["../../etc/passwd"]
    path.write_text(json.dumps(ann))
    report = check_dataset(path, progress=False)
    assert not report.ok and not report.missing and not report.unreadable
    assert report.outside_root == [f"val id='val_000': image path '../../etc/passwd' leaves {root}"]
    assert "outside root: val id='val_000'" in report.format()
    allowed = check_dataset(path, progress=False, allow_outside_root=True)
    assert not allowed.outside_root and allowed.missing == [f"val id='val_000': {root / '../../etc/passwd'}"]
    for decode in (False, True):
        capped = check_dataset(path, progress=False, max_pixels=1000, decode=decode)
        assert len(capped.unreadable) == 11  # every view but the refused one: 32x32 = 1024 > 1000
        assert capped.unreadable[0].endswith(
            "is 32x32 = 1,024 pixels, over the max_pixels cap of 1,000 pixels"
        )
