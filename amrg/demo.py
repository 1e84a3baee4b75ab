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
labeler on both sides), the stage-1 micro-F1 at 0.5 against the annotation's labels, distinct reports
(%), recall agreement of the full model (:func:`recall_agreement`: the share of its top-5 recalled
report- and visual-memory items stored under one of the study's labels, against a random item) and wall
time. Each stage leaves ``<out>/<stage>.done.json``; a re-run reuses finished stages whose
command has not changed (``fresh=True`` redoes everything).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEMO_MARKER",
    "DemoError",
    "Row",
    "baseline_reports",
    "recall_agreement",
    "run_demo",
    "stage1_sentences",
]

_logger = logging.getLogger(__name__)

DEMO_MARKER = "amrg-demo.json"
"""File that marks a folder as an ``amrg demo`` run (``--fresh`` deletes only such folders)."""

_TINY = {  # seconds-long run of every stage (tests, smoke runs)
    "data": ["--data.init_args.n=40", "--data.init_args.batch_size=4"],
    "stage1": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
    "stage2": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
}


class DemoError(ValueError):
    """A demo run that cannot start or continue (named folder, file or stage)."""


@dataclass
class Row:
    """One line of the results table."""

    name: str
    scores: dict[str, float]
    seconds: float | None = None


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


_STAGES = ("stage1", "memory", "stage2", "test")


def _run_stage(out: Path, name: str, args: list[str], step: str, artifact: Path) -> float:
    """Run one ``amrg`` command unless it already finished with the same arguments; return its seconds.

    A stage that runs makes every later stage run too (their inputs changed), by dropping their records.
    """
    done = out / f"{name}.done.json"
    if done.is_file() and artifact.exists():
        record = json.loads(done.read_text(encoding="utf-8"))
        if record.get("args") == args:
            _logger.info("%s %s: done before (%s), reused", step, name, done)
            return float(record["seconds"])
    _logger.info("%s %s: amrg %s", step, name, " ".join(args))
    for later in _STAGES[_STAGES.index(name) + 1 :]:
        (out / f"{later}.done.json").unlink(missing_ok=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "amrg.cli", *args], cwd=out, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise DemoError(f"{step} {name} failed (exit {result.returncode}): amrg {' '.join(args)}")
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps({"args": args, "seconds": round(seconds, 1)}) + "\n", encoding="utf-8")
    os.replace(tmp, done)
    return seconds


def stage1_sentences(positive: Sequence[str]) -> str:
    """The stage-1 prediction as report text: one sentence per positive label (CheXpert wording)."""
    if not positive or list(positive) == ["No Finding"]:
        return "no acute cardiopulmonary abnormality ."
    return " ".join(f"{label.lower()} ." for label in positive if label != "No Finding")


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


def _scores(
    hyps: list[str], refs: list[str], ref_labels: list[list[int | None]], labeler: Any
) -> dict[str, float]:
    from amrg.metrics.clinical import ce_key, ce_scores
    from amrg.metrics.nlg import nlg_scores

    nlg = nlg_scores(hyps, refs, meteor=False)
    ce = ce_scores(labeler.label_batch(hyps), ref_labels)
    return {
        "bleu4": nlg["bleu4"],
        "cider": nlg["cider"],
        "rouge_l": nlg["rouge_l"],
        "ce_micro_f1": ce[ce_key("micro", "f1", "14", "u0")],
        "ce_macro_f1": ce[ce_key("macro", "f1", "14", "u0")],
        "distinct": len(set(hyps)) / max(1, len(hyps)),
    }


def _stage1_predictions(ckpt: Path, data) -> tuple[list[str], list[set[int]], float]:
    """Test ids, stage-1 positive label sets at 0.5, and the stage-1 micro-F1 (u0) against the annotation."""
    import torch

    from amrg.checkpoints.stage1 import load_stage1
    from amrg.metrics.clinical import precision_recall_f1

    net = load_stage1(ckpt)
    ids, preds, pred_rows, true_rows = [], [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            if batch is None:
                continue
            probs = torch.sigmoid(net(batch.images, batch.view_mask).float())  # [B, 14]
            ids += list(batch.ids)
            pred_rows.append(probs >= 0.5)
            true_rows.append(batch.labels == 1)  # u0: uncertain and unmentioned count as negative
    pred, true = torch.cat(pred_rows), torch.cat(true_rows)
    preds = [set(torch.nonzero(row).flatten().tolist()) for row in pred]
    return ids, preds, precision_recall_f1(pred, true)["micro_f1"]


def recall_agreement(net, loader, top_k: int = 5) -> dict[str, float]:
    """How often a recalled memory item's label is positive for the study, against a random item.

    For each test study with a positive label, the top-k items of each memory
    (:meth:`~amrg.models.reporter.ReportGenerator.explain_from_prefix`) are compared with the study's
    positive labels (the annotation's, code 1): the share whose stored label is one of them. A random
    item's expected share is the fraction of the memory's rows stored under one of the study's labels,
    computed exactly rather than sampled.

    Returns:
        ``{"report", "report_random", "visual", "visual_random"}``, means over those studies.
    """
    import torch

    from amrg.labels import LABELS

    label_of = {
        "visual": [str(r.get("label")) for r in net.visual_provenance],
        "report": [str(r.get("label")) for r in net.report_provenance],
    }
    sums = dict.fromkeys(("report", "report_random", "visual", "visual_random"), 0.0)
    studies = 0
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
                    sums[kind] += sum(item.label in positive for item in mine) / max(1, len(mine))
                    stored = label_of[kind]
                    sums[f"{kind}_random"] += sum(label in positive for label in stored) / max(1, len(stored))
    return {key: value / max(1, studies) for key, value in sums.items()}


def _table(rows: list[Row], stage1_f1: float, recall: dict[str, float]) -> str:
    head = (
        "| | BLEU-4 | CIDEr | ROUGE-L | CE micro-F1 | CE macro-F1 | stage-1 micro-F1 | distinct | "
        "report recall (random) | visual recall (random) | wall time |"
    )
    lines = [head, "|" + "---|" * 11]
    for i, row in enumerate(rows):
        s = row.scores
        wall = f"{row.seconds:.0f} s" if row.seconds is not None else "-"
        # recall agreement is the full model's (the first row); the baselines recall nothing
        agree = [
            f"{recall[k]:.2f} ({recall[k + '_random']:.2f})" if i == 0 else "-" for k in ("report", "visual")
        ]
        lines.append(
            f"| {row.name} | {s['bleu4']:.3f} | {s['cider']:.3f} | {s['rouge_l']:.3f} | {s['ce_micro_f1']:.3f} | "
            f"{s['ce_macro_f1']:.3f} | {stage1_f1:.3f} | {100 * s['distinct']:.0f} % | {agree[0]} | {agree[1]} | "
            f"{wall} |"
        )
    return "\n".join(lines)


def run_demo(
    out: Path = Path("runs/demo"),
    data: Literal["synthetic", "iu-synth"] = "synthetic",
    reports: Path | None = None,
    seed: int = 0,
    fresh: bool = False,
    preset: Literal["full", "tiny"] = "full",
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
    settings = {"data": data, "seed": seed, "preset": preset}
    _prepare_out(out, fresh, settings)
    tiny = _TINY if preset == "tiny" else {"data": [], "stage1": [], "stage2": []}
    if data == "synthetic":
        data_yaml = configs / "demo" / "data.yaml"
        data_args = [f"--data.init_args.root={out / 'data'}", f"--data.init_args.seed={seed}", *tiny["data"]]
    else:
        data_yaml = configs / "iu_synth" / "data.yaml"
        data_args = [f"--data.init_args.annotation={out / 'data' / 'annotation.json'}"]
        data_args += [a for a in tiny["data"] if "batch_size" in a]
        if not (out / "data" / "annotation.json").is_file() or fresh:
            from amrg.data.iu_synth import iu_synthesize

            _logger.info("[0/5] data: iu-synth from %s", reports)
            iu_synthesize(out / "data", Path(reports).resolve(), seed=seed, image_size=64)
    common = ["--run_root", str(out)]
    seconds: dict[str, float] = {}

    def recipe(name: str) -> list[str]:
        return ["-c", str(data_yaml), "-c", str(configs / "demo" / f"{name}.yaml")]

    seconds["stage1"] = _run_stage(
        out,
        "stage1",
        ["fit", *recipe("stage1"), *common, *data_args, f"--seed_everything={seed}", *tiny["stage1"]],
        "[1/5]",
        out / "stage1" / "checkpoints" / "last.ckpt",
    )
    memory_args = [a for a in data_args if "batch_size" not in a]
    seconds["memory"] = _run_stage(
        out,
        "memory",
        ["memory", "build", *recipe("memory"), *common, *memory_args, f"--sampling.seed={seed}"],
        "[2/5]",
        out / "memory" / "manifest.json",
    )
    seconds["stage2"] = _run_stage(
        out,
        "stage2",
        ["fit", *recipe("stage2"), *common, *data_args, f"--seed_everything={seed}", *tiny["stage2"]],
        "[3/5]",
        out / "stage2" / "checkpoints" / "last.ckpt",
    )
    test_dir = out / "test"
    seconds["test"] = _run_stage(
        out,
        "test",
        [
            "test",
            *recipe("stage2"),
            *common,
            *data_args,
            f"--seed_everything={seed}",
            f"--ckpt_path={out / 'stage2' / 'checkpoints' / 'last.ckpt'}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={test_dir}",
        ],
        "[4/5]",
        test_dir / "test_predictions_epoch0.jsonl",
    )

    _logger.info("[5/5] results: scoring the full model and the baselines on the test split")
    from amrg.labeling.chexpert import CheXpertLabeler

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
    ids, predicted, stage1_f1 = _stage1_predictions(out / "stage1" / "checkpoints" / "last.ckpt", dm)
    model = {
        r["id"]: r
        for r in map(json.loads, (test_dir / "test_predictions_epoch0.jsonl").read_text().splitlines())
    }
    missing = sorted(set(ids) - set(model))
    if missing:
        raise DemoError(
            f"the test predictions in {test_dir} lack {len(missing)} test id(s), e.g. {missing[:3]}"
        )
    refs = [model[i]["reference"] for i in ids]
    labeler = CheXpertLabeler()
    ref_labels = labeler.label_batch(refs)
    base = baseline_reports(train, predicted)
    from amrg.labels import LABELS

    rows = [
        Row(
            "full model",
            _scores([model[i]["hypothesis"] for i in ids], refs, ref_labels, labeler),
            seconds["stage2"] + seconds["test"],
        ),
        Row("constant report", _scores(base["constant"], refs, ref_labels, labeler)),
        Row("retrieval (stage-1 labels)", _scores(base["retrieval"], refs, ref_labels, labeler)),
        Row(
            "stage 1 as text",
            _scores(
                [stage1_sentences([LABELS[j] for j in sorted(p)]) for p in predicted],
                refs,
                ref_labels,
                labeler,
            ),
        ),
    ]
    from amrg.checkpoints.stage2 import load_stage2

    recall = recall_agreement(load_stage2(out / "stage2" / "checkpoints" / "last.ckpt"), dm.test_dataloader())
    table = _table(rows, stage1_f1, recall)
    results = {
        "settings": settings,
        "test_studies": len(ids),
        "stage1_micro_f1": stage1_f1,
        "recall_agreement": recall,
        "reference_distinct": len(set(refs)) / max(1, len(refs)),
        "seconds": seconds,
        "rows": [{"name": r.name, **r.scores, "seconds": r.seconds} for r in rows],
    }
    for name, text in (("results.md", table + "\n"), ("results.json", json.dumps(results, indent=1) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return table
