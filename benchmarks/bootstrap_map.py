"""The mAP bootstrap interval: sample counts as AP weights (``map_ci``: one sort a class)
against scoring every resampled array (a sort a class and resample), as a ratio.

Both draw the same resamples (same seed); the script checks that they give the same
interval. Random scores (2 decimals, so with ties) and 0/1 targets at a positive rate of 0.2,
as a multi-label test set of N samples x C labels (BigEarthNet: 19 labels).

    python benchmarks/bootstrap_map.py [--sizes 200 2000 10000] [--labels 19] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from visionbench.results import bootstrap as b


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 10000])
    parser.add_argument("--labels", type=int, default=19)
    parser.add_argument("--resamples", type=int, default=1000)
    return parser.parse_args()


def resampled_ci(scores, targets, average: str, n_resamples: int) -> tuple[float, float]:
    """The general path: ``mean_average_precision`` of each resampled (b, N, C) array."""
    return b.bootstrap_ci((scores, targets),
                          lambda s, t: b.mean_average_precision(s, t, average), n_resamples)


def timed(fn, *args) -> tuple[float, tuple[float, float]]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    print(f"{'N x C':>12} {'average':>8} {'resampled s':>12} {'counted s':>10} {'ratio':>7}")
    for n in args.sizes:
        scores = np.round(rng.random((n, args.labels)), 2)
        targets = (rng.random((n, args.labels)) < 0.2).astype(np.int64)
        for average in ("macro", "micro"):
            slow, slow_ci = timed(resampled_ci, scores, targets, average, args.resamples)
            fast, fast_ci = timed(b.map_ci, scores, targets, average, args.resamples)
            if not np.allclose(slow_ci, fast_ci, rtol=0, atol=1e-9):
                raise SystemExit(f"the two paths disagree at N={n} {average}: "
                                 f"{slow_ci} vs {fast_ci}")
            print(f"{f'{n} x {args.labels}':>12} {average:>8} {slow:12.2f} {fast:10.2f} "
                  f"{slow / fast:6.1f}x")


if __name__ == "__main__":
    main()
