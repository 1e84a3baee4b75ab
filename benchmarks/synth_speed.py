"""Synthetic chest film throughput on one core.

Usage: ``python benchmarks/synth_speed.py [--sizes 64 128 224] [--seconds 5]``

Prints, per image size, images per second and milliseconds per image for rendering alone
(``render_study``, one view) and for the whole ``synthesize`` run (render, PNG encode and write,
annotation JSON), each by process CPU time and by wall clock. CPU time is the number to compare on a
shared machine: wall time there also counts other processes' turns. The issue's target is >= 50
images/s at 224 px on one core.
"""

from __future__ import annotations

import os

# One core: pin the math libraries before numpy is imported (numpy's own loops are single-threaded).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from amrg.data.synthetic import render_study, synthesize  # noqa: E402


def _render_rate(size: int, seconds: float) -> tuple[float, float]:
    """Images per second (CPU, wall) of ``render_study`` with one view, run for about ``seconds``."""
    rng = np.random.default_rng(0)
    render_study(rng, size, 1)  # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        render_study(rng, size, 1)
        n += 1
    return n / (time.process_time() - c0), n / (time.perf_counter() - t0)


def _synthesize_rate(size: int, n: int) -> tuple[float, float]:
    """Images per second (CPU, wall) of a one-view ``synthesize`` run of n studies into a temp folder."""
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        synthesize(Path(tmp), n=n, seed=0, image_size=size, two_view_prob=0.0, progress=False)
        return n / (time.process_time() - c0), n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 224, 384])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per row")
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, python {platform.python_version()}, numpy {np.__version__}, one thread")
    head = ("image size", "stage", "images/s (cpu)", "ms/image (cpu)", "images/s (wall)")
    print(f"{head[0]:>10} | {head[1]:<12} | {head[2]:>14} | {head[3]:>14} | {head[4]:>15}")
    print("-" * 78)
    for size in args.sizes:
        rates = {"render": _render_rate(size, args.seconds)}
        n = max(20, int(rates["render"][0] * args.seconds / 2))
        rates["synthesize"] = _synthesize_rate(size, n)
        for stage, (cpu, wall) in rates.items():
            print(f"{size:>10} | {stage:<12} | {cpu:>14.1f} | {1000 / cpu:>14.2f} | {wall:>15.1f}")


if __name__ == "__main__":
    main()
