"""Open-i report archives: parsing, tgz or wheel, MeSH -> labels, labeler fill-in, bad input."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pytest

from amrg.data.iu_reports import TGZ_IN_WHEEL, load_reports, merge_labels, mesh_labels, read_archive
from amrg.labels import NUM_LABELS, label_index


def _codes(**named: int | None) -> list[int | None]:
    codes: list[int | None] = [None] * NUM_LABELS
    for name, v in named.items():
        codes[label_index(name.replace("_", " "))] = v
    return codes


def test_parses_findings_impression_mesh_and_ids(iu_tgz):
    reports = {r.id: r for r in load_reports(iu_tgz)}
    assert sorted(reports) == [f"CXR{i}" for i in range(1, 7)]
    r2 = reports["CXR2"]
    assert r2.source == "ecgen-radiology/2.xml"
    assert r2.findings == "The heart is enlarged. Small right pleural effusion. No pneumothorax."
    assert r2.impression == "Cardiomegaly with right effusion."
    assert r2.mesh == ("Cardiomegaly/mild", "Pleural Effusion/right/small")
    assert r2.text == r2.findings + " " + r2.impression
    assert (reports["CXR3"].findings, reports["CXR3"].impression) == ("", "Right lower lobe pneumonia.")
    assert (reports["CXR4"].findings, reports["CXR4"].impression, reports["CXR4"].text) == ("", "", "")
    assert reports["CXR1"].mesh == ("normal",)


def test_reads_a_wheel_like_the_tgz(iu_tgz, make_wheel, tmp_path):
    wheel = make_wheel(tmp_path / "torchxrayvision-1.5.7-py3-none-any.whl", iu_tgz)
    assert read_archive(wheel) == iu_tgz.read_bytes()
    assert load_reports(wheel) == load_reports(iu_tgz)


def test_uid_falls_back_to_the_file_stem(tmp_path, make_tgz, open_i_xml):
    xml = open_i_xml("CXR9", "Clear lungs.", None, ("normal",)).replace(b'<uId id="CXR9"/>', b"")
    (report,) = load_reports(make_tgz(tmp_path / "r.tgz", {"ecgen-radiology/9.xml": xml}))
    assert report.id == "9" and report.impression == ""


def test_mesh_labels_follow_the_table():
    assert mesh_labels(["normal"]) == {"No Finding"}
    assert mesh_labels(["Cardiomegaly/mild", "Pleural Effusion/right/small"]) == {
        "Cardiomegaly",
        "Pleural Effusion",
    }
    # qualifiers decide for some terms
    assert mesh_labels(["Mediastinum/enlarged"]) == {"Enlarged Cardiomediastinum"}
    assert mesh_labels(["Mediastinum/normal"]) == set()
    assert mesh_labels(["Thickening/pleura/apex"]) == {"Pleural Other"}
    assert mesh_labels(["Cicatrix/pleura"]) == {"Lung Opacity", "Pleural Other"}
    assert mesh_labels(["Markings/lung/interstitial"]) == {"Lung Opacity"}
    # CheXpert's definitions: post-surgical hardware is a support device, "fibrosis" is Pleural Other
    assert mesh_labels(["Surgical Instruments/mediastinum", "Sutures"]) == {"Support Devices"}
    assert mesh_labels(["Pulmonary Fibrosis/apex", "Calcinosis/pleura/multiple"]) == {"Pleural Other"}
    assert mesh_labels(["Calcinosis/aorta"]) == set()
    # unmapped on purpose
    assert (
        mesh_labels(["Pulmonary Congestion", "Calcified Granuloma/lung", "Density", "No Indexing"]) == set()
    )


def test_merge_mesh_positive_wins_and_the_labeler_fills_in():
    text = _codes(Cardiomegaly=0, Pneumothorax=0, Support_Devices=1, No_Finding=1)
    merged = merge_labels(["Cardiomegaly/mild", "Nodule/lung"], text)
    # MeSH positives over the labeler's 0 or silence; the labeler where MeSH says nothing
    # No Finding dropped: a MeSH finding contradicts the labeler's No Finding (CheXpert rule)
    assert merged == _codes(Cardiomegaly=1, Lung_Lesion=1, Pneumothorax=0, Support_Devices=1)


def test_merge_normal_mesh():
    # "normal" makes No Finding positive; the labeler's negatives stay
    assert merge_labels(["normal"], _codes(Pneumothorax=0)) == _codes(Pneumothorax=0, No_Finding=1)
    # ... and wins over a labeler finding (CheXpert rule kept); support devices do not count
    text = _codes(Enlarged_Cardiomediastinum=-1, Fracture=1, Support_Devices=1, Edema=0)
    assert merge_labels(["normal"], text) == _codes(Support_Devices=1, Edema=0, No_Finding=1)
    # a report with nothing to say stays unlabelled
    assert merge_labels([], [None] * NUM_LABELS) == [None] * NUM_LABELS
    with pytest.raises(ValueError, match="14 codes"):
        merge_labels(["normal"], [1])


def test_missing_folder_and_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.tgz: no such file"):
        read_archive(tmp_path / "nope.tgz")
    with pytest.raises(ValueError, match="is a folder"):
        read_archive(tmp_path)
    locked = tmp_path / "locked.tgz"
    locked.write_bytes(b"\x1f\x8b")
    real = Path.read_bytes

    def deny(self: Path) -> bytes:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ValueError, match=r"locked\.tgz: cannot read it \(Permission denied\)"):
        read_archive(locked)


def test_neither_tgz_nor_wheel(tmp_path, make_wheel):
    text = tmp_path / "reports.txt"
    text.write_text("FINDINGS: clear lungs")
    with pytest.raises(ValueError, match=r"reports\.txt: neither a \.tgz \(gzip\) nor a wheel \(zip\)"):
        read_archive(text)
    empty_wheel = make_wheel(tmp_path / "other-1.0-py3-none-any.whl")
    with pytest.raises(ValueError, match=f"a zip without {TGZ_IN_WHEEL}"):
        read_archive(empty_wheel)
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken zip"):
        read_archive(broken)


def test_tgz_without_open_i_reports(tmp_path, make_tgz, open_i_xml):
    no_xml = make_tgz(tmp_path / "a.tgz", {"notes/readme.txt": b"hello"})
    with pytest.raises(ValueError, match=r"a\.tgz: no Open-i XML reports"):
        load_reports(no_xml)
    other_xml = make_tgz(tmp_path / "b.tgz", {"x/1.xml": b"<html><body/></html>"})
    with pytest.raises(ValueError, match=r"b\.tgz: no Open-i XML reports"):
        load_reports(other_xml)
    bad_xml = make_tgz(tmp_path / "c.tgz", {"ecgen-radiology/1.xml": b"<eCitation><uId"})
    with pytest.raises(ValueError, match=r"c\.tgz: ecgen-radiology/1\.xml: not well-formed XML"):
        load_reports(bad_xml)
    not_tar = tmp_path / "d.tgz"
    not_tar.write_bytes(gzip.compress(b"just text, no tar"))
    with pytest.raises(ValueError, match=r"d\.tgz: not a gzip'd tar archive"):
        load_reports(not_tar)
    # a wheel whose tgz is no tar is named by the wheel's path
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(TGZ_IN_WHEEL, gzip.compress(b"nope"))
    with pytest.raises(ValueError, match=r"w\.whl: not a gzip'd tar archive"):
        load_reports(wheel)
