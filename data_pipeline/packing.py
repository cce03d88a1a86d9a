"""Packs token documents into fixed-length rows and assembles each process's slice of the batch.

The global batch is `num_streams` independent streams, each packing its own shard of the
documents into `global_batch_size / num_streams` rows per step. A process owns a contiguous range
of streams, so the global batch is the same rows whatever the process count (1 process x 8
devices and 2 x 4 see identical data), and each process reads only its own documents.
"""
from __future__ import annotations

import collections
import json
from typing import Any, Callable

import grain
import numpy as np
from grain import experimental as grain_exp

# One packed row: the model reads inputs/positions/segment_ids, the loss targets/weights.
BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def document_to_example(document: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shifts a document into next-token (inputs, targets, weights) before packing, so no target
    ever crosses into the next document in the row. `weights[i]` is the loss weight of token i."""
    tokens = np.asarray(document["tokens"], np.int32)
    weights = np.asarray(document.get("weights", np.ones_like(tokens, np.float32)), np.float32)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights[1:]}


def stream_ranges(num_streams: int, process_index: int, process_count: int) -> range:
    if num_streams % process_count:
        raise ValueError(f"data.num_streams={num_streams} must be divisible by the process count {process_count}")
    per_process = num_streams // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class PackedBatchIterator:
    """Iterator over this process's rows of each global batch, with JSON state for orbax.

    Implements the duck-typed interface of `grain.checkpoint.CheckpointSave/Restore`
    (`get_state() -> bytes`, `set_state(bytes)`, `start_prefetch()`), so the data position is
    saved beside the model and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, documents: grain.MapDataset, *, seq_len: int, global_batch_size: int,
                 num_streams: int, seed: int, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, transform: Callable[[Any, np.random.Generator], dict] | None = None):
        """`transform(document, rng)` (neighbour join, condition dropout, CM3 masking) runs per
        document per epoch with a generator Grain seeds from (seed, stream, position)."""
        if num_streams <= 0:
            num_streams = global_batch_size
        if global_batch_size % num_streams:
            raise ValueError(f"global batch {global_batch_size} is not divisible by data.num_streams={num_streams}")
        if len(documents) < num_streams:
            raise ValueError(f"{len(documents)} documents cannot feed {num_streams} streams")
        self.seq_len = seq_len
        self.rows_per_stream = global_batch_size // num_streams
        self.stream_ids = list(stream_ranges(num_streams, process_index, process_count))
        self.skipped = collections.Counter()
        self._transform = transform
        self._iterators = [iter(self._stream(documents, s, num_streams, seed, shuffle)) for s in self.stream_ids]

    def _fits(self, example) -> bool:
        if len(example["inputs"]) > self.seq_len:
            self.skipped["document_longer_than_seq_len"] += 1
            return False
        if len(example["inputs"]) == 0:
            self.skipped["empty_document"] += 1
            return False
        return True

    def _stream(self, documents, stream, num_streams, seed, shuffle):
        ds = documents[stream::num_streams]
        if shuffle:
            ds = ds.shuffle(seed=seed * 1_000_003 + stream)  # reshuffled every epoch by grain
        ds = ds.repeat(None)
        if self._transform is not None:
            ds = ds.random_map(self._transform, seed=(seed * 1_000_003 + stream + 7919) % 2 ** 32)
        ds = ds.map(document_to_example).to_iter_dataset().filter(self._fits)
        lengths = {key: self.seq_len for key in ("inputs", "targets", "weights")}
        ds = grain_exp.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=self.rows_per_stream,
                                               shuffle_bins=False)
        return ds.batch(self.rows_per_stream)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(it) for it in self._iterators]
        packed = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
        return {
            "inputs": packed["inputs"].astype(np.int32),
            "targets": packed["targets"].astype(np.int32),
            "weights": packed["weights"].astype(np.float32),
            "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
            "positions": packed["inputs_positions"].astype(np.int32),
        }

    def get_state(self) -> bytes:
        state = {"streams": self.stream_ids, "states": [it.get_state() for it in self._iterators]}
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if state["streams"] != self.stream_ids:
            raise ValueError(f"data state is for streams {state['streams']}, this process owns {self.stream_ids}; "
                             "resume with the same data.num_streams and process count")
        for it, s in zip(self._iterators, state["states"]):
            it.set_state(s)

    def start_prefetch(self) -> None:
        """Part of grain's checkpoint interface; batches are produced on demand."""


def validate_batch(batch: dict[str, Any], rows: int, seq_len: int) -> None:
    for key in BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"batch lacks {key!r}; a batch needs {BATCH_KEYS}")
        if batch[key].shape != (rows, seq_len):
            raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}, expected {(rows, seq_len)}")
