"""``amrg demo``: the whole pipeline offline, one folder, one results table.

Runs data -> stage 1 -> memory build -> stage 2 -> test with the demo recipes (``configs/demo/``; tiny
random models on 64 px films, 2 CPU cores) into ``--out`` and scores the test split:

* **full model**: the stage-2 reports (``amrg test`` with the trained checkpoint);
* **constant**: the most frequent training report for every study (ties: one with the most common
  label set);
* **retrieval**: the training report whose labels best match the stage-1 prediction at 0.5 (F1 of the
  label sets; ties: the more frequent report, then the first id);
* **stage 1 as text**: the stage-1 prediction written out as one sentence per label, an upper bound for
  what the reporter can say about the findings.

Columns: BLEU-4, CIDEr, ROUGE-L, CE micro- and macro-F1 (14 labels, uncertain as negative, the offline
labeler on both sides), the stage-1 micro-F1 at 0.5 against the annotation's labels, how much of the
stage-1 prediction the reports state (:func:`stage1_agreement`), distinct reports (%), recall agreement
of the model (:func:`recall_agreement`: how many of its top-5 recalled report- and visual-memory items'
labels the study has, against a random item) and wall time. Each stage leaves
``<out>/<stage>.done.json``; a re-run reuses finished stages whose command has not changed
(``fresh=True`` redoes everything).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from amrg.errors import InputError

__all__ = [
    "DEMO_MARKER",
    "DemoError",
    "Row",
    "baseline_reports",
    "recall_agreement",
    "run_demo",
    "stage1_agreement",
    "stage1_sentences",
]

_logger = logging.getLogger(__name__)

DEMO_MARKER = "amrg-demo.json"
"""File that marks a folder as an ``amrg demo`` run (``--fresh`` deletes only such folders)."""

_TINY = {  # seconds-long run of every stage (tests, smoke runs)
    "data": ["--data.init_args.n=40", "--data.init_args.batch_size=4"],
    "stage1": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
    "stage2": [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1",
    ],
}


class DemoError(InputError):
    """A demo run that cannot start or continue (named folder, file or stage)."""


@dataclass
class Row:
    """One line of the results table."""

    name: str
    scores: dict[str, float]
    intervals: dict[str, list[float]]
    """95 % bootstrap interval [low, high] of each score in :data:`_SCORED`."""
    seconds: float | None = None
    recall: dict[str, float] = field(default_factory=dict)
    """Recall agreement of the row's memories (:func:`recall_agreement`); empty for rows without one."""


def _configs() -> Path:
    folder = Path(__file__).resolve().parents[1] / "configs"
    if not (folder / "demo" / "stage1.yaml").is_file():
        raise DemoError(
            f"amrg demo needs the recipes of a source checkout (configs/demo/ next to the amrg package); "
            f"none at {folder}"
        )
    return folder


def _prepare_out(out: Path, fresh: bool, settings: dict[str, Any]) -> None:
    marker = out / DEMO_MARKER
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise DemoError(
            f"--out '{out}' holds files that are not an amrg demo run (no {DEMO_MARKER}); choose another --out"
        )
    if fresh and marker.is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if marker.is_file():
        before = json.loads(marker.read_text(encoding="utf-8"))
        if before.get("settings") != settings:
            raise DemoError(
                f"--out '{out}' is a demo run with other settings ({before.get('settings')}); use --fresh to "
                "redo it or choose another --out"
            )
    else:
        marker.write_text(json.dumps({"kind": "amrg demo", "settings": settings}, indent=1) + "\n")


ABLATIONS: dict[str, str] = {  # configs/ablations/<name>.yaml -> row of the results table
    "no_visual_memory": "without visual memory",
    "no_report_memory": "without report memory",
    "no_memory": "without both memories",
    "cross_attention": "cross-attention, not Hopfield",
    "pooled_queries": "pooled tokens, not disease queries",
}
"""The ablations ``amrg demo`` trains and tests next to the full model, each from the same stage-1
checkpoint and memory folder with the same recipe plus one overlay."""

_STAGES = ("stage1", "memory", "stage2", "test", *(f"{a}{t}" for a in ABLATIONS for t in ("", "_test")))


def _downstream(name: str) -> tuple[str, ...]:
    """The stages whose inputs a run of ``name`` changes: everything after the data-wide stages (stage 1,
    memory), else the test of the model just trained."""
    if name in ("stage1", "memory"):
        return _STAGES[_STAGES.index(name) + 1 :]
    if name == "stage2":
        return ("test",)
    return (f"{name}_test",) if name in ABLATIONS else ()


def _run_stage(
    out: Path,
    name: str,
    args: list[str],
    step: str,
    artifact: Path,
    log: Path | None = None,
    threads: int = 0,
) -> float:
    """Run one ``amrg`` command unless it already finished with the same arguments; return its seconds.

    A stage that runs makes the stages that use its output run too (:func:`_downstream`), by dropping
    their records.

    Args:
        log: write the command's output there instead of the console (stages that run side by side).
        threads: torch/OpenMP threads of the command (``OMP_NUM_THREADS``); 0 leaves the default.
    """
    done = out / f"{name}.done.json"
    recipes = _recipe_hashes(args)
    if done.is_file() and artifact.exists():
        record = json.loads(done.read_text(encoding="utf-8"))
        if _stage_key(record.get("args"), record.get("recipes")) == _stage_key(args, recipes):
            _logger.info("%s %s: done before (%s), reused", step, name, done)
            return float(record["seconds"])
    where = f" (output: {log})" if log is not None else ""
    _logger.info("%s %s: amrg %s%s", step, name, " ".join(args), where)
    for later in _downstream(name):
        (out / f"{later}.done.json").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads > 0 else None
    command = [sys.executable, "-m", "amrg.cli", *args]
    start = time.perf_counter()
    if log is None:
        result = subprocess.run(command, cwd=out, check=False, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w", encoding="utf-8") as sink:
            result = subprocess.run(
                command, cwd=out, check=False, env=env, stdout=sink, stderr=subprocess.STDOUT
            )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = ""
        if log is not None:
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            tail = "; its last lines:\n" + "\n".join(lines[-15:]) + f"\n(whole output: {log})"
        raise DemoError(f"{step} {name} failed (exit {result.returncode}): amrg {' '.join(args)}{tail}")
    _logger.info("%s %s: finished in %.0f s", step, name, seconds)
    tmp = done.with_name(done.name + ".tmp")
    seconds = round(seconds, 1)  # what a re-run reads back, so both runs write the same table
    tmp.write_text(
        json.dumps({"args": args, "recipes": recipes, "seconds": seconds}) + "\n", encoding="utf-8"
    )
    os.replace(tmp, done)
    return seconds


def _check_text_encoder(memory_yaml: Path) -> None:
    """Fail before any training when the report memory's text encoder is not installed (an extra)."""
    import yaml

    from amrg.memory.reports import resolve_model_dir

    path = (yaml.safe_load(memory_yaml.read_text(encoding="utf-8")) or {}).get("report", {}).get("path")
    try:
        resolve_model_dir(path)
    except FileNotFoundError as err:
        raise DemoError(f"{memory_yaml}: the report memory's text encoder is missing: {err}") from err


def _recipe_hashes(args: Sequence[str]) -> dict[str, str]:
    """sha256 of every recipe a command reads (``-c FILE``), so an edited recipe makes its stage run again."""
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-c", "--config")]
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}


def _stage_key(args: Any, recipes: Any) -> list[str] | None:
    """A stage's arguments with each recipe path replaced by its file's sha256: the same recipes read
    from another checkout (a fresh clone, a moved repository) are the same stage."""
    if not isinstance(args, list) or not isinstance(recipes, dict):
        return None
    return [f"<recipe {recipes[a]}>" if a in recipes else a for a in args]


_MENTION = {"Lung Lesion": "lung nodule", "Pleural Other": "pleural thickening"}
"""Labels whose CheXpert name is not one of the labeler's mention phrases, and a phrase that is."""


def stage1_sentences(positive: Sequence[str]) -> str:
    """The stage-1 prediction as report text: one sentence per positive label, worded so the CheXpert
    labeler reads that label (its name, or a mention phrase of it where the name is none: "pleural other"
    reads as nothing, "pleural thickening" as Pleural Other)."""
    if not positive or list(positive) == ["No Finding"]:
        return "no acute cardiopulmonary abnormality ."
    return " ".join(f"{_MENTION.get(label, label.lower())} ." for label in positive if label != "No Finding")


def _label_f1(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    return 2 * len(a & b) / (len(a) + len(b))


def baseline_reports(
    train: Sequence[tuple[str, str, Sequence[int | None]]],
    test_predictions: Sequence[set[int]],
) -> dict[str, list[str]]:
    """The constant and retrieval baselines for every test study.

    Args:
        train: (id, cleaned report, 14 label codes) of each training study.
        test_predictions: per test study, the label indices the stage-1 model predicts (p >= 0.5).

    Returns:
        ``{"constant": [...], "retrieval": [...]}``, one report per test study.
    """
    if not train:
        raise DemoError("no training reports to draw the baselines from")
    positives = [frozenset(i for i, v in enumerate(codes) if v == 1) for _, _, codes in train]
    report_count = Counter(report for _, report, _ in train)
    label_count = Counter(positives)
    # Most frequent report; ties broken by how common its label set is, then by the first id.
    order = sorted(
        range(len(train)),
        key=lambda i: (-report_count[train[i][1]], -label_count[positives[i]], train[i][0]),
    )
    constant = train[order[0]][1]
    # One candidate per distinct label set (its best-ranked study), so each test study compares a few
    # dozen sets rather than every training report.
    first_of_set: dict[frozenset[int], int] = {}
    for i in order:
        first_of_set.setdefault(positives[i], i)
    rank = {i: r for r, i in enumerate(order)}
    retrieval = []
    for predicted in test_predictions:
        best = max(first_of_set.values(), key=lambda i: (_label_f1(set(positives[i]), predicted), -rank[i]))
        retrieval.append(train[best][1])
    return {"constant": [constant] * len(test_predictions), "retrieval": retrieval}


_SCORED = ("bleu4", "cider", "rouge_l", "ce_micro_f1", "ce_macro_f1")
"""The scores of a row that get a bootstrap interval."""


def stage1_agreement(report_labels: Sequence[Sequence[int | None]], predicted: Sequence[set[int]]) -> float:
    """How much of the stage-1 prediction the reports state: micro-F1 (14 labels) between the labels read
    as positive in each report and the labels stage 1 predicts for its study (at the reporter's
    ``findings_threshold``, 0.5 in every demo recipe; at 0.5 for the baselines).

    1.0 for a reporter whose reports are read back as exactly what stage 1 decides; the "stage 1 as
    text" row comes close (0.98 on the demo: the labeler's No Finding rule differs from stage 1's own No
    Finding output for some studies). A reporter's CE gap to that row is what it loses in the writing.

    Args:
        report_labels: per report, the labeler's 14 codes (1 positive; 0, -1 and None are not).
        predicted: per study, the indices of the labels stage 1 predicts.
    """
    import torch

    from amrg.metrics.clinical import binarise_labels, precision_recall_f1

    if len(report_labels) != len(predicted):
        raise ValueError(f"{len(report_labels)} reports but {len(predicted)} stage-1 predictions")
    written = binarise_labels(report_labels, uncertain_positive=False)  # [N, 14]
    stated = torch.zeros_like(written)
    for row, labels in enumerate(predicted):
        stated[row, sorted(labels)] = True
    return float(precision_recall_f1(written, stated)["micro_f1"])


def _scores(
    hyps: list[str],
    refs: list[str],
    ref_labels: list[list[int | None]],
    labeler: Any,
    predicted: Sequence[set[int]],
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The row's scores on the whole test split, and a 95 % bootstrap interval (1,000 resamples of the
    test studies, :func:`amrg.metrics.bootstrap.bootstrap_intervals`) for each of :data:`_SCORED`."""
    from amrg.metrics.bootstrap import bootstrap_intervals
    from amrg.metrics.clinical import ce_key
    from amrg.metrics.study_stats import study_stats

    hyp_labels = labeler.label_batch(hyps)
    stats = study_stats(hyps, refs, hyp_labels, ref_labels, meteor=False)
    micro, macro = (ce_key(average, "f1", "14", "u0") for average in ("micro", "macro"))
    # row key -> the metric's key in the bootstrap's scores
    names = dict(zip(_SCORED, ("bleu4", "cider", "rouge_l", micro, macro), strict=True))
    intervals = bootstrap_intervals(stats, resamples=1000, seed=seed)
    scores = {name: float(intervals[key].value) for name, key in names.items()}
    scores["distinct"] = len(set(hyps)) / max(1, len(hyps))
    scores["stage1_agreement"] = stage1_agreement(hyp_labels, predicted)
    return scores, {
        name: [float(intervals[key].low), float(intervals[key].high)] for name, key in names.items()
    }


def _stage1_predictions(ckpt: Path, data) -> tuple[list[str], Any, float]:
    """Test ids, stage-1 probabilities [N, 14] and the stage-1 micro-F1 at 0.5 (u0) against the annotation."""
    import torch

    from amrg.checkpoints.stage1 import load_stage1
    from amrg.metrics.clinical import precision_recall_f1

    net = load_stage1(ckpt)
    ids, prob_rows, true_rows = [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            if batch is None:
                continue
            prob_rows.append(torch.sigmoid(net(batch.images, batch.view_mask).float()))  # [B, 14]
            ids += list(batch.ids)
            true_rows.append(batch.labels == 1)  # u0: uncertain and unmentioned count as negative
    probs, true = torch.cat(prob_rows), torch.cat(true_rows)
    return ids, probs, precision_recall_f1(probs >= 0.5, true)["micro_f1"]


def _positives(probs: Any, threshold: float) -> list[set[int]]:
    """Per study, the labels whose probability is at least ``threshold``."""
    import torch

    return [set(torch.nonzero(row >= threshold).flatten().tolist()) for row in probs]


def recall_agreement(net, loader, top_k: int = 5) -> dict[str, float]:
    """How much of what the memories recall is stored under the study's labels, against a random item.

    For each test study with a positive label, the top-k items of each memory
    (:meth:`~amrg.models.reporter.ReportGenerator.explain_from_prefix`: a report stored under several
    labels is one item) are compared with the study's positive labels (the annotation's, code 1): each
    item scores the share of the labels it is stored under that the study has (1 or 0 for an item stored
    under one label; 1/7 for a report stored under seven labels of which the study has one, so reports
    with many labels, which the summed weights favour, do not match every study), averaged over the
    items. A random item's expected score is the same average over all of the memory's items, computed
    exactly rather than sampled.

    Returns:
        ``{"report", "report_random", "visual", "visual_random"}``, means over those studies; a memory
        that recalls nothing (``NoRetriever``) has no keys.
    """
    import torch

    from amrg.labels import LABELS

    stored = {
        "visual": _stored_labels(net.visual_provenance, by_source=False),
        "report": _stored_labels(net.report_provenance, by_source=True),
    }
    sums = dict.fromkeys(("report", "report_random", "visual", "visual_random"), 0.0)
    studies = 0
    recalls: set[str] = set()
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            visual = net.encode(batch.images, batch.view_mask, return_attention=True)
            for row, recalled in zip(
                batch.labels.tolist(), net.explain_from_prefix(visual, top_k), strict=True
            ):
                positive = {LABELS[j] for j, v in enumerate(row) if v == 1}
                if not positive:
                    continue
                studies += 1
                for kind in ("visual", "report"):
                    mine = [item for item in recalled if item.memory == kind]
                    if mine:
                        recalls.add(kind)
                    sums[kind] += sum(_share(positive, i.all_labels) for i in mine) / max(1, len(mine))
                    items = stored[kind]
                    sums[f"{kind}_random"] += sum(_share(positive, s) for s in items) / max(1, len(items))
    return {key: value / max(1, studies) for key, value in sums.items() if key.split("_")[0] in recalls}


def _share(positive: set[str], labels: Iterable[str]) -> float:
    """The share of an item's labels that are among the study's positive labels."""
    labels = set(labels)
    return len(labels & positive) / max(1, len(labels))


def _stored_labels(provenance: Sequence[dict[str, Any]], by_source: bool) -> list[set[str]]:
    """The labels each memory item is stored under, items as
    :meth:`~amrg.models.reporter.ReportGenerator.explain_from_prefix` lists them
    (:func:`~amrg.models.reporter.memory_items`)."""
    from amrg.models.reporter import memory_items

    return [{str(provenance[r].get("label")) for r in rows} for rows in memory_items(provenance, by_source)]


def _table(rows: list[Row], stage1_f1: float, labeler: str, studies: int) -> str:
    head = (
        "| | BLEU-4 | CIDEr | ROUGE-L | CE micro-F1 | CE macro-F1 | stage-1 micro-F1 | states stage 1 | "
        "distinct | report recall (random) | visual recall (random) | wall time |"
    )
    lines = [
        f"{studies} test studies; CE read by the `{labeler}` labeler (14 labels, uncertain as negative); "
        "[95 % bootstrap interval over the test studies, 1,000 resamples]",
        "",
        head,
        "|" + "---|" * 12,
    ]
    for row in rows:
        s, iv = row.scores, row.intervals
        cells = [f"{s[k]:.3f} [{iv[k][0]:.3f}, {iv[k][1]:.3f}]" for k in _SCORED]
        wall = f"{row.seconds:.0f} s" if row.seconds is not None else "-"
        agree = [
            f"{row.recall[k]:.2f} ({row.recall[k + '_random']:.2f})" if k in row.recall else "-"
            for k in ("report", "visual")
        ]
        lines.append(
            f"| {row.name} | {' | '.join(cells)} | {stage1_f1:.3f} | {s['stage1_agreement']:.3f} | "
            f"{100 * s['distinct']:.0f} % | "
            f"{agree[0]} | {agree[1]} | {wall} |"
        )
    return "\n".join(lines)


def run_demo(
    out: Path = Path("runs/demo"),
    data: Literal["synthetic", "iu-synth"] = "synthetic",
    reports: Path | None = None,
    seed: int = 0,
    fresh: bool = False,
    preset: Literal["full", "tiny"] = "full",
    ablations: bool = True,
    jobs: int = 0,
) -> str:
    """Run the demo pipeline into ``out`` and return the results table (also written as Markdown + JSON).

    Args:
        out: the run folder (created; ``--fresh`` deletes it first when it is a demo run).
        data: ``synthetic`` films with template reports, or ``iu-synth``: synthetic films for the real
            IU X-ray reports (needs ``reports``).
        reports: Open-i's ``NLMCXR_reports.tgz`` or the torchxrayvision wheel (``iu-synth`` only).
        seed: seed of every stage (data, initialisation, sampling).
        fresh: redo every stage.
        preset: ``full`` (the demo recipes as committed) or ``tiny`` (a few batches: a smoke run).
        ablations: also train and test every ablation of :data:`ABLATIONS` (one row each); ``False``
            runs the full model and the baselines only.
        jobs: stage-2 models trained side by side (0: one per CPU core, at most one per model), each
            with an equal share of the cores and its output in ``<out>/logs/<stage>.log``; 1 runs them
            one after another on the console. The tiny demo models run faster as several one-thread
            processes than as one process on every core.

    Returns:
        The results table, Markdown.

    Raises:
        DemoError: ``out`` holds another kind of run or other settings, a missing ``--reports``, or a
            stage that failed (named).
    """
    out = Path(out).resolve()
    configs = _configs()
    if data == "iu-synth" and reports is None:
        raise DemoError("--data iu-synth needs --reports: NLMCXR_reports.tgz or the torchxrayvision wheel")
    if reports is not None and not Path(reports).is_file():
        raise DemoError(
            f"--reports '{reports}' not found: give NLMCXR_reports.tgz or the torchxrayvision wheel"
        )
    _check_text_encoder(configs / "demo" / "memory.yaml")
    settings = {"data": data, "seed": seed, "preset": preset}
    _prepare_out(out, fresh, settings)
    # The full preset's stage-2 fits skip their end-of-training validation (generation over the 200 val
    # studies, ~10 s a model on 2 cores): the results table scores the test split, and `amrg fit` of the same
    # recipe outside the demo still validates.
    full = {"data": [], "stage1": [], "stage2": ["--trainer.limit_val_batches=0"]}
    preset_args = _TINY if preset == "tiny" else full
    if data == "synthetic":
        data_yaml = configs / "demo" / "data.yaml"
        data_args = [
            f"--data.init_args.root={out / 'data'}",
            f"--data.init_args.seed={seed}",
            *preset_args["data"],
        ]
    else:
        data_yaml = configs / "iu_synth" / "data.yaml"
        data_args = [f"--data.init_args.annotation={out / 'data' / 'annotation.json'}"]
        data_args += [a for a in preset_args["data"] if "batch_size" in a]
        if not (out / "data" / "annotation.json").is_file() or fresh:
            from amrg.data.iu_synth import iu_synthesize

            _logger.info("[0] data: iu-synth from %s", reports)
            iu_synthesize(out / "data", Path(reports).resolve(), seed=seed, image_size=64)
    common = ["--run_root", str(out)]
    steps = 4
    seconds: dict[str, float] = {}

    def recipe(name: str) -> list[str]:
        return ["-c", str(data_yaml), "-c", str(configs / "demo" / f"{name}.yaml")]

    seconds["stage1"] = _run_stage(
        out,
        "stage1",
        ["fit", *recipe("stage1"), *common, *data_args, f"--seed_everything={seed}", *preset_args["stage1"]],
        f"[1/{steps}]",
        out / "stage1" / "checkpoints" / "last.ckpt",
    )
    memory_args = [a for a in data_args if "batch_size" not in a]
    seconds["memory"] = _run_stage(
        out,
        "memory",
        ["memory", "build", *recipe("memory"), *common, *memory_args, f"--sampling.seed={seed}"],
        f"[2/{steps}]",
        out / "memory" / "manifest.json",
    )

    models = {"stage2": ([], out / "stage2")}
    for name in ABLATIONS if ablations else ():
        models[name] = (["-c", str(configs / "ablations" / f"{name}.yaml")], out / "ablations" / name)
    jobs = max(1, min(jobs if jobs > 0 else (os.cpu_count() or 1), len(models)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0

    def train_and_test(name: str) -> float:
        """Fit a stage-2 recipe (plus overlay) and test its last checkpoint; seconds of both."""
        overlay, folder = models[name]
        step = f"[3/{steps}]"
        log = out / "logs" / f"{name}.log" if jobs > 1 else None
        ckpt = folder / "checkpoints" / "last.ckpt"
        fit = ["fit", *recipe("stage2"), *overlay, *common, *data_args, f"--seed_everything={seed}"]
        seconds = _run_stage(out, name, [*fit, *preset_args["stage2"]], step, ckpt, log, threads)
        test = ["test", *recipe("stage2"), *overlay, *common, *data_args, f"--seed_everything={seed}"]
        test += [
            f"--ckpt_path={ckpt}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={folder / 'test'}",
        ]
        test_stage = "test" if name == "stage2" else f"{name}_test"
        predictions = folder / "test" / "test_predictions_epoch0.jsonl"
        test_log = out / "logs" / f"{test_stage}.log" if jobs > 1 else None
        return seconds + _run_stage(out, test_stage, test, step, predictions, test_log, threads)

    _logger.info(
        "[3/%d] stage 2: training and testing %d model(s) (%s), %d at a time",
        steps,
        len(models),
        ", ".join(models),
        jobs,
    )
    if jobs == 1:
        for name in models:
            seconds[name] = train_and_test(name)
    else:
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {name: pool.submit(train_and_test, name) for name in models}
            pending = set(futures.values())
            while pending:  # a line a minute, so a quiet console is not mistaken for a hang
                finished, pending = wait(pending, timeout=60, return_when=FIRST_EXCEPTION)
                if any(f.exception() is not None for f in finished):
                    for future in pending:
                        future.cancel()
                    break
                if pending:
                    left = [name for name, f in futures.items() if not f.done()]
                    _logger.info(
                        "[3/%d] %.0f s: %d of %d model(s) done; waiting for %s (output in %s)",
                        steps,
                        time.perf_counter() - start,
                        len(models) - len(left),
                        len(models),
                        ", ".join(left),
                        out / "logs",
                    )
        failed = [f.exception() for f in futures.values() if not f.cancelled() and f.exception() is not None]
        if failed:
            raise failed[0]  # type: ignore[misc]
        seconds.update({name: future.result() for name, future in futures.items()})
    trained = {name: folder for name, (_, folder) in models.items()}

    _logger.info("[%d/%d] results: scoring every model and the baselines on the test split", steps, steps)
    from amrg.labeling import build_labeler

    overrides = {"num_workers": 0, "augment": False}
    if data == "synthetic":
        overrides.update(
            root=str(out / "data"), seed=seed, **({"n": 40, "batch_size": 4} if preset == "tiny" else {})
        )
    else:
        overrides.update(annotation=str(out / "data" / "annotation.json"))
    from amrg.data.datamodules import datamodule_from_recipe

    dm = datamodule_from_recipe(data_yaml, **overrides)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    clean = dm.datasets["train"].clean
    train = [(s.id, clean(s.report), list(s.labels or [None] * 14)) for s in dm.annotation["train"]]
    ids, probs, stage1_f1 = _stage1_predictions(out / "stage1" / "checkpoints" / "last.ckpt", dm)
    predicted = _positives(probs, 0.5)
    labeler = build_labeler("chexpert")
    refs: list[str] | None = None
    ref_labels: list[Any] = []
    rows = []
    from amrg.checkpoints.stage2 import load_stage2

    for name, folder in trained.items():
        predictions = folder / "test" / "test_predictions_epoch0.jsonl"
        model = {r["id"]: r for r in map(json.loads, predictions.read_text(encoding="utf-8").splitlines())}
        missing = sorted(set(ids) - set(model))
        if missing:
            raise DemoError(f"{predictions} lacks {len(missing)} test id(s), e.g. {missing[:3]}")
        if refs is None:
            refs = [model[i]["reference"] for i in ids]
            ref_labels = labeler.label_batch(refs)
        net = load_stage2(folder / "checkpoints" / "last.ckpt")
        stated = _positives(probs, net.findings_threshold)  # what this reporter was told stage 1 decided
        rows.append(
            Row(
                "full model" if name == "stage2" else ABLATIONS[name],
                *_scores([model[i]["hypothesis"] for i in ids], refs, ref_labels, labeler, stated, seed),
                seconds=seconds[name],
                recall=recall_agreement(net, dm.test_dataloader()),
            )
        )
    assert refs is not None  # the full model is always trained
    base = baseline_reports(train, predicted)
    from amrg.labels import LABELS

    as_text = [stage1_sentences([LABELS[j] for j in sorted(p)]) for p in predicted]
    rows += [
        Row("constant report", *_scores(base["constant"], refs, ref_labels, labeler, predicted, seed)),
        Row(
            "retrieval (stage-1 labels)",
            *_scores(base["retrieval"], refs, ref_labels, labeler, predicted, seed),
        ),
        Row("stage 1 as text", *_scores(as_text, refs, ref_labels, labeler, predicted, seed)),
    ]
    table = _table(rows, stage1_f1, labeler.name, len(ids))
    results = {
        "settings": settings,
        "test_studies": len(ids),
        "stage1_micro_f1": stage1_f1,
        "labeler": labeler.name,
        "intervals": "95 % percentile bootstrap over the test studies, 1,000 resamples",
        "reference_distinct": len(set(refs)) / max(1, len(refs)),
        "seconds": seconds,
        "rows": [
            {
                "name": r.name,
                **r.scores,
                "intervals": r.intervals,
                "seconds": r.seconds,
                "recall_agreement": r.recall or None,
            }
            for r in rows
        ],
    }
    for name, text in (("results.md", table + "\n"), ("results.json", json.dumps(results, indent=1) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return table
