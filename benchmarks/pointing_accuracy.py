"""Pointing accuracy of CAM ROI mining on synthetic chest films, against random patch choice.

Usage::

    python benchmarks/pointing_accuracy.py [--config configs/demo/stage1.yaml]
        [--checkpoint runs/demo/stage1/checkpoints/last.ckpt] [--methods gradcam layercam]
        [--patch-sizes 8 16] [--threshold 0.75] [--top-k 6]

Synthetic data (``amrg.data.synthetic``) knows where each sign is drawn (``Study.boxes``). A mined patch
*points* when its centre lies inside a true box of its label in the same view; patches of (study, view,
label) triples without a box ("No Finding") are not scored. The random baseline is the exact expectation
of choosing one grid cell uniformly at random for the same (view, label). The issue's target is an
accuracy >= 0.6 for the demo stage-1 model.

The stage-1 model is read from ``--checkpoint``; when that file does not exist it is first trained with
``amrg fit -c <config>`` (the demo recipe, a few minutes on 2 CPU cores). The data are the train split of
the config's synthetic set. Prints the model's validation AUROC, a table per (CAM method, patch size) and
per-label hit rates.

Measured on the 2-core CPU dev box (2 threads), configs/demo/stage1.yaml as committed (conv stem, 28
epochs, seed 0, val mean AUROC 0.904), 800 train studies, 8 px patches, threshold 0.75, top-k 6 (pointing
accuracy vs random; ``--patch-sizes 8``):

    gradcam   on final_norm  0.025 vs 0.074   (the paper's setting)
    layercam  on final_norm  0.026 vs 0.068
    gradcam   on stem        0.024 vs 0.073
    layercam  on stem        0.246 vs 0.075   (configs/demo/memory.yaml; per label 0.00 Atelectasis and
                                               Fracture, 0.02 Lung Lesion .. 0.64 Enlarged Cardiomediastinum,
                                               0.89 Pneumothorax)

An earlier model of the same recipe (before the Q-Former's projection was built after the encoder, which
changed the random draws; val AUROC 0.917) gave 0.018 / 0.027 / 0.030 / 0.319: the ranking holds, the
level moves with the seed.

So the issue's target of 0.6 is not met. The paper's Grad-CAM on the final norm points *below* random on
this tiny from-scratch Swin: its post-LayerNorm features are dense and signed, the spatially averaged
gradient weights then follow bright anatomy (abdomen, shoulders) rather than the sign. LayerCAM on the
convolutional stem's last (GELU) activation weighs each location by its own gradient on local, non-negative
features and is 3-4x random; it finds the large signs and misses the small ones (lesion, fracture,
atelectasis), which the model itself detects poorly (val AUROC ~0.75-0.8) and predicts largely from
co-occurring findings. More data at the same step budget does not help (2,500 studies x 12 epochs: AUROC
0.899, LayerCAM on the stem 0.262); training augmentation hurts (0.872, 0.185). Before the conv stem (patch
stem, val AUROC 0.86) every method was at or below random (0.036-0.052 vs 0.071). The mining itself is
sound: on a tiny model trained to find a bright square (tests/memory/test_cam.py) LayerCAM patches hit the
square 0.50-0.92 of the time against 0.17 at random.
"""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from amrg.checkpoints.stage1 import load_stage1
from amrg.data.datamodules import datamodule_from_recipe
from amrg.labels import LABELS
from amrg.memory.cam import CAMConfig, mine_visual_memory, pointing_accuracy


@torch.no_grad()
def _val_auroc(net, data) -> float:
    from torchmetrics.functional.classification import multilabel_auroc

    probs, labels = [], []
    for batch in data.val_dataloader():
        probs.append(torch.sigmoid(net(batch.images, batch.view_mask)))
        labels.append(batch.labels)
    p, y = torch.cat(probs), torch.cat(labels)
    target = (y == 1).long()  # NaN (not mentioned) counts as negative, as in the stage-1 default
    target = torch.where(y == -1, torch.full_like(target, -1), target)
    per_label = multilabel_auroc(p, target, num_labels=len(LABELS), average="none", ignore_index=-1)
    defined = [(target[:, j] == 1).any() and (target[:, j] == 0).any() for j in range(len(LABELS))]
    return float(per_label[torch.tensor(defined)].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=Path("configs/demo/stage1.yaml"), help="stage-1 recipe"
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/stage1/checkpoints/last.ckpt"))
    parser.add_argument("--methods", nargs="+", default=["gradcam", "layercam"])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument(
        "--target-layers", nargs="+", default=["final_norm", "stem"], choices=["final_norm", "stem"]
    )
    parser.add_argument("--threshold", type=float, default=0.75)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="(view, label) pairs per CAM pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if not args.checkpoint.is_file():
        print(f"# {args.checkpoint} not found: training it with amrg fit -c {args.config}", flush=True)
        t0 = time.perf_counter()
        recipe = ["-c", str(args.config.parent / "data.yaml"), "-c", str(args.config)]
        subprocess.run([sys.executable, "-m", "amrg.cli", "fit", *recipe], check=True)
        print(f"# trained in {time.perf_counter() - t0:.0f} s", flush=True)
    from amrg.data.dataset import collate_studies

    net = load_stage1(args.checkpoint)
    data = datamodule_from_recipe(args.config.parent / "data.yaml")  # the recipe's data block
    data.prepare_data()
    data.setup("fit")
    train = data.annotation["train"]
    boxes = {s.id: s.boxes for s in train}
    data.datasets["train"].augment = None  # mine the views as they are
    loader = torch.utils.data.DataLoader(
        data.datasets["train"], batch_size=32, shuffle=False, collate_fn=collate_studies
    )
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"# stage-1 model {args.checkpoint}: val mean AUROC {_val_auroc(net, data):.3f}")
    print(
        f"# {len(train)} train studies of {data.annotation_path}; threshold {args.threshold}, top-k {args.top_k}"
    )
    head = ("method", "layer", "patch px", "grid", "patches", "scored", "pointing acc", "random", "mining s")
    print(" | ".join(f"{h:>12}" for h in head))
    print("-" * 135)
    per_label = {}
    size = int(net.encoder.img_size)
    runs = [(m, t, p) for t in args.target_layers for m in args.methods for p in args.patch_sizes]
    for method, layer, patch in runs:
        cfg = CAMConfig(
            patch_size=patch,
            threshold=args.threshold,
            top_k=args.top_k,
            batch_size=args.batch_size,
            method=method,
            target_layer=layer,
        )
        t0 = time.perf_counter()
        bank = mine_visual_memory(net, loader, cfg, progress=False)
        secs = time.perf_counter() - t0
        result = pointing_accuracy(bank, boxes)
        per_label[(method, layer, patch)] = result["per_label"]
        row = (
            method,
            layer,
            patch,
            f"{size // patch}x{size // patch}",
            len(bank),
            result["scored"],
            f"{result['accuracy']:.3f}",
            f"{result['random']:.3f}",
            f"{secs:.1f}",
        )
        print(" | ".join(f"{v:>12}" for v in row), flush=True)
    for (method, layer, patch), labels in per_label.items():
        print(f"\n# per label, {method} on {layer}, {patch} px patches: hits / scored")
        for label, (hits, scored) in labels.items():
            print(f"  {label:<28} {hits:>5} / {scored:<5} {hits / scored:.2f}")


if __name__ == "__main__":
    main()
