"""How much can better retrieval buy on shapes data? Neighbours chosen from the captions' ground truth.

    python bench/oracle_retrieval.py --data workdirs/e2e/data --out workdirs/oracle/data
    python -m cm3leon_jax.train --config experiments/e2e_tiny_lm.py:workdirs/oracle/data --workdir workdirs/oracle/lm
    python bench/oracle_retrieval.py --data workdirs/oracle/data --evaluate workdirs/oracle/lm \
        --classifier_dir workdirs/e2e [--image_neighbours 2] [--cfg_scale 1.5]

Shapes captions name every object, so the ideal neighbours are known. The oracle scores a bank
document by the query's exact objects it holds (shape, colour, size, position), then the same
objects anywhere, then the background. It picks greedily so the chosen documents cover as many of
the query's objects as possible, and skips near duplicates (the same objects on the same
background). `--out` copies DATA with the oracle's neighbour sidecar (as many columns as the stored
one), so the LM can be trained on it unchanged. `--evaluate` runs `cm3leon_jax.evaluate` on an LM
with the oracle choosing each caption's neighbours: the text -> image prompts (`--image_neighbours`)
and the validation loss with k neighbours. The evaluation of any LM trained on DATA's documents
works, so an LM trained with the learned retriever can be given oracle neighbours too.

A diagnostic, not a retriever: no real corpus has ground truth. It bounds what a retriever that
matches objects could add. The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

# Its scoring, and its flags: --data (the e2e data dir), --num_queries (training documents whose
# neighbours are scored) and --seed (the sample, and here the oracle's tie-break); its --variants is unused.
import neighbour_quality  # noqa: E402

flags.DEFINE_string("out", None, "write a copy of DATA with oracle neighbours here")
flags.DEFINE_string("evaluate", None, "an LM workdir trained on DATA's documents: evaluate it with oracle retrieval")
flags.DEFINE_string("classifier_dir", None, "the attribute classifier's cache (evaluate)")
flags.DEFINE_integer("image_neighbours", 2, "oracle neighbours prepended to each text -> image prompt (evaluate)",
                     lower_bound=0)
flags.DEFINE_float("cfg_scale", 1.5, "guidance scale (evaluate)")
flags.DEFINE_list("strategies", ["topp_topk_cfg", "topp"], "decoding strategies (evaluate)")
flags.DEFINE_integer("num_prompts", 64, "held-out captions for text -> image (evaluate)", lower_bound=1)
flags.DEFINE_integer("num_val_documents", 128, "validation documents for the loss with 0/1/2 neighbours (evaluate)",
                     lower_bound=0)

FLAGS = flags.FLAGS

import numpy as np  # noqa: E402

from bench import flag_checks  # noqa: E402
from cm3leon_jax import vocab as vocab_lib  # noqa: E402
from data_pipeline import index as index_lib, neighbours, prepare, shapes_world as sw  # noqa: E402

EXACT = {k: i for i, k in enumerate(itertools.product(sw.SHAPES, sw.COLORS, sw.SIZES, sw.POSITIONS))}
ANYWHERE = {k: i for i, k in enumerate(itertools.product(sw.SHAPES, sw.COLORS, sw.SIZES))}
BACKGROUND = {k: i for i, k in enumerate(sw.BACKGROUNDS)}
# Weights of the oracle's score: an exact object outranks the same object elsewhere, which
# outranks a shared background.
W_EXACT, W_ANYWHERE, W_BACKGROUND = 1.0, 0.5, 0.3
CANDIDATES = 64  # top-scored documents the greedy cover picks from


def scene_of(caption: str) -> tuple[frozenset, frozenset, str | None]:
    objects = sw.parse_caption(caption)
    exact = frozenset((o["shape"], o["color"], o["size"], o["position"]) for o in objects)
    anywhere = frozenset((o["shape"], o["color"], o["size"]) for o in objects)
    return exact, anywhere, sw.parse_background(caption)


def scene_vector(scene) -> np.ndarray:
    exact, anywhere, background = scene
    v = np.zeros(len(EXACT) + len(ANYWHERE) + len(BACKGROUND), np.float32)
    v[[EXACT[o] for o in exact]] = W_EXACT
    v[[len(EXACT) + ANYWHERE[o] for o in anywhere]] = W_ANYWHERE
    if background is not None:
        v[len(EXACT) + len(ANYWHERE) + BACKGROUND[background]] = W_BACKGROUND
    return v


class Oracle:
    """The bank's scenes (from its captions) and the greedy object cover over them."""

    def __init__(self, data_dir: str):
        self.documents = prepare.load_documents(data_dir, "train")
        texts, _ = index_lib.document_columns(self.documents)
        self.vocab = vocab_lib.Vocabulary.load(os.path.join(data_dir, prepare.VOCAB_DIR))
        self.scenes = [scene_of(self.vocab.decode_text(np.asarray(t, np.int32))) for t in texts]
        self.vectors = np.stack([scene_vector(s) for s in self.scenes])

    def choose(self, scene, k: int, rng: np.random.Generator, exclude: int = -1) -> list[int]:
        scores = self.vectors @ scene_vector(scene) + 1e-3 * rng.random(len(self.vectors))  # random tie-break
        if exclude >= 0:
            scores[exclude] = -np.inf
        candidates = np.argsort(-scores)[:CANDIDATES]
        chosen: list[int] = []
        covered: set = set()
        for _ in range(k):
            best, best_gain = -1, -np.inf
            for c in candidates:
                other = self.scenes[c]
                if c in chosen or (other[0] == scene[0] and other[2] == scene[2]):  # near duplicate
                    continue
                gain = len((other[0] & scene[0]) - covered) + W_ANYWHERE * len(other[1] & scene[1]) + 1e-2 * scores[c]
                if gain > best_gain:
                    best, best_gain = int(c), gain
            if best < 0:
                break
            chosen.append(best)
            covered |= self.scenes[best][0]
        return chosen


def write_oracle_data(oracle: Oracle, data_dir: str, out_dir: str) -> dict:
    if os.path.exists(out_dir):
        raise ValueError(f"{out_dir} exists: pick a new directory")
    shutil.copytree(data_dir, out_dir)
    _, _, meta = neighbours.load_neighbours(data_dir)
    n, k = meta["num_documents"], meta["k"]
    rng = np.random.default_rng(FLAGS.seed)
    ids = np.full((n, k), -1, np.int32)
    scores = np.full((n, k), -np.inf, np.float32)
    for i in range(n):
        chosen = oracle.choose(oracle.scenes[i], k, rng, exclude=i)
        ids[i, :len(chosen)] = chosen
        scores[i, :len(chosen)] = oracle.vectors[chosen] @ oracle.vectors[i]
    neighbours.save_neighbours(out_dir, ids, scores, stats={**meta["stats"], "oracle": True},
                               extra={"oracle_of": os.path.abspath(data_dir)})
    # the same object-overlap figures bench/neighbour_quality.py reports, with the oracle's
    # vectors standing in for embeddings (top 5 by the oracle's score)
    texts, _ = index_lib.document_columns(oracle.documents)
    scenes = [neighbour_quality.scene_keys(oracle.vocab, t) for t in texts]
    queries = np.sort(np.random.default_rng(FLAGS.seed).choice(n, min(FLAGS.num_queries, n), replace=False))
    figures = neighbour_quality.score(ids, oracle.vectors, oracle.vectors, queries, scenes,
                                      np.random.default_rng(FLAGS.seed + 1))
    print(f"oracle neighbours hold {100 * figures['union_object_share']:.1f}% of the query's objects "
          f"(random documents {100 * figures['random_documents_object_share']:.1f}%), "
          f"{100 * figures['per_neighbour_object_share']:.1f}% each", flush=True)
    return {"mode": "data", "out": os.path.abspath(out_dir), "num_documents": n, "k": k, **figures}


def evaluate_with_oracle(oracle: Oracle, lm_workdir: str) -> dict:
    from cm3leon_jax import evaluate, generate, metrics
    metrics.quiet_library_logs()

    def retrieve(self, caption: str, k: int) -> list[np.ndarray]:
        if k <= 0:
            return []
        chosen = oracle.choose(scene_of(caption), k, np.random.default_rng(FLAGS.seed))
        return [np.asarray(oracle.documents[i]["tokens"], np.int32) for i in chosen]

    generate.Generator.retrieve = retrieve  # every retrieval of this process goes through the oracle
    out_dir = os.path.join(lm_workdir, f"eval_oracle_{FLAGS.image_neighbours}")
    report = evaluate.evaluate(lm_workdir, out_dir=out_dir, strategies=FLAGS.strategies,
                               num_prompts=FLAGS.num_prompts, num_captions=0,
                               num_val_documents=FLAGS.num_val_documents, num_vq_images=0,
                               classifier_dir=FLAGS.classifier_dir, image_neighbours=FLAGS.image_neighbours,
                               cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed)
    print(open(os.path.join(out_dir, "report.md"), encoding="utf-8").read(), flush=True)
    return {"mode": "evaluate", "lm": os.path.abspath(lm_workdir), "image_neighbours": FLAGS.image_neighbours,
            "cfg_scale": FLAGS.cfg_scale, "report": os.path.join(out_dir, "report.json"),
            "text_to_image": report.get("text_to_image"), "validation_loss": report.get("validation_loss")}


def main(argv):
    flag_checks.no_arguments(argv)
    if bool(FLAGS.out) == bool(FLAGS.evaluate):
        raise app.UsageError("give exactly one of --out (oracle data) or --evaluate (an LM workdir)")
    oracle = Oracle(FLAGS.data)
    result = write_oracle_data(oracle, FLAGS.data, FLAGS.out) if FLAGS.out else evaluate_with_oracle(oracle, FLAGS.evaluate)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    app.run(main)
