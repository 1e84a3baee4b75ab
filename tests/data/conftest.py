"""Fixtures for the IU X-ray tests: a tiny Open-i report archive written by each test.

The real reports are CC BY-NC-ND and never committed.

Six hand-written reports in Open-i's XML format:

==========  ==================================================  ====================================
id          text                                                MeSH major terms
==========  ==================================================  ====================================
CXR1        normal findings + impression                        normal
CXR2        big heart, effusion, no pneumothorax                Cardiomegaly; Pleural Effusion
CXR3        FINDINGS empty, IMPRESSION "pneumonia"              Pneumonia
CXR4        neither FINDINGS nor IMPRESSION (skipped)           No Indexing
CXR5        opacity, pacemaker (MeSH silent), no pneumothorax   Opacity; Nodule (text silent)
CXR6        "stable cardiomediastinal silhouette" (uncertain)   normal
==========  ==================================================  ====================================
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

# id -> (FINDINGS, IMPRESSION, MeSH major terms); None leaves the section out, "" leaves it empty.
REPORTS: dict[str, tuple[str | None, str | None, tuple[str, ...]]] = {
    "CXR1": (
        "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
        "Normal chest x-XXXX.",
        ("normal",),
    ),
    "CXR2": (
        "The heart is enlarged. Small right pleural effusion. No pneumothorax.",
        "Cardiomegaly with right effusion.",
        ("Cardiomegaly/mild", "Pleural Effusion/right/small"),
    ),
    "CXR3": ("", "Right lower lobe pneumonia.", ("Pneumonia/lung/lower lobe/right",)),
    "CXR4": (None, "", ("No Indexing",)),
    "CXR5": (
        "Left basilar opacity. A left-sided pacemaker is in place. No pneumothorax.",
        "Left basilar opacity.",
        ("Opacity/lung/base/left", "Nodule/lung/upper lobe/left"),
    ),
    "CXR6": ("Stable cardiomediastinal silhouette. The lungs are clear.", "No acute disease.", ("normal",)),
}


def xml_report(uid: str, findings: str | None, impression: str | None, mesh: tuple[str, ...]) -> bytes:
    """One report in Open-i's XML layout (the parts amrg reads, plus some it ignores)."""
    sections = [("COMPARISON", "None."), ("INDICATION", "XXXX-year-old with cough.")]
    sections += [(k, v) for k, v in (("FINDINGS", findings), ("IMPRESSION", impression)) if v is not None]
    abstract = "\n".join(f'<AbstractText Label="{k}">{escape(v)}</AbstractText>' for k, v in sections)
    terms = "\n".join(f"<major>{escape(t)}</major>" for t in mesh)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <meta type="rr"/>
  <uId id="{uid}"/>
  <MedlineCitation><Article><Abstract>
{abstract}
  </Abstract></Article></MedlineCitation>
  <MeSH>
{terms}
  </MeSH>
  <parentImage id="{uid}_IM-0001-1001"><caption>Xray Chest PA and Lateral</caption></parentImage>
</eCitation>
""".encode()


def _tgz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tgz(path: Path, members: dict[str, bytes] | None = None) -> Path:
    """Write the six reports (or the given members) as ``ecgen-radiology/<n>.xml`` in a tgz."""
    if members is None:
        members = {
            f"ecgen-radiology/{uid.removeprefix('CXR')}.xml": xml_report(uid, *parts)
            for uid, parts in REPORTS.items()
        }
    path.write_bytes(_tgz_bytes(members))
    return path


def write_wheel(
    path: Path, tgz: Path | None = None, member: str = "torchxrayvision/data/NLMCXR_reports.tgz"
) -> Path:
    """A wheel-shaped zip holding the tgz at ``member`` (and a module file, as a wheel would)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("torchxrayvision/__init__.py", "")
        if tgz is not None:
            zf.writestr(member, tgz.read_bytes())
    return path


@pytest.fixture(scope="session")
def open_i_xml():
    """``open_i_xml(uid, findings, impression, mesh) -> bytes``: one report in Open-i's XML layout."""
    return xml_report


@pytest.fixture(scope="session")
def make_tgz():
    """``make_tgz(path, members=None)``: the six reports (or ``{name: bytes}``) as a tgz at ``path``."""
    return write_tgz


@pytest.fixture(scope="session")
def make_wheel():
    """``make_wheel(path, tgz=None, member=...)``: a wheel-shaped zip holding ``tgz`` at ``member``."""
    return write_wheel


@pytest.fixture
def iu_tgz(tmp_path: Path) -> Path:
    """The six-report archive as ``NLMCXR_reports.tgz``."""
    return write_tgz(tmp_path / "NLMCXR_reports.tgz")
