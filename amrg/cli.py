"""The ``amrg`` command: the only place that parses arguments.

``fit|validate|test|predict`` go through LightningCLI (subclass mode for model and data); the
other commands are plain typed functions that jsonargparse dispatches, their help taken from the
docstrings. ``COMMANDS`` is the one table of subcommands; a test keeps it in step with the parsers.

Errors: :func:`main` prints amrg's own errors (:class:`amrg.errors.AmrgError`) and the OS, decoding and
JSON errors met on a user's file as one line ``amrg: error: <message>`` on stderr and exits with status 1
(130 when interrupted); ``--debug`` anywhere on the command line, or ``AMRG_DEBUG=1``, shows the
traceback instead. jsonargparse's usage errors keep their own output and status 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from amrg.errors import AmrgError, ConfigError, InputError

__all__ = ["COMMANDS", "lightning_cli", "main"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


# ---- data -------------------------------------------------------------------------------------
def data_synth(
    *,
    out: Path,
    n: int = 1000,
    seed: int = 0,
    image_size: int = 224,
    two_view_prob: float = 0.5,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> None:
    """Write a synthetic chest X-ray dataset (PNGs + R2Gen annotation.json with labels and boxes).

    Args:
        out: output folder.
        n: number of studies.
        seed: generation seed; the same seed gives byte-identical files.
        image_size: image side in pixels.
        two_view_prob: probability that a study has a second view.
        val_fraction: fraction of studies in the val split.
        test_fraction: fraction of studies in the test split.
    """
    from amrg.data.synthetic import synthesize

    try:
        path = synthesize(
            out,
            n=n,
            seed=seed,
            image_size=image_size,
            two_view_prob=two_view_prob,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        )
    except ValueError as err:
        # NOTE: synthesize checks its options with plain ValueErrors ("synthesize: n must be ..."); one line
        # here until it raises ConfigError (issue 14)
        if isinstance(err, AmrgError):
            raise
        raise ConfigError(f"data synth: {err}") from err
    print(f"wrote {n} synthetic studies: {path}")


def data_iu_synth(*, out: Path, reports: Path, seed: int = 0, image_size: int = 64) -> None:
    """Write synthetic films for the real IU X-ray report text (PNGs + R2Gen annotation.json, MeSH labels).

    One study per Open-i report with FINDINGS (else IMPRESSION) text; labels from its MeSH terms, the
    offline labeler filling in the rest; two views drawn from those labels; split 7:1:2 by study.

    Args:
        out: output folder; written whole through a temp folder next to it. An existing non-empty
            folder is replaced only when this command wrote it.
        reports: Open-i's NLMCXR_reports.tgz, or the torchxrayvision wheel holding it (CC BY-NC-ND:
            keep it and the written dataset outside the repository).
        seed: seed of the split and of the films; the same seed gives byte-identical files.
        image_size: image side in pixels.
    """
    from amrg.data.iu_synth import iu_synthesize

    try:
        res = iu_synthesize(out, reports, seed=seed, image_size=image_size)
    except (FileNotFoundError, ValueError) as err:
        # iu_synthesize names the option and file in plain FileNotFoundError/ValueError messages
        if isinstance(err, AmrgError):
            raise
        raise InputError(f"data iu-synth: {err}") from err
    counts = ", ".join(f"{k} {v}" for k, v in res.counts.items())
    print(
        f"wrote {sum(res.counts.values())} IU studies ({counts}; {len(res.skipped)} skipped "
        f"without FINDINGS or IMPRESSION): {res.annotation}"
    )


_MAX_PIXELS = 50_000_000
"""amrg.data.images.DEFAULT_MAX_PIXELS, repeated so that `amrg --help` starts without torch (a test keeps
them equal)."""


def data_check(
    annotation: Path,
    image_root: Path | None = None,
    decode: bool = False,
    max_pixels: int | None = _MAX_PIXELS,
    allow_outside_root: bool = False,
) -> None:
    """Validate a prepared dataset: schema, every image, counts per split and label distribution.

    Prints the report, then exits with status 1 and one error line when an image is missing, unreadable,
    too large or outside the image root.

    Args:
        annotation: the annotation.json to check.
        image_root: folder the image paths are relative to (default: the annotation's folder).
        decode: fully decode every image (slower) instead of checking headers and structure.
        max_pixels: an image with more pixels (width x height) is unreadable, as training would refuse
            it; null for no cap.
        allow_outside_root: accept image paths that are absolute or climb out of the image root with ``..``.
    """
    from amrg.data.check import check_dataset

    report = check_dataset(
        annotation,
        image_root=image_root,
        decode=decode,
        progress=sys.stderr.isatty(),  # a bar only on a terminal, not in a log or a pipe
        max_pixels=max_pixels,
        allow_outside_root=allow_outside_root,
    )
    print(report.format())
    if not report.ok:
        bad = [
            (kind, items)
            for kind, items in (
                ("missing", report.missing),
                ("unreadable", report.unreadable),
                ("outside the image root", report.outside_root),
            )
            if items
        ]
        found = [f"{len(items)} {kind}" for kind, items in bad]
        first = bad[0][1][0]
        raise InputError(
            f"data check: {annotation}: bad images: {', '.join(found)}; e.g. {first} (all listed above)"
        )


def data_preview(
    annotation: Path,
    *,
    out: Path,
    image_root: Path | None = None,
    n: int = 16,
    split: str = "train",
    seed: int = 0,
) -> None:
    """Draw a grid of studies with their positive labels and sign boxes into a PNG.

    Args:
        annotation: the annotation.json (e.g. from ``amrg data synth``).
        out: PNG file to write.
        image_root: folder the image paths are relative to (default: the annotation's folder).
        n: number of studies in the grid.
        split: which split to draw from.
        seed: which studies are picked.
    """
    from amrg.data.preview import preview_grid

    root = image_root if image_root is not None else annotation.parent
    try:
        path = preview_grid(annotation, root, out, n=n, split=split, seed=seed)
    except ValueError as err:
        # preview_grid names the option (n, split) in plain ValueErrors
        if isinstance(err, AmrgError):
            raise
        raise InputError(f"data preview: {err}") from err
    print(f"wrote {path}")


# ---- memory -----------------------------------------------------------------------------------
def _memory_build_handler() -> Callable[..., None]:
    import functools

    from amrg.memory.build import memory_build

    # jsonargparse reads the signature and docstring of the real function; the wrapper prints.
    @functools.wraps(memory_build)
    def run(**kwargs) -> None:
        print(memory_build(**kwargs))

    return run


# ---- prediction on image files ------------------------------------------------------------------
def _predict_images_handler() -> Callable[..., None]:
    import functools

    from amrg.predict import predict_images

    @functools.wraps(predict_images)
    def run(**kwargs) -> None:
        print(f"wrote {predict_images(**kwargs)}")

    return run


# ---- web demo -------------------------------------------------------------------------------------
def _serve_handler() -> Callable[..., None]:
    import functools
    import logging

    from amrg.serve import serve

    @functools.wraps(serve)
    def run(*args, **kwargs) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            serve(*args, **kwargs)
        except ImportError as err:  # Gradio is an optional extra
            raise ConfigError(f"serve: {err}") from err
        except ValueError as err:
            if isinstance(err, AmrgError):
                raise
            raise InputError(f"serve: {err}") from err

    return run


# ---- demo -----------------------------------------------------------------------------------------
def _demo_handler() -> Callable[..., None]:
    import functools
    import logging

    from amrg.demo import run_demo

    @functools.wraps(run_demo)
    def run(**kwargs) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        print(run_demo(**kwargs))
        print(f"\nwrote {Path(kwargs.get('out') or 'runs/demo') / 'results.md'} and results.json")

    return run


# ---- evaluation of prediction files --------------------------------------------------------------
def eval_predictions(
    predictions: Path,
    *,
    compare: Path | None = None,
    annotation: Path | None = None,
    split: Literal["train", "val", "test"] = "test",
    cleaning: Literal["iu_xray", "mimic_cxr", "none"] | None = None,
    out: Path | None = None,
    no_meteor: bool = False,
    labeler: Literal["chexpert", "chexbert"] = "chexpert",
    chexbert_weights: Path | None = None,
    chexbert_tokenizer: Path | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> None:
    """Score any model's reports: BLEU-1..4, METEOR, ROUGE-L, CIDEr and CE, with bootstrap intervals.

    Predictions are JSONL lines {"id", "report"} (amrg predict-images) or {"id", "hypothesis",
    "reference"} (the metrics callback). Writes <name>.eval.json and <name>.eval.md into --out or next
    to the predictions (replacing only files amrg eval wrote) and prints the table. With --compare,
    also the paired difference A - B of every score with its interval and p-value.

    Args:
        predictions: system A's predictions JSONL.
        compare: system B's predictions JSONL (same ids) for the paired comparison A - B.
        annotation: take the references from this annotation.json instead of each line's "reference".
        split: the annotation's split to score.
        cleaning: report cleaning of the annotation's dataset, as its data module: iu_xray (IU X-ray),
            mimic_cxr (MIMIC-CXR, CheXpert Plus, synthetic) or none; needed with --annotation.
        out: folder for the results (default: the predictions' folder).
        no_meteor: skip METEOR (it needs Java).
        labeler: CE labeler: chexpert (rule-based, offline) or chexbert (needs --chexbert_weights).
        chexbert_weights: CheXbert weights, chexbert.pth of stanfordmlgroup/CheXbert.
        chexbert_tokenizer: bert-base-uncased's vocab.txt or tokenizer folder (default: next to the weights).
        resamples: bootstrap resamples (studies drawn with replacement).
        seed: seed of the resamples.
        confidence: interval coverage.
    """
    import logging

    from amrg.metrics.eval_report import check_targets, markdown_table, output_paths, write_outputs
    from amrg.metrics.evaluate import evaluate_files

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    json_path, md_path = output_paths(predictions, compare, out)
    given = (predictions, compare, annotation, chexbert_weights, chexbert_tokenizer)
    inputs = [p for p in given if p is not None]
    # EvalInputError (an InputError) names the file and line; main prints it as one line
    check_targets([json_path, md_path], inputs)  # before the slow part
    result = evaluate_files(
        predictions,
        compare=compare,
        annotation=annotation,
        split=split,
        cleaning=cleaning,
        meteor=not no_meteor,
        labeler=labeler,
        chexbert_weights=chexbert_weights,
        chexbert_tokenizer=chexbert_tokenizer,
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )
    write_outputs(result, json_path, md_path, inputs)
    print(markdown_table(result).split("\n", 1)[1].lstrip("\n"), end="")
    print(f"\nwrote {json_path} and {md_path}")


# The one table of subcommands: name -> (handler, one-line help). Lightning ones have no handler.
COMMANDS: dict[str, tuple[Callable[..., None] | None, str]] = {
    "fit": (None, "train a model from a config (LightningCLI)"),
    "validate": (None, "run the validation loop"),
    "test": (None, "run the test loop"),
    "predict": (None, "write predictions JSONL of the data's predict split (--ckpt_path required)"),
    "data synth": (data_synth, "write a synthetic chest X-ray dataset"),
    "data iu-synth": (data_iu_synth, "synthetic films for the real IU X-ray reports (Open-i tgz or wheel)"),
    "data check": (data_check, "validate an annotation and its images"),
    "data preview": (data_preview, "draw a PNG grid of studies with labels and boxes"),
    "memory build": (_memory_build_handler, "mine Grad-CAM patches and encode reports into memory banks"),
    "predict-images": (_predict_images_handler, "write reports (JSONL) for image files or folders"),
    "eval": (eval_predictions, "score predictions JSONL: NLG + CE with bootstrap intervals, --compare B"),
    "demo": (_demo_handler, "the whole pipeline offline into one folder, ending with a results table"),
    "serve": (_serve_handler, "web demo of a checkpoint (Gradio): upload views, see report, CAMs, memory"),
}
# Handlers whose modules import torch are built on demand (a factory returns the real command), so
# `amrg --help` and the data commands start fast.
_FACTORIES = {_memory_build_handler, _predict_images_handler, _demo_handler, _serve_handler}


def _handler(name: str) -> Callable[..., None] | None:
    fn = COMMANDS[name][0]
    return fn() if fn in _FACTORIES else fn


def _group(command: str) -> dict[str, Callable[..., None]] | Callable[..., None] | None:
    """The sub-command table of a group ("data"), the handler of a single command, or None."""
    if command in COMMANDS and COMMANDS[command][0] is not None:
        return _handler(command)
    subs = {name.split(" ", 1)[1]: name for name in COMMANDS if name.startswith(command + " ")}
    return {sub: _handler(name) for sub, name in subs.items()} or None


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    rows = "\n".join(f"  amrg {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return (
        "usage: amrg COMMAND [options] [--debug]   (amrg COMMAND --help for its options)\n\n"
        "AM-MRG chest X-ray report generation.\n\ncommands:\n" + rows + "\n\n"
        "errors: a bad input or option prints one line, 'amrg: error: <message>' naming the file, record or\n"
        "option, and exits with status 1 (2: a usage error, with the usage; 130: interrupted).\n"
        "  --debug           (anywhere on the command line) show the full traceback instead\n"
        f"  {_DEBUG_ENV}=1      the same, from the environment\n"
    )


def _dashes_to_underscores(args: Sequence[str]) -> list[str]:
    # jsonargparse names options after the Python parameters (--image_size); accept --image-size too,
    # and -c for --config as in the LightningCLI commands.
    out = []
    for a in args:
        if a == "-c":
            a = "--config"
        elif a.startswith("--") and len(a) > 2:
            key, sep, value = a[2:].partition("=")
            a = "--" + key.replace("-", "_") + sep + value
        out.append(a)
    return out


def _bare_flags(fn: Callable[..., None] | None, args: list[str]) -> list[str]:
    # jsonargparse wants a value after a bool option (--no_meteor true); a bare --no_meteor means true.
    import typing

    try:
        hints = typing.get_type_hints(fn) if fn is not None else {}
    except (NameError, TypeError):
        return args
    flags = {f"--{name}" for name, tp in hints.items() if tp is bool}
    out = []
    for i, a in enumerate(args):
        out.append(a)
        following = args[i + 1].lower() if i + 1 < len(args) else None
        if a in flags and following not in ("true", "false", "yes", "no"):
            out.append("true")
    return out


def _run_path(sub: str, *, _parent_) -> str:
    """OmegaConf resolver ``${run_path:stage1/checkpoints}``: ``sub`` under the config's ``run_root``."""
    node = _parent_
    while node is not None:
        if hasattr(node, "keys") and "run_root" in node.keys():
            root = str(node["run_root"]).rstrip("/")
            return root if sub in ("", ".") else f"{root}/{sub}"
        node = node._get_parent()
    raise ValueError(f"${{run_path:{sub}}} needs a run_root option in the config")


def _parsing_settings(args: Sequence[str] | None) -> None:
    """jsonargparse's settings and the ``run_path`` resolver, for a command line (None: ``sys.argv``)."""
    import omegaconf
    from jsonargparse import set_parsing_settings
    from omegaconf import OmegaConf

    # Help text for dataclass fields comes from their attribute docstrings; reading them (the source of
    # every class in a recipe) costs ~2 s a command, so only help and --print_config read them.
    words = sys.argv[1:] if args is None else args
    wants_help = any(w in ("-h", "--help") or w.startswith("--print_config") for w in words)
    set_parsing_settings(docstring_parse_attribute_docstrings=wants_help)
    if not OmegaConf.has_resolver("run_path"):
        # OmegaConf 2.4 renamed register_new_resolver (now deprecated) to register_resolver, whose 2.3
        # namesake is the legacy API without _parent_.
        major_minor = tuple(int(x) for x in omegaconf.__version__.split(".")[:2])
        register = OmegaConf.register_resolver if major_minor >= (2, 4) else OmegaConf.register_new_resolver
        register("run_path", _run_path)


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class AmrgCLI(LightningCLI):
        """LightningCLI whose ``--ckpt_path`` never changes the run's config.

        Lightning re-parses the model config from a checkpoint's hyper-parameters, so a checkpoint of
        another class silently switched the run to that class, and any class path stored in it was
        imported. Here the checkpoint is only checked to be written by the recipe's own module class and
        nothing in its hyper-parameters is used: the recipe stays the user's; the checkpoint brings
        weights and training state (read with ``weights_only=True``).
        """

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--run_root",
                type=str,
                default="runs",
                help="Folder of the whole pipeline run: recipes name every output and every earlier stage's "
                "file under it as ${run_path:stage1/checkpoints}, ..., so this one option moves them all.",
            )

        def instantiate_classes(self) -> None:
            # jsonargparse wraps an error raised while building the model (say, the stage-2 builder's
            # list of missing files) in a long "does not validate against any of the Union subtypes"
            # dump of the whole config; show the error that caused it instead.
            try:
                super().instantiate_classes()
            except ValueError as err:
                cause = err.__cause__
                while cause is not None and cause.__cause__ is not None:
                    cause = cause.__cause__
                if isinstance(cause, (OSError, ValueError)):
                    raise cause from None
                if type(cause).__name__ == "MisconfigurationException":  # Lightning's, e.g. from a strategy
                    raise ConfigError(str(cause)) from None
                raise

        def instantiate_trainer(self, **kwargs):
            """The trainer; under ``predict`` with a :class:`~amrg.modules.prediction_writer.PredictionWriter`
            (output ``<default_root_dir>/predictions.jsonl``) unless the config names a prediction writer."""
            trainer = super().instantiate_trainer(**kwargs)
            if self.subcommand == "predict":
                from lightning.pytorch.callbacks import BasePredictionWriter

                if not any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):
                    from amrg.modules.prediction_writer import PredictionWriter

                    trainer.callbacks.append(PredictionWriter())
            return trainer

        def _parse_ckpt_path(self) -> None:
            if not self.config.get("subcommand"):
                return
            subcommand = self.config.subcommand
            config = self.config[subcommand]
            _check_optional_strategy(config)  # here, before the seed line and any instantiation
            ckpt_path = config.get("ckpt_path")
            if subcommand == "predict" and not ckpt_path:
                # without one Lightning predicts with the recipe's freshly built (untrained) weights
                raise ConfigError(
                    "predict: --ckpt_path is required: the checkpoint whose predictions to write (e.g. "
                    "runs/demo/stage2/checkpoints/last.ckpt)"
                )
            if not ckpt_path or _lightning_ckpt_alias(str(ckpt_path)):
                return
            from amrg.checkpoints.safety import (
                check_checkpoint_file,
                check_written_by,
                is_deepspeed_checkpoint,
            )
            from amrg.checkpoints.stage1 import check_lightning_checkpoint, read_checkpoint
            from amrg.errors import CheckpointError

            source = f"--ckpt_path '{ckpt_path}'"
            if is_deepspeed_checkpoint(ckpt_path):
                if "DeepSpeed" in _strategy_path(config):
                    return  # DeepSpeed resumes or tests from its own folder
                check_checkpoint_file(ckpt_path, "--ckpt_path")  # says how to convert it to one .ckpt
            if not Path(ckpt_path).is_file():
                # caught here, before the trainer is built, rather than by Lightning after it
                what = "is a folder" if Path(ckpt_path).is_dir() else "not found"
                raise CheckpointError(
                    f"{source} {what}: expected a .ckpt file that `amrg fit` wrote (or last, best)"
                )
            # Read with weights_only=True and checked here, so Lightning never unpickles a file that is not
            # one of its checkpoints (random bytes, a plain state dict) and fails with a raw KeyError.
            ckpt = read_checkpoint(ckpt_path, "--ckpt_path")
            model = config.get("model")
            expected = model.get("class_path") if hasattr(model, "get") else None
            if expected:  # the other stage's checkpoint: the most specific message first
                check_written_by(ckpt, str(expected), source)
            check_lightning_checkpoint(ckpt, source, resume=subcommand == "fit")

    return AmrgCLI


def _strategy_path(config: Any) -> str:
    """The trainer strategy a parsed subcommand config names: its class path, or the strategy's name."""
    trainer = config.get("trainer") if hasattr(config, "get") else None
    strategy = trainer.get("strategy") if hasattr(trainer, "get") else None
    return str(getattr(strategy, "class_path", None) or strategy or "")


def _check_optional_strategy(config: Any) -> None:
    """A DeepSpeed overlay without deepspeed installed: one line, before jsonargparse buries Lightning's error."""
    class_path = _strategy_path(config)
    if "DeepSpeed" in class_path:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                f"trainer.strategy is {class_path.rsplit('.', 1)[-1]} (configs/trainer/deepspeed_zero*.yaml) but "
                "deepspeed is not installed: pip install deepspeed (an optional extra; it builds CUDA ops on a "
                "GPU machine)"
            )


def _lightning_ckpt_alias(ckpt_path: str) -> bool:
    """Whether ``--ckpt_path`` names a checkpoint Lightning resolves itself (last, best, hpc, registry, a URL)."""
    return ckpt_path in ("last", "best", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path


def lightning_cli(args: list[str] | None, run: bool = True):
    """Build amrg's LightningCLI (subclass mode for model and data) over ``args``.

    With ``run=False`` the args hold no subcommand and the CLI only instantiates the model, the
    data and the trainer (used by tests and notebooks to build a recipe).
    """
    _parsing_settings(args)
    return _cli_class()(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        # checkpoints written to a temp file in their own folder and renamed (Lightning's own goes through
        # $TMPDIR and, across file systems, truncates the previous checkpoint while copying)
        trainer_defaults={"plugins": [{"class_path": "amrg.checkpoints.atomic_io.AtomicCheckpointIO"}]},
        # ${run_path:...} in a recipe is resolved after every config file and override is merged
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
        run=run,
    )


_DEBUG_ENV = "AMRG_DEBUG"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``amrg`` console script: runs a command, printing an error as one line.

    ``--debug`` (anywhere; removed before parsing) or ``AMRG_DEBUG=1`` re-raises instead, with the
    full traceback.
    """
    given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(_DEBUG_ENV, "").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        if not given:  # LightningCLI reads sys.argv itself
            sys.argv = [sys.argv[0], *argv]
    try:
        _run(argv, given)
    except KeyboardInterrupt:
        if debug:
            raise
        print("amrg: error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        message = _error_message(err)
        if message is None or debug:
            raise
        print(f"amrg: error: {message}", file=sys.stderr)
        sys.exit(1)


# OS errors a user's file (or output path) raises; amrg's own code also raises these with a message.
_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _error_message(err: BaseException) -> str | None:
    """The one-line message of an error the user should see without a traceback, or None for a bug."""
    cause: BaseException | None = err
    for _ in range(8):  # an amrg error that jsonargparse or Lightning wrapped with `raise ... from`
        if cause is None or isinstance(cause, AmrgError):
            break
        cause = cause.__cause__
    if isinstance(cause, AmrgError):
        return _one_line(_worker_message(str(cause)))
    if isinstance(err, _FILE_ERRORS):
        if err.filename is not None:  # raised by the OS: "[Errno 2] No such file or directory: 'x'"
            reason = (err.strerror or type(err).__name__).lower()
            target = f" -> '{err.filename2}'" if err.filename2 is not None else ""
            return f"'{err.filename}'{target}: {reason}"
        return _one_line(str(err))
    if isinstance(err, json.JSONDecodeError):  # carries no file name; the position at least
        return f"not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
    if isinstance(err, UnicodeDecodeError):
        return (
            f"not UTF-8 text: byte {bytes(err.object[err.start : err.start + 1]).hex()} at offset {err.start}"
        )
    return None


def _worker_message(message: str) -> str:
    """The error's own message when a DataLoader worker re-raised it with the worker's traceback in it.

    torch re-raises a worker's exception as the same type, its message being "Caught X in DataLoader worker
    process N." plus the worker's whole traceback; the last line is ``module.X: <the message>``.
    """
    if "Original Traceback (most recent call last):" not in message:
        return message
    last = message.strip().splitlines()[-1]
    own = last.split(": ", 1)[1] if ": " in last and " " not in last.split(": ", 1)[0] else last
    return f"{own} (in a DataLoader worker)"


def _one_line(message: str) -> str:
    """Fold a multi-line message (a heading, then one problem per line) into one line."""
    out = ""
    for line in message.splitlines():
        line = line.strip()
        line = line[2:] if line.startswith("- ") else line
        if not line:
            continue
        out = line if not out else f"{out} {line}" if out.endswith(":") else f"{out}; {line}"
    return out


def _run(argv: list[str], given: bool) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command = argv[0]
    if command in LIGHTNING_COMMANDS:
        # From the console LightningCLI reads sys.argv itself (given both, it warns on every run).
        lightning_cli(argv if given else None)
        return
    target = _group(command)
    if target is not None:
        from jsonargparse import CLI

        _parsing_settings(argv)
        args = _dashes_to_underscores(argv[1:])
        fn = target.get(args[0]) if isinstance(target, dict) and args else target
        CLI(
            target,
            args=_bare_flags(fn if callable(fn) else None, args),
            prog=f"amrg {command}",
            as_positional=True,
            parser_mode="omegaconf+",
        )
        return
    print(f"amrg: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
