"""DICOM radiographs to one grayscale float image in [0, 1], with pydicom.

Monochrome images follow the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2.1.1):

1. stored values: pydicom masks the unused high bits and sign-extends signed data;
2. the Modality LUT, or Rescale Slope/Intercept (``apply_modality_lut``);
3. the first VOI LUT of the VOI LUT Sequence, else the first Window Center/Width pair
   (``apply_voi`` and ``apply_windowing``, the two halves of ``apply_voi_lut``); the VOI output range
   (``0 .. 2**n - 1`` for a LUT of n-bit entries, the modality output range for a window) maps to
   [0, 1]. Without a VOI, the range the stored bits can hold, after step 2, maps to [0, 1]
   (``v / 4095`` for unsigned 12-bit data, ``v / 255`` for 8-bit): not the image's own min and max,
   so the exposure the DICOM records is kept;
4. MONOCHROME1 is inverted, so bone is bright as in MONOCHROME2.

Colour images (RGB, or YBR which pydicom converts to RGB: secondary captures, screenshots) become
ITU-R BT.601 luminance (as PIL's "L" conversion) divided by ``2**BitsStored - 1``.

Refused, each with one line naming the file: a file that is not DICOM Part 10, no pixel data (a
structured report), more than one frame, an unsupported photometric interpretation, a compressed
transfer syntax whose decoder plugin is not installed (the line names the transfer syntax and the
plugins that would decode it), and truncated or corrupt pixel data.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom as _has_dicm_marker
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder

from amrg.errors import InputError

__all__ = ["DICOM_SUFFIXES", "DicomError", "check_dicom", "has_dicom_marker", "is_dicom", "read_dicom"]

DICOM_SUFFIXES = (".dcm", ".dicom")
"""File suffixes read as DICOM (case-insensitive); other files are DICOM when they carry the marker."""

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# pydicom's decoders return RGB for these (PS3.3 C.7.6.3.1.2)
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_REQUIRED = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
# What a malformed file can raise while pydicom parses it or decodes its pixels.
_PARSE_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    struct.error,
)


class DicomError(InputError):
    """A DICOM file cannot be read as one radiograph; the message names the file and the reason."""


def has_dicom_marker(path: str | Path) -> bool:
    """True when the file holds the ``DICM`` marker at byte 128 (a DICOM Part 10 file)."""
    try:
        return _has_dicm_marker(path)
    except OSError:
        return False


def is_dicom(path: str | Path) -> bool:
    """True for a ``.dcm``/``.dicom`` name, or any other file with the ``DICM`` marker at byte 128."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_marker(path)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read(path: Path, header_only: bool) -> Dataset:
    if not has_dicom_marker(path):
        raise DicomError(f"image {path} is not a DICOM Part 10 file (no 'DICM' marker at byte 128)")
    try:
        # Deferring large values reads the header without loading the pixel data.
        return pydicom.dcmread(path, defer_size="1 KB" if header_only else None)
    except _PARSE_ERRORS as err:
        raise DicomError(f"image {path} is an unreadable or corrupt DICOM file: {_one_line(err)}") from None


def _check_header(path: Path, ds: Dataset) -> None:
    """Refuse, before decoding, a DICOM that is not one decodable radiograph."""
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        kind = f"SOP class '{sop.name}'" if sop else "no SOP class"
        raise DicomError(f"image {path} is a DICOM without pixel data ({kind}): not an image, or truncated")
    missing = [name for name in _REQUIRED if ds.get(name) is None]
    if missing:
        raise DicomError(f"image {path} is a DICOM image without {', '.join(missing)}")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomError(f"image {path} is a multi-frame DICOM ({frames} frames); expected one radiograph")
    samples, photometric = int(ds.SamplesPerPixel), str(ds.PhotometricInterpretation)
    if not ((samples == 1 and photometric in _MONOCHROME) or (samples == 3 and photometric in _COLOUR)):
        raise DicomError(
            f"image {path} has DICOM photometric interpretation {photometric!r} with {samples} sample(s) "
            f"per pixel; expected MONOCHROME1, MONOCHROME2 or RGB"
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise DicomError(f"image {path} is a DICOM without a Transfer Syntax UID in its file meta")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(
            f"image {path} has DICOM transfer syntax {syntax} ({syntax.name}), which pydicom cannot decode"
        ) from None
    if not decoder.is_available:
        raise DicomError(
            f"image {path} has compressed DICOM transfer syntax {syntax} ({syntax.name}) and no decoder "
            f"for it is installed; install one of: {'; '.join(decoder.missing_dependencies)}"
        )


def check_dicom(path: str | Path) -> None:
    """Check a DICOM's header without decoding its pixels (the checks :func:`read_dicom` makes first).

    Raises:
        DicomError: not DICOM Part 10, no pixel data, several frames, unsupported photometric
            interpretation or transfer syntax, or a missing decoder plugin.
    """
    path = Path(path)
    _check_header(path, _read(path, header_only=True))


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """The Modality LUT's output for the lowest and the highest stored value, as pydicom's
    ``apply_windowing`` computes its output range."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        return lo * slope + intercept, hi * slope + intercept
    return float(lo), float(hi)


def _grayscale(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored monochrome values [H, W] to display values in [0, 1], bone bright."""
    values = apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence"):
        # A LUT is indexed by integers; the rescale step returns floats even for slope 1, intercept 0.
        if np.issubdtype(values.dtype, np.floating):
            values = np.rint(values).astype(np.int64)
        values = apply_voi(values, ds, index=0)
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # pydicom maps values below the window to the first bound, above it to the second
        values = apply_windowing(values, ds, index=0)
        lo, hi = _modality_range(ds)
    else:
        lo, hi = sorted(_modality_range(ds))
    if hi == lo:
        raise ValueError(f"the pixel value range is empty ({lo} to {hi})")
    scaled = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 - scaled if ds.PhotometricInterpretation == "MONOCHROME1" else scaled


def read_dicom(path: str | Path) -> np.ndarray:
    """Decode a single-frame DICOM radiograph (see the module docstring for the mapping).

    Returns:
        The image, [H, W] float32 in [0, 1].

    Raises:
        DicomError: the file cannot be read as one radiograph (the message names it and says why).
    """
    path = Path(path)
    ds = _read(path, header_only=False)
    _check_header(path, ds)
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        stored = ds.pixel_array
    except _PARSE_ERRORS as err:
        raise DicomError(
            f"image {path} has DICOM pixel data ({syntax.name}) that is truncated or cannot be decoded: "
            f"{_one_line(err)}"
        ) from None
    colour = int(ds.SamplesPerPixel) == 3
    if stored.ndim != (3 if colour else 2):
        raise DicomError(f"image {path} decoded to pixel array shape {stored.shape}; expected one frame")
    try:
        if colour:
            rgb = stored.astype(np.float64)
            image = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / (
                2 ** int(ds.BitsStored) - 1
            )
        else:
            image = _grayscale(ds, stored)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError) as err:
        raise DicomError(f"image {path} has invalid DICOM LUT or window values: {_one_line(err)}") from None
    return image.astype(np.float32)
