"""The retrieval-augmented CM3 training source: prepared documents + their neighbour sidecar.

ArrayRecord documents (random access) -> per-process streams and seeded shuffle (packing.py) ->
per document, with Grain's per-element generator: sample k stored neighbours, fetch them by
random access (tokens only: `prepare.TokenDocuments`), condition dropout, `<eos> neighbours query
<eos>`, CM3 masking -> packing.
"""
from __future__ import annotations

import dataclasses
import math
import os

import grain
import numpy as np
from absl import logging

from cm3leon_jax import vocab as vocab_lib
from data_pipeline import cm3, mixture, neighbours, prepare


class RetrievalAugmentedTransform:
    """document, rng -> {"tokens", "weights"}; a plain class so Grain workers can pickle it.

    `source` reads documents by id (`prepare.TokenDocuments`); `neighbour_ids` is the sidecar,
    memory-mapped: a worker reopens the file instead of receiving a copy of the array."""

    def __init__(self, source, neighbour_ids: np.ndarray | None, config: cm3.CM3Config):
        self.source, self.neighbour_ids, self.config = source, neighbour_ids, config

    def __getstate__(self):
        state = dict(self.__dict__)
        ids = self.neighbour_ids
        if isinstance(ids, np.memmap) and ids.filename:
            state["neighbour_ids"] = ("memmap", ids.filename, int(ids.offset), ids.shape, ids.dtype.str)
        return state

    def __setstate__(self, state):
        ids = state["neighbour_ids"]
        if isinstance(ids, tuple) and ids[0] == "memmap":
            _, filename, offset, shape, dtype = ids
            state["neighbour_ids"] = np.memmap(filename, np.dtype(dtype), "r", offset, tuple(shape))
        self.__dict__.update(state)

    def __call__(self, document, rng: np.random.Generator) -> dict[str, np.ndarray]:
        doc_id = int(document["id"])
        chosen = []
        if self.config.retrieval and self.neighbour_ids is not None:
            chosen = cm3.sample_neighbours(self.neighbour_ids[doc_id], self.config.num_neighbours, rng, exclude=doc_id)
        fetched = [self.source[int(j)]["tokens"] for j in chosen]
        return cm3.example_for_training(np.asarray(document["tokens"], np.int32), fetched, rng, self.config,
                                        presampled=True)


def cm3_config(data_config, vocab: vocab_lib.Vocabulary) -> cm3.CM3Config:
    if int(data_config.num_neighbours) < 0:   # would silently train without retrieval, as 0 does on purpose
        raise ValueError(f"data.num_neighbours={data_config.num_neighbours} must be >= 0 (0: no retrieval)")
    return cm3.CM3Config.from_vocab(
        vocab, retrieval=int(data_config.num_neighbours) > 0, num_neighbours=max(int(data_config.num_neighbours), 1),
        condition_dropout_rate=float(data_config.condition_dropout_rate), cm3=bool(data_config.cm3_masking),
        cm3_lambda=float(data_config.cm3_lambda), caption_span_rate=float(data_config.caption_span_rate),
        max_length=int(data_config.seq_len) + 1)


def data_vocabulary(config, maker: str = "data_pipeline.prepare") -> vocab_lib.Vocabulary:
    """The prepared data's vocabulary, checked against the model's embedding size."""
    data = config.data
    if not data.data_dir:
        raise ValueError(f"data.source={data.source!r} needs data.data_dir: a directory made by `python -m {maker}`")
    vocab = vocab_lib.Vocabulary.load(os.path.join(data.data_dir, prepare.VOCAB_DIR))
    if vocab.size > int(config.model.vocab_size):
        raise ValueError(f"the data's vocabulary has {vocab.size} ids but model.vocab_size={config.model.vocab_size}; "
                         f"set --config.model.vocab_size={vocab.padded_size()}")
    return vocab


PART_KEY = "mixture_part"   # which dataset of a mixture a document came from (MixtureTransform's switch)


class MixtureTransform:
    """document, rng -> the transform of the dataset the document came from: each dataset joins
    neighbours from its own sidecar (its ids are its own documents'). Picklable for Grain workers."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, document, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.transforms[int(document[PART_KEY])](document, rng)


def mixture_parts(data) -> list[tuple[str, float]]:
    """[(data.data_dir, data.data_dir_weight), (DIR, WEIGHT) of each `data.mix_with` item]: the
    prepared datasets whose train splits the training documents are drawn from, by weight."""
    extra = mixture.parse_weights(data.get("mix_with", ""), what="DIR")
    names = [os.path.normpath(os.path.abspath(d)) for d, _ in extra]
    for (d, _), name in zip(extra, names):
        if name == os.path.normpath(os.path.abspath(str(data.data_dir))):   # it would be two parts, both data_dir's
            raise ValueError(f"data.mix_with names data.data_dir ({d}); its weight is data.data_dir_weight")
        if names.count(name) > 1:
            raise ValueError(f"data.mix_with names the directory {name} more than once; give it one weight")
    weight = float(data.get("data_dir_weight", 1.0))
    if not (math.isfinite(weight) and weight >= 0):   # named here: the mixture's error lists weights, not fields
        raise ValueError(f"data.data_dir_weight={weight} must be a finite number >= 0")
    return [(str(data.data_dir), weight)] + extra


def _train_part(data, data_dir: str, settings: cm3.CM3Config):
    """(train documents, their transform) of one prepared dataset."""
    source = prepare.load_tokens(data_dir, "train")
    ids = None
    if int(data.num_neighbours) > 0:
        ids, _, _ = neighbours.load_neighbours(data_dir, len(source))
        if int(data.num_neighbours) > ids.shape[1]:   # sample_neighbours would return fewer, without a word
            raise ValueError(f"data.num_neighbours={data.num_neighbours} but the neighbour sidecar of {data_dir} stores "
                             f"{ids.shape[1]} per document: at most {ids.shape[1]} can be joined")
    return source, RetrievalAugmentedTransform(source, ids, settings)


def _check_same_vocabulary(vocab: vocab_lib.Vocabulary, data_dir: str, primary: str) -> None:
    if not vocab_lib.Vocabulary.saved_in(os.path.join(data_dir, prepare.VOCAB_DIR)):
        raise ValueError(f"data.mix_with: {data_dir!r} is not a directory made by `python -m data_pipeline.prepare` "
                         "(no vocabulary)")
    try:
        vocab.check_compatible(vocab_lib.Vocabulary.load(os.path.join(data_dir, prepare.VOCAB_DIR)))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"data.mix_with: {data_dir} was not prepared with the vocabulary of data.data_dir={primary} "
                         f"({e}); prepare it with data_dir's SentencePiece model and VQ tokenizer: "
                         f"--config.spm_model={os.path.join(primary, prepare.VOCAB_DIR, 'spm.model')} and the same "
                         "--config.vq_workdir and num_sentinels") from None


def training_source(config):
    """(documents MapDataset, per-document transform, vocabulary) for the trainer: the train split
    only, as the neighbour sidecar's rows are train documents (held-out documents get neighbours by
    retrieval: evaluate.validation_loss). With `data.mix_with`, the train splits of several
    prepared datasets (one vocabulary) mixed by weight (`mixture.MixedDocuments`)."""
    data = config.data
    vocab = data_vocabulary(config)
    settings = cm3_config(data, vocab)
    parts = mixture_parts(data)
    if len(parts) == 1:
        source, transform = _train_part(data, data.data_dir, settings)
        return grain.MapDataset.source(source), transform, vocab
    loaded = []
    for data_dir, _ in parts:
        if data_dir != data.data_dir:
            _check_same_vocabulary(vocab, data_dir, data.data_dir)
        loaded.append(_train_part(data, data_dir, settings))
    counts = mixture.mixing_counts({str(i): len(source) for i, (source, _) in enumerate(loaded)},
                                   {str(i): weight for i, (_, weight) in enumerate(parts)})
    kept = [i for i in range(len(parts)) if counts[str(i)] > 0]
    logging.info("training mixture, documents per mixture epoch: %s", ", ".join(
        f"{parts[i][0]} {counts[str(i)]:,} of {len(loaded[i][0]):,}" for i in range(len(parts))))
    docs = mixture.MixedDocuments([mixture.Part(loaded[i][0], 0, len(loaded[i][0])) for i in kept],
                                  [counts[str(i)] for i in kept], part_key=PART_KEY)
    return docs, MixtureTransform([loaded[i][1] for i in kept]), vocab   # a Grain dataset already (mixture.py)


def heldout_source(config):
    """(documents, transform) for the trainer's periodic held-out loss: the validation split under
    the training objective (layout, CM3 masking) with no condition dropout and no neighbours, which
    the sidecar holds for train documents only: with retrieved ones it is `evaluate.validation_loss`."""
    vocab = data_vocabulary(config)
    source = prepare.load_tokens(config.data.data_dir, "validation")
    settings = dataclasses.replace(cm3_config(config.data, vocab), retrieval=False, condition_dropout_rate=0.0)
    return grain.MapDataset.source(source), RetrievalAugmentedTransform(source, None, settings)
