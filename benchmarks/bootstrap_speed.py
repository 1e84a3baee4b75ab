"""Time bootstrap intervals on a MIMIC-CXR-size test set: 3,858 synthetic report pairs, 1,000 resamples.

References are recombined, seeded, from a bank of typical chest X-ray sentences (normal findings,
negations, findings, hedges, devices); each hypothesis is its reference with sentences dropped, swapped
for others or reordered, so the scores land where real models do. The process is pinned to one CPU
core. Timed separately: the per-study statistics (one pycocoevalcap pass for BLEU, ROUGE-L and CIDEr,
plus the CE counts), the bootstrap of one system, the paired bootstrap of two, and, apart from the
target, labelling the reports and (``--meteor``) the METEOR jar.

    python benchmarks/bootstrap_speed.py [--n 3858] [--resamples 1000] [--meteor]

The target is statistics + bootstrap of one system <= 60 s on one core, METEOR's JVM aside.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from amrg.labeling import build_labeler
from amrg.metrics.bootstrap import bootstrap_intervals, paired_bootstrap
from amrg.metrics.study_stats import study_stats

_NORMAL = [
    "the heart is normal in size .",
    "heart size is within normal limits .",
    "the mediastinum is unremarkable .",
    "the cardiomediastinal silhouette is normal in size and contour .",
    "the lungs are clear .",
    "no focal consolidation pleural effusion or pneumothorax .",
    "there is no pneumothorax or pleural effusion .",
    "no acute osseous abnormality .",
    "pulmonary vascularity is within normal limits .",
    "no evidence of pneumonia .",
    "no acute cardiopulmonary process .",
    "there is no evidence of pulmonary edema .",
]
_ABNORMAL = [
    "the heart is mildly enlarged .",
    "moderate cardiomegaly is again noted .",
    "small left pleural effusion with adjacent atelectasis .",
    "bilateral pleural effusions are present right greater than left .",
    "patchy opacity in the right lower lobe concerning for pneumonia .",
    "mild pulmonary edema .",
    "there is bibasilar atelectasis .",
    "focal consolidation in the left lower lobe .",
    "a small right apical pneumothorax is seen .",
    "a nodular opacity in the left upper lobe may represent a lung nodule .",
    "healed right rib fractures are noted .",
    "the endotracheal tube terminates 4 cm above the carina .",
    "a right internal jugular central venous catheter ends in the svc .",
    "possible mild interstitial edema .",
    "cannot exclude a small left effusion .",
]


def _pairs(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """References, a close system A and a weaker system B (more sentences dropped or swapped)."""
    rng = random.Random(seed)
    refs, hyp_a, hyp_b = [], [], []
    for _ in range(n):
        body = rng.sample(_NORMAL, rng.randint(3, 6)) + rng.sample(_ABNORMAL, rng.randint(0, 3))
        rng.shuffle(body)
        refs.append(" ".join(body))
        for out, keep, swap in ((hyp_a, 0.8, 0.15), (hyp_b, 0.6, 0.3)):
            sentences = [
                rng.choice(_NORMAL + _ABNORMAL) if rng.random() < swap else s
                for s in body
                if rng.random() < keep
            ] or [rng.choice(_NORMAL)]
            if rng.random() < 0.3:
                rng.shuffle(sentences)
            out.append(" ".join(sentences))
    return refs, hyp_a, hyp_b


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=3858, help="report pairs (MIMIC-CXR's R2Gen test split: 3,858)"
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reports and of the resamples")
    parser.add_argument("--meteor", action="store_true", help="also time the METEOR jar (needs Java)")
    args = parser.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, whatever the thread pools do
    refs, hyp_a, hyp_b = _pairs(args.n, args.seed)
    labeler = build_labeler("chexpert")
    texts = list(dict.fromkeys(refs + hyp_a + hyp_b))
    rows, t_label = _timed(labeler.label_batch, texts)
    labels = dict(zip(texts, rows))
    ref_labels = [labels[t] for t in refs]

    def stats(hyps: list[str]):
        return study_stats(hyps, refs, [labels[t] for t in hyps], ref_labels, meteor=False)

    stats_a, t_stats = _timed(stats, hyp_a)
    stats_b = stats(hyp_b)
    intervals, t_boot = _timed(bootstrap_intervals, stats_a, args.resamples, args.seed)
    diffs, t_paired = _timed(paired_bootstrap, stats_a, stats_b, args.resamples, args.seed)

    rows_out = [
        ("per-study statistics, one system (BLEU, ROUGE-L, CIDEr, CE counts)", t_stats),
        (f"bootstrap, one system ({len(intervals)} scores x {args.resamples} resamples)", t_boot),
        ("target: statistics + bootstrap, one system (<= 60 s)", t_stats + t_boot),
        (f"paired bootstrap A vs B ({len(diffs)} differences)", t_paired),
        (f"labelling {len(texts)} distinct reports (CheXpert rules; not in the target)", t_label),
    ]
    if args.meteor:
        _, t_meteor = _timed(study_stats, hyp_a, refs, meteor=True)
        rows_out.append(("per-study statistics with METEOR (JVM included; not in the target)", t_meteor))
    width = max(len(name) for name, _ in rows_out)
    print(
        f"{args.n} report pairs, {args.resamples} resamples, 1 core ({sys.platform}, python {sys.version.split()[0]})"
    )
    print(f"| {'step':<{width}} | seconds |")
    print(f"|{'-' * (width + 2)}|---------|")
    for name, seconds in rows_out:
        print(f"| {name:<{width}} | {seconds:7.2f} |")
    key = "bleu4"
    iv, d = intervals[key], diffs[key]
    print(
        f"\nA {key} {iv.value:.4f} [{iv.low:.4f}, {iv.high:.4f}]; A - B {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}], p={d.p_value:.3g}"
    )


if __name__ == "__main__":
    main()
