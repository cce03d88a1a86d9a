"""Data for the trainer: sources of documents -> packed, per-process batches."""
from __future__ import annotations

from data_pipeline.packing import BATCH_KEYS, PackedBatchIterator


def make_train_iterator(config, process_index: int, process_count: int) -> PackedBatchIterator:
    """The trainer's only entry point into the data: picks the source named by `data.source`."""
    data = config.data
    transform = None
    if data.source == "synthetic":
        from data_pipeline import synthetic_tokens
        docs = synthetic_tokens.documents(data, config.model.vocab_size)
    elif data.source == "cm3":
        from data_pipeline import cm3_pipeline
        docs, transform, _ = cm3_pipeline.training_source(config)
    elif data.source == "sft":
        from data_pipeline import sft_pipeline
        docs, transform, _ = sft_pipeline.training_source(config)
    else:
        raise ValueError(f"unknown data.source={data.source!r}; available: 'synthetic', 'cm3', 'sft'")
    return PackedBatchIterator(docs, seq_len=int(data.seq_len), global_batch_size=int(data.global_batch_size),
                               num_streams=int(data.num_streams), seed=int(config.seed),
                               process_index=process_index, process_count=process_count, transform=transform,
                               worker_count=int(data.worker_count))


__all__ = ["BATCH_KEYS", "PackedBatchIterator", "make_train_iterator"]
