"""amrg.files and amrg.checkpoints.atomic_io: whole files or none, in the target's folder, errors naming the target."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from amrg.checkpoints.atomic_io import AtomicCheckpointIO
from amrg.errors import OutputError
from amrg.files import atomic_write, atomic_write_text


def _full_disk_after(n: int):
    """A ``write`` that writes ``n`` bytes, then fails as a full disk does."""

    def write(f) -> None:
        f.write(b"x" * n)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_atomic_write_replaces_the_file_with_the_umask_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["m.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_full_disk_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous good checkpoint")
    with pytest.raises(OutputError) as err:
        atomic_write(path, _full_disk_after(1000), "checkpoint")
    assert str(err.value) == f"cannot write checkpoint '{path}': no space left on the device"
    assert isinstance(err.value, OSError)
    assert path.read_bytes() == b"previous good checkpoint"
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_an_error_of_the_writer_itself_passes_through_and_leaves_no_temp(tmp_path: Path) -> None:
    def broken(f) -> None:
        f.write(b"half")
        raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_write(tmp_path / "a.bin", broken)
    assert os.listdir(tmp_path) == []


def test_a_folder_in_the_way_or_a_file_as_folder_is_one_output_error(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match=f"cannot write metrics '{tmp_path / 'taken'}': it is a folder"):
        atomic_write_text(tmp_path / "taken", "{}", "metrics")
    (tmp_path / "plain").write_text("")
    with pytest.raises(OutputError, match=r"cannot write checkpoint '.*plain/x.ckpt': "):
        atomic_write_text(tmp_path / "plain" / "x.ckpt", "", "checkpoint")


def test_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    host = socket.gethostname().split(".")[0].replace("-", "_")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_temp = tmp_path / f".last.ckpt.tmp-{host}-{int(dead.stdout)}-0badc0de"
    live_temp = tmp_path / f".last.ckpt.tmp-{host}-{os.getppid()}-0badc0de"  # our parent is running
    other_host = tmp_path / f".last.ckpt.tmp-elsewhere-{int(dead.stdout)}-0badc0de"
    for temp in (dead_temp, live_temp, other_host):
        temp.write_bytes(b"partial")
    atomic_write_text(tmp_path / "last.ckpt", "new")
    assert not dead_temp.exists() and live_temp.exists() and other_host.exists()


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)), batch_size=4
    )


def test_trainer_fit_with_the_plugin_writes_a_checkpoint_that_loads(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    model = _Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)],
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(model, _loader())
    names = sorted(os.listdir(ckpt_dir))
    assert "last.ckpt" in names and not [n for n in names if n.startswith(".")], names  # no temp left
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    torch.testing.assert_close(ckpt["state_dict"]["layer.weight"], model.layer.weight.detach())
    resumed = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)],
    )
    resumed.fit(_Tiny(), _loader(), ckpt_path=ckpt_dir / "last.ckpt")
    assert resumed.global_step == 6


def test_the_plugin_never_touches_tmpdir_where_lightnings_default_does(tmp_path: Path, monkeypatch) -> None:
    # $TMPDIR on another (here: no) file system: Lightning's save goes through it, ours never does
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    checkpoint = {"state_dict": {"w": torch.ones(3)}}
    with pytest.raises(FileNotFoundError):
        TorchCheckpointIO().save_checkpoint(checkpoint, tmp_path / "lightning.ckpt")
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "ours.ckpt")
    torch.testing.assert_close(
        torch.load(tmp_path / "ours.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(3)
    )


def test_the_plugin_turns_a_full_disk_into_one_error_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def full_disk_save(obj, f, *args, **kwargs) -> None:
        f.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip, as torch.save begins
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OutputError, match=f"^cannot write checkpoint '{path}': no space left on the device$"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path, storage_options={"x": 1})
