"""Reading chest radiographs into normalised RGB tensors.

Any PIL-readable file works: 8-bit grayscale, 16-bit PNG (DICOM exports), RGB/RGBA, palette and
JPEG. DICOM files (a ``.dcm``/``.dicom`` name, or any file with the ``DICM`` marker at byte 128)
are decoded by :mod:`amrg.data.dicom`: Modality LUT or rescale, then the first VOI LUT or window,
MONOCHROME1 inverted, 12/16-bit and signed data scaled to [0, 1]; compressed transfer syntaxes need
pydicom's optional decoder plugins. Radiographs are single-channel, so every image is reduced to
luminance, scaled to [0, 1], resized, replicated to 3 channels and normalised with the ImageNet
statistics the Swin backbones were trained with.

Huge files are refused from their header, before any pixel is decoded: an image with more than
``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`, 50 million; a 43 cm detector at 100 um
gives 18 million) raises :class:`ImageTooLargeError` naming the file, and so does one past PIL's own
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, which still applies when ``max_pixels`` is
None). When the size the model needs is known (``size_hint``), JPEGs are decoded at 1/2, 1/4 or 1/8
scale by libjpeg (``Image.draft``) and other images are box-reduced by the same factors before they
are turned into floats, so a large view costs a fraction of its full-size float copy; the reduced
image keeps at least 3 times the target side, so the final resize gives nearly the same pixels.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from amrg.data.dicom import DicomError, check_dicom, is_dicom, read_dicom
from amrg.errors import InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "check_pixels",
    "ImageTooLargeError",
    "OutsideRootError",
    "from_model_input",
    "grayscale_from_pil",
    "image_problem",
    "leaves_root",
    "load_image",
    "read_grayscale",
    "to_model_input",
    "train_augmentation",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


DEFAULT_MAX_PIXELS = 50_000_000
"""Default pixel cap (width x height) of one image file: 7071 px square; radiographs are 2-18 million."""

# Box-reduction factors tried before decoding to floats (libjpeg's DCT scaling offers 1/2, 1/4, 1/8).
_REDUCE_FACTORS = (8, 4, 2)
# A reduced image keeps at least 3x the target side, Pillow's advice for ``resize(reducing_gap=3.0)``
# ("indistinguishable from fair resampling in most cases"), so the final resize still does the work.
_REDUCING_GAP = 3
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImageError(InputError):
    """An image is missing, unreadable or of an unsupported kind."""


class ImageTooLargeError(BadImageError):
    """An image has more pixels than the cap (``max_pixels``) or PIL's decompression-bomb limit."""


class OutsideRootError(InputError):
    """An annotation's image path is absolute or climbs out of the image root with ``..``."""


def leaves_root(rel: str) -> bool:
    """True when an annotation's image path is absolute or climbs out of its root with ``..``.

    The test is on the text alone (no file system access): a symlink inside the root that points
    elsewhere is the dataset owner's choice and is followed as before.
    """
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).anchor:
        return True
    depth = 0
    for part in rel.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _too_large(path: Path, size: tuple[int, int] | None, pixels: int, cap: int, cap_name: str) -> str:
    dims = f"{size[0]}x{size[1]} = " if size is not None else ""
    return f"image {path} is {dims}{pixels:,} pixels, over the {cap_name} cap of {cap:,} pixels"


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(_too_large(path, size, size[0] * size[1], max_pixels, "max_pixels"))


@contextmanager
def _open(path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """``Image.open`` (header only) with the pixel cap checked and PIL's bomb error naming the file.

    Raises:
        ImageTooLargeError: more pixels than ``max_pixels`` or PIL's own limit.
        UnidentifiedImageError, OSError, SyntaxError: as ``Image.open`` raises them.
    """
    with warnings.catch_warnings():
        if max_pixels is not None:
            # Our cap is checked below from the same header; PIL's warning would say it twice.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            pixels = int(found.group(1)) if found else 0
            if max_pixels is not None and pixels > max_pixels:
                msg = _too_large(path, None, pixels, max_pixels, "max_pixels")
            else:
                limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
                msg = _too_large(
                    path, None, pixels, limit, "PIL decompression-bomb (PIL.Image.MAX_IMAGE_PIXELS)"
                )
            raise ImageTooLargeError(msg) from None
    with img:
        _check_pixels(path, img.size, max_pixels)
        yield img


def _dicom_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a DICOM header, or None when it cannot be read (read_dicom then says why)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Columns), int(ds.Rows)
    except Exception:  # noqa: BLE001 - any parse failure is reported by read_dicom/check_dicom
        return None


def check_pixels(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """Refuse an image file with more than ``max_pixels`` pixels, from its header alone (DICOM too).

    Returns:
        ``(width, height)``, or None when the header cannot be read (the reader then says why).

    Raises:
        ImageTooLargeError: more pixels than ``max_pixels``, or than PIL's decompression-bomb limit.
    """
    path = Path(path)
    if is_dicom(path):
        size = _dicom_size(path)
        if size is not None:
            _check_pixels(path, size, max_pixels)
        return size
    try:
        with _open(path, max_pixels) as img:
            return img.size
    except ImageTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def _reduce_factor(size: tuple[int, int], size_hint: int | None) -> int:
    """The largest of 8, 4, 2 that keeps both sides >= 3 x ``size_hint`` (1: no reduction)."""
    if size_hint is None:
        return 1
    room = min(size[0], size[1]) // (_REDUCING_GAP * size_hint)
    return next((k for k in _REDUCE_FACTORS if room >= k), 1)


def grayscale_from_pil(img: Image.Image, source: str = "image") -> Image.Image:
    """A loaded PIL image as a PIL "F" (float32) image with values in [0, 1] (see :func:`read_grayscale`).

    Args:
        img: any PIL image (8-bit, 16/32-bit integer, float, RGB(A), palette, ...).
        source: what to call the image in messages (its file name, or "uploaded image").

    Raises:
        BadImageError: an unsupported mode.
    """
    mode = img.mode
    if mode in _DEEP_MODES:
        return _scaled_float(np.asarray(img), reduce=1)
    if mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        gray = img.convert("RGB").convert("L") if mode not in ("L", "LA") else img.convert("L")
        arr = np.asarray(gray, dtype=np.float32) / 255.0
        return Image.fromarray(arr, mode="F")
    raise BadImageError(f"{source} has unsupported mode {mode!r}")


def _scaled_float(arr: np.ndarray, reduce: int) -> Image.Image:
    """Min-max scale deep integer or float data to a [0, 1] "F" image, box-reduced by ``reduce`` first.

    The range comes from the full-size data; reduction and scaling work in place where they can, so a
    16-bit view never holds more than one full-size float copy (none when it is reduced).
    """
    lo, hi = float(arr.min()), float(arr.max())
    if reduce > 1:
        h, w = (arr.shape[0] // reduce) * reduce, (arr.shape[1] // reduce) * reduce
        blocks = arr[:h, :w].reshape(h // reduce, reduce, w // reduce, reduce)  # [H/k, k, W/k, k]
        arr = blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)  # [H/k, W/k]
    else:
        arr = np.array(arr, dtype=np.float32)  # a writable copy
    if hi > lo:
        arr -= lo
        arr *= 1.0 / (hi - lo)
    else:
        arr[...] = 0.0
    return Image.fromarray(arr)  # float32 [H, W] -> mode "F"


def read_grayscale(
    path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, size_hint: int | None = None
) -> Image.Image:
    """Read an image file as a PIL "F" (float32) image with values in [0, 1].

    8-bit data is divided by 255. Deeper data (16-bit PNG, 32-bit integer) is min-max scaled per
    image, because DICOM exports often fill only 10-12 of their 16 bits. Alpha is dropped. DICOM
    files go through :func:`amrg.data.dicom.read_dicom`, which knows the stored bits and the window.

    Args:
        path: the image file.
        max_pixels: refuse a file with more pixels (width x height, read from its header before any
            decoding); None for no cap of ours (PIL's decompression-bomb limit still applies).
        size_hint: the side the image will be resized to; a file at least 6 times as large on both
            sides is decoded (JPEG) or box-reduced (other formats) by 2, 4 or 8 first, never below 3
            times ``size_hint``. None reads at full size.

    Raises:
        ImageTooLargeError: more pixels than ``max_pixels`` (or PIL's limit), named with its size.
        BadImageError: the file is missing, not an image, truncated or of an unsupported mode or kind.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"image {path} not found")
    if is_dicom(path):
        size = _dicom_size(path)
        if size is not None:
            _check_pixels(path, size, max_pixels)
        try:
            return Image.fromarray(read_dicom(path))  # float32 [H, W] -> mode "F"
        except DicomError as e:
            raise BadImageError(str(e)) from None
    try:
        with _open(path, max_pixels) as img:
            reduce = _reduce_factor(img.size, size_hint)
            if reduce > 1 and img.format == "JPEG":
                side = _REDUCING_GAP * size_hint
                img.draft(None, (side, side))  # libjpeg DCT scaling by the same factor; the mode is kept
                reduce = 1
            img.load()
            if img.mode in _DEEP_MODES:
                return _scaled_float(np.asarray(img), reduce)
            if reduce > 1 and img.mode in ("L", "RGB", "RGBA"):
                img = img.reduce(reduce)
            return grayscale_from_pil(img, f"image {path}")
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"image {path} is unreadable or corrupt: {e}") from None


def image_problem(
    path: str | Path, decode: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> str | None:
    """Why ``path`` cannot be read as a radiograph, or None when it can.

    Args:
        path: the image file.
        decode: decode the pixels as training will (slow) instead of checking the header and
            structure only (PIL's ``verify``; for DICOM, :func:`amrg.data.dicom.check_dicom`).
        max_pixels: the pixel cap :func:`read_grayscale` applies (None: PIL's limit only).
    """
    path = Path(path)
    if decode:
        try:
            read_grayscale(path, max_pixels)
        except BadImageError as e:
            return str(e)
        return None
    if not path.is_file():
        return f"image {path} not found"
    if is_dicom(path):
        try:
            check_dicom(path)
            size = _dicom_size(path)
            if size is not None:
                _check_pixels(path, size, max_pixels)
        except (DicomError, ImageTooLargeError) as e:
            return str(e)
        return None
    try:
        with _open(path, max_pixels) as img:
            img.verify()
    except ImageTooLargeError as e:
        return str(e)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"image {path} is unreadable or corrupt: {e}"
    return None


def train_augmentation() -> Callable[[Tensor], Tensor]:
    """Mild geometric and exposure jitter for training, on a [1, H, W] image in [0, 1].

    No horizontal flip: reports name sides ("left pleural effusion"), so a flip would make the
    image contradict its report.
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomAffine(degrees=5, translate=(0.03, 0.03), scale=(0.95, 1.05)),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
    )


def load_image(
    path: str | Path,
    image_size: int,
    augment: Callable[[Tensor], Tensor] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Read (any kind :func:`read_grayscale` reads, DICOM included), resize, optionally augment,
    and normalise one view.

    Large files are decoded or reduced towards ``image_size`` first (``size_hint``) and files over
    ``max_pixels`` are refused (see :func:`read_grayscale`).

    Returns:
        Normalised RGB tensor, [3, image_size, image_size] float32.
    """
    return to_model_input(read_grayscale(path, max_pixels, size_hint=image_size), image_size, augment)


def to_model_input(
    gray: Image.Image, image_size: int, augment: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Resize a grayscale "F" image in [0, 1], optionally augment it, replicate and normalise it.

    Returns:
        Normalised RGB tensor, [3, image_size, image_size] float32.
    """
    gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(gray, dtype=np.float32).copy()).unsqueeze(0)  # [1, H, W]
    if augment is not None:
        x = augment(x).clamp_(0.0, 1.0)
    x = x.expand(3, -1, -1)  # [3, H, W]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def from_model_input(x: Tensor) -> Tensor:
    """Undo :func:`to_model_input`'s normalisation: a grayscale view in [0, 1], [3, H, W] -> [H, W]."""
    return (x[0].float() * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0.0, 1.0)
