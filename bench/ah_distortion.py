"""The scan-and-reorder bound for 4-bit asymmetric hashing on random vectors (WORKSPACE.md, ScaNN on
random vectors).

    python bench/ah_distortion.py [--dims_per_block 2,4,6,8] [--points 200000] [--scanned 900000]

For each block size b: k-means with 16 centres (4-bit codes) on Gaussian b-d blocks (a random unit
vector's coordinates, rescaled) gives D, the fraction of a vector's variance the codes miss. A
true top-10 neighbour at 4.26 standard deviations then has a hashed score of
4.26 sqrt(1 - D) +- sqrt(D) standard deviations against the rest's N(0, 1), so keeping 95% of the
neighbours takes a reorder of R = n Q(4.26 sqrt(1 - D) - 1.645 sqrt(D)) of n scanned points. The
last line printed is one JSON object with D and R per block size.
"""
from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list("dims_per_block", ["2", "4", "6", "8"], "hashing block sizes")
flags.DEFINE_integer("points", 200_000, "Gaussian blocks k-means is trained on (>= its 16 centres)", lower_bound=16)
flags.DEFINE_integer("iterations", 60, "Lloyd iterations", lower_bound=0)
flags.DEFINE_integer("scanned", 900_000, "points scanned (90% of 1M)", lower_bound=1)
flags.DEFINE_float("neighbour_sigma", 4.26, "a true top-10 neighbour's score in standard deviations (1M points)")
flags.DEFINE_integer("seed", 0, "data seed")
FLAGS = flags.FLAGS

from bench import flag_checks  # noqa: E402

flag_checks.int_list("dims_per_block")

import numpy as np  # noqa: E402


def distortion(dim: int, points: int, iterations: int, rng: np.random.Generator) -> float:
    """Fraction of the variance 16 k-means centres miss on Gaussian `dim`-d blocks."""
    x = rng.standard_normal((points, dim)).astype(np.float32)
    centres = x[rng.choice(points, 16, replace=False)]
    for _ in range(iterations + 1):
        assign = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        if _ == iterations:
            break
        centres = np.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(16)])
    return float(((x - centres[assign]) ** 2).sum() / (x ** 2).sum())


def main(argv):
    flag_checks.no_arguments(argv)
    rng = np.random.default_rng(FLAGS.seed)
    out = {}
    for b in map(int, FLAGS.dims_per_block):
        d = distortion(b, FLAGS.points, FLAGS.iterations, rng)
        cutoff = FLAGS.neighbour_sigma * math.sqrt(1 - d) - 1.645 * math.sqrt(d)
        reorder = FLAGS.scanned * 0.5 * math.erfc(cutoff / math.sqrt(2))
        out[b] = {"distortion": round(d, 3), "cutoff_sigma": round(cutoff, 2), "reorder_for_95pct": round(reorder)}
        print(f"{b}-d blocks: D = {d:.3f}, reorder {reorder:,.0f} of {FLAGS.scanned:,}", flush=True)
    print(json.dumps({"bench": "ah_distortion", "scanned": FLAGS.scanned, "dims_per_block": out}))


if __name__ == "__main__":
    app.run(main)
