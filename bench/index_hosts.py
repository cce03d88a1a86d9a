"""The neighbour index built by one host and split over H hosts, side by side: each stage's seconds,
peak memory and files, and whether the sidecars are equal.

    python bench/index_hosts.py [--num_documents 100000] [--dim 512] [--hosts 2,4] [--num_shards 4]
                                [--candidates 128] [--clusters 1000] [--workdir /tmp/cm3leon_bench_index_hosts]

Documents come through the real ingestion (bench/synthetic_documents.py: shapes captions, random
VQ codes); their embeddings are a user's `--embeddings` file of clustered unit vectors (random
centres, each document a centre plus noise, so the index has structure to find, as real embeddings
do). Every run is a fresh copy of the documents and the real CLI, one process per stage and host:

- one host: `python -m data_pipeline.index --data D --embeddings E --num_shards S`;
- H hosts: `--stage embed|search|select --num_hosts H --host_index h` for every h (run one after
  another here: on a cluster they run at once), then `--stage finish`.

Per stage and host: wall seconds and peak resident memory (the child's own `VmHWM`, read as it
exits; it counts pages of memory-mapped files the process touched, which the kernel can drop)
and the bytes the stage wrote. A stage's time on a cluster is its slowest host, so the H-host
figure compared with the one-host run is the sum over stages of the slowest host (`critical_path`),
beside the work summed over hosts (`host_seconds`). `equal` checks the sidecar's ids and scores
against the one-host run's (they must be equal while --candidates covers the one-host run's widest
search). The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", "/tmp/cm3leon_bench_index_hosts", "where the documents and the runs go (documents "
                    "reused if there)")
flags.DEFINE_integer("num_documents", 100_000, "train documents", lower_bound=1)
flags.DEFINE_integer("dim", 512, "embedding dimension (CLIP ViT-B: 512)", lower_bound=1)
flags.DEFINE_integer("clusters", 1000, "centres the embeddings are drawn around", lower_bound=1)
flags.DEFINE_float("noise", 1.0, "each embedding = normalise(centre + noise * a random unit vector)", lower_bound=0.0)
flags.DEFINE_list("hosts", ["2", "4"], "host counts to split the build over")
flags.DEFINE_integer("num_shards", 4, "ScaNN shards (the same for every run, so the sidecars can be compared)",
                     lower_bound=1)
flags.DEFINE_integer("candidates", 128, "--candidates of the search stage", lower_bound=1)
flags.DEFINE_integer("image_side", 4, "image codes per side (the index does not look at them)", lower_bound=1)
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_bool("keep_runs", False, "keep each run's copy of the data (default: removed once measured)")

FLAGS = flags.FLAGS

from bench import flag_checks  # noqa: E402

flag_checks.int_list("hosts")


def _shards_for_every_host(values) -> bool:
    try:
        return all(int(h) <= values["num_shards"] for h in values["hosts"])
    except ValueError:   # not integers: int_list says so
        return False


flags.register_multi_flags_validator(["hosts", "num_shards"], _shards_for_every_host, "--hosts: every host count "
                                     "must be <= --num_shards (each host builds and searches at least one shard)")

import numpy as np  # noqa: E402

from bench import synthetic_documents  # noqa: E402
from data_pipeline import index_parts, neighbours  # noqa: E402

STAGES = ("embed", "search", "select", "finish")


def documents(data_dir: str) -> str:
    """The ingested documents and the embeddings file, built once and reused."""
    marker = os.path.join(data_dir, "bench_index_hosts.json")
    wanted = {"num_documents": FLAGS.num_documents, "dim": FLAGS.dim, "clusters": FLAGS.clusters,
              "noise": FLAGS.noise, "image_side": FLAGS.image_side, "seed": FLAGS.seed}
    embeddings = os.path.join(data_dir, "embeddings.npy")
    if os.path.exists(marker) and read_json(marker) == wanted:
        print(f"reusing documents in {data_dir}", flush=True)
        return embeddings
    shutil.rmtree(data_dir, ignore_errors=True)
    synthetic_documents.ingest_random_code_documents(os.path.join(data_dir, "documents"), FLAGS.num_documents,
                                                     FLAGS.image_side, 8192, FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed + 1)
    centres = rng.standard_normal((FLAGS.clusters, FLAGS.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(embeddings, "w+", np.float32, (FLAGS.num_documents, FLAGS.dim))
    for a in range(0, FLAGS.num_documents, 65536):
        b = min(a + 65536, FLAGS.num_documents)
        noise = rng.standard_normal((b - a, FLAGS.dim), dtype=np.float32)
        x = centres[rng.integers(0, FLAGS.clusters, b - a)] + FLAGS.noise * noise / np.linalg.norm(
            noise, axis=1, keepdims=True)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(wanted, f)
    return embeddings


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# `python -m data_pipeline.index` writing its peak RSS (KiB) to $BENCH_PEAK_FILE as it exits. Not the
# child's ru_maxrss: exec carries the parent's high-water mark into it, so every stage read at least
# this bench's own peak (the documents' ingestion included).
PEAK_WRAPPER = """
import atexit, os, runpy
def _peak():
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(kib)
atexit.register(_peak)
runpy.run_module("data_pipeline.index", run_name="__main__", alter_sys=True)
"""


def run_stage(args: list[str], log_path: str) -> dict:
    """One CLI process: its wall seconds and peak resident memory (MiB)."""
    peak_file = log_path + ".peak"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), BENCH_PEAK_FILE=peak_file)
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds = round(time.perf_counter() - t0, 2)
    if proc.returncode:
        raise RuntimeError(f"`python -m data_pipeline.index {' '.join(args)}` failed ({proc.returncode}): see {log_path}")
    with open(peak_file, encoding="utf-8") as f:
        peak_kib = int(f.read())
    os.remove(peak_file)
    return {"seconds": seconds, "peak_rss_mib": round(peak_kib / 1024, 1)}


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def fresh_copy(source: str, name: str) -> str:
    target = os.path.join(FLAGS.workdir, "runs", name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def one_host(source: str, embeddings: str) -> tuple[dict, str]:
    data = fresh_copy(source, "one_host")
    stage = run_stage(["--data", data, "--embeddings", embeddings, "--num_shards", str(FLAGS.num_shards)],
                      os.path.join(data, "bench.log"))
    stats = read_json(os.path.join(data, neighbours.NEIGHBOURS_JSON))["stats"]
    return {**stage, "index_bytes": tree_bytes(os.path.join(data, "scann_index")),
            "widened_searches": stats["widened_searches"], "max_candidates": stats.get("max_candidates"),
            "mean_neighbours": round(stats["mean_neighbours"], 3)}, data


def split_over(hosts: int, source: str, embeddings: str, reference: str) -> dict:
    data = fresh_copy(source, f"hosts_{hosts}")
    log = os.path.join(data, "bench.log")
    stages = {}
    for stage in STAGES:
        if stage == "finish":
            runs = [run_stage(["--data", data, "--stage", "finish"], log)]
        else:
            extra = {"embed": ["--embeddings", embeddings],
                     "search": ["--num_shards", str(FLAGS.num_shards), "--candidates", str(FLAGS.candidates)],
                     "select": []}[stage]
            runs = [run_stage(["--data", data, "--stage", stage, "--num_hosts", str(hosts), "--host_index", str(h),
                               *extra], log) for h in range(hosts)]
        written = (sum(os.path.getsize(os.path.join(data, f)) for f in (neighbours.NEIGHBOURS_IDS,
                   neighbours.NEIGHBOURS_SCORES, neighbours.NEIGHBOURS_JSON)) if stage == "finish"
                   else tree_bytes(os.path.join(data, index_parts.WORK_DIR, stage)))
        stages[stage] = {
            "seconds": [r["seconds"] for r in runs], "peak_rss_mib": [r["peak_rss_mib"] for r in runs],
            "slowest_seconds": max(r["seconds"] for r in runs), "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "bytes": written}
        print(f"[{hosts} hosts] {stage}: {stages[stage]}", flush=True)
    equal = all(np.array_equal(np.load(os.path.join(data, f)), np.load(os.path.join(reference, f)))
                for f in (neighbours.NEIGHBOURS_IDS, neighbours.NEIGHBOURS_SCORES))
    stats = read_json(os.path.join(data, neighbours.NEIGHBOURS_JSON))["stats"]
    result = {"stages": stages, "critical_path_seconds": round(sum(s["slowest_seconds"] for s in stages.values()), 2),
              "host_seconds": round(sum(sum(s["seconds"]) for s in stages.values()), 2),
              "max_peak_rss_mib": max(s["max_peak_rss_mib"] for s in stages.values()),
              "parts_bytes": tree_bytes(os.path.join(data, index_parts.WORK_DIR)),
              "equal_to_one_host": bool(equal), "widened_searches": stats["widened_searches"]}
    if not FLAGS.keep_runs:
        shutil.rmtree(data)
    return result


def main(argv):
    flag_checks.no_arguments(argv)
    embeddings = documents(FLAGS.workdir)
    source = os.path.join(FLAGS.workdir, "documents")
    print(f"one host, {FLAGS.num_shards} shards ...", flush=True)
    single, reference = one_host(source, embeddings)
    print(f"[1 host] {single}", flush=True)
    split = {}
    for hosts in (int(h) for h in FLAGS.hosts):
        split[str(hosts)] = split_over(hosts, source, embeddings, reference)
        r = split[str(hosts)]
        print(f"[{hosts} hosts] critical path {r['critical_path_seconds']}s (one host {single['seconds']}s), "
              f"work {r['host_seconds']}s, peak {r['max_peak_rss_mib']} MiB (one host {single['peak_rss_mib']}), "
              f"parts {r['parts_bytes'] / 2 ** 20:.0f} MiB, equal: {r['equal_to_one_host']}", flush=True)
    if not FLAGS.keep_runs:
        shutil.rmtree(reference)
    print(json.dumps({
        "bench": "index_hosts", "num_documents": FLAGS.num_documents, "dim": FLAGS.dim, "clusters": FLAGS.clusters,
        "noise": FLAGS.noise, "num_shards": FLAGS.num_shards, "candidates": FLAGS.candidates,
        "embeddings_bytes": os.path.getsize(embeddings), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0], "one_host": single, "hosts": split}))


if __name__ == "__main__":
    app.run(main)
