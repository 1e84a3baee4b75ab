"""Throughput of CheXpertLabeler on ~5,000 varied synthetic reports (one process, one thread).

The reports are built, seeded, from a bank of typical chest X-ray sentences (normal and abnormal
findings, negations, uncertainty, lists, devices), in three styles: raw text as radiologists write
it, R2Gen-cleaned text (lower case, no commas, `` . `` between sentences) as amrg scores it, and
long reports (findings + impression + history, ~2-4 kB). A few degenerate strings are mixed in.

    OMP_NUM_THREADS=1 python benchmarks/labeler_speed.py [--n 5000] [--repeat 3]

Prints reports/s and microseconds per report per style; the target is >= 2,000 reports/s.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time

from amrg.labeling.chexpert import CheXpertLabeler

_NORMAL = [
    "The heart is normal in size.",
    "Heart size is within normal limits.",
    "The mediastinum is unremarkable.",
    "The cardiomediastinal silhouette is normal in size and contour.",
    "The lungs are clear.",
    "No focal consolidation, pleural effusion, or pneumothorax.",
    "There is no pneumothorax or pleural effusion.",
    "No acute osseous abnormality.",
    "Pulmonary vascularity is within normal limits.",
    "No evidence of pneumonia.",
    "No acute cardiopulmonary process.",
    "The osseous structures are intact.",
    "There is no evidence of pulmonary edema.",
    "No displaced rib fractures are identified.",
]
_ABNORMAL = [
    "There is mild cardiomegaly.",
    "The heart is moderately enlarged.",
    "Small left pleural effusion.",
    "Bibasilar atelectasis.",
    "Patchy opacity in the right lower lobe, concerning for pneumonia.",
    "Mild pulmonary vascular congestion.",
    "Moderate interstitial edema.",
    "Right apical pneumothorax.",
    "Left lower lobe consolidation.",
    "A 1.5 cm nodule in the right upper lobe.",
    "Retrocardiac opacity may reflect atelectasis or consolidation.",
    "Cannot exclude early pneumonia.",
    "Possible small right effusion.",
    "Healed left rib fractures.",
    "Endotracheal tube tip 4 cm above the carina.",
    "Right IJ central venous catheter terminates in the SVC.",
    "Left chest wall pacemaker with leads in place.",
    "Stable cardiomediastinal silhouette.",
    "Pleural thickening at the left apex.",
    "Degenerative changes of the thoracic spine.",
    "Calcified granuloma in the left lower lobe.",
    "Atelectasis versus scarring at the lung bases.",
    "The previously seen pneumothorax has resolved.",
    "The nasogastric tube has been removed.",
    "Findings suggestive of congestive heart failure.",
    "Emphysema with hyperinflated lungs.",
    "Interval increase in the right pleural effusion.",
]
_EXTRA = [
    "Comparison is made to the prior study.",
    "PA and lateral views of the chest were obtained.",
    "Clinical history: shortness of breath, evaluate for pneumonia.",
    "Portable AP upright view.",
    "Findings were discussed with the referring clinician.",
    "Recommend follow-up imaging in 3 months.",
]
_DEGENERATE = [
    "",
    "   ",
    "nan",
    "None",
    ".",
    "no",
    "XXXX XXXX XXXX.",
    "\u00e9panchement pleural \u2014 \u2603 \U0001f600",
    "no no no no no",
    "or or or effusion or or",
    ". . . ; ; :",
]


def _r2gen(text: str) -> str:
    # Roughly R2Gen's IU cleaning: lower case, punctuation other than "." dropped, " . " separators.
    text = re.sub(r"[,;:()]", "", text.lower())
    return " . ".join(s.strip() for s in text.split(". ") if s.strip()).rstrip(".") + " ."


def make_reports(n: int, seed: int = 0) -> dict[str, list[str]]:
    """Synthetic reports by style."""
    rng = random.Random(seed)

    def report(k_norm: int, k_abn: int) -> str:
        sents = rng.sample(_NORMAL, k_norm) + rng.sample(_ABNORMAL, k_abn)
        rng.shuffle(sents)
        return " ".join(sents)

    n_long = max(1, n // 10)
    n_degen = len(_DEGENERATE)
    n_each = (n - n_long - n_degen) // 2
    raw = [report(rng.randint(2, 7), rng.randint(0, 4)) for _ in range(n_each)]
    cleaned = [_r2gen(report(rng.randint(2, 7), rng.randint(0, 4))) for _ in range(n_each)]
    long = []
    for _ in range(n_long):
        parts = [
            " ".join(rng.sample(_EXTRA, 3)),
            "FINDINGS:",
            report(8, 6),
            "IMPRESSION:",
            report(3, 3),
            report(6, 8),
            "\n\n".join(f"{i}. {s}" for i, s in enumerate(rng.sample(_ABNORMAL, 6), 1)),
        ]
        long.append("\n".join(parts))
    return {"raw": raw, "r2gen-cleaned": cleaned, "long": long, "degenerate": list(_DEGENERATE)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="number of reports (default 5000)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    labeler = CheXpertLabeler()
    build_ms = (time.perf_counter() - t0) * 1e3
    styles = make_reports(args.n, args.seed)
    styles["all"] = [r for v in styles.values() for r in v]

    print(f"CheXpertLabeler built in {build_ms:.0f} ms; {len(styles['all'])} reports; best of {args.repeat}")
    print("CPU = process time of this (single-threaded) process, so other load on the machine counts less.")
    head = (
        f"{'style':<14} {'reports':>7} {'mean chars':>10} {'CPU s':>7} {'reports/s':>10} {'us/report':>10} "
        f"{'wall rep/s':>10}"
    )
    print(head)
    print("-" * len(head))
    for style, reports in styles.items():
        cpu, wall = [], []
        for _ in range(args.repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            labeler.label_batch(reports)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
        best, best_wall = max(min(cpu), 1e-9), max(min(wall), 1e-9)
        chars = statistics.mean(len(r) for r in reports)
        print(
            f"{style:<14} {len(reports):>7} {chars:>10.0f} {best:>7.3f} {len(reports) / best:>10,.0f} "
            f"{1e6 * best / len(reports):>10.1f} {len(reports) / best_wall:>10,.0f}"
        )
    huge = " ".join(styles["raw"][:2000])  # one ~0.5 MB string
    t0 = time.perf_counter()
    labeler.label(huge)
    print(f"one huge report of {len(huge):,} chars: {time.perf_counter() - t0:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
