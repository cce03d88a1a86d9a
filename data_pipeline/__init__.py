"""Data for the trainer: sources of documents -> packed, per-process batches."""
from __future__ import annotations

import itertools
import os

import grain
import numpy as np
from absl import logging

from data_pipeline.packing import BATCH_KEYS, PackedBatchIterator, fits_a_row, stream_count

SOURCES = ("synthetic", "cm3", "sft")


def _documents(config, heldout: bool):
    """(documents MapDataset, per-document transform or None) of `data.source`: its training
    documents, or its held-out ones."""
    data = config.data
    if data.source == "synthetic":
        from data_pipeline import synthetic_tokens
        return synthetic_tokens.documents(data, config.model.vocab_size, heldout=heldout), None
    if data.source in ("cm3", "sft"):
        from data_pipeline import cm3_pipeline, sft_pipeline
        module = cm3_pipeline if data.source == "cm3" else sft_pipeline
        if heldout:
            return module.heldout_source(config)
        docs, transform, _ = module.training_source(config)
        return docs, transform
    raise ValueError(f"unknown data.source={data.source!r}; available: {', '.join(map(repr, SOURCES))}")


def _packed(config, docs, transform, process_index: int, process_count: int,
            worker_count: int | None = None) -> PackedBatchIterator:
    data = config.data
    return PackedBatchIterator(docs, seq_len=int(data.seq_len), global_batch_size=int(data.global_batch_size),
                               num_streams=int(data.num_streams), seed=int(config.seed),
                               process_index=process_index, process_count=process_count, transform=transform,
                               worker_count=int(data.worker_count if worker_count is None else worker_count))


def make_train_iterator(config, process_index: int, process_count: int) -> PackedBatchIterator:
    """The trainer's only entry point into the training data: picks the source named by `data.source`."""
    return _packed(config, *_documents(config, heldout=False), process_index, process_count)


def _heldout_examples(config, docs, transform) -> tuple[list[dict], int, int]:
    """(examples that fit a row, held-out documents read, how many of them fit none) in a seeded
    order, read until every packing stream (examples are dealt to them in turn) holds twice the
    tokens of its rows of `eval_batches` batches: first-fit rows are not full, and a stream that
    ran out would start over and score documents twice. The work is bounded by what the
    evaluation needs, not by the split's size. Every process computes the same list."""
    seq_len, seed = int(config.data.seq_len), int(config.seed)
    streams = stream_count(config.data.num_streams, config.data.global_batch_size)
    per_stream = 2 * int(config.eval_batches) * (int(config.data.global_batch_size) // streams) * seq_len
    examples, tokens, read = [], np.zeros(streams, np.int64), 0
    for index in np.random.default_rng(seed).permutation(len(docs)):
        document = docs[int(index)]
        example = transform(document, np.random.default_rng([seed, int(index)])) if transform else document
        read += 1
        if fits_a_row(example["tokens"], seq_len):
            tokens[len(examples) % streams] += len(example["tokens"]) - 1
            examples.append(example)
            if tokens.min() >= per_stream:
                break
    return examples, read, read - len(examples)


def make_eval_batches(config, process_index: int, process_count: int) -> list[dict]:
    """This process's rows of `eval_batches` fixed held-out global batches, packed like training
    rows. Built once: every evaluation of a run scores the same tokens. Held-out documents that fit
    no row are left out and counted in the log; a split smaller than a batch is cycled."""
    try:
        docs, transform = _documents(config, heldout=True)
        examples, read, unfit = _heldout_examples(config, docs, transform)
        if not examples:
            raise ValueError(f"none of the {read} held-out documents fits a row of data.seq_len={config.data.seq_len}")
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"no held-out data for eval_every_steps={config.eval_every_steps} "
                         f"(--config.eval_every_steps=0 turns it off): {e}") from e
    if unfit:
        logging.warning("held-out loss: %d of %d held-out documents read fit no row of %d tokens, left out",
                        unfit, read, int(config.data.seq_len))
    source = grain.MapDataset.source(examples)
    streams = stream_count(config.data.num_streams, config.data.global_batch_size)
    if len(source) < streams:
        source = source.repeat(-(-streams // len(source)))
    # in-process: a few batches do not pay for worker start-up
    batches = _packed(config, source, None, process_index, process_count, worker_count=0)
    try:
        return list(itertools.islice(batches, int(config.eval_batches)))
    finally:
        batches.close()


def heldout_sets(config) -> list[tuple[str, object]]:
    """(metric suffix, config) of each held-out set the trainer scores: data.data_dir's ("", logged
    as eval_loss) and, for a cm3 mixture (`data.mix_with`), each mixed dataset's validation split
    under its directory's name (eval_loss_NAME), so a mixture's datasets are watched one by one."""
    sets = [("", config)]
    if config.data.source != "cm3" or not config.data.get("mix_with"):
        return sets
    from data_pipeline import cm3_pipeline
    taken = {""}
    for data_dir, _ in cm3_pipeline.mixture_parts(config.data)[1:]:
        name = "_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(os.path.normpath(data_dir)))
        base, n = name, 2
        while name in taken:   # two directories of one name: numbered in mix_with's order
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        other = config.copy_and_resolve_references()
        other.data.update(data_dir=data_dir, mix_with="")
        sets.append((name, other))
    return sets


__all__ = ["BATCH_KEYS", "PackedBatchIterator", "heldout_sets", "make_eval_batches", "make_train_iterator"]
