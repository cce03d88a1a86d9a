"""ScaNN queries/s and recall@10 against exact brute-force search, on random unit vectors.

    python bench/retrieval.py [--sizes 100000,1000000] [--dim 512] [--num_queries 1000]
                              [--fractions 0.85,0.9,0.95] [--reorders 10000,20000] [--dims_per_block 4]
                              [--noscale_reorders]
                              [--mode tree_ah|ah] [--reorder_quantize int8|bfloat16|float32] [--rescore 50] [--avq 2.5]

Random unit vectors in 512-d are the hardest case for approximate search: every point is nearly
orthogonal to every other, so k-means partitions carry little information about where the true
neighbours are (~85-90% of the leaves must be searched for recall@10 0.95 at 1M) and the speed can
only come from cheaper scoring per point. Each size: build ScaNN (tree ~ leaves_per_sqrt * sqrt(N)
leaves, anisotropic 4-bit hashing over 4-d blocks (half the scan of 2-d blocks), a large reorder
in int8 (a quarter of the float bytes per candidate), then ScaNN's final 50 candidates rescored
exactly in float in numpy, timed with the search, so the final ranking is exact), time exact brute
force (numpy BLAS matmul + argpartition in query batches: it also gives the ground truth) in the
same run, then sweep leaves_to_search (as a fraction of the leaves) x reorder size (given for 1M
points, scaled by sqrt(size / 1M)), timing each
point (best of --repeats) with ScaNN's parallel batched search, and timing one brute-force
batch right after it (best of as many repeats): each point's speedup is against that side-by-side
brute-force figure. `--mode ah` drops the tree (hashing over every point).
The figure reported per size is the fastest point reaching --target_recall (or the best recall if
none does). The machine is shared: timings swing; both sides are measured side by side for that
reason, and each point records the load average. The last line printed is one JSON object with
every figure.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list("sizes", ["100000", "1000000"], "bank sizes")
flags.DEFINE_integer("dim", 512, "vector dimension", lower_bound=1)
flags.DEFINE_integer("num_queries", 1000, "random unit queries (not from the bank)", lower_bound=1)
flags.DEFINE_integer("k", 10, "recall@k", lower_bound=1)
flags.DEFINE_float("target_recall", 0.95, "recall@k the reported figure must reach", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_list("fractions", ["0.85", "0.9", "0.95"], "leaves_to_search / num_leaves values")
flags.DEFINE_list("reorders", ["10000", "20000"], "pre-reorder candidate counts (for 1M points: see "
                  "--scale_reorders)")
flags.DEFINE_bool("scale_reorders", True, "scale --reorders by sqrt(size / 1M): the hashed score's rank of a "
                  "true neighbour grows with the bank, though less than in proportion (measured: 100k with a "
                  "tenth of the 1M reorder stays below recall 0.95)")
flags.DEFINE_float("leaves_per_sqrt", 1.0, "num_leaves = this * sqrt(N) (at least 16)", lower_bound=0.0)
flags.DEFINE_float("soar_lambda", 0.0, "SOAR spilling lambda (<= 0: no spilling; 1.5 raises recall per leaf "
                   "searched but costs more per leaf: no better here on random data)")
flags.DEFINE_float("avq", 0.0, "> 0: ScaNN's anisotropic vector quantization of the tree's leaf centres with this "
                   "eta (2.5: a little more recall per leaf searched on random data)")
flags.DEFINE_integer("dims_per_block", 4, "asymmetric hashing: dimensions per 4-bit block (2: twice the scan "
                     "cost, far fewer candidates to reorder)", lower_bound=1)
flags.DEFINE_enum("hash_type", "lut16", ["lut16", "lut256"], "AH codes: 16 centres per block (4 bits, scored by "
                  "in-register shuffles) or 256 (8 bits, table lookups): with --dims_per_block 8, lut256 spends the "
                  "same bytes per point as lut16 over 4-d blocks")
flags.DEFINE_enum("mode", "tree_ah", ["tree_ah", "ah"], "tree_ah: k-means tree + AH; ah: AH over every point "
                  "(no tree: --fractions and --leaves_per_sqrt are then ignored)")
flags.DEFINE_float("anisotropic_threshold", 0.2, "AH anisotropic quantization threshold (< 0: none)")
flags.DEFINE_enum("reorder_quantize", "int8", ["float32", "int8", "bfloat16"],
                  "ScaNN reordering precision (int8/bfloat16: a quarter/half of the float bytes per candidate)")
flags.DEFINE_integer("rescore", 50, "> k: ScaNN returns this many reordered candidates, rescored exactly in float "
                     "(numpy, timed with the search): exact final ranking after a quantized reorder", lower_bound=0)
flags.DEFINE_integer("search_batch", 256, "queries per ScaNN batch (search_batched_parallel)", lower_bound=1)
flags.DEFINE_integer("repeats", 2, "timed repeats per point (best taken)", lower_bound=1)
flags.DEFINE_integer("bf_batch", 250, "brute-force query batch", lower_bound=1)
flags.DEFINE_integer("seed", 0, "data seed")

FLAGS = flags.FLAGS

from bench import flag_checks  # noqa: E402

flag_checks.int_list("sizes")
flag_checks.float_list("fractions", 0.0, 1.0)
flag_checks.int_list("reorders")


def _banks_hold_k(values) -> bool:
    try:
        return all(int(s) >= values["k"] for s in values["sizes"])
    except ValueError:   # not integers: int_list says so
        return True


flags.register_multi_flags_validator(["sizes", "k"], _banks_hold_k, "--sizes: every bank must hold at least --k points")

import numpy as np  # noqa: E402

from data_pipeline import neighbours as NB  # noqa: E402


def random_unit(n: int, d: int, rng: np.random.Generator, chunk: int = 65536) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - a), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:a + x.shape[0]] = x
    return out


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float]:
    """Exact top-k (ids as a set per query: order irrelevant for recall) and its queries/s."""
    ids = np.empty((queries.shape[0], k), np.int64)
    start = time.perf_counter()
    for a in range(0, queries.shape[0], batch):
        s = queries[a:a + batch] @ bank.T
        ids[a:a + batch] = np.argpartition(-s, k - 1, axis=1)[:, :k]
    seconds = time.perf_counter() - start
    return ids, queries.shape[0] / seconds


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(a[a >= 0].tolist()) & set(b.tolist())) for a, b in zip(found, truth))
    return hits / (k * truth.shape[0])


def reorders(n: int) -> list[int]:
    scale = math.sqrt(n / 1_000_000) if FLAGS.scale_reorders else 1.0
    return [max(FLAGS.k, int(round(int(r) * scale))) for r in FLAGS.reorders]


def bench_size(n: int, rng: np.random.Generator) -> dict:
    d, k = FLAGS.dim, FLAGS.k
    t0 = time.perf_counter()
    bank = random_unit(n, d, rng)
    queries = random_unit(FLAGS.num_queries, d, rng)
    print(f"[{n:,}] data {time.perf_counter() - t0:.1f}s", flush=True)

    truth, bf_qps = brute_force(bank, queries, k, FLAGS.bf_batch)
    print(f"[{n:,}] brute force: {bf_qps:,.1f} queries/s", flush=True)

    leaves = int(max(16, round(FLAGS.leaves_per_sqrt * math.sqrt(n))))
    params = NB.scann_params(n, k=k, num_leaves=leaves, leaves_to_search=leaves,
                             dims_per_block=FLAGS.dims_per_block,
                             soar_lambda=FLAGS.soar_lambda if FLAGS.soar_lambda > 0 else None,
                             avq=FLAGS.avq if FLAGS.avq > 0 else None,
                             anisotropic_quantization_threshold=(FLAGS.anisotropic_threshold
                                                                 if FLAGS.anisotropic_threshold >= 0 else None),
                             reorder_quantize=FLAGS.reorder_quantize,
                             rescore=FLAGS.rescore if FLAGS.rescore > k else 0,
                             reorder=max(reorders(n)), hash_type=FLAGS.hash_type)
    if FLAGS.mode == "ah":
        params["mode"] = "ah"
        leaves = 1
    t0 = time.perf_counter()
    index = NB.ScannIndex.build(bank, params=params, k=k)
    build_seconds = time.perf_counter() - t0
    print(f"[{n:,}] ScaNN build {build_seconds:.1f}s: {params}", flush=True)

    index.search(queries[:100], k, leaves_to_search=max(1, leaves // 2), batch_size=FLAGS.search_batch)   # warm-up
    sweep = []
    for fraction in (float(f) for f in (FLAGS.fractions if FLAGS.mode == "tree_ah" else ["1.0"])):
        to_search = max(1, int(round(fraction * leaves)))
        for reorder in reorders(n):
            best = math.inf
            for _ in range(FLAGS.repeats):
                t0 = time.perf_counter()
                ids, _ = index.search(queries, k, leaves_to_search=to_search, reorder=reorder,
                                      batch_size=FLAGS.search_batch)
                best = min(best, time.perf_counter() - t0)
            qps = queries.shape[0] / best
            # brute force again right now, on one batch, best of as many repeats as ScaNN had: the
            # load on a shared machine drifts, so the speedup compares the two measured side by side
            bf_now = max(brute_force(bank, queries[:FLAGS.bf_batch], k, FLAGS.bf_batch)[1]
                         for _ in range(FLAGS.repeats))
            point = {"leaves_to_search": to_search, "fraction": fraction, "reorder": reorder,
                     "recall": round(recall(ids, truth), 4), "qps": round(qps, 1),
                     "brute_force_qps": round(bf_now, 1), "speedup": round(qps / bf_now, 2),
                     "load_average": round(os.getloadavg()[0], 2)}
            sweep.append(point)
            print(f"[{n:,}] {point}", flush=True)
    reaching = [p for p in sweep if p["recall"] >= FLAGS.target_recall]
    chosen = max(reaching, key=lambda p: p["qps"]) if reaching else max(sweep, key=lambda p: (p["recall"], p["qps"]))
    # the best speedup at any recall >= 0.9, for the trade-off picture
    near = [p for p in sweep if p["recall"] >= 0.9]
    result = {
        "size": n, "dim": d, "num_queries": int(queries.shape[0]), "k": k,
        "brute_force_qps": round(bf_qps, 1), "build_seconds": round(build_seconds, 1),
        "mode": params["mode"], "num_leaves": leaves if params["mode"] == "tree_ah" else None,
        "soar_lambda": params["soar_lambda"], "avq": params["avq"], "dims_per_block": params["dims_per_block"], "hash_type": params["hash_type"],
        "anisotropic_quantization_threshold": params["anisotropic_quantization_threshold"],
        "reorder_quantize": params["reorder_quantize"], "rescore": params["rescore"],
        "search_batch": FLAGS.search_batch,
        "best": chosen, "reaches_target_recall": bool(reaching),
        # the targets are stated at 1M points: a smaller bank reaching them does not meet them
        "meets_targets": bool(reaching) and chosen["speedup"] >= 10.0 and n >= 1_000_000,
        "best_speedup_at_recall_0.9": max((p["speedup"] for p in near), default=None),
        "sweep": sweep,
    }
    del index, bank
    return result


def main(argv):
    flag_checks.no_arguments(argv)
    rng = np.random.default_rng(FLAGS.seed)
    results = {}
    for size in (int(s) for s in FLAGS.sizes):
        results[str(size)] = bench_size(size, rng)
    summary = {
        "bench": "retrieval",
        "target": {"recall_at_10": FLAGS.target_recall, "speedup_at_1M": 10.0},
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "sizes": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
