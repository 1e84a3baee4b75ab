"""ClassifierModule: label policies, loss, metrics, optimiser wiring, checkpoint round trips (Python and CLI),
untrusted checkpoints, the checks at fit start and the stage-1 recipes."""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from amrg.checkpoints.safety import MODULE_KEY, UntrustedCheckpointError
from amrg.checkpoints.stage1 import load_stage1
from amrg.data.batch import Batch
from amrg.labels import LABELS
from amrg.models.classifier import DiseaseClassifier
from amrg.models.qformer import DiseaseQFormer
from amrg.models.vision import VisionEncoder
from amrg.modules._optim import WarmupCosineLR, param_groups
from amrg.modules.classifier import ClassifierModule, _StageMetrics, label_targets

NAN = float("nan")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_DATA = CONFIGS / "demo" / "data.yaml"
ENCODER = dict(img_size=32, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
QFORMER = dict(vision_width=32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, dropout=0.0)


def _net(seed: int = 0) -> DiseaseClassifier:
    torch.manual_seed(seed)
    return DiseaseClassifier(VisionEncoder(**ENCODER), DiseaseQFormer(**QFORMER))


def _batch(n: int = 4, seed: int = 0, views: int = 2) -> Batch:
    """Studies whose label i is positive when the top-left quadrant of channel i % 3 is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 14, generator=g) > 0.5).float()
    images = torch.randn(n, views, 3, 32, 32, generator=g) * 0.1
    images[:, :, 0, :16, :16] += 2.0 * labels[:, None, 1, None, None]
    images[:, :, 1, 16:, 16:] += 2.0 * labels[:, None, 9, None, None]
    labels[0, 2] = -1.0  # an uncertain mention
    labels[1, 3] = NAN  # a label the report does not mention
    view_mask = torch.ones(n, views, dtype=torch.bool)
    view_mask[-1, -1] = False
    return Batch(
        ids=[f"s{seed}-{i}" for i in range(n)],
        images=images,
        view_mask=view_mask,
        reports=["no acute findings ."] * n,
        labels=labels,
    )


class TinyData(L.LightningDataModule):
    """A few in-memory batches; importable by class path for the LightningCLI round trip."""

    def __init__(self, n_batches: int = 2, batch_size: int = 4) -> None:
        super().__init__()
        self.n_batches, self.batch_size = n_batches, batch_size

    def _loader(self, offset: int) -> DataLoader:
        batches = [_batch(self.batch_size, seed=offset + i) for i in range(self.n_batches)]
        return DataLoader(batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(100)

    def test_dataloader(self) -> DataLoader:
        return self._loader(100)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(100)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


# ---------------------------------------------------------------------- policies and loss
RAW = torch.tensor([[1.0, 0.0, -1.0, NAN]])


@pytest.mark.parametrize(
    ("uncertain", "missing", "targets", "weights"),
    [
        ("ignore", "negative", [1, 0, 0, 0], [1, 1, 0, 1]),
        ("positive", "negative", [1, 0, 1, 0], [1, 1, 1, 1]),
        ("negative", "ignore", [1, 0, 0, 0], [1, 1, 1, 0]),
        ("ignore", "ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
    ],
)
def test_label_policies(uncertain, missing, targets, weights):
    t, w = label_targets(RAW, uncertain, missing)
    assert t.tolist() == [targets] and w.tolist() == [weights]


def test_unknown_label_codes_are_rejected():
    with pytest.raises(ValueError, match=r"found \[2\.0\]"):
        label_targets(torch.tensor([[1.0, 2.0]]))


def _module(**kwargs) -> ClassifierModule:
    return ClassifierModule(net=_net(), **kwargs)


def test_loss_matches_hand_computation_for_each_policy():
    labels = torch.full((1, 14), NAN)
    labels[0, :4] = torch.tensor([1.0, 0.0, -1.0, NAN])
    logits = torch.zeros(1, 14)
    logits[0, 0] = 2.0
    bce_pos = math.log1p(math.exp(-2.0))  # label 0: positive, logit 2
    ln2 = math.log(2.0)  # every other entry has logit 0
    # ignore/negative: 13 counted entries (only the uncertain one is dropped).
    loss, targets = _module(uncertain="ignore", missing="negative").loss_fn(logits, labels)
    assert loss.item() == pytest.approx((bce_pos + 12 * ln2) / 13, rel=1e-5)
    assert targets[0, :4].tolist() == [1, 0, -1, 0]
    # positive/ignore: only labels 0, 1, 2 count (the 11 NaNs are dropped).
    loss, targets = _module(uncertain="positive", missing="ignore").loss_fn(logits, labels)
    assert loss.item() == pytest.approx((bce_pos + 2 * ln2) / 3, rel=1e-5)
    assert targets[0, :4].tolist() == [1, 0, 1, -1]


def test_label_smoothing_and_pos_weight_match_hand_computation():
    labels = torch.zeros(1, 14)
    labels[0, 0] = 1.0
    logits = torch.zeros(1, 14)
    module = _module(label_smoothing=0.2, pos_weight=[3.0] + [1.0] * 13, missing="ignore")
    loss, _ = module.loss_fn(logits, labels)
    # BCE(x=0, y, pw) = -(pw*y*log(1/2) + (1-y)*log(1/2)) = ln2 * (pw*y + 1 - y)
    ln2 = math.log(2.0)
    first = ln2 * (3.0 * 0.9 + 0.1)  # positive, smoothed to 0.9
    others = ln2 * (0.1 + 0.9)  # negatives, smoothed to 0.1, pos_weight 1
    assert loss.item() == pytest.approx((first + 13 * others) / 14, rel=1e-5)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="pos_weight needs 14 values"):
        _module(pos_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        _module(label_smoothing=1.0)


# ---------------------------------------------------------------------- optimisation
def test_a_few_optimisation_steps_lower_the_loss():
    module = _module(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    opt = module.configure_optimizers()
    batch = _batch(8)
    losses = []
    for _ in range(20):
        loss, _ = module.loss_fn(module(batch.images, batch.view_mask), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_no_weight_decay_below_two_dims_and_frozen_parameters_left_out():
    net = _net()
    net.encoder.backbone.requires_grad_(False)
    groups = param_groups(net.named_parameters())
    decay, no_decay = groups
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert not any(id(p) in trainable for p in net.encoder.parameters())


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # (step + 1) / (warmup + 1)
    assert lrs[4] == pytest.approx(1.0)  # cosine starts at the base LR
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the 10 cosine steps
    assert lrs[14] == pytest.approx(0.1)  # floor at min_lr_ratio


def test_scheduler_total_steps_come_from_the_trainer(tmp_path):
    module = _module(
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=1),
    )
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, TinyData())
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step" and sched.scheduler.total_steps == 3


# ---------------------------------------------------------------------- metrics
def test_auroc_mean_skips_labels_without_both_classes():
    metrics = _StageMetrics(14, threshold=0.5)
    target = torch.zeros(4, 14, dtype=torch.long)
    target[:2, 0] = 1  # label 0: two positives, two negatives
    target[:, 1] = torch.tensor([1, 0, -1, 0])  # label 1: the ignored entry (-1) is not scored
    probs = torch.full((4, 14), 0.3)
    probs[:, 0] = torch.tensor([0.9, 0.8, 0.1, 0.2])  # perfect ranking for label 0
    probs[:, 1] = torch.tensor([0.2, 0.4, 0.9, 0.1])  # 0.5 for label 1: 0.2 beats 0.1 but not 0.4
    metrics.update(probs, target)
    out = metrics.compute()
    assert out["auroc"][0].item() == pytest.approx(1.0)
    assert out["auroc"][1].item() == pytest.approx(0.5)
    assert torch.isnan(out["auroc"][2:]).all()  # labels 2..13 have no positives
    assert out["auroc_mean"].item() == pytest.approx(0.75)


def test_fit_logs_the_documented_metrics_and_predict_returns_ids(tmp_path):
    module = _module(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, TinyData())
    logged = trainer.callback_metrics
    for key in (
        "train/loss",
        "val/loss",
        "val/auroc_mean",
        "val/f1_micro",
        "val/f1_macro",
        "train/auroc_mean",
    ):
        assert key in logged, key
    for name in LABELS:
        assert f"val/auroc/{name.replace(' ', '_')}" in logged
    out = trainer.predict(module, TinyData(n_batches=1))
    assert out[0]["ids"] == [f"s100-{i}" for i in range(4)]
    assert out[0]["probs"].shape == (4, 14)


# ---------------------------------------------------------------------- checkpoints
def test_python_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    module = _module(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = _trainer(tmp_path)
    trainer.fit(module, TinyData())
    path = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(path)
    batch = _batch(2, seed=7)
    expected = module.net.eval()(batch.images, batch.view_mask)
    ckpt = torch.load(path, weights_only=True)  # built in Python: no pickled objects in hparams
    assert "net" not in ckpt["hyper_parameters"] and ckpt["hyper_parameters"]["uncertain"] == "ignore"
    reloaded = ClassifierModule.load_from_checkpoint(path, net=_net(seed=1)).eval()
    assert torch.allclose(reloaded(batch.images, batch.view_mask), expected, atol=1e-6)
    assert ckpt[MODULE_KEY] == "amrg.modules.classifier.ClassifierModule"
    net = load_stage1(path, net=_net(seed=2))
    assert not net.training
    assert torch.allclose(net(batch.images, batch.view_mask), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"stage1\.ckpt'?: holds no net config"):
        load_stage1(path)
    with pytest.raises(ValueError, match="holds no net config"):  # no net given, none stored
        ClassifierModule.load_from_checkpoint(path)


def test_cli_checkpoint_rebuilds_the_net_from_the_checkpoint_alone(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI
    from safetensors.torch import save_file

    # An ImageNet-style encoder file the config points at; it is deleted before reloading, which
    # shows that reloading takes every weight from the checkpoint and never re-reads this file.
    init_file = tmp_path / "swin_init.safetensors"
    save_file(VisionEncoder(**ENCODER).backbone.state_dict(), str(init_file))
    encoder_args = {**ENCODER, "checkpoint_path": str(init_file)}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "limit_val_batches": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "amrg.modules.classifier.ClassifierModule",
            "init_args": {
                "net": {
                    "class_path": "amrg.models.classifier.DiseaseClassifier",
                    "init_args": {
                        "encoder": {
                            "class_path": "amrg.models.vision.VisionEncoder",
                            "init_args": encoder_args,
                        },
                        "qformer": {"class_path": "amrg.models.qformer.DiseaseQFormer", "init_args": QFORMER},
                    },
                },
                "optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": 1e-3, "weight_decay": 0.05},
                },
                "scheduler": {
                    "class_path": "amrg.modules._optim.WarmupCosineLR",
                    "init_args": {"warmup_steps": 1},
                },
                "uncertain": "positive",
            },
        },
        "data": {"class_path": f"{__name__}.TinyData", "init_args": {"n_batches": 2}},
    }
    monkeypatch.setattr("sys.argv", ["amrg"])  # the config comes from args, not pytest's command line
    cli = LightningCLI(run=False, args=config, save_config_callback=None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = tmp_path / "cli.ckpt"
    cli.trainer.save_checkpoint(path)
    init_file.unlink()

    ckpt = torch.load(path, weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["_class_path"] == "amrg.modules.classifier.ClassifierModule"
    assert hparams["net"]["init_args"]["encoder"]["init_args"]["checkpoint_path"] is None
    assert cli.model.hparams["net"]["init_args"]["encoder"]["init_args"]["checkpoint_path"] == str(init_file)

    batch = _batch(2, seed=7)
    expected = cli.model.net.eval()(batch.images, batch.view_mask)
    reloaded = ClassifierModule.load_from_checkpoint(path).eval()
    assert reloaded.uncertain == "positive"
    assert torch.allclose(reloaded(batch.images, batch.view_mask), expected, atol=1e-6)
    assert not reloaded.training and reloaded.net is not cli.model.net
    net = load_stage1(path)
    assert isinstance(net, DiseaseClassifier) and not net.training
    assert torch.allclose(net(batch.images, batch.view_mask), expected, atol=1e-6)


def test_load_stage1_names_a_mismatching_net(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, TinyData(n_batches=1))
    path = tmp_path / "s1.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(0)
    other = DiseaseClassifier(VisionEncoder(**ENCODER), DiseaseQFormer(**{**QFORMER, "num_layers": 3}))
    with pytest.raises(
        ValueError, match=r"s1\.ckpt'?: weights do not fit DiseaseClassifier: missing \[.*layer\.2"
    ):
        load_stage1(path, net=other)
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_stage1(tmp_path / "nothing.ckpt")


# ---------------------------------------------------------------------- untrusted checkpoints
SENTINEL_MODULE = """\
from pathlib import Path

Path({sentinel!r}).write_text("imported")


class Evil:
    pass
"""


def _tampered_checkpoint(tmp_path: Path, net_config: dict) -> Path:
    """A stage-1 checkpoint (weights of the tiny net) whose stored net config is ``net_config``."""
    module = _module()
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, TinyData(n_batches=1))
    path = tmp_path / "tampered.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["net"] = net_config
    torch.save(ckpt, path)
    return path


def _net_config(
    encoder_class: str = "amrg.models.vision.VisionEncoder",
    net_class: str = "amrg.models.classifier.DiseaseClassifier",
) -> dict:
    return {
        "class_path": net_class,
        "init_args": {
            "encoder": {"class_path": encoder_class, "init_args": dict(ENCODER)},
            "qformer": {"class_path": "amrg.models.qformer.DiseaseQFormer", "init_args": dict(QFORMER)},
        },
    }


@pytest.fixture
def sentinel(tmp_path, monkeypatch) -> Path:
    """``sentinel_mod`` on sys.path: importing it creates the returned file."""
    flag = tmp_path / "sentinel_was_imported"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "sentinel_mod.py").write_text(SENTINEL_MODULE.format(sentinel=str(flag)))
    monkeypatch.syspath_prepend(str(code_dir))
    monkeypatch.delitem(sys.modules, "sentinel_mod", raising=False)
    yield flag
    sys.modules.pop("sentinel_mod", None)


def test_the_sentinel_module_would_leave_its_file_when_imported(sentinel):
    # the control for the refusals below: had anything imported sentinel_mod, its file would be there
    assert not sentinel.exists()
    importlib.import_module("sentinel_mod")
    assert sentinel.read_text() == "imported"


@pytest.mark.parametrize(
    ("config", "offender"),
    [
        (_net_config(net_class="os.system"), "class_path='os.system'"),
        (_net_config(net_class="sentinel_mod.Evil"), "class_path='sentinel_mod.Evil'"),
        (_net_config(encoder_class="sentinel_mod.Evil"), "encoder.class_path='sentinel_mod.Evil'"),
    ],
    ids=["os.system", "top-level", "nested-encoder"],
)
def test_a_class_path_outside_the_allow_list_is_refused_before_any_import(
    config, offender, sentinel, tmp_path, monkeypatch
):
    monkeypatch.delenv("AMRG_TRUSTED_CLASSES", raising=False)
    path = _tampered_checkpoint(tmp_path, config)
    with pytest.raises(UntrustedCheckpointError, match=re.escape(offender)):
        load_stage1(path)
    with pytest.raises(UntrustedCheckpointError, match=re.escape(offender)):
        ClassifierModule.load_from_checkpoint(path)
    assert issubclass(UntrustedCheckpointError, ValueError)
    assert not sentinel.exists(), "a refused checkpoint imported sentinel_mod"
    assert "sentinel_mod" not in sys.modules


def test_resuming_never_takes_settings_or_code_from_the_checkpoint(sentinel, tmp_path, monkeypatch):
    """`fit --ckpt_path` restores weights and training state; the recipe, not the checkpoint, builds the run
    (Lightning would re-parse the model config from the checkpoint's hyper-parameters and import them)."""
    from amrg.cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["amrg"])
    recipe = [
        "-c",
        str(DEMO_DATA),
        "-c",
        str(CONFIGS / "demo" / "stage1.yaml"),
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--data.init_args.n=20",
        "--data.init_args.batch_size=8",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
    ]
    built = lightning_cli(recipe, run=False)
    built.trainer.strategy.connect(built.model)
    path = tmp_path / "crafted.ckpt"
    built.trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["net"]["init_args"]["encoder"]["class_path"] = "sentinel_mod.Evil"
    ckpt["hyper_parameters"]["label_smoothing"] = 0.5
    torch.save(ckpt, path)
    resumed = lightning_cli(["fit", *recipe, f"--ckpt_path={path}", "--trainer.max_steps=1"])
    assert not sentinel.exists() and "sentinel_mod" not in sys.modules
    assert type(resumed.model.net.encoder) is VisionEncoder and resumed.model.label_smoothing == 0.0
    assert resumed.trainer.global_step == 1


# ---------------------------------------------------------------------- checks at fit start
def _synthetic(root: Path, image_size: int):
    from amrg.data.datamodules import SyntheticDataModule

    return SyntheticDataModule(
        root=root, n=20, seed=0, image_size=image_size, batch_size=4, num_workers=0, pin_memory=False
    )


def test_a_datamodule_of_another_image_size_fails_at_fit_start(tmp_path):
    module = _module(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"image_size is 64\b.*takes 32 px.*img_size"):
        trainer.fit(module, datamodule=_synthetic(tmp_path / "synthetic", image_size=64))
    assert trainer.global_step == 0
    # the same module trains on data of its own size: the check is about the size, nothing else
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=_synthetic(tmp_path / "synthetic", image_size=32))
    assert trainer.global_step == 1


# ---------------------------------------------------------------------- recipes
PAPER_RECIPES = ["iu_xray", "mimic_cxr", "chexpert_plus"]
SHRINK_NET = [  # tiny sizes so a paper recipe builds in a second on a CPU
    "--model.init_args.net.init_args.encoder.init_args.img_size=32",
    "--model.init_args.net.init_args.encoder.init_args.embed_dim=16",
    "--model.init_args.net.init_args.encoder.init_args.depths=[1, 1]",
    "--model.init_args.net.init_args.encoder.init_args.num_heads=[1, 2]",
    "--model.init_args.net.init_args.encoder.init_args.window_size=4",
    "--model.init_args.net.init_args.qformer.init_args.vision_width=32",
    "--model.init_args.net.init_args.qformer.init_args.hidden_size=32",
    "--model.init_args.net.init_args.qformer.init_args.num_layers=2",
    "--model.init_args.net.init_args.qformer.init_args.num_heads=2",
    "--model.init_args.net.init_args.qformer.init_args.intermediate_size=64",
]


def _cli(args: list[str], monkeypatch):
    """amrg's own LightningCLI (as `amrg fit` builds it), instantiating only."""
    from amrg.cli import lightning_cli

    monkeypatch.setattr("sys.argv", ["amrg"])
    return lightning_cli(args, run=False)


@pytest.mark.parametrize("dataset", PAPER_RECIPES)
def test_paper_recipe_widths_agree(dataset):
    import yaml

    config = yaml.safe_load((CONFIGS / dataset / "stage1.yaml").read_text())
    net = config["model"]["init_args"]["net"]["init_args"]
    with torch.device("meta"):  # Swin-B's shapes without allocating its weights
        encoder = VisionEncoder(**net["encoder"]["init_args"])
        qformer = DiseaseQFormer(**net["qformer"]["init_args"])
        classifier = DiseaseClassifier(encoder, qformer)
    # a recipe either leaves the Q-Former's input width to the encoder or states the encoder's width
    assert net["qformer"]["init_args"].get("vision_width") in (None, encoder.num_features)
    assert classifier.qformer.vision_width == encoder.num_features
    assert classifier.qformer.visual_proj.fc.in_features == encoder.num_features
    assert net["qformer"]["init_args"]["num_queries"] == len(LABELS)


@pytest.mark.parametrize("dataset", PAPER_RECIPES)
def test_paper_recipe_builds_through_lightning_cli(dataset, tmp_path, monkeypatch):
    args = [
        "--config",
        str(CONFIGS / dataset / "data.yaml"),
        "--config",
        str(CONFIGS / dataset / "stage1.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        *SHRINK_NET,
    ]
    cli = _cli(args, monkeypatch)
    assert isinstance(cli.model, ClassifierModule) and isinstance(cli.model.net, DiseaseClassifier)
    assert cli.model.label_smoothing == 0.1
    assert cli.model.hparams["net"]["init_args"]["encoder"]["init_args"]["model_name"].startswith("swin_base")
    assert cli.datamodule.hparams.image_size == 224


def test_demo_recipe_runs_through_lightning_cli(tmp_path, monkeypatch):
    args = [
        "--config",
        str(DEMO_DATA),
        "--config",
        str(CONFIGS / "demo" / "stage1.yaml"),
        "--trainer.fast_dev_run=1",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={tmp_path / 'synthetic'}",
        "--data.init_args.n=20",
        "--data.init_args.batch_size=4",
    ]
    cli = _cli(args, monkeypatch)
    net = cli.model.net
    assert net.encoder.num_features == net.qformer.vision_width
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_demo_stage1_last_ckpt_is_the_last_epoch_when_the_best_is_not(tmp_path, monkeypatch):
    import yaml

    from amrg.cli import lightning_cli

    # The recipe's own two checkpoint callbacks, with the best one made to keep epoch 0 whatever the
    # model does (monitor the epoch, lower is better): best and last are then different epochs.
    recipe = yaml.safe_load((CONFIGS / "demo" / "stage1.yaml").read_text())
    callbacks = recipe["trainer"]["callbacks"]
    best = [c for c in callbacks if c["init_args"].get("filename") == "best"]
    last = [c for c in callbacks if c["init_args"].get("filename") == "last"]
    assert len(best) == 1 and len(last) == 1 and len(callbacks) == 2, callbacks
    assert "monitor" not in last[0]["init_args"]
    best[0]["init_args"].update(monitor="epoch", mode="min")
    overlay = tmp_path / "best_is_epoch_0.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))

    monkeypatch.chdir(tmp_path)  # the recipe writes runs/ and .cache/ relative to the working directory
    monkeypatch.setattr("sys.argv", ["amrg"])
    cli = lightning_cli(
        [
            "fit",
            "-c",
            str(DEMO_DATA),
            "-c",
            str(CONFIGS / "demo" / "stage1.yaml"),
            "-c",
            str(overlay),
            "--data.init_args.n=20",
            "--data.init_args.batch_size=2",
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.image_size=32",
            *SHRINK_NET,
        ]
    )  # a tiny net: seconds
    folder = tmp_path / "runs" / "demo" / "stage1" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no -v1 copies
    with torch.serialization.safe_globals([type(Path())]):
        last_ckpt = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
        best_ckpt = torch.load(folder / "best.ckpt", map_location="cpu", weights_only=True)
    assert last_ckpt["epoch"] == 2 and last_ckpt["global_step"] == 3
    assert best_ckpt["epoch"] == 0 and best_ckpt["global_step"] == 1
    assert last_ckpt[MODULE_KEY] == "amrg.modules.classifier.ClassifierModule"

    # last.ckpt holds the trained model as the run ended: reloading it alone gives the same logits
    x = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 2, dtype=torch.bool)
    with torch.no_grad():
        expected = cli.model.net.eval()(x, mask)
        reloaded = ClassifierModule.load_from_checkpoint(folder / "last.ckpt")
        assert torch.allclose(reloaded(x, mask), expected, atol=1e-5)
        assert torch.allclose(load_stage1(folder / "last.ckpt")(x, mask), expected, atol=1e-5)
        first = load_stage1(folder / "best.ckpt")(x, mask)
    assert not torch.allclose(first, expected, atol=1e-5)  # epoch 0's weights, not the last ones


def test_skip_mode_batches_with_every_study_skipped_are_stepped_over(make_dataset, tmp_path):
    from amrg.data.datamodules import ReportDataModule

    path = make_dataset(size=32)
    for bad in ("train_000", "train_001", "train_002", "val_000", "val_001"):  # train_003 stays good
        for png in (path.parent / bad).glob("*.png"):
            png.write_bytes(b"not an image")
    data = ReportDataModule(
        path,
        image_size=32,
        batch_size=2,
        num_workers=0,
        augment=False,
        on_bad_image="skip",
        predict_split="val",
    )
    module = _module(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    # 4 train studies in batches of 2: whatever the shuffle, one batch is all skipped, one keeps train_003
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=1, limit_val_batches=None)
    trainer.fit(module, data)  # used to fail: 'NoneType' object has no attribute 'images'
    assert trainer.global_step == 1 and "train/loss" in trainer.callback_metrics
    assert "val/loss" not in trainer.callback_metrics  # the only val batch was skipped
    out = trainer.predict(module, data)
    assert len(out) == 1 and out[0]["ids"] == [] and out[0]["probs"].shape == (0, 14)
    trainer.test(module, data)  # the test split is whole
    assert "test/loss" in trainer.callback_metrics
