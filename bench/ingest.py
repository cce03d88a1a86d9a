"""Ingestion in parts vs one run, side by side: documents/s of `prepare` and of the merge.

    python bench/ingest.py [--images shapes|photos] [--encoder vq|random] [--num_documents 4000]
                           [--parts 2] [--repeats 1]

The source is a JSONL manifest written here once: `--images shapes`, shapes-world PNGs at 64 px
(e2e_tiny's size) with their captions; `--images photos`, 640x480 JPEGs (gradients + noise, so
they compress like photographs; numbered captions) centre-cropped and resized to 256 px, the
paper's images from the web. The text tokenizer is a BPE model trained on shapes captions; the
encoder is `--encoder vq`, `experiments/vq_tiny.py`'s architecture at random weights (the same
compute as a trained one; at 256 px its CPU time dwarfs the rest), or `--encoder random`: random
codes, standing for an accelerator's encoder, whose time is small next to decoding.
Each timed run is a fresh process, as a host would run it:
one run of the whole source (`prepare.prepare`) decoding images on one thread (`decode_threads=1`),
the same with the default decoding threads running ahead of the encoder (every later run has
them), then `--parts` processes at once, each ingesting its part (`--num_shards P --shard_index
I`), then `ingest_parts.merge_parts` in one process and in P (`--merge_workers`, files of
--merge_file_mb; after an untimed merge); the merged dataset is checked equal to the single run's,
document by document. On one machine the parts share its cores; on P hosts each part has its own. The last line
printed is one JSON object with every figure.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue as queue_lib
import shutil
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import flag_checks  # noqa: E402

flags.DEFINE_string("workdir", "/tmp/cm3leon_bench_ingest", "where the manifest and outputs go (manifest reused)")
flags.DEFINE_integer("num_documents", 4000, "manifest rows (images)", lower_bound=1)
flags.DEFINE_integer("parts", 2, "parts ingested at once", lower_bound=2)
flags.DEFINE_integer("repeats", 1, "timed rounds (single run, then parts + merge, each round)", lower_bound=1)
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_enum("images", "shapes", ["shapes", "photos"], "64 px shapes PNGs, or 640x480 JPEGs ingested at 256 px")
flags.DEFINE_enum("encoder", "vq", ["vq", "random"], "vq_tiny at random weights, or random codes (an accelerator's "
                  "encoder: next to no time)")
flags.DEFINE_float("merge_file_mb", 1.0, "merged file size (MB of stored records; the CLI's is 256): small here so "
                   "this bench's few MB make several files, written by 1 and then by --parts processes")

FLAGS = flags.FLAGS
flags.register_validator("merge_file_mb", lambda mb: mb > 0, "--merge_file_mb must be > 0")

IMAGE_SIZE = {"shapes": 64, "photos": 256}


def _photo(i: int, rng) -> "np.ndarray":
    import numpy as np
    yy, xx = np.mgrid[0:480, 0:640]
    phase = rng.uniform(0, 6.3, 3)
    base = np.stack([np.sin(xx / (9.0 + i % 13) + phase[0]) * 100 + yy * 0.2,
                     np.cos(yy / (7.0 + i % 11) + phase[1]) * 100 + xx * 0.15,
                     np.sin((xx + yy) / 23.0 + phase[2]) * 120], -1) + 128
    return (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)


def build_source(root: str, images: str, num_documents: int, seed: int) -> tuple[str, str]:
    """The manifest and the BPE model, reused when already there."""
    import numpy as np
    from PIL import Image

    from cm3leon_jax import text_tokenizer
    from data_pipeline import shapes_world
    manifest, spm = os.path.join(root, "manifest.jsonl"), os.path.join(root, "spm", "spm")
    marker = os.path.join(root, "source.json")
    wanted = {"images": images, "num_documents": num_documents, "seed": seed}
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == wanted:
                return manifest, spm + ".model"
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "images"))
    world = shapes_world.ShapesWorld(shapes_world.ShapesWorldConfig(image_size=IMAGE_SIZE["shapes"], seed=seed),
                                     "train")
    rng = np.random.default_rng(seed)
    with open(manifest, "w", encoding="utf-8") as f:
        for i in range(num_documents):
            if images == "shapes":
                ex = world[i]
                path = os.path.join("images", f"{i:06d}.png")
                Image.fromarray(ex["image"]).save(os.path.join(root, path))
                caption = ex["caption"]
            else:
                path = os.path.join("images", f"{i:06d}.jpg")
                Image.fromarray(_photo(i, rng)).save(os.path.join(root, path), quality=90)
                caption = f"a photograph with the number {i}"
            f.write(json.dumps({"image": path, "text": caption}) + "\n")
    text_tokenizer.train_sentencepiece(text_tokenizer.shapes_captions(5000, seed=seed), spm, vocab_size=1000)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(wanted, f)
    return manifest, spm + ".model"


def _ingest(manifest: str, spm: str, out: str, shard_index: int, num_shards: int, decode_threads: int,
            images: str, encoder: str, queue) -> None:
    """One process's ingestion (a host's run): seconds spent inside `prepare.prepare`."""
    import jax
    import numpy as np

    from cm3leon_jax import text_tokenizer, vocab as vocab_lib, vqgan
    from cm3leon_jax.vq_tokenizer import VQTokenizer
    from data_pipeline import prepare
    from experiments import data_shapes, vq_tiny
    size = IMAGE_SIZE[images]
    vq_config = dataclasses.replace(vqgan.VQGANConfig.from_config(vq_tiny.get_config().vq), image_size=size)
    vq = VQTokenizer(vqgan.init_params(jax.random.key(0), vq_config), vq_config)
    vocab = vocab_lib.Vocabulary(text_tokenizer.TextTokenizer(spm), num_image_codes=vq.codebook_size,
                                 image_tokens_per_image=vq.tokens_per_image, num_sentinels=16,
                                 image_grid=(vq.latent_size, vq.latent_size))
    if encoder == "vq":
        encode = vq.encode
        encode(np.zeros((1, size, size, 3), np.uint8))   # compiled before the clock starts, as in a long run
    else:
        def encode(batch):   # codes a function of the image, as a real encoder's: parts and one run agree
            return np.stack([np.random.default_rng(zlib.crc32(image.tobytes())).integers(
                0, vq.codebook_size, (vq.latent_size, vq.latent_size), dtype=np.int32) for image in batch])
    cfg = data_shapes.get_config()
    cfg.update(source="jsonl", jsonl=manifest, validation_fraction=0.0, image_size=size, log_every=10 ** 9,
               decode_threads=decode_threads, max_document_length=10 ** 6)
    start = time.perf_counter()
    prepare.prepare(cfg, out, vocab, encode, shard_index=shard_index, num_shards=num_shards)
    queue.put((shard_index, time.perf_counter() - start))


def _run(processes: list[tuple]) -> tuple[float, list[float]]:
    """Starts the processes at once; (wall seconds, each one's seconds inside prepare)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ingest, args=(*args, queue)) for args in processes]
    start = time.perf_counter()
    for p in procs:
        p.start()
    inside = {}
    while len(inside) < len(procs):   # a process that died puts nothing: waiting on it alone hung the bench
        try:
            shard, seconds = queue.get(timeout=1.0)
            inside[shard] = seconds
        except queue_lib.Empty:
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                raise RuntimeError(f"an ingestion process failed with exit code {failed[0]}")
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
    flag_checks.no_arguments(argv)
    from data_pipeline import ingest_parts, prepare
    ingest_parts.FILE_BYTES = int(FLAGS.merge_file_mb * (1 << 20))
    root = FLAGS.workdir
    t0 = time.perf_counter()
    manifest, spm = build_source(os.path.join(root, f"source_{FLAGS.images}"), FLAGS.images, FLAGS.num_documents,
                                 FLAGS.seed)
    kind = (FLAGS.images, FLAGS.encoder)
    print(f"source ready in {time.perf_counter() - t0:.1f}s", flush=True)
    n, rounds = FLAGS.num_documents, []
    for r in range(FLAGS.repeats):
        single_out, parts_out = os.path.join(root, "single"), os.path.join(root, "parts")
        shutil.rmtree(single_out, ignore_errors=True)
        shutil.rmtree(parts_out, ignore_errors=True)
        serial_out = os.path.join(root, "serial")
        shutil.rmtree(serial_out, ignore_errors=True)
        _, (serial_inside,) = _run([(manifest, spm, serial_out, 0, 1, 1, *kind)])
        single_wall, (single_inside,) = _run([(manifest, spm, single_out, 0, 1, 0, *kind)])
        parts_wall, parts_inside = _run([(manifest, spm, parts_out, i, FLAGS.parts, 0, *kind)
                                          for i in range(FLAGS.parts)])
        if r == 0:   # untimed: a process's first merge pays one-time imports (~0.2 s, timed as 1 worker's)
            ingest_parts.merge_parts(parts_out)
        merge_s = {}
        for workers in (1, FLAGS.parts):
            start = time.perf_counter()
            ingest_parts.merge_parts(parts_out, workers=workers)
            merge_s[workers] = time.perf_counter() - start
        num_files = len([f for f in os.listdir(prepare.documents_dir(parts_out)) if ".array_record-" in f])
        same = _same_documents(single_out, parts_out)
        merge = min(merge_s.values())
        row = {"round": r, "serial_decode_docs_per_s": n / serial_inside,
               "decode_threads_speedup": serial_inside / single_inside,
               "single_docs_per_s": n / single_inside, "parts_docs_per_s": n / max(parts_inside),
               "parts_with_merge_docs_per_s": n / (max(parts_inside) + merge),
               "speedup_parts": single_inside / max(parts_inside),
               "speedup_parts_with_merge": single_inside / (max(parts_inside) + merge),
               "merge_files": num_files, "merge_docs_per_s_1_worker": n / merge_s[1],
               f"merge_docs_per_s_{FLAGS.parts}_workers": n / merge_s[FLAGS.parts],
               "single_wall_s": single_wall, "parts_wall_s": parts_wall,
               "same_documents": same, "load_average": os.getloadavg()[0]}
        print(f"round {r}: one run decoding on one thread {row['serial_decode_docs_per_s']:.0f} docs/s, with "
              f"decoding threads ahead of the encoder {row['single_docs_per_s']:.0f} "
              f"({row['decode_threads_speedup']:.2f}x); {FLAGS.parts} parts at once "
              f"{row['parts_docs_per_s']:.0f} docs/s ({row['speedup_parts']:.2f}x), with the merge "
              f"{row['parts_with_merge_docs_per_s']:.0f} ({row['speedup_parts_with_merge']:.2f}x); merge of "
              f"{num_files} files: {n / merge_s[1]:.0f} docs/s in 1 process, {n / merge_s[FLAGS.parts]:.0f} in "
              f"{FLAGS.parts}; merged == single run: {same}", flush=True)
        rounds.append(row)
    best = max(rounds, key=lambda x: x["speedup_parts_with_merge"])
    print(json.dumps({"bench": "ingest", "images": FLAGS.images, "encoder": FLAGS.encoder, "num_documents": n, "parts": FLAGS.parts, "cpu_count": os.cpu_count(),
                      "best": best, "rounds": rounds}))


if __name__ == "__main__":
    app.run(main)
