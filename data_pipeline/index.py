"""Retrieval stage: embed the prepared documents, index them with ScaNN, store each one's neighbours.

    python -m data_pipeline.index --data DIR [--embeddings my_embeddings.npy | --clip_model CLIP_DIR]
        [--steps 2000] [--num_shards 1]
    python -m data_pipeline.index --data DIR --stage train|embed|search|select|finish [--num_hosts H --host_index h]
        (the same over many hosts: data_pipeline/index_parts.py)

Trains the CLIP-style retriever on the data's train split (or embeds with a user's local CLIP
checkpoint, the paper's frozen retriever, or takes embeddings computed elsewhere, a `.npy` [N, D]
aligned with the documents), then writes DIR/scann_index and the neighbour sidecar
(DIR/neighbours_ids.npy, one row per train document) that the training pipeline joins.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
from absl import logging

from cm3leon_jax import retriever
from cm3leon_jax import vocab as vocab_lib
from data_pipeline import neighbours, prepare


def document_columns(documents, image_tokens: int | None = None, *, start: int = 0,
                     stop: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The text ids and image codes of documents [start, stop) (default all), as the retriever
    takes them. An interleaved document (several images' codes, `image_tokens` each) is
    represented by all its text and its first image, as the paper's bi-encoder embeds one text and
    one image per document. Read in chunks where the source reads many records at once (a TFDS
    ArrayRecord source's `__getitems__`: 3.6x faster than one by one on 5,000 documents)."""
    texts, images = [], []
    stop = len(documents) if stop is None else stop
    read_many = getattr(documents, "__getitems__", None) or (lambda ids: [documents[i] for i in ids])
    for doc in (d for a in range(start, stop, 1024) for d in read_many(list(range(a, min(a + 1024, stop))))):
        texts.append(np.asarray(doc["text_ids"], np.int32))
        codes = np.asarray(doc["image_codes"], np.int32)
        images.append(codes[:image_tokens] if image_tokens else codes)
    return texts, images


def image_tokens_of(data_dir: str) -> int:
    return vocab_lib.Vocabulary.load(os.path.join(data_dir, prepare.VOCAB_DIR)).image_tokens_per_image


def retriever_config_for(data_dir: str, **overrides):
    vocab = vocab_lib.Vocabulary.load(os.path.join(data_dir, prepare.VOCAB_DIR))
    return retriever.retriever_config(text_vocab_size=vocab.size, num_image_codes=vocab.num_image_codes,
                                      image_grid=tuple(vocab.image_grid), **overrides)


def clip_embeddings(data_dir: str, clip_model: str, texts, images, *, seed: int = 0, batch_size: int = 256,
                    first_id: int = 0):
    """The paper's retriever with a user's CLIP checkpoint: each document's caption (its text ids
    decoded) and image (its codes through the data's VQ decoder) embedded by CLIP, combined by
    the paper's rule. Text queries lose 20% of their tokens first (the query dropout, drawn from
    the seed and the document id: texts[i] is document first_id + i); image queries are the image
    embeddings. Returns (doc_emb, text_queries, image_queries)."""
    from cm3leon_jax import clip_metrics, export, vq_tokenizer
    scorer = clip_metrics.ClipScorer(clip_model)
    vocab = vocab_lib.Vocabulary.load(os.path.join(data_dir, prepare.VOCAB_DIR))
    n = len(texts)
    has_text = np.array([len(t) > 0 for t in texts])
    has_image = np.array([len(c) > 0 for c in images])
    dropout = float(retriever.retriever_config().query_dropout)

    def embed_captions(rows, drop: bool):
        return scorer.embed_text([vocab.decode_text(retriever.query_token_dropout(texts[i], dropout, seed, first_id + int(i))
                                                    if drop else texts[i]) for i in rows])

    text_rows, image_rows = np.flatnonzero(has_text), np.flatnonzero(has_image)
    if not len(text_rows) and not len(image_rows):
        raise ValueError(f"{data_dir}: no document has text or an image to embed")
    dim = int(scorer.model.config.projection_dim)
    text, text_query, image = (np.zeros((n, dim), np.float32) for _ in range(3))
    if len(text_rows):
        text[text_rows] = embed_captions(text_rows, drop=False)
        text_query[text_rows] = embed_captions(text_rows, drop=True)
    if len(image_rows):
        vq_workdir = export.data_vq_workdir(data_dir)
        if not vq_workdir:
            raise ValueError(f"{data_dir}: its ingest report names no VQ tokenizer to decode the images for CLIP")
        vq = vq_tokenizer.VQTokenizer.from_workdir(vq_workdir)
        h, w = vocab.image_grid
        for start in range(0, len(image_rows), batch_size):
            rows = image_rows[start:start + batch_size]
            codes = np.stack([np.asarray(images[i], np.int32).reshape(h, w) for i in rows])
            image[rows] = scorer.embed_images(vq.decode(codes))
    return retriever.combine_document_embeddings(text, image, has_text, has_image), text_query, image


def has_retriever(data_dir: str) -> bool:
    return os.path.exists(os.path.join(data_dir, retriever.RETRIEVER_SUBDIR, retriever.CONFIG_JSON))


# what a trained retriever must match to be reused, besides the settings a caller asks for: the
# data's vocabulary (sizes) and the seed
_ALWAYS_CHECKED = ("seed", "text_vocab_size", "num_image_codes", "image_grid")
# fields that do not change the trained parameters: asking for other values reuses it
_NOT_TRAINING_FIELDS = ("log_every", "embed_batch_size")


def training_data_record(texts, images, samples: int = 1024) -> dict[str, int]:
    """What a retriever was trained on: the document count and a CRC of an evenly spaced sample of
    documents' tokens (re-ingested data or another tokenizer changes it), cheap at any size."""
    n = len(texts)
    crc = 0
    for i in np.unique(np.linspace(0, n - 1, min(n, samples)).astype(np.int64)) if n else []:
        crc = zlib.crc32(np.asarray(images[i], np.int32).tobytes(), zlib.crc32(np.asarray(texts[i], np.int32).tobytes(), crc))
    return {"num_documents": n, "sample_crc32": crc}


def train_or_load_retriever(data_dir: str, texts, images, *, seed: int = 0, **retriever_overrides):
    """(params, config) of DATA_DIR's retriever: the one trained there when it was trained on these
    documents with the settings asked for (`retriever_overrides`; the others are whatever it was
    trained with), else a new one trained on the given columns (a reused retriever of other data
    or settings would embed silently wrong)."""
    config = retriever_config_for(data_dir, seed=seed, **retriever_overrides)
    trained_on = training_data_record(texts, images)
    if has_retriever(data_dir):
        _, saved = retriever.saved_retriever_record(data_dir)
        wanted = json.loads(config.to_json())
        differ = [k for k in sorted(set(retriever_overrides) | set(_ALWAYS_CHECKED))
                  if k not in _NOT_TRAINING_FIELDS and wanted.get(k) != saved["config"].get(k)]
        if saved.get("trained_on", trained_on) != trained_on:   # retrievers saved before the record: settings only
            differ.append("training documents")
        if not differ:
            logging.info("using the retriever already trained in %s", data_dir)
            return retriever.load_retriever(data_dir)
        logging.warning("the retriever in %s was trained with other %s: training a new one", data_dir, ", ".join(differ))
    return retriever.train_retriever(config, {"text_ids": texts, "image_codes": images}, data_dir,
                                     trained_on=trained_on)["params"], config


def embedder_record(clip_model: str | None = None, embeddings_path: str | None = None) -> dict[str, str]:
    """neighbours.json's "embedder": what embedded the bank, so generation queries it the same way
    (`neighbours.index_embedder` reads it back)."""
    if clip_model:
        return {"kind": "clip", "clip_model": os.path.abspath(clip_model)}
    if embeddings_path:
        return {"kind": "embeddings", "path": os.path.abspath(embeddings_path)}
    return {"kind": "retriever"}


def build(data_dir: str, *, embeddings_path: str | None = None, clip_model: str | None = None, num_shards: int = 1,
          seed: int = 0, **retriever_overrides) -> dict:
    """Trains (or loads) the retriever, or embeds with a user's CLIP, indexes the train split and
    writes its neighbours."""
    if embeddings_path and clip_model:
        raise ValueError("give --embeddings or --clip_model, not both")
    documents = prepare.load_documents(data_dir, "train")
    if not 1 <= int(num_shards) <= len(documents):   # checked before the costly embedding
        raise ValueError(f"--num_shards {num_shards} must be in [1, {len(documents)}] (the train documents)")
    texts, images = document_columns(documents, image_tokens_of(data_dir))
    has_text = np.array([len(t) > 0 for t in texts])
    has_image = np.array([len(c) > 0 for c in images])
    if clip_model:
        doc_emb, text_q, image_q = clip_embeddings(data_dir, clip_model, texts, images, seed=seed)
        retriever.save_clip_reference(data_dir, clip_model, doc_emb)
    elif embeddings_path:
        doc_emb = retriever.load_embeddings(embeddings_path, len(documents))
        text_q = image_q = doc_emb  # user embeddings: one vector per document serves both queries
    else:
        params, config = train_or_load_retriever(data_dir, texts, images, seed=seed, **retriever_overrides)
        doc_emb = retriever.embed_documents(params, config, texts, images)
        text_q, image_q, _, _ = retriever.embed_queries(params, config, texts, images, seed=seed)
    stats = neighbours.build_neighbours(data_dir, doc_emb, text_q, image_q, has_text, has_image,
                                        num_shards=num_shards,
                                        embedder=embedder_record(clip_model, embeddings_path))
    logging.info("neighbours: %s", stats)
    return stats


def main(argv):
    del argv
    from absl import flags
    from cm3leon_jax import metrics, workdir_io
    from data_pipeline import index_parts
    metrics.quiet_library_logs()
    f = flags.FLAGS
    data = workdir_io.require_local(f.data, "--data")
    overrides = {"steps": f.steps} if f.steps else {}
    stage = f.stage
    if stage in ("embed", "search", "select") and (f.num_hosts is None or f.host_index is None):
        raise app.UsageError(f"--stage {stage} needs --num_hosts and --host_index")
    if stage not in ("embed", "search", "select") and (f.num_hosts is not None or f.host_index is not None):
        raise app.UsageError("--num_hosts and --host_index go with --stage embed, search or select")
    if stage in ("train", "search", "select", "finish") and (f.embeddings or f.clip_model):
        raise app.UsageError(f"--embeddings and --clip_model go with --stage all or embed, not {stage}"
                             + (" (they replace training the retriever)" if stage == "train" else ""))
    # a flag the chosen stage does not read was ignored without a word
    for name, stages in (("steps", ("all", "train")), ("num_shards", ("all", "search")), ("candidates", ("search",)),
                         ("remove_parts", ("finish",))):
        if f[name].present and stage not in stages:
            raise app.UsageError(f"--{name} goes with --stage {' or '.join(stages)}, not {stage}")
    if f.steps and (f.embeddings or f.clip_model):
        raise app.UsageError("--steps trains our retriever: not with --embeddings or --clip_model (they replace it)")
    if f.num_shards is not None and f.num_shards < 1:
        raise app.UsageError(f"--num_shards must be >= 1, got {f.num_shards}")
    if os.path.exists(os.path.join(data, neighbours.NEIGHBOURS_JSON)) and not f.overwrite:
        logging.info("%s already has neighbours; pass --overwrite to rebuild", data)
        return
    if stage == "all":
        build(data, embeddings_path=f.embeddings, clip_model=f.clip_model, num_shards=f.num_shards or 1,
              seed=f.seed, **overrides)
    elif stage == "train":
        index_parts.train(data, seed=f.seed, **overrides)
    elif stage == "embed":
        index_parts.embed_part(data, f.num_hosts, f.host_index, embeddings_path=f.embeddings,
                               clip_model=f.clip_model, seed=f.seed, overwrite=f.overwrite)
    elif stage == "search":
        index_parts.search_part(data, f.num_hosts, f.host_index, num_shards=f.num_shards, candidates=f.candidates,
                                overwrite=f.overwrite)
    elif stage == "select":
        index_parts.select_part(data, f.num_hosts, f.host_index, overwrite=f.overwrite)
    else:
        index_parts.finish(data, remove_parts=f.remove_parts)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("data", None, "a directory made by `python -m data_pipeline.prepare`", required=True)
    flags.DEFINE_string("embeddings", None, "optional .npy [N, D] document embeddings computed elsewhere")
    flags.DEFINE_string("clip_model", None, "optional local Hugging Face CLIP checkpoint dir (safetensors): the "
                        "paper's frozen retriever instead of training ours; generation then queries it too")
    flags.DEFINE_integer("steps", None, "retriever training steps (default: the retriever config's)")
    flags.DEFINE_integer("num_shards", None, "index shards (one per host's memory, see WORKSPACE.md); default 1, "
                         "or --num_hosts with --stage search")
    flags.DEFINE_integer("seed", 0, "seed for retriever training and query dropout")
    flags.DEFINE_bool("overwrite", False, "rebuild even if neighbours exist (a host stage: redo its part even if "
                      "finished)")
    flags.DEFINE_enum("stage", "all", ["all", "train", "embed", "search", "select", "finish"],
                      "all: the whole stage on this host; the others split it over hosts (data_pipeline/index_parts.py)")
    flags.DEFINE_integer("num_hosts", None, "hosts the embed / search / select stages are split over")
    flags.DEFINE_integer("host_index", None, "this host's part, in [0, --num_hosts)")
    flags.DEFINE_integer("candidates", 128, "--stage search: candidates kept per document and query "
                         "(the widest the select stage can search)")
    flags.DEFINE_bool("remove_parts", False, "--stage finish: delete DIR/index_parts once joined")
    app.run(main)
