"""The dataset preview sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from amrg.data.preview import LABEL_COLOURS, TILE, preview_grid
from amrg.data.synthetic import synthesize

LEGEND_H = 40  # the text band under each tile (amrg.data.preview._LEGEND_H)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    ann = synthesize(root, n=24, seed=2, image_size=48, val_fraction=0.25, test_fraction=0.0, progress=False)
    return ann, root


def test_grid_of_16_has_boxes_in_label_colours(dataset, tmp_path):
    ann, root = dataset
    out = preview_grid(ann, root, tmp_path / "sub" / "grid.png", n=16)
    assert out == tmp_path / "sub" / "grid.png"
    with Image.open(out) as img:
        assert img.mode == "RGB" and img.size == (4 * TILE, 4 * (TILE + LEGEND_H))
        rgb = np.asarray(img).astype(np.uint32)
    packed = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    colours = {(int(v >> 16), int(v >> 8 & 255), int(v & 255)) for v in packed}
    # The 16 shown studies are a sample of 18 training studies; at least some boxes get drawn.
    assert len(colours & set(LABEL_COLOURS.values())) >= 2


def test_small_split_and_fewer_studies(dataset, tmp_path):
    ann, root = dataset
    out = preview_grid(ann, root, tmp_path / "val.png", n=16, split="val")  # 6 val studies -> 3 x 2
    with Image.open(out) as img:
        assert img.size == (3 * TILE, 2 * (TILE + LEGEND_H))
    a = preview_grid(ann, root, tmp_path / "a.png", n=4, seed=1).read_bytes()
    b = preview_grid(ann, root, tmp_path / "b.png", n=4, seed=1).read_bytes()
    assert a == b


def test_errors_name_the_problem(dataset, tmp_path):
    ann, root = dataset
    with pytest.raises(ValueError, match="n must be >= 1"):
        preview_grid(ann, root, tmp_path / "x.png", n=0)
    with pytest.raises(FileNotFoundError, match="synth_0000.*check image_root"):
        preview_grid(ann, tmp_path / "nowhere", tmp_path / "x.png", n=2)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(ValueError, match="no studies"):
        preview_grid(empty, root, tmp_path / "x.png", split="test")
