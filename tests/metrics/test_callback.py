"""ReportMetricsCallback in real (tiny, CPU) Trainer runs: logged keys, files, ModelCheckpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from amrg.labels import label_index
from amrg.metrics.callback import ReportMetricsCallback

REFS = {
    "v1": "the heart is normal in size . the lungs are clear .",
    "v2": "mild cardiomegaly . no pleural effusion .",
    "v3": "small left pleural effusion . no pneumothorax .",
    "v4": "no acute cardiopulmonary abnormality .",
    "v5": "the lungs are clear . heart size is normal .",
}
BAD = "there is a fracture ."


class KeywordLabeler:
    """Cardiomegaly / Pleural Effusion / Fracture when the word appears (negated after 'no'), else No Finding."""

    words = {"cardiomegaly": "Cardiomegaly", "effusion": "Pleural Effusion", "fracture": "Fracture"}

    def label_batch(self, reports):
        rows = []
        for text in reports:
            labels: list[int | None] = [None] * 14
            for sentence in text.split(" . "):
                for word, name in self.words.items():
                    if word in sentence:
                        labels[label_index(name)] = 0 if sentence.startswith("no ") else 1
            if 1 not in labels:
                labels[label_index("No Finding")] = 1
            rows.append(labels)
        return rows


class ToyReporter(L.LightningModule):
    """Trains one weight; 'generates' a bad report at epoch 0 and the reference from epoch 1 on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.w**2).sum()

    def _generate(self, batch):
        good = self.current_epoch >= 1 or self.trainer.testing
        hyps = list(batch["reference"]) if good else [BAD] * len(batch["id"])
        return {"ids": list(batch["id"]), "hypotheses": hyps, "references": list(batch["reference"])}

    def validation_step(self, batch, batch_idx):
        return self._generate(batch)

    def test_step(self, batch, batch_idx):
        return self._generate(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    data = [{"id": k, "reference": v} for k, v in REFS.items()]
    return DataLoader(data, batch_size=2)


def _trainer(tmp_path: Path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fit_logs_writes_files_and_feeds_model_checkpoint(tmp_path):
    reports = tmp_path / "reports"
    callback = ReportMetricsCallback(dirpath=reports, meteor=False, labeler=KeywordLabeler())
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/bleu4", mode="max", filename="best-{epoch}"
    )
    trainer = _trainer(tmp_path, [callback, ckpt], enable_checkpointing=True, num_sanity_val_steps=1)
    trainer.fit(ToyReporter(), train_dataloaders=_loader(), val_dataloaders=_loader())

    # 6 NLG scores (METEOR off) + 36 CE scores, each under val/.
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert len(logged) == 6 + 36
    assert {"val/bleu1", "val/bleu4", "val/rouge_l", "val/cider", "val/ce/micro_f1/14/u0"} <= set(logged)
    assert "val/meteor" not in logged
    # Epoch 1 generated the references themselves.
    assert logged["val/bleu4"] == pytest.approx(1.0)
    assert logged["val/ce/micro_f1/14/u0"] == 1.0

    # One pair of files per validation epoch; the sanity check wrote none.
    assert sorted(p.name for p in reports.iterdir()) == [
        "val_metrics_epoch0.json",
        "val_metrics_epoch1.json",
        "val_predictions_epoch0.jsonl",
        "val_predictions_epoch1.jsonl",
    ]
    epoch0 = json.loads((reports / "val_metrics_epoch0.json").read_text())
    epoch1 = json.loads((reports / "val_metrics_epoch1.json").read_text())
    assert epoch0["stage"] == "val" and epoch0["epoch"] == 0
    assert epoch0["num_reports"] == epoch1["num_reports"] == len(REFS)  # state reset between epochs
    assert epoch0["metrics"]["val/bleu4"] < 0.01 < epoch1["metrics"]["val/bleu4"]
    assert epoch1["metrics"]["val/bleu4"] == pytest.approx(logged["val/bleu4"])

    records = _read_jsonl(reports / "val_predictions_epoch0.jsonl")
    assert [r["id"] for r in records] == sorted(REFS)
    assert set(records[0]) == {"id", "hypothesis", "reference", "hyp_labels", "ref_labels"}
    v2 = records[1]
    assert v2["hypothesis"] == BAD and v2["reference"] == REFS["v2"]
    assert v2["hyp_labels"][label_index("Fracture")] == 1
    assert v2["ref_labels"][label_index("Cardiomegaly")] == 1
    assert v2["ref_labels"][label_index("Pleural Effusion")] == 0

    # ModelCheckpoint saw val/bleu4 at both epochs and kept the better one.
    assert Path(ckpt.best_model_path).name == "best-epoch=1.ckpt"
    assert float(ckpt.best_model_score) == pytest.approx(epoch1["metrics"]["val/bleu4"])


def test_test_stage_defaults_to_logger_dir(tmp_path):
    callback = ReportMetricsCallback(meteor=False, ce=False)
    logger = CSVLogger(tmp_path, name="run")
    trainer = _trainer(tmp_path, [callback], logger=logger)
    results = trainer.test(ToyReporter(), dataloaders=_loader(), verbose=False)
    assert set(results[0]) == {
        "test/bleu1",
        "test/bleu2",
        "test/bleu3",
        "test/bleu4",
        "test/rouge_l",
        "test/cider",
    }
    log_dir = Path(logger.log_dir)
    summary = json.loads((log_dir / "test_metrics_epoch0.json").read_text())
    assert summary["metrics"] == pytest.approx(results[0])
    records = _read_jsonl(log_dir / "test_predictions_epoch0.jsonl")
    assert len(records) == len(REFS) and records[0]["hyp_labels"] is None
    # The logger got the values too.
    assert "test/bleu4" in (log_dir / "metrics.csv").read_text()


def test_every_n_val_epochs(tmp_path):
    callback = ReportMetricsCallback(dirpath=tmp_path, meteor=False, ce=False, every_n_val_epochs=2)
    # A checkpoint monitoring a scored name must skip the unscored epochs the same way.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/bleu4", mode="max", every_n_epochs=2)
    trainer = _trainer(tmp_path, [callback, ckpt], max_epochs=3, enable_checkpointing=True)
    trainer.fit(ToyReporter(), train_dataloaders=_loader(), val_dataloaders=_loader())
    assert sorted(p.name for p in tmp_path.glob("val_metrics_*.json")) == ["val_metrics_epoch1.json"]
    assert Path(ckpt.best_model_path).name.startswith("epoch=1-")
    assert callback.state_dict() == {"val_runs": 3}
    fresh = ReportMetricsCallback(meteor=False, ce=False, every_n_val_epochs=2)
    fresh.load_state_dict(callback.state_dict())
    assert fresh.state_dict() == {"val_runs": 3}
    # trainer.validate always scores; after fit, current_epoch is max_epochs.
    trainer.validate(ToyReporter(), dataloaders=_loader(), verbose=False)
    assert (tmp_path / "val_metrics_epoch3.json").exists()


def test_several_validations_per_epoch_write_their_own_files(tmp_path):
    callback = ReportMetricsCallback(dirpath=tmp_path, meteor=False, ce=False)
    trainer = _trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2, val_check_interval=0.5)
    trainer.fit(ToyReporter(), train_dataloaders=_loader(), val_dataloaders=_loader())
    names = sorted(p.name for p in tmp_path.glob("val_metrics_*.json"))
    assert names == ["val_metrics_epoch0_step1.json", "val_metrics_epoch0_step2.json"]
    summary = json.loads((tmp_path / names[0]).read_text())
    assert (summary["epoch"], summary["global_step"]) == (0, 1)
    assert (tmp_path / "val_predictions_epoch0_step2.jsonl").exists()
    trainer.validate(ToyReporter(), dataloaders=_loader(), verbose=False)  # outside fit: the epoch name
    assert (tmp_path / "val_metrics_epoch1.json").exists()


def test_bad_step_output_is_reported(tmp_path):
    class NoDict(ToyReporter):
        def validation_step(self, batch, batch_idx):
            return torch.zeros(())

    callback = ReportMetricsCallback(dirpath=tmp_path, meteor=False, ce=False)
    trainer = _trainer(tmp_path, [callback])
    with pytest.raises(ValueError, match=r"validation_step \(batch 0\) must return a dict with keys"):
        trainer.validate(NoDict(), dataloaders=_loader(), verbose=False)


def test_rejects_bad_every_n():
    with pytest.raises(ValueError, match="every_n_val_epochs must be >= 1, found 0"):
        ReportMetricsCallback(every_n_val_epochs=0)


def test_meteor_flag_and_missing_java(tmp_path, monkeypatch):
    # METEOR itself is checked against pycocoevalcap in test_nlg.py (the one test that starts Java);
    # here: the flag reaches both stages, and a missing Java fails at setup, before any generation.
    callback = ReportMetricsCallback(dirpath=tmp_path, meteor=True, ce=False)
    assert callback.val_nlg.meteor and callback.test_nlg.meteor
    monkeypatch.setattr("amrg.metrics.callback.shutil.which", lambda name: None)
    trainer = _trainer(tmp_path, [callback])
    with pytest.raises(RuntimeError, match="needs a Java runtime"):
        trainer.validate(ToyReporter(), dataloaders=_loader(), verbose=False)


def test_builds_from_cli_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ReportMetricsCallback, "callback")
    cfg = parser.parse_args(
        [
            "--callback.meteor=false",
            "--callback.dirpath=out",
            "--callback.every_n_val_epochs=2",
            f"--callback.labeler={__name__}.KeywordLabeler",  # any class with label_batch fits the protocol
        ]
    )
    callback = parser.instantiate(cfg).callback
    assert isinstance(callback, ReportMetricsCallback)
    assert (callback.meteor, callback.dirpath, callback.every_n_val_epochs) == (False, Path("out"), 2)
    assert type(callback.val_ce.labeler).__name__ == "KeywordLabeler"
    assert "score METEOR (one JVM per epoch" in parser.format_help()  # help text comes from the docstring


class _Lines(logging.Handler):
    """Collects the messages of Lightning's rank-zero console logger."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def console():
    handler = _Lines()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # what rank_zero_info writes to
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_metrics_file_says_which_weights_and_labeler_and_console_shows_headline(tmp_path, console):
    reports = tmp_path / "reports"
    callback = ReportMetricsCallback(dirpath=reports, meteor=False, labeler=KeywordLabeler())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = _trainer(tmp_path, [callback, ckpt], enable_checkpointing=True)
    trainer.fit(ToyReporter(), train_dataloaders=_loader(), val_dataloaders=_loader())
    epoch1 = json.loads((reports / "val_metrics_epoch1.json").read_text())
    assert epoch1["labeler"] == "KeywordLabeler"  # no `name`: the class name
    record = epoch1["checkpoint"]
    assert (record["fitting"], record["epoch"], record["global_step"], record["ckpt_path"]) == (
        True,
        1,
        4,
        None,
    )
    # scored before ModelCheckpoint saves this epoch: the last file written is epoch 0's
    assert Path(record["checkpoint_callbacks"][0]["last_saved"]).name == "epoch=0.ckpt"
    headline = [line for line in console if line.startswith("[val epoch 1, step 4]")]
    assert len(headline) == 1, console
    assert "BLEU-4 1.0000" in headline[0] and "CE micro-F1 1.0000" in headline[0]
    assert "CIDEr" in headline[0] and "5 reports, labeler KeywordLabeler" in headline[0]

    best = tmp_path / "ckpt" / "epoch=0.ckpt"
    trainer.test(ToyReporter(), dataloaders=_loader(), ckpt_path=str(best), verbose=False)
    tested = json.loads((reports / "test_metrics_epoch2.json").read_text())  # named by the trainer's epoch
    record = tested["checkpoint"]
    assert (record["ckpt_path"], record["fitting"]) == (str(best), False)
    assert (record["ckpt_epoch"], record["ckpt_global_step"]) == (0, 2)  # the checkpoint's, not the trainer's
    assert any(line.startswith("[test epoch=0.ckpt (epoch 0, step 2)] BLEU-4") for line in console), console


def test_labelers_by_name(tmp_path):
    from tests.labeling.test_chexbert import tiny_chexbert

    weights, _, config, _ = tiny_chexbert(tmp_path)
    (tmp_path / "config.json").write_text((config / "config.json").read_text())  # the tiny BERT's sizes
    for name, kwargs, expected in (
        ("chexpert", {}, "chexpert-rules"),
        ("chexbert", {"chexbert_weights": weights}, "chexbert:chexbert.pth"),
    ):
        out = tmp_path / name
        callback = ReportMetricsCallback(dirpath=out, meteor=False, labeler=name, **kwargs)
        assert callback.val_ce.labeler is callback.test_ce.labeler  # built once for both stages
        trainer = _trainer(tmp_path, [callback])
        results = trainer.validate(ToyReporter(), dataloaders=_loader(), verbose=False)
        summary = json.loads((out / "val_metrics_epoch0.json").read_text())
        assert summary["labeler"] == expected
        assert summary["metrics"]["val/ce/micro_f1/14/u0"] == pytest.approx(
            results[0]["val/ce/micro_f1/14/u0"]
        )


def test_named_labeler_errors(tmp_path):
    with pytest.raises(ValueError, match=r"labeler='chexbert'\) needs chexbert_weights"):
        ReportMetricsCallback(labeler="chexbert")
    with pytest.raises(ValueError, match="chexbert_weights/chexbert_tokenizer need labeler='chexbert'"):
        ReportMetricsCallback(chexbert_weights=tmp_path / "chexbert.pth")
    with pytest.raises(ValueError, match="labeler='bert'; expected 'chexpert', 'chexbert' or an object"):
        ReportMetricsCallback(labeler="bert")  # type: ignore[arg-type]
    # Weights that are not there fail at setup, before any report is generated.
    callback = ReportMetricsCallback(meteor=False, labeler="chexbert", chexbert_weights=tmp_path / "no.pth")
    with pytest.raises(FileNotFoundError, match="no.pth not found"):
        _trainer(tmp_path, [callback]).validate(ToyReporter(), dataloaders=_loader(), verbose=False)


def test_named_labeler_from_cli_arguments(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ReportMetricsCallback, "callback")
    weights = tmp_path / "chexbert.pth"
    cfg = parser.parse_args(["--callback.labeler=chexbert", f"--callback.chexbert_weights={weights}"])
    callback = parser.instantiate(cfg).callback
    assert callback.val_ce.labeler.name == "chexbert" and Path(callback.val_ce.labeler.weights) == weights


def test_a_full_disk_while_writing_metrics_is_one_error_naming_the_file_and_leaves_no_temp(
    tmp_path, monkeypatch
):
    import errno
    import os

    from amrg.errors import OutputError

    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the disk fills up while the metrics file is written
        if "val_metrics_" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    reports = tmp_path / "reports"
    callback = ReportMetricsCallback(dirpath=reports, meteor=False, ce=False)
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises(OutputError) as err:
        trainer.fit(ToyReporter(), train_dataloaders=_loader(), val_dataloaders=_loader())
    path = reports / "val_metrics_epoch0.json"
    assert str(err.value) == f"cannot write metrics '{path}': no space left on the device"
    assert sorted(p.name for p in reports.iterdir()) == [
        "val_predictions_epoch0.jsonl"
    ]  # whole; no temp file
    assert len(_read_jsonl(reports / "val_predictions_epoch0.jsonl")) == len(REFS)
