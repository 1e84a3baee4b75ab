"""Scale of the data layer: a MIMIC-CXR-sized annotation loads and validates fast and lean.

Synthesises an annotation.json with ~276k studies (MIMIC-CXR's size in R2Gen's split), then
measures, in a fresh process, load + validate time, peak RSS, and that building the datasets
opens no image file.

    .venv/bin/python benchmarks/data_scale.py [--n 276000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PHRASES = [
    "The lungs are clear.",
    "No pleural effusion or pneumothorax.",
    "Heart size is normal.",
    "There is mild cardiomegaly.",
    "Small left pleural effusion.",
    "Cannot exclude early pneumonia.",
    "Right internal jugular central line tip in the SVC.",
    "Bibasilar atelectasis.",
]

# (a) load + validate alone: the data layer's schema needs no torch.
_CHILD_SCHEMA = r"""
import json, resource, sys, time
from amrg.data.schema import load_annotation
t0 = time.perf_counter()
ann = load_annotation(sys.argv[1])
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "studies": sum(ann.counts().values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# (b) the whole DataModule setup, with a spy on every image open.
_CHILD_DATAMODULE = r"""
import builtins, json, resource, sys, time
from pathlib import Path
opened = []
real_open = builtins.open
def spy(file, *a, **k):
    if str(file).endswith((".png", ".jpg")):
        opened.append(str(file))
    return real_open(file, *a, **k)
builtins.open = spy
import PIL.Image
real_pil = PIL.Image.open
def pil_spy(fp, *a, **k):
    opened.append(str(fp))
    return real_pil(fp, *a, **k)
PIL.Image.open = pil_spy
from amrg.data.datamodules import MIMICCXRDataModule
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
dm = MIMICCXRDataModule(Path(sys.argv[1]), batch_size=16, num_workers=0, labels_from_reports=False)
dm.setup("fit")
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "studies": sum(len(d) for d in dm.datasets.values()),
                  "import_rss_mb": base, "peak_rss_mb": peak, "images_opened": len(opened)}))
"""


def synthesise(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for i in range(n):
        split = "train" if i < n * 0.98 else ("val" if i < n * 0.99 else "test")
        pid, sid = 10000000 + i // 3, 50000000 + i
        views = [
            f"p{str(pid)[:2]}/p{pid}/s{sid}/{rng.getrandbits(64):016x}.jpg"
            for _ in range(rng.choice((1, 1, 2, 3)))
        ]
        report = " ".join(rng.sample(_PHRASES, 4))
        # CheXpert-like sparsity: most labels not mentioned, some negative, few positive/uncertain
        labels = [rng.choices((None, 0, 1, -1), weights=(70, 18, 9, 3))[0] for _ in range(14)]
        splits[split].append(
            {"id": f"{sid}", "report": report, "image_path": views, "split": split, "labels": labels}
        )
    path.write_text(json.dumps(splits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=276_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotation.json"
        t0 = time.perf_counter()
        synthesise(path, args.n)
        gen = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        runs = {}
        for name, child in (("schema", _CHILD_SCHEMA), ("datamodule", _CHILD_DATAMODULE)):
            out = subprocess.run(
                [sys.executable, "-c", child, str(path)], capture_output=True, text=True, check=True
            )
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    s, d = runs["schema"], runs["datamodule"]
    print(f"annotation: {s['studies']} studies, {size_mb:.1f} MB JSON (synthesised in {gen:.1f} s)\n")
    print(f"{'step':<44}{'seconds':>9}{'peak RSS MB':>13}{'images opened':>15}")
    print(
        f"{'load_annotation (validate all records)':<44}{s['seconds']:>9.2f}{s['peak_rss_mb']:>13.0f}{'-':>15}"
    )
    print(
        f"{'MIMICCXRDataModule.setup (datasets built)':<44}{d['seconds']:>9.2f}{d['peak_rss_mb']:>13.0f}"
        f"{d['images_opened']:>15}"
    )
    print(f"{'  of which: importing torch + lightning':<44}{'':>9}{d['import_rss_mb']:>13.0f}")
    print(f"{'  of which: the data':<44}{'':>9}{d['peak_rss_mb'] - d['import_rss_mb']:>13.0f}")
    print("\ntargets: <= 10 s and <= 1024 MB to load and validate; 0 images opened while building")


if __name__ == "__main__":
    main()
