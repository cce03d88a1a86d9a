"""Packed sequences/s of the full retrieval-augmented CM3 training pipeline, per Grain worker count.

    python bench/pipeline.py [--num_documents 20000] [--image_side 16] [--seq_len 1024]
                             [--worker_counts 0,1,2] [--seconds 15] [--profile] [--mix]

The data is built here through the real path: shapes-world captions (a BPE model trained on
them) and random VQ codes (no trained VQ needed for throughput) go through `prepare.prepare`'s
TFDS builder into ArrayRecord; random unit embeddings go through `neighbours.build_neighbours`
(ScaNN + the paper's selection) into the neighbour sidecar. Default shapes: 16x16 = 256 image
codes per document (a 128x128 image at CM3Leon's f8) + a ~24-token caption, so, as in CM3Leon
(~1,100-token documents in 4,096-token rows), a query with its neighbours about fills one
row; `max_length` drops the lowest-ranked neighbour when three do not fit.

Then `data_pipeline.make_train_iterator` (data.source="cm3": ArrayRecord reads -> neighbour join
by random access -> layout -> condition dropout -> CM3 masking -> packing) is timed for each
`data.worker_count` (0 = in this process; W > 0 = W Grain worker processes), after a warm-up
that includes the workers' start-up. Figures: packed rows/s, tokens/s (row slots and non-padding
tokens) and rows/s per worker (the in-process run counts as one). `--profile` prints cProfile of
the in-process path. The machine is shared: timings swing; the in-process run also reports rows
per CPU-second of this process, which other jobs disturb less. The last line printed is one JSON
object with every figure.
"""
from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", "/tmp/cm3leon_bench_pipeline", "where the bench data is built (reused if there)")
flags.DEFINE_integer("num_documents", 20_000, "train documents", lower_bound=1)
flags.DEFINE_integer("image_side", 16, "image codes per side (256 codes per document)", lower_bound=1)
flags.DEFINE_integer("num_image_codes", 8192, "VQ codebook size", lower_bound=1)
flags.DEFINE_integer("seq_len", 1024, "packed row length", lower_bound=1)
flags.DEFINE_integer("global_batch_size", 8, "rows per batch (one packing stream per row)", lower_bound=1)
flags.DEFINE_list("worker_counts", ["0", "1", "2"], "data.worker_count values to time (0 = in-process)")
flags.DEFINE_float("seconds", 15.0, "timed seconds per worker count (after warm-up)")
flags.DEFINE_integer("warmup_batches", 5, "untimed batches first (worker start-up included)", lower_bound=0)
flags.DEFINE_bool("profile", False, "print cProfile of the in-process pipeline")
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_bool("mix", False, "also time the in-process pipeline on a two-dataset mixture (the data and a copy of "
                  "it, data.mix_with weight 1:1), alternating with the plain pipeline: the mixture's cost as a ratio")

FLAGS = flags.FLAGS

from bench import flag_checks  # noqa: E402

flag_checks.int_list("worker_counts", minimum=0)
flags.register_validator("seconds", lambda s: s > 0, "--seconds must be > 0")

import numpy as np  # noqa: E402

from bench import synthetic_documents  # noqa: E402

import data_pipeline  # noqa: E402
from cm3leon_jax.config_defaults import base_config  # noqa: E402
from data_pipeline import neighbours, prepare  # noqa: E402


def build_data(data_dir: str, num_documents: int, image_side: int, num_image_codes: int, seed: int) -> dict:
    """Documents (real ingestion, random codes) + neighbour sidecar; returns the data's shape."""
    marker = os.path.join(data_dir, "bench_data.json")
    wanted = {"num_documents": num_documents, "image_side": image_side, "num_image_codes": num_image_codes,
              "seed": seed}
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            shape = json.load(f)
        if shape["config"] == wanted:
            print(f"reusing bench data in {data_dir}", flush=True)
            return shape
        # another build's: ingesting over it reused its documents (TFDS keeps a finished dataset), timed as these
        shutil.rmtree(data_dir)
        os.makedirs(data_dir)
    vocab = synthetic_documents.ingest_random_code_documents(data_dir, num_documents, image_side, num_image_codes,
                                                             seed)
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    emb = rng.standard_normal((num_documents, 64), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    def query(noise: float) -> np.ndarray:
        q = emb + noise * rng.standard_normal(emb.shape, dtype=np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    has = np.ones(num_documents, bool)
    stats = neighbours.build_neighbours(data_dir, emb, query(0.3), query(0.3), has, has)
    print(f"neighbours in {time.perf_counter() - t0:.1f}s: mean {stats['mean_neighbours']:.2f} per document",
          flush=True)

    docs = prepare.load_documents(data_dir, "train")
    lengths = np.array([len(docs[i]["tokens"]) for i in range(min(len(docs), 2000))])
    shape = {"config": wanted, "vocab_size": vocab.padded_size(), "mean_document_tokens": float(lengths.mean()),
             "mean_caption_tokens": float(lengths.mean() - image_side * image_side - 2),
             "mean_neighbours": stats["mean_neighbours"]}
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(shape, f)
    return shape


def pipeline_config(data_dir: str, vocab_size: int, worker_count: int):
    config = base_config()
    config.seed = FLAGS.seed
    config.model.vocab_size = vocab_size
    config.data.update(source="cm3", data_dir=data_dir, seq_len=FLAGS.seq_len,
                       global_batch_size=FLAGS.global_batch_size, worker_count=worker_count)
    return config


def time_pipeline(config, seconds: float, profile: bool = False) -> dict:
    it = data_pipeline.make_train_iterator(config, 0, 1)
    t0 = time.perf_counter()
    for _ in range(FLAGS.warmup_batches):
        next(it)
    warmup = time.perf_counter() - t0
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    rows = real = batches = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        batches += 1
        rows += batch["inputs"].shape[0]
        real += int((batch["segment_ids"] > 0).sum())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    it.close()
    return {"batches": batches, "seconds": round(elapsed, 2), "warmup_seconds": round(warmup, 2),
            "sequences_per_second": round(rows / elapsed, 1),
            # this process's CPU time: with workers it only waits, in-process it is the whole cost
            "main_process_cpu_seconds": round(cpu, 2),
            "tokens_per_second": round(rows * config.data.seq_len / elapsed),
            "real_tokens_per_second": round(real / elapsed),
            "fill": round(real / max(rows * config.data.seq_len, 1), 3),
            "skipped": dict(it.skipped)}


def mixture_copy(data_dir: str) -> str:
    """A copy of the bench data (the mixture's second dataset), made again when the data was rebuilt
    with other settings: an old copy mixed other documents in (or failed the vocabulary check)."""
    copy = data_dir.rstrip("/") + "_mix_copy"

    def marker(d):
        path = os.path.join(d, "bench_data.json")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    if marker(copy) is None or marker(copy) != marker(data_dir):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(data_dir, copy)
    return copy


def time_mixture(shape: dict, rounds: int = 2) -> dict:
    """In-process rows/s of the plain pipeline and of a 1:1 mixture of the data with a copy of it
    (`data.mix_with`), alternated `rounds` times so both see the same machine; best of each."""
    copy = mixture_copy(FLAGS.workdir)
    plain = pipeline_config(FLAGS.workdir, shape["vocab_size"], 0)
    mixed = pipeline_config(FLAGS.workdir, shape["vocab_size"], 0)
    mixed.data.mix_with = f"{copy}=1"
    best = {"plain": 0.0, "mixed": 0.0}
    for _ in range(rounds):
        for name, config in (("plain", plain), ("mixed", mixed)):
            best[name] = max(best[name], time_pipeline(config, FLAGS.seconds)["sequences_per_second"])
    ratio = best["mixed"] / best["plain"]
    print(f"mixture of 2 datasets: {best['mixed']:,.1f} rows/s against {best['plain']:,.1f} plain ({ratio:.3f}x)",
          flush=True)
    return {"plain_sequences_per_second": best["plain"], "mixed_sequences_per_second": best["mixed"],
            "ratio": round(ratio, 3)}


def main(argv):
    flag_checks.no_arguments(argv)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    shape = build_data(FLAGS.workdir, FLAGS.num_documents, FLAGS.image_side, FLAGS.num_image_codes, FLAGS.seed)
    print(f"data: {shape}", flush=True)
    results = {}
    for workers in (int(w) for w in FLAGS.worker_counts):
        config = pipeline_config(FLAGS.workdir, shape["vocab_size"], workers)
        r = time_pipeline(config, FLAGS.seconds, profile=FLAGS.profile and workers == 0)
        r["sequences_per_second_per_worker"] = round(r["sequences_per_second"] / max(workers, 1), 1)
        if workers == 0:  # less sensitive to other jobs on a shared machine than the wall-clock rate
            r["sequences_per_cpu_second"] = round(r["batches"] * FLAGS.global_batch_size / r["main_process_cpu_seconds"], 1)
        results[str(workers)] = r
        print(f"workers={workers}: {r['sequences_per_second']:8,.1f} rows/s of {FLAGS.seq_len}  "
              f"({r['sequences_per_second_per_worker']:,.1f} per worker, {r['real_tokens_per_second']:,} "
              f"non-pad tokens/s, fill {r['fill']:.2f}, warm-up {r['warmup_seconds']}s)", flush=True)
    mixture = time_mixture(shape) if FLAGS.mix else None
    summary = {
        "bench": "pipeline", "seq_len": FLAGS.seq_len, "global_batch_size": FLAGS.global_batch_size,
        "data": shape, "target": {"sequences_per_second_per_worker": 1000},
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0], "worker_counts": results,
        **({"mixture": mixture} if mixture else {}),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
