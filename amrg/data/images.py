"""Reading chest radiographs into normalised RGB tensors.

Any PIL-readable file works: 8-bit grayscale, 16-bit PNG (DICOM exports), RGB/RGBA, palette and
JPEG. DICOM files (a ``.dcm``/``.dicom`` name, or any file with the ``DICM`` marker at byte 128)
are decoded by :mod:`amrg.data.dicom`: Modality LUT or rescale, then the first VOI LUT or window,
MONOCHROME1 inverted, 12/16-bit and signed data scaled to [0, 1]; compressed transfer syntaxes need
pydicom's optional decoder plugins. Radiographs are single-channel, so every image is reduced to
luminance, scaled to [0, 1], resized, replicated to 3 channels and normalised with the ImageNet
statistics the Swin backbones were trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from amrg.data.dicom import DicomError, check_dicom, is_dicom, read_dicom
from amrg.errors import InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "from_model_input",
    "grayscale_from_pil",
    "image_problem",
    "load_image",
    "read_grayscale",
    "to_model_input",
    "train_augmentation",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageError(InputError):
    """An image is missing, unreadable or of an unsupported kind."""


def grayscale_from_pil(img: Image.Image, source: str = "image") -> Image.Image:
    """A loaded PIL image as a PIL "F" (float32) image with values in [0, 1] (see :func:`read_grayscale`).

    Args:
        img: any PIL image (8-bit, 16/32-bit integer, float, RGB(A), palette, ...).
        source: what to call the image in messages (its file name, or "uploaded image").

    Raises:
        BadImageError: an unsupported mode.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr, mode="F")
    if mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        gray = img.convert("RGB").convert("L") if mode not in ("L", "LA") else img.convert("L")
        arr = np.asarray(gray, dtype=np.float32) / 255.0
        return Image.fromarray(arr, mode="F")
    raise BadImageError(f"{source} has unsupported mode {mode!r}")


def read_grayscale(path: str | Path) -> Image.Image:
    """Read an image file as a PIL "F" (float32) image with values in [0, 1].

    8-bit data is divided by 255. Deeper data (16-bit PNG, 32-bit integer) is min-max scaled per
    image, because DICOM exports often fill only 10-12 of their 16 bits. Alpha is dropped. DICOM
    files go through :func:`amrg.data.dicom.read_dicom`, which knows the stored bits and the window.

    Raises:
        BadImageError: the file is missing, not an image, truncated or of an unsupported mode or kind.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"image {path} not found")
    if is_dicom(path):
        try:
            return Image.fromarray(read_dicom(path))  # float32 [H, W] -> mode "F"
        except DicomError as e:
            raise BadImageError(str(e)) from None
    try:
        with Image.open(path) as img:
            img.load()
            return grayscale_from_pil(img, f"image {path}")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadImageError(f"image {path} is unreadable or corrupt: {e}") from None


def image_problem(path: str | Path, decode: bool = False) -> str | None:
    """Why ``path`` cannot be read as a radiograph, or None when it can.

    Args:
        path: the image file.
        decode: decode the pixels as training will (slow) instead of checking the header and
            structure only (PIL's ``verify``; for DICOM, :func:`amrg.data.dicom.check_dicom`).
    """
    path = Path(path)
    if decode:
        try:
            read_grayscale(path)
        except BadImageError as e:
            return str(e)
        return None
    if not path.is_file():
        return f"image {path} not found"
    if is_dicom(path):
        try:
            check_dicom(path)
        except DicomError as e:
            return str(e)
        return None
    try:
        with Image.open(path) as img:
            img.verify()
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
    path: str | Path, image_size: int, augment: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Read (any kind :func:`read_grayscale` reads, DICOM included), resize, optionally augment,
    and normalise one view.

    Returns:
        Normalised RGB tensor, [3, image_size, image_size] float32.
    """
    return to_model_input(read_grayscale(path), image_size, augment)


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
