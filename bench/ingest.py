"""Ingestion in parts vs one run, side by side: documents/s of `prepare` and of the merge.

    python bench/ingest.py [--num_documents 4000] [--parts 2] [--repeats 1]

The source is a JSONL manifest of shapes-world PNGs (64 px, e2e_tiny's size) with their captions,
written here once; the text tokenizer is a BPE model trained on shapes captions and the VQ
encoder is `experiments/vq_tiny.py`'s architecture at random weights (the same compute as a
trained one, no training needed). Each timed run is a fresh process, as a host would run it:
one run of the whole source (`prepare.prepare`), then `--parts` processes at once, each ingesting
its part (`--num_shards P --shard_index I`), then `ingest_parts.merge_parts` in one process and in
P (`--merge_workers`, files of --merge_file_mb); the merged dataset is checked equal to the single
run's, document by document. On one machine the parts share its
cores, so their speed-up is bounded by the cores the single run left idle (PNG decoding and
tokenization are single-threaded; the VQ encoder is not); on P hosts each part has its own. The
last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", "/tmp/cm3leon_bench_ingest", "where the manifest and outputs go (manifest reused)")
flags.DEFINE_integer("num_documents", 4000, "manifest rows (images)")
flags.DEFINE_integer("parts", 2, "parts ingested at once")
flags.DEFINE_integer("repeats", 1, "timed rounds (single run, then parts + merge, each round)")
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_float("merge_file_mb", 1.0, "merged file size (MB of stored records; the CLI's is 256): small here so "
                   "this bench's few MB make several files, written by 1 and then by --parts processes")

FLAGS = flags.FLAGS

IMAGE_SIZE = 64


def build_source(root: str, num_documents: int, seed: int) -> tuple[str, str]:
    """The manifest and the BPE model, reused when already there."""
    from PIL import Image

    from cm3leon_jax import text_tokenizer
    from data_pipeline import shapes_world
    manifest, spm = os.path.join(root, "manifest.jsonl"), os.path.join(root, "spm", "spm")
    marker = os.path.join(root, "source.json")
    wanted = {"num_documents": num_documents, "seed": seed}
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == wanted:
                return manifest, spm + ".model"
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "images"))
    world = shapes_world.ShapesWorld(shapes_world.ShapesWorldConfig(image_size=IMAGE_SIZE, seed=seed), "train")
    with open(manifest, "w", encoding="utf-8") as f:
        for i in range(num_documents):
            ex = world[i]
            path = os.path.join("images", f"{i:06d}.png")
            Image.fromarray(ex["image"]).save(os.path.join(root, path))
            f.write(json.dumps({"image": path, "text": ex["caption"]}) + "\n")
    text_tokenizer.train_sentencepiece(text_tokenizer.shapes_captions(5000, seed=seed), spm, vocab_size=1000)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(wanted, f)
    return manifest, spm + ".model"


def _ingest(manifest: str, spm: str, out: str, shard_index: int, num_shards: int, queue) -> None:
    """One process's ingestion (a host's run): seconds spent inside `prepare.prepare`."""
    import jax

    from cm3leon_jax import text_tokenizer, vocab as vocab_lib, vqgan
    from cm3leon_jax.vq_tokenizer import VQTokenizer
    from data_pipeline import prepare
    from experiments import data_shapes, vq_tiny
    vq_config = vqgan.VQGANConfig.from_config(vq_tiny.get_config().vq)
    vq = VQTokenizer(vqgan.init_params(jax.random.key(0), vq_config), vq_config)
    vocab = vocab_lib.Vocabulary(text_tokenizer.TextTokenizer(spm), num_image_codes=vq.codebook_size,
                                 image_tokens_per_image=vq.tokens_per_image, num_sentinels=16,
                                 image_grid=(vq.latent_size, vq.latent_size))
    vq.encode(prepare.load_image(os.path.join(os.path.dirname(manifest), "images", "000000.png"),
                                 IMAGE_SIZE, 1)[None])   # compiled before the clock starts, as in a long run
    cfg = data_shapes.get_config()
    cfg.update(source="jsonl", jsonl=manifest, validation_fraction=0.0, image_size=IMAGE_SIZE, log_every=10 ** 9)
    start = time.perf_counter()
    prepare.prepare(cfg, out, vocab, vq.encode, shard_index=shard_index, num_shards=num_shards)
    queue.put((shard_index, time.perf_counter() - start))


def _run(processes: list[tuple]) -> tuple[float, list[float]]:
    """Starts the processes at once; (wall seconds, each one's seconds inside prepare)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ingest, args=(*args, queue)) for args in processes]
    start = time.perf_counter()
    for p in procs:
        p.start()
    inside = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"an ingestion process failed with exit code {p.exitcode}")
    return time.perf_counter() - start, [inside[i] for i in sorted(inside)]


def _same_documents(a: str, b: str) -> bool:
    import numpy as np

    from data_pipeline import prepare
    x, y = prepare.load_documents(a, "train"), prepare.load_documents(b, "train")
    return len(x) == len(y) and all(
        all(np.array_equal(np.asarray(x[i][k]), np.asarray(y[i][k])) for k in x[i]) for i in range(len(x)))


def main(argv):
    del argv
    from data_pipeline import ingest_parts, prepare
    ingest_parts.FILE_BYTES = int(FLAGS.merge_file_mb * (1 << 20))
    root = FLAGS.workdir
    t0 = time.perf_counter()
    manifest, spm = build_source(os.path.join(root, "source"), FLAGS.num_documents, FLAGS.seed)
    print(f"source ready in {time.perf_counter() - t0:.1f}s", flush=True)
    n, rounds = FLAGS.num_documents, []
    for r in range(FLAGS.repeats):
        single_out, parts_out = os.path.join(root, "single"), os.path.join(root, "parts")
        shutil.rmtree(single_out, ignore_errors=True)
        shutil.rmtree(parts_out, ignore_errors=True)
        single_wall, (single_inside,) = _run([(manifest, spm, single_out, 0, 1)])
        parts_wall, parts_inside = _run([(manifest, spm, parts_out, i, FLAGS.parts) for i in range(FLAGS.parts)])
        merge_s = {}
        for workers in (1, FLAGS.parts):
            start = time.perf_counter()
            ingest_parts.merge_parts(parts_out, workers=workers)
            merge_s[workers] = time.perf_counter() - start
        num_files = len([f for f in os.listdir(prepare.documents_dir(parts_out)) if ".array_record-" in f])
        same = _same_documents(single_out, parts_out)
        merge = min(merge_s.values())
        row = {"round": r, "single_docs_per_s": n / single_inside, "parts_docs_per_s": n / max(parts_inside),
               "parts_with_merge_docs_per_s": n / (max(parts_inside) + merge),
               "speedup_parts": single_inside / max(parts_inside),
               "speedup_parts_with_merge": single_inside / (max(parts_inside) + merge),
               "merge_files": num_files, "merge_docs_per_s_1_worker": n / merge_s[1],
               f"merge_docs_per_s_{FLAGS.parts}_workers": n / merge_s[FLAGS.parts],
               "single_wall_s": single_wall, "parts_wall_s": parts_wall,
               "same_documents": same, "load_average": os.getloadavg()[0]}
        print(f"round {r}: single {row['single_docs_per_s']:.0f} docs/s; {FLAGS.parts} parts at once "
              f"{row['parts_docs_per_s']:.0f} docs/s ({row['speedup_parts']:.2f}x), with the merge "
              f"{row['parts_with_merge_docs_per_s']:.0f} ({row['speedup_parts_with_merge']:.2f}x); merge of "
              f"{num_files} files: {n / merge_s[1]:.0f} docs/s in 1 process, {n / merge_s[FLAGS.parts]:.0f} in "
              f"{FLAGS.parts}; merged == single run: {same}", flush=True)
        rounds.append(row)
    best = max(rounds, key=lambda x: x["speedup_parts_with_merge"])
    print(json.dumps({"bench": "ingest", "num_documents": n, "parts": FLAGS.parts, "cpu_count": os.cpu_count(),
                      "best": best, "rounds": rounds}))


if __name__ == "__main__":
    app.run(main)
