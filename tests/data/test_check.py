"""`amrg data check`: counts, missing/unreadable images, label distribution."""

from amrg.data.check import check_dataset


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
