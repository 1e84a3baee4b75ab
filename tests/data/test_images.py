"""amrg.data.images: every image kind becomes a normalised RGB view; bad files are named."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amrg.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    ImageTooLargeError,
    check_pixels,
    image_problem,
    leaves_root,
    load_image,
    read_grayscale,
    to_model_input,
)
from amrg.errors import InputError
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


def _png_header_only(path: Path, width: int, height: int, bit_depth: int = 8) -> Path:
    """A PNG that declares ``width`` x ``height`` grayscale pixels and holds none (header, IEND)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # grayscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_a_20000_square_png_is_refused_with_its_path_not_pil_bomb_error(tmp_path: Path) -> None:
    # 20000^2 = 4e8 pixels: over PIL's bomb limit (2 * 89,478,485), which used to escape as
    # DecompressionBombError without the path
    path = _png_header_only(tmp_path / "huge.png", 20000, 20000)
    expected = f"image {path} is 400,000,000 pixels, over the max_pixels cap of 50,000,000 pixels"
    with pytest.raises(ImageTooLargeError) as err:
        read_grayscale(path)
    assert str(err.value) == expected
    assert image_problem(path) == expected and image_problem(path, decode=True) == expected
    with pytest.raises(ImageTooLargeError, match="PIL decompression-bomb"):  # no cap of ours: PIL's applies
        read_grayscale(path, max_pixels=None)
    assert isinstance(err.value, InputError) and isinstance(err.value, BadImageError)


def test_the_pixel_cap_is_read_from_the_header_before_decoding(tmp_path: Path) -> None:
    # a 12000^2 16-bit PNG (1.8 GB as floats) is refused from its 33-byte header alone
    path = _png_header_only(tmp_path / "deep.png", 12000, 12000, bit_depth=16)
    assert image_problem(path) == (
        f"image {path} is 12000x12000 = 144,000,000 pixels, over the max_pixels cap of 50,000,000 pixels"
    )
    small = write_image(tmp_path / "small.png", size=40)
    msg = f"image {small} is 40x40 = 1,600 pixels, over the max_pixels cap of 1,000 pixels"
    with pytest.raises(ImageTooLargeError, match=msg):
        load_image(small, 16, max_pixels=1000)
    assert image_problem(small, max_pixels=1000) == msg
    assert (
        image_problem(small, max_pixels=1600) is None and load_image(small, 16, max_pixels=1600).shape[0] == 3
    )


def test_dicom_over_the_cap_is_refused_from_its_header(tmp_path: Path) -> None:
    from tests.data.test_dicom import write_dicom

    path = write_dicom(tmp_path / "x.dcm", np.zeros((40, 30), np.uint16))
    msg = f"image {path} is 30x40 = 1,200 pixels, over the max_pixels cap of 1,000 pixels"
    assert image_problem(path, max_pixels=1000) == msg
    with pytest.raises(ImageTooLargeError, match=msg):
        read_grayscale(path, max_pixels=1000)
    assert image_problem(path) is None


def test_large_jpeg_is_decoded_at_reduced_size_and_matches_a_full_decode(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:800, 0:640]
    arr = (127 + 100 * np.sin(xx / 60.0) * np.cos(yy / 80.0)).astype(np.uint8)  # smooth, JPEG-friendly
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    assert read_grayscale(tmp_path / "big.jpg").size == (640, 800)
    assert read_grayscale(tmp_path / "big.jpg", size_hint=24).size == (80, 100)  # 1/8: 640 // (3 * 24) = 8
    assert read_grayscale(tmp_path / "big.jpg", size_hint=100).size == (320, 400)  # 1/2: never below 300
    assert read_grayscale(tmp_path / "big.jpg", size_hint=120).size == (640, 800)  # 640 < 6 * 120: full
    fast = load_image(tmp_path / "big.jpg", 24)
    full = to_model_input(read_grayscale(tmp_path / "big.jpg"), 24)
    assert (fast - full).abs().max() < 0.02  # normalised units; the scene spans about 4


def test_large_16_bit_png_is_box_reduced_before_float_conversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(100, 4000, size=(256, 200), dtype=np.uint16)
    arr[0, 0], arr[-1, -1] = 50, 4090  # the range comes from the full image
    Image.fromarray(arr).save(tmp_path / "d.png")
    reduced = np.asarray(read_grayscale(tmp_path / "d.png", size_hint=16))
    assert reduced.shape == (64, 50)  # 4x: 200 // (3 * 16) = 4
    blocks = arr.reshape(64, 4, 50, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(reduced, (blocks - 50) / (4090 - 50), rtol=1e-5)
    assert read_grayscale(tmp_path / "d.png", size_hint=40).size == (200, 256)  # 200 < 6 * 40: full size


def test_large_8_bit_png_reduced_gives_nearly_the_full_size_result(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:600, 0:500]
    arr = (127 + 100 * np.sin(xx / 30.0) * np.cos(yy / 40.0)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "p.png")
    assert read_grayscale(tmp_path / "p.png", size_hint=32).size == (125, 150)  # 500 // 96 = 5 -> 4x
    fast, full = load_image(tmp_path / "p.png", 32), to_model_input(read_grayscale(tmp_path / "p.png"), 32)
    assert (fast - full).abs().max() < 0.02


@pytest.mark.parametrize(
    ("rel", "leaves"),
    [
        ("a/0.png", False),
        ("./a/../b/0.png", False),
        ("../x.png", True),
        ("a/../../x.png", True),
        ("/etc/passwd", True),
        ("C:\\\\x.png", True),
        ("..\\\\x.png", True),
        ("a..b/0.png", False),
    ],
)
def test_leaves_root(rel: str, leaves: bool) -> None:
    assert leaves_root(rel) is leaves


def test_check_pixels_reads_only_the_header(tmp_path: Path) -> None:
    huge = _png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(
        ImageTooLargeError, match=f"image {huge} is 400,000,000 pixels, over the max_pixels cap"
    ):
        check_pixels(huge)
    assert check_pixels(_png_header_only(tmp_path / "ok.png", 300, 200)) == (300, 200)
    (tmp_path / "junk.png").write_bytes(b"junk")
    assert check_pixels(tmp_path / "junk.png") is None and check_pixels(tmp_path / "gone.png") is None
