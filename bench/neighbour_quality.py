"""Are the retrieved neighbours relevant? Object overlap of each document's neighbours on shapes-world data.

    python bench/neighbour_quality.py --data workdirs/e2e/data [--num_queries 1000]
        [--variants '{}' --variants '{"batch_size": 1024}' ...]

On shapes-world documents every caption names its objects, so relevance can be counted: for a
sample of training documents, the share of the query's objects (shape, colour, position) that
appear in its selected neighbours, against as many random documents (chance); the share per
neighbour; and how often the retriever's top 5 (by the query's own caption, itself excluded)
share the query's background. The first row is the data's stored retriever and neighbour sidecar.
Each `--variants` entry (a JSON object of retriever config overrides, applied over the stored
retriever's config) trains a retriever into a scratch directory, recomputes every document's
neighbours with the same rules in memory (nothing in DATA is changed) and is scored the same
way, with its training seconds (`{}` retrains the stored settings: the time to compare against). The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("data", None, "a data dir made by the e2e run (documents, retriever, neighbours)", required=True)
flags.DEFINE_integer("num_queries", 1000, "training documents scored (a seeded sample)", lower_bound=1)
flags.DEFINE_multi_string("variants", [], "retriever config overrides (JSON objects), one retrained retriever each")
flags.DEFINE_integer("seed", 0, "sample seed", lower_bound=0)

FLAGS = flags.FLAGS


def _json_objects(values) -> bool:
    try:
        return all(isinstance(json.loads(v), dict) for v in values)
    except ValueError:
        return False


flags.register_validator("variants", _json_objects, "--variants: each must be a JSON object of retriever config "
                         "overrides, e.g. '{\"batch_size\": 1024}'")

import numpy as np  # noqa: E402

from bench import flag_checks  # noqa: E402
from cm3leon_jax import retriever, vocab as vocab_lib  # noqa: E402
from data_pipeline import index as index_lib, neighbours, prepare, shapes_world  # noqa: E402


def scene_keys(vocab, text_ids) -> tuple[set, str | None]:
    caption = vocab.decode_text(np.asarray(text_ids, np.int32))
    objects = {(o["shape"], o["color"], o["position"]) for o in shapes_world.parse_caption(caption)}
    return objects, shapes_world.parse_background(caption)


def score(ids: np.ndarray, doc_emb: np.ndarray, text_q: np.ndarray, queries: np.ndarray, scenes: list,
          rng: np.random.Generator) -> dict:
    union, chance, per_neighbour = [], [], []
    for q in queries:
        wanted = scenes[q][0]
        chosen = [int(n) for n in ids[q] if n >= 0]
        if not chosen or not wanted:   # no neighbour, or a caption naming no object: no share to score
            continue
        found = set().union(*(scenes[n][0] for n in chosen))
        union.append(len(wanted & found) / len(wanted))
        per_neighbour += [len(wanted & scenes[n][0]) / len(wanted) for n in chosen]
        drawn = set().union(*(scenes[int(n)][0] for n in rng.choice(len(scenes), len(chosen), replace=False)))
        chance.append(len(wanted & drawn) / len(wanted))
    sims = text_q[queries] @ doc_emb.T
    sims[np.arange(len(queries)), queries] = -np.inf
    top5 = np.argsort(-sims, axis=1)[:, :5]
    same_bg = [scenes[q][1] == scenes[int(c)][1] for q, row in zip(queries, top5) for c in row]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None   # noqa: E731  (None, not a NaN: valid JSON)
    return {"union_object_share": mean(union), "random_documents_object_share": mean(chance),
            "per_neighbour_object_share": mean(per_neighbour), "queries_scored": len(union),
            "top5_same_background": mean(same_bg), "mean_neighbours": float(np.mean((ids[queries] >= 0).sum(1)))}


def main(argv):
    flag_checks.no_arguments(argv)
    data = FLAGS.data
    documents = prepare.load_documents(data, "train")
    vocab = vocab_lib.Vocabulary.load(os.path.join(data, prepare.VOCAB_DIR))
    texts, images = index_lib.document_columns(documents, vocab.image_tokens_per_image)
    scenes = [scene_keys(vocab, t) for t in texts]
    queries = np.sort(np.random.default_rng(FLAGS.seed).choice(len(texts), min(FLAGS.num_queries, len(texts)),
                                                               replace=False))
    has_text = np.array([len(t) > 0 for t in texts])
    has_image = np.array([len(c) > 0 for c in images])
    stored_ids, _, meta = neighbours.load_neighbours(data, len(texts))
    # the selection rules the stored neighbours were computed with (compute_neighbours records them)
    rules = {key: meta["stats"][key] for key in ("k_text", "k_image", "num_candidates", "max_score",
                                                 "diversity_threshold")}
    stored_params, stored_config = retriever.load_retriever(data)
    rows = []
    scratch = tempfile.TemporaryDirectory()
    for i, (name, overrides) in enumerate([("stored", None)] + [(v, json.loads(v)) for v in FLAGS.variants]):
        params, config, seconds = stored_params, stored_config, None
        if overrides is not None:
            config = retriever.retriever_config(**{**dict(stored_config), **overrides})
            t0 = time.time()
            params = retriever.train_retriever(config, {"text_ids": texts, "image_codes": images},
                                               os.path.join(scratch.name, str(i)))["params"]
            seconds = round(time.time() - t0, 1)
        doc_emb = retriever.embed_documents(params, config, texts, images)
        text_q, image_q, _, _ = retriever.embed_queries(params, config, texts, images, seed=0)
        if overrides is None:
            ids = np.asarray(stored_ids)
        else:
            index = neighbours.build_index(doc_emb, valid=has_text | has_image, k=rules["num_candidates"])
            ids, _, _ = neighbours.compute_neighbours(doc_emb, text_q, image_q, has_text, has_image, search=index,
                                                      **rules)
        row = {"retriever": name, "train_seconds": seconds,
               **score(ids, doc_emb, text_q, queries, scenes, np.random.default_rng(FLAGS.seed + 1))}
        rows.append(row)
        if row["queries_scored"]:
            print(f"{name}: neighbours hold {100 * row['union_object_share']:.1f}% of the query's objects "
                  f"(random documents {100 * row['random_documents_object_share']:.1f}%), "
                  f"{100 * row['per_neighbour_object_share']:.1f}% each; top 5 share the background "
                  f"{100 * row['top5_same_background']:.0f}%" + (f"; trained in {seconds} s" if seconds else ""),
                  flush=True)
        else:
            print(f"{name}: no query has both a neighbour and a caption naming objects: nothing to score", flush=True)
    scratch.cleanup()
    print(json.dumps({"data": os.path.abspath(data), "num_queries": int(len(queries)), "rows": rows}))


if __name__ == "__main__":
    app.run(main)
