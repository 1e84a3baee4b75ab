"""Shared fixtures: seeding, global-state restoration and a tiny on-disk dataset."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-gpu") and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and --run-gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Seed every test and restore global torch state it may change."""
    torch.manual_seed(0)
    np.random.seed(0)
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def write_image(path: Path, size: int = 32, mode: str = "L", seed: int = 0) -> Path:
    """Write a small random image in the given PIL mode ("L", "I;16", "RGB", "RGBA", JPEG by suffix)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        arr = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)  # 12-bit data in 16 bits
        Image.fromarray(arr).save(path)
    elif mode == "RGBA":
        arr = rng.integers(0, 256, size=(size, size, 4), dtype=np.uint8)
        Image.fromarray(arr, mode="RGBA").save(path)
    elif mode == "RGB":
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(arr, mode="RGB").save(path)
    else:
        arr = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
        Image.fromarray(arr, mode="L").save(path)
    return path


def _record(i: int, split: str, views: int, labels: bool) -> dict:
    rec = {
        "id": f"{split}_{i:03d}",
        "report": f"The heart is normal in size. No pleural effusion. Study {i}.",
        "image_path": [f"{split}_{i:03d}/{v}.png" for v in range(views)],
        "split": split,
    }
    if labels:
        rec["labels"] = [None] * 9 + [1 if i % 2 else 0] + [None] * 3 + [0 if i % 2 else 1]
    return rec


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Build a small R2Gen-layout dataset; returns the annotation path.

    Studies alternate one and two views; labels mark Pleural Effusion on odd studies.
    """

    def _make(
        n: dict[str, int] | None = None, size: int = 32, labels: bool = True, root: Path | None = None
    ) -> Path:
        root = root or tmp_path / "dataset"
        counts = n or {"train": 4, "val": 2, "test": 2}
        ann: dict[str, list] = {}
        for split, k in counts.items():
            ann[split] = []
            for i in range(k):
                rec = _record(i, split, views=1 + i % 2, labels=labels)
                for j, rel in enumerate(rec["image_path"]):
                    write_image(root / rel, size=size, seed=i * 10 + j)
                ann[split].append(rec)
        path = root / "annotation.json"
        path.write_text(json.dumps(ann))
        return path

    return _make
