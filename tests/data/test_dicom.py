"""amrg.data.dicom: DICOM radiographs decode as their PNG twins; a bad DICOM is one line naming it.

Every DICOM is written here with pydicom from a numpy array; its PNG twin is written from the same
array with the mapping the module docstring documents, and both go through ``read_grayscale``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from amrg.data.dicom import DicomError, check_dicom, is_dicom, read_dicom
from amrg.data.images import BadImageError, image_problem, load_image, read_grayscale

H, W = 24, 20


def _dataset(sop_class: UID, syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    return ds


def write_dicom(
    path: Path,
    stored: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    syntax: UID = ExplicitVRLittleEndian,
    **attrs,
) -> Path:
    """Write a DICOM Part 10 file holding the stored values ``stored``.

    Args:
        path: the file to write.
        stored: [H, W] monochrome, [H, W, 3] RGB, or [F, H, W] with ``NumberOfFrames=F`` in attrs;
            the dtype sets Bits Allocated and Pixel Representation.
        photometric: Photometric Interpretation.
        bits_stored: Bits Stored (default: all allocated bits).
        syntax: transfer syntax; a compressed one stores the raw bytes as one encapsulated fragment.
        attrs: more data elements by keyword (RescaleSlope, WindowCenter, ...).
    """
    rgb = photometric == "RGB"
    sop_class = SecondaryCaptureImageStorage if rgb else DigitalXRayImageStorageForPresentation
    ds = _dataset(sop_class, syntax)
    ds.Rows, ds.Columns = stored.shape[:2] if rgb else stored.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(np.issubdtype(stored.dtype, np.signedinteger))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    data = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = encapsulate([data]) if syntax.is_compressed else data
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _png_twin(path: Path, expected: np.ndarray) -> Path:
    """A 16-bit PNG of ``expected`` (spanning exactly [0, 1]), which ``read_grayscale`` min-max scales
    back to ``expected`` within 1/65535."""
    assert expected.min() == 0.0 and expected.max() == 1.0  # else the PNG's min-max scaling stretches it
    Image.fromarray(np.round(expected * 65535).astype(np.uint16)).save(path)
    return path


def _stored_12bit(seed: int = 0) -> np.ndarray:
    """Unsigned 12-bit values holding both ends of the range, [H, W] uint16."""
    stored = np.random.default_rng(seed).integers(0, 4096, size=(H, W)).astype(np.uint16)
    stored[0, 0], stored[-1, -1] = 0, 4095
    return stored


def _read(path: Path) -> np.ndarray:
    return np.asarray(read_grayscale(path))


def test_monochrome2_12_bit_matches_its_png_twin(tmp_path: Path) -> None:
    stored = _stored_12bit()
    dcm = write_dicom(tmp_path / "m2.dcm", stored, bits_stored=12)
    Image.fromarray(stored).save(tmp_path / "m2.png")  # the same stored values, as a 16-bit PNG
    got = _read(dcm)
    assert got.dtype == np.float32 and got.shape == (H, W)
    np.testing.assert_allclose(got, _read(tmp_path / "m2.png"), atol=1e-6)
    np.testing.assert_allclose(got, stored / 4095.0, atol=1e-6)  # 4095 = 2**BitsStored - 1


def test_without_a_window_the_stored_bits_range_maps_to_0_1(tmp_path: Path) -> None:
    # Values 1000..2000 of 12 bits: not stretched to the image's min-max (a 16-bit PNG would be).
    stored = np.linspace(1000, 2000, H * W).reshape(H, W).astype(np.uint16)
    noisy = stored | 0xF000  # garbage above BitsStored (e.g. an overlay) is masked off
    got = _read(write_dicom(tmp_path / "mid.dcm", noisy, bits_stored=12))
    np.testing.assert_allclose(got, stored / 4095.0, atol=1e-6)
    assert got.max() < 0.5


def test_monochrome1_is_the_inverted_monochrome2_twin(tmp_path: Path) -> None:
    stored = _stored_12bit(seed=1)
    m1 = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", bits_stored=12)
    twin = _png_twin(tmp_path / "m2.png", stored / 4095.0)
    np.testing.assert_allclose(_read(m1), 1.0 - _read(twin), atol=1e-4)  # 1e-4 > 1/65535 quantisation
    assert _read(m1)[0, 0] == 1.0  # the lowest MONOCHROME1 value is white


def test_8_bit_matches_its_png_twin(tmp_path: Path) -> None:
    stored = np.random.default_rng(2).integers(10, 200, size=(H, W)).astype(np.uint8)  # not full range
    dcm = write_dicom(tmp_path / "e.dcm", stored)
    Image.fromarray(stored, mode="L").save(tmp_path / "e.png")  # 8-bit PNGs are divided by 255 too
    np.testing.assert_allclose(_read(dcm), _read(tmp_path / "e.png"), atol=1e-6)


def test_signed_data_with_rescale_matches_its_png_twin(tmp_path: Path) -> None:
    stored = np.random.default_rng(3).integers(-2048, 2048, size=(H, W)).astype(np.int16)
    stored[0, 0], stored[-1, -1] = -2048, 2047  # the signed 12-bit range
    dcm = write_dicom(tmp_path / "s.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    # modality values 2 * s - 1024 span [-5120, 3070]; that range maps to [0, 1]
    twin = _png_twin(tmp_path / "s.png", (stored.astype(np.float64) + 2048) / 4095.0)
    np.testing.assert_allclose(_read(dcm), _read(twin), atol=1e-4)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR) with output range [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_the_first_window_is_applied_after_rescale(tmp_path: Path) -> None:
    stored = _stored_12bit(seed=4)
    dcm = write_dicom(
        tmp_path / "w.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=[476, 2000],  # in modality units (stored - 1024); the second window is ignored
        WindowWidth=[1001, 300],
    )
    modality = stored.astype(np.float64) - 1024
    expected = _linear_window(modality, 476, 1001)
    twin = _png_twin(tmp_path / "w.png", expected)
    got = _read(dcm)
    np.testing.assert_allclose(got, _read(twin), atol=1e-4)
    assert not np.allclose(got, _linear_window(modality, 2000, 300), atol=1e-2)


@pytest.mark.filterwarnings("error")  # pydicom warns when a VOI LUT is indexed by floats
def test_a_voi_lut_sequence_is_applied_before_any_window(tmp_path: Path) -> None:
    stored = _stored_12bit(seed=5)
    lut = np.round(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # a gamma-like VOI LUT
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor: entries, first value, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    dcm = write_dicom(
        tmp_path / "lut.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=1,  # the rescale gives floats; the LUT still indexes by value
        RescaleIntercept=0,
        VOILUTSequence=Sequence([item]),
        WindowCenter=100,
        WindowWidth=10,
    )
    np.testing.assert_allclose(_read(dcm), lut[stored] / 4095.0, atol=1e-6)


def test_rgb_secondary_capture_becomes_luminance_as_its_png_twin(tmp_path: Path) -> None:
    stored = np.random.default_rng(6).integers(0, 256, size=(H, W, 3)).astype(np.uint8)
    dcm = write_dicom(tmp_path / "sc.dcm", stored, photometric="RGB")
    Image.fromarray(stored, mode="RGB").save(tmp_path / "sc.png")
    # PIL rounds its "L" conversion to whole grey levels; the DICOM path keeps the fraction
    np.testing.assert_allclose(_read(dcm), _read(tmp_path / "sc.png"), atol=0.5 / 255 + 1e-6)


def test_an_extensionless_dicom_is_detected_and_str_paths_load(tmp_path: Path) -> None:
    stored = _stored_12bit(seed=7)
    named = write_dicom(tmp_path / "named.dcm", stored, bits_stored=12)
    bare = write_dicom(tmp_path / "IM0001", stored, bits_stored=12)
    (tmp_path / "notes").write_text("not an image")
    assert is_dicom(bare) and is_dicom(tmp_path / "x.DICOM") and not is_dicom(tmp_path / "notes")
    np.testing.assert_array_equal(_read(bare), _read(named))
    x = load_image(str(bare), 16)
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, load_image(named, 16))
    assert image_problem(str(bare)) is None and image_problem(bare, decode=True) is None


def _no_pixel_data(path: Path) -> Path:
    ds = _dataset(BasicTextSRStorage)
    ds.Modality = "SR"
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_ls(path: Path) -> Path:
    return write_dicom(path, _stored_12bit(), bits_stored=12, syntax=JPEGLSLossless)


def _truncated(path: Path) -> Path:
    write_dicom(path, _stored_12bit(), bits_stored=12)
    path.write_bytes(path.read_bytes()[:-10])  # the download stopped inside the pixel data
    return path


def _multi_frame(path: Path) -> Path:
    return write_dicom(path, np.zeros((2, H, W), np.uint16), bits_stored=12, NumberOfFrames=2)


def _not_part10(path: Path) -> Path:
    path.write_bytes(b"\x00" * 200)
    return path


BAD = {
    "no pixel data": (_no_pixel_data, "without pixel data (SOP class 'Basic Text SR Storage')", True),
    "no decoder": (
        _jpeg_ls,
        "transfer syntax 1.2.840.10008.1.2.4.80 (JPEG-LS Lossless Image Compression) and no decoder "
        "for it is installed; install one of: ",
        True,
    ),
    "truncated": (_truncated, "that is truncated or cannot be decoded", False),
    "multi-frame": (_multi_frame, "is a multi-frame DICOM (2 frames); expected one radiograph", True),
    "not part 10": (_not_part10, "is not a DICOM Part 10 file (no 'DICM' marker at byte 128)", True),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_dicom_is_one_line_naming_the_file(tmp_path: Path, kind: str) -> None:
    make, reason, seen_in_header = BAD[kind]
    path = make(tmp_path / "bad.dcm")
    with pytest.raises(BadImageError) as err:
        read_grayscale(path)
    message = str(err.value)
    assert message.startswith(f"image {path} ") and reason in message and "\n" not in message
    assert image_problem(path, decode=True) == message
    # a header check (data check without --decode, predict-images up front) finds all but truncation
    assert image_problem(path) == (message if seen_in_header else None)


def test_the_missing_decoder_names_the_plugins(tmp_path: Path) -> None:
    assert not get_decoder(JPEGLSLossless).is_available, "this test expects no JPEG-LS plugin installed"
    with pytest.raises(DicomError, match=r"install one of: .*pylibjpeg.*pylibjpeg-libjpeg"):
        check_dicom(_jpeg_ls(tmp_path / "ls.dcm"))


def test_palette_colour_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "p.dcm", np.zeros((H, W), np.uint8), photometric="PALETTE COLOR")
    with pytest.raises(
        DicomError, match=r"photometric interpretation 'PALETTE COLOR' .*expected MONOCHROME1"
    ):
        read_dicom(path)
