"""Fuzzing with hypothesis: report cleaning, the labeler, annotation validation, the tokenizer and image
decoding take random input and either answer or raise amrg's own error (an AmrgError subclass), and
give the same answer (or the same error message) twice.

Every test is derandomized (the same examples on every run) and without deadline: the suite is
deterministic and the whole file runs in well under 30 s on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from amrg.data.cleaning import clean_report
from amrg.data.images import read_grayscale
from amrg.data.schema import load_annotation
from amrg.errors import AmrgError
from amrg.labeling import build_labeler
from amrg.labels import NUM_LABELS
from amrg.models.tokenizer import train_report_tokenizer

# AMRG_FUZZ_SCALE=20 hunts longer (same seeds, more examples); the suite runs at 1.
_SCALE = int(os.environ.get("AMRG_FUZZ_SCALE", "1"))


def _fuzz(max_examples: int):
    return settings(
        max_examples=max_examples * _SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """``("ok", value)`` or ``("error", message)`` for amrg's own errors; anything else propagates."""
    try:
        return "ok", fn()
    except AmrgError as err:
        assert str(err).strip(), f"{type(err).__name__} with an empty message"
        return "error", f"{type(err).__name__}: {err}"


def _twice(fn: Callable[[], Any], same: Callable[[Any, Any], bool] = lambda a, b: a == b) -> tuple[str, Any]:
    first, second = _outcome(fn), _outcome(fn)
    event(first[0] if first[0] == "ok" else first[1].split(":", 1)[0])  # --hypothesis-show-statistics
    assert first[0] == second[0], (first, second)
    assert same(first[1], second[1]) if first[0] == "ok" else first[1] == second[1], (first, second)
    return first


# Report-like text: words from radiology prose mixed with any unicode, punctuation, numbers, newlines.
_WORDS = st.sampled_from(
    [
        "no", "pleural", "effusion", "cardiomegaly", "heart", "size", "is", "normal", "not", "seen",
        "possible", "pneumothorax", "1.", "2.", "..", "__", ":", "-", "xxxx", "\n", "  ", "[", "]", "'", '"',
        "\\", "/", "edema", "without", "may", "represent", "atelectasis", "fracture", "clear", "lungs",
    ]
)  # fmt: skip
_REPORTS = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(_WORDS, st.text(max_size=8)), max_size=60).map(" ".join),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
)


@_fuzz(300)
@given(report=_REPORTS, style=st.sampled_from(["iu_xray", "mimic_cxr", "none"]))
def test_cleaning_any_text(report: str, style: str) -> None:
    kind, cleaned = _twice(lambda: clean_report(report, style))
    assert kind == "ok" and isinstance(cleaned, str)


_LABELER = build_labeler("chexpert")


@_fuzz(300)
@given(report=st.one_of(st.none(), _REPORTS))
def test_labeler_any_text(report: str | None) -> None:
    kind, row = _twice(lambda: _LABELER.label(report))
    assert kind == "ok" and len(row) == NUM_LABELS and set(row) <= {1, 0, -1, None}
    assert _LABELER.label_batch([report, report]) == [row, row]


# --------------------------------------------------------------------------- annotation files
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_IDS = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.none(), _JSON)
_LABEL_LISTS = st.one_of(
    st.lists(st.sampled_from([1, 0, -1, None, 1.0, 2, "1", True, float("nan")]), max_size=16), _JSON
)
_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "id": _IDS,
        "report": st.one_of(_REPORTS, _JSON),
        "image_path": st.one_of(st.lists(st.one_of(st.text(max_size=10), _JSON), max_size=3), _JSON),
        "split": st.one_of(st.sampled_from(["train", "val", "test", "dev"]), _JSON),
        "labels": _LABEL_LISTS,
        "boxes": _JSON,
    },
)
# mostly well-formed records, so validation gets past the first check and the loader's fast path runs
_GOOD_RECORD = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=6),
        "report": _REPORTS.filter(str.strip),
        "image_path": st.lists(st.text(min_size=1, max_size=10).filter(str.strip), min_size=1, max_size=3),
    },
    optional={
        "labels": st.lists(st.sampled_from([1, 0, -1, None]), min_size=14, max_size=14),
        "split": st.sampled_from(["train", "val", "test"]),
    },
)
_SPLIT_KEYS = st.sampled_from(["train", "val", "test", "dev", ""])
_ANNOTATIONS = st.one_of(
    _JSON,
    st.dictionaries(_SPLIT_KEYS, st.one_of(st.lists(_RECORD, max_size=4), _JSON), max_size=4),
    st.dictionaries(
        st.sampled_from(["train", "val", "test"]), st.lists(_GOOD_RECORD, max_size=4), max_size=3
    ),
)


def _annotation_summary(annotation) -> dict[str, list]:
    return {split: [repr(s) for s in studies] for split, studies in annotation.splits.items()}


def _load_summary(path: Path) -> Any:
    return _annotation_summary(load_annotation(path))


@_fuzz(400)
@given(doc=_ANNOTATIONS)
def test_annotation_any_json_structure(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotation.json"
        path.write_text(json.dumps(doc, allow_nan=True))
        _twice(lambda: _load_summary(path))


@_fuzz(200)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        _ANNOTATIONS.map(lambda d: json.dumps(d).encode()).flatmap(
            lambda b: st.tuples(st.just(b), st.integers(0, max(len(b) - 1, 0)), st.binary(max_size=4)).map(
                lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]  # valid JSON with a few random bytes spliced in
            )
        ),
    )
)
def test_annotation_any_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotation.json"
        path.write_bytes(data)
        _twice(lambda: _load_summary(path))


# --------------------------------------------------------------------------- tokenizer
@_fuzz(12)
@given(
    reports=st.lists(st.one_of(_REPORTS, _REPORTS, _JSON), max_size=6),
    style=st.sampled_from(["llama", "qwen"]),
    vocab_size=st.sampled_from([100, 300, 600]),  # 100: below the byte alphabet
)
def test_tokenizer_trains_on_any_reports(reports: list[str], style: str, vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:

        def train() -> list[list[int]]:
            tok = train_report_tokenizer(reports, Path(tmp) / "tok", vocab_size=vocab_size, style=style)
            return [tok(r)["input_ids"] for r in reports]

        _twice(train)


@pytest.fixture(scope="module")
def report_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    texts = [
        "The heart is normal in size. No pleural effusion.",
        "Possible small left pleural effusion; no pneumothorax.",
        "Mild cardiomegaly. Lungs are clear.",
    ] * 5
    return train_report_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


@_fuzz(300)
@given(text=_REPORTS)
def test_tokenizer_encodes_any_text_and_decodes_it_back(report_tokenizer, text: str) -> None:
    kind, ids = _twice(lambda: report_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert kind == "ok"
    # byte-level BPE: every string has an encoding, and decoding gives the string back
    assert report_tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text


# --------------------------------------------------------------------------- image decoding
def _image_bytes(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size=size[::-1], dtype=np.uint16))
    elif mode == "RGB":
        img = Image.fromarray(rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8), mode="RGB")
    else:
        img = Image.fromarray(rng.integers(0, 256, size=size[::-1], dtype=np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


_VALID_IMAGES = st.builds(
    _image_bytes,
    fmt=st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "GIF"]),
    mode=st.sampled_from(["L", "RGB"]),
    size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    seed=st.integers(0, 3),
) | st.builds(
    _image_bytes, fmt=st.just("PNG"), mode=st.just("I;16"), size=st.just((9, 7)), seed=st.integers(0, 3)
)


def _mutate(data: bytes, draw) -> bytes:
    """Truncate, overwrite or splice random bytes into an image file."""
    how = draw(st.sampled_from(["truncate", "overwrite", "splice", "header"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    junk = draw(st.binary(min_size=1, max_size=16))
    if how == "truncate":
        return data[:at]
    if how == "overwrite":
        return data[:at] + junk + data[at + len(junk) :]
    if how == "splice":
        return data[:at] + junk + data[at:]
    return data[:16] + junk + data[16 + len(junk) :]  # inside the header: sizes, bit depths, chunk lengths


def _png_header(width: int, height: int, depth: int, color: int) -> bytes:
    """A PNG signature and IHDR chunk (valid CRC) claiming any size, bit depth and colour type, no data."""
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


_PNG_HEADERS = st.builds(
    _png_header,
    width=st.integers(0, 2**31),
    height=st.integers(0, 2**31),
    depth=st.sampled_from([0, 1, 2, 4, 8, 16, 3]),
    color=st.sampled_from([0, 2, 3, 4, 6, 5]),
)
_DICOM_LIKE = st.binary(max_size=200).map(lambda b: b"\0" * 128 + b"DICM" + b)  # the Part 10 marker


@st.composite
def _image_files(draw) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["random", "mutated", "valid", "dicom", "png_header"]))
    if kind == "random":
        data = draw(st.binary(max_size=300))
    elif kind == "png_header":
        data = draw(_PNG_HEADERS) + draw(st.binary(max_size=40))
    elif kind == "dicom":
        data = draw(_DICOM_LIKE)
    else:
        data = draw(_VALID_IMAGES)
        if kind == "mutated":
            data = _mutate(data, draw)
    suffix = draw(st.sampled_from([".png", ".jpg", ".tif", ".dcm", ".bin", ""]))
    return data, suffix


@_fuzz(600)
@given(file=_image_files(), size_hint=st.sampled_from([None, 2]))
def test_image_decoding_any_bytes(file: tuple[bytes, str], size_hint: int | None) -> None:
    data, suffix = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"view{suffix}"
        path.write_bytes(data)

        def read() -> np.ndarray:
            img = read_grayscale(path, size_hint=size_hint)
            arr = np.asarray(img)
            assert img.mode == "F" and arr.ndim == 2, (img.mode, arr.shape)
            return arr

        kind, arr = _twice(read, same=lambda a, b: np.array_equal(a, b, equal_nan=True))
        if kind == "ok":
            assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0, (arr.min(), arr.max())
