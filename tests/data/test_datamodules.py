"""DataModules: batches of the documented shapes, presets, label filling."""

import json
from pathlib import Path

import pytest
import torch

from amrg.data import Batch, IUXrayDataModule, MIMICCXRDataModule, ReportDataModule
from amrg.data.datamodules import CheXpertPlusDataModule
from tests.conftest import write_image


def test_report_datamodule_batches(make_dataset) -> None:
    path = make_dataset()
    dm = ReportDataModule(path, image_size=16, max_views=2, batch_size=3, num_workers=0, augment=True)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("fit")  # safe twice
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch)
    assert batch.images.shape == (3, 2, 3, 16, 16)
    assert batch.view_mask.dtype == torch.bool and batch.labels.shape == (3, 14)
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 2
    assert len(list(dm.test_dataloader())[0]) == 2 and len(list(dm.predict_dataloader())[0]) == 2


def test_presets() -> None:
    iu = IUXrayDataModule(Path("a.json"))
    mimic = MIMICCXRDataModule(Path("a.json"), batch_size=4)
    plus = CheXpertPlusDataModule(Path("a.json"))
    assert (iu.hparams.cleaning, iu.hparams.max_views) == ("iu_xray", 2)
    assert (mimic.hparams.cleaning, mimic.hparams.max_views, mimic.hparams.batch_size) == ("mimic_cxr", 1, 4)
    assert (plus.hparams.cleaning, plus.hparams.max_views) == ("mimic_cxr", 1)


def test_missing_split_loader_error(make_dataset) -> None:
    path = make_dataset({"train": 2})
    dm = ReportDataModule(path, image_size=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"no 'val' split to load"):
        dm.val_dataloader()


def test_unlabelled_studies_keep_nan_without_labeler(make_dataset) -> None:
    path = make_dataset(labels=False)
    dm = ReportDataModule(path, image_size=16, batch_size=2, num_workers=0, labels_from_reports=False)
    dm.setup("fit")
    assert torch.isnan(next(iter(dm.train_dataloader())).labels).all()


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="data.init_args.batch_size must be >= 1"):
        ReportDataModule(Path("a.json"), batch_size=0)


def test_image_root_override(make_dataset, tmp_path: Path) -> None:
    path = make_dataset()
    moved = tmp_path / "elsewhere.json"
    moved.write_text(json.dumps(json.loads(path.read_text())))
    dm = ReportDataModule(moved, image_root=path.parent, image_size=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).images.shape[0] == 2


def test_unlabelled_studies_labelled_from_reports_and_cached(make_dataset, tmp_path: Path) -> None:
    # conftest reports say "The heart is normal in size. No pleural effusion." -> effusion negated
    path = make_dataset(labels=False)
    cache = tmp_path / "cache"
    dm = ReportDataModule(path, image_size=16, batch_size=8, num_workers=0, cache_dir=cache)
    dm.prepare_data()
    files = list(cache.glob("*.labels.json"))
    assert len(files) == 1
    dm.setup("fit")
    labels = next(iter(dm.train_dataloader())).labels
    effusion = 9  # LABELS.index("Pleural Effusion")
    assert (labels[:, effusion] == 0).all()
    assert (labels[:, 13] == 1).all()  # No Finding: nothing positive
    # setup reads the cache, it does not relabel: a doctored cache shows through
    data = json.loads(files[0].read_text())
    data = {k: [1] * 14 for k in data}
    files[0].write_text(json.dumps(data))
    dm2 = ReportDataModule(path, image_size=16, batch_size=8, num_workers=0, cache_dir=cache)
    dm2.setup("fit")
    assert (next(iter(dm2.train_dataloader())).labels == 1).all()


def test_hparams_hold_no_path_objects(tmp_path: Path) -> None:
    # a PosixPath in a checkpoint's datamodule hparams breaks torch.load(weights_only=True)
    from amrg.data import SyntheticDataModule

    for dm in (
        ReportDataModule(tmp_path / "a.json", image_root=tmp_path, cache_dir=tmp_path),
        SyntheticDataModule(root=tmp_path, n=4),
    ):
        assert not any(isinstance(v, Path) for v in dm.hparams.values()), dict(dm.hparams)


def test_max_pixels_and_allow_outside_root_reach_the_datasets(make_dataset, tmp_path: Path) -> None:
    from amrg.data.images import OutsideRootError

    path = make_dataset(size=32)
    ann = json.loads(path.read_text())
    ann["train"][0]["image_path"] = ["../outside.png"]
    write_image(path.parent.parent / "outside.png")
    path.write_text(json.dumps(ann))
    dm = ReportDataModule(path, image_size=16, batch_size=8, num_workers=0)
    with pytest.raises(OutsideRootError, match=r"train id='train_000': image path '../outside.png' leaves"):
        dm.setup("fit")
    dm = ReportDataModule(path, image_size=16, batch_size=8, num_workers=0, allow_outside_root=True)
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))) == 4
    dm = ReportDataModule(
        path,
        image_size=16,
        batch_size=8,
        num_workers=0,
        allow_outside_root=True,
        max_pixels=100,
        on_bad_image="skip",
    )
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())) is None  # every 32x32 view is over the cap: all skipped


@pytest.mark.slow  # two subprocesses that import Lightning
def test_synthetic_cache_written_by_two_processes_at_once_is_one_whole_dataset(tmp_path: Path) -> None:
    # several nodes on one shared file system each run prepare_data on their local rank 0
    import os
    import subprocess
    import sys

    script = (
        "import sys; from amrg.data import SyntheticDataModule; "
        "dm = SyntheticDataModule(root=sys.argv[1], n=24, image_size=32, num_workers=0); dm.prepare_data(); "
        "dm.setup('fit'); print(len(dm.datasets['train']))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=repo,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["20", "20"]
    (data_dir,) = tmp_path.iterdir()
    assert json.loads((data_dir / "synth.json").read_text())["settings"]["n"] == 24
    assert not list(data_dir.glob(".synth-tmp-*"))
