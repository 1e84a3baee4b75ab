"""amrg.data.images: every image kind becomes a normalised RGB view; bad files are named."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amrg.data.images import IMAGENET_MEAN, IMAGENET_STD, image_problem, load_image, read_grayscale
from tests.conftest import write_image


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA"])
def test_image_kinds_become_normalised_rgb(tmp_path: Path, mode: str) -> None:
    path = write_image(tmp_path / "x.png", size=40, mode=mode)
    x = load_image(path, image_size=24)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # channels are the same luminance, normalised per channel
    gray = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(gray[0], gray[1])
    assert 0.0 <= gray.min() and gray.max() <= 1.0 + 1e-6


def test_16bit_png_is_min_max_scaled(tmp_path: Path) -> None:
    # 12-bit data stored in 16 bits would be nearly black if divided by 65535
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    got = np.asarray(read_grayscale(tmp_path / "d.png"))
    np.testing.assert_allclose(got, arr / 4000.0, rtol=1e-6)


def test_jpeg_reads(tmp_path: Path) -> None:
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "x.jpg")
    assert load_image(tmp_path / "x.jpg", 16).shape == (3, 16, 16)


def test_str_and_path_inputs_read_the_same(tmp_path: Path) -> None:
    path = write_image(tmp_path / "x.png", size=20, mode="I;16")
    torch.testing.assert_close(load_image(str(path), 16), load_image(path, 16))
    np.testing.assert_array_equal(np.asarray(read_grayscale(str(path))), np.asarray(read_grayscale(path)))


def test_image_problem_names_missing_and_corrupt_files(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert image_problem(good) is None and image_problem(str(good), decode=True) is None
    assert image_problem(tmp_path / "gone.png") == f"image {tmp_path / 'gone.png'} not found"
    for decode in (False, True):
        problem = image_problem(corrupt, decode=decode)
        assert problem is not None and problem.startswith(f"image {corrupt} is unreadable or corrupt: ")


def test_a_flat_16_bit_image_reads_as_zeros_not_nan(tmp_path: Path) -> None:
    Image.new("I;16", (8, 8)).save(tmp_path / "flat.png")  # no range to min-max scale
    assert np.asarray(read_grayscale(tmp_path / "flat.png")).max() == 0.0
