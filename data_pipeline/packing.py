"""Packs token documents into fixed-length rows and assembles each process's slice of the batch.

The global batch is `num_streams` independent streams, each packing its own shard of the
documents into `global_batch_size / num_streams` rows per step. A process owns a contiguous range
of streams, so the global batch is the same rows whatever the process count (1 process x 8
devices and 2 x 4 see identical data), and each process reads only its own documents.
"""
from __future__ import annotations

import collections
import json
import weakref
from typing import Any, Callable, Sequence

import grain
import numpy as np
from absl import flags
from grain import experimental as grain_exp

from data_pipeline.cm3 import NEIGHBOURS_CUT

# One packed row: the model reads inputs/positions/segment_ids, the loss targets/weights.
BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
# Documents in a row that fit no row before a stream is an error (see FirstFitPackDataset).
MAX_CONSECUTIVE_SKIPS = 10_000


def fits_a_row(tokens, seq_len: int) -> bool:
    """Whether a document packs: its next-token shift (one token shorter) is non-empty and fits."""
    return 0 < len(tokens) - 1 <= seq_len


def stream_count(num_streams: int, global_batch_size: int) -> int:
    """`data.num_streams`, where <= 0 means one stream per row."""
    return int(num_streams) if int(num_streams) > 0 else int(global_batch_size)


def grain_seed(value: int) -> int:
    """A seed Grain accepts ([0, 2**32)) from any integer: the derived per-stream seeds of a config
    seed >= 4,295 overflow it. Values that already fit are kept, so earlier runs' orders stay."""
    return int(value) % 2 ** 32


class FirstFitPackDataset(grain.IterDataset):
    """Documents `{"tokens", "weights"?}` -> `[rows, seq_len]` batches in BATCH_KEYS, first fit.

    Each document is shifted into next-token (inputs, targets, weights) as it is copied into a
    row, so no target ever crosses into the next document; `weights[i]` of a document is the
    loss weight of predicting token i. A document goes into the first row with room; when none
    has room the batch is emitted and the document opens the next one (Grain's first-fit
    packing without its per-element tree machinery, which cost more than the CM3 transforms in
    bench/pipeline.py's profile). Documents that
    fit no row (longer than seq_len after the shift, or empty) are skipped and counted in
    `skips`. More than `max_consecutive_skips` of them in a row is an error, not an endless loop
    over a stream none of whose documents fits. State: the parent's position before the document
    carried into the next batch.
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, rows: int, skips: "_Skips",
                 max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS):
        super().__init__(parent)
        self.seq_len, self.rows, self.skips = int(seq_len), int(rows), skips
        self.max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> "_FirstFitPackIterator":
        return _FirstFitPackIterator(self._parent.__iter__(), self.seq_len, self.rows, self.skips,
                                     self.max_consecutive_skips)

    def __str__(self) -> str:
        return f"FirstFitPackDataset(seq_len={self.seq_len}, rows={self.rows})"


class _FirstFitPackIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len: int, rows: int, skips: "_Skips", max_consecutive_skips: int):
        super().__init__(parent)
        self._seq_len, self._rows, self._skips = seq_len, rows, skips
        self._max_consecutive_skips, self._consecutive_skips = max_consecutive_skips, 0
        self._positions = np.arange(seq_len, dtype=np.int32)
        self._carry = None
        self._carry_state = None

    def _next_document(self):
        if self._carry is not None:
            doc, self._carry = self._carry, None
            return doc
        self._carry_state = self._parent.get_state()
        return next(self._parent)

    def __next__(self) -> dict[str, np.ndarray]:
        rows, length = self._rows, self._seq_len
        inputs = np.zeros((rows, length), np.int32)
        targets = np.zeros((rows, length), np.int32)
        weights = np.zeros((rows, length), np.float32)
        segment_ids = np.zeros((rows, length), np.int32)
        positions = np.zeros((rows, length), np.int32)
        used, count = [0] * rows, [0] * rows
        while True:
            try:
                doc = self._next_document()
            except StopIteration:
                if any(count):
                    break
                raise
            tokens = np.asarray(doc["tokens"])
            n = len(tokens) - 1
            if not fits_a_row(tokens, length):
                self._skips.count(n)
                self._consecutive_skips += 1
                if self._consecutive_skips > self._max_consecutive_skips:
                    raise ValueError(f"{self._consecutive_skips} documents in a row fit no row of data.seq_len={length} "
                                     "(longer after the next-token shift, or empty): this stream has none that "
                                     "does; raise data.seq_len or drop the long documents at ingestion")
                continue
            self._consecutive_skips = 0
            row = next((r for r in range(rows) if used[r] + n <= length), None)
            if row is None:
                self._carry = doc
                break
            a, b = used[row], used[row] + n
            inputs[row, a:b] = tokens[:-1]
            targets[row, a:b] = tokens[1:]
            w = doc.get("weights")
            weights[row, a:b] = 1.0 if w is None else np.asarray(w, np.float32)[1:]
            count[row] += 1
            self._skips.count_cut_neighbours(doc.get(NEIGHBOURS_CUT, 0))
            segment_ids[row, a:b] = count[row]
            positions[row, a:b] = self._positions[:n]
            used[row] = b
        return {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": segment_ids,
                "positions": positions}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._carry_state if self._carry is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._carry = None


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

    The process's streams are zipped into one Grain pipeline that yields whole batches, so with
    `worker_count` W > 0 Grain's `mp_prefetch` runs it in W processes: worker w transforms and
    packs elements w, w+W, ... of every stream and the workers' batches are interleaved in turn.
    Batches are a pure function of (seed, W): changing W changes the packing, so a run must
    resume with the W it saved (checked).
    """

    def __init__(self, documents: grain.MapDataset, *, seq_len: int, global_batch_size: int,
                 num_streams: int, seed: int, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, transform: Callable[[Any, np.random.Generator], dict] | None = None,
                 worker_count: int = 0, worker_buffer_size: int = 4, max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS):
        """`transform(document, rng)` (neighbour join, condition dropout, CM3 masking) runs per
        document per epoch with a generator Grain seeds from (seed, stream, position). Whether a
        transformed document fits a row can be a matter of chance (its sampled neighbours and
        spans), so a stream fails only after `max_consecutive_skips` misses in a row: data that
        broken (under 0.01% usable at the default) gets an error, not an endless loop."""
        if worker_count < 0:
            raise ValueError(f"data.worker_count must be >= 0, got {worker_count}")
        num_streams = stream_count(num_streams, global_batch_size)
        if global_batch_size % num_streams:
            raise ValueError(f"global batch {global_batch_size} is not divisible by data.num_streams={num_streams}")
        if len(documents) < num_streams:
            # the user's way out: streams are data.num_streams (default one per row of the batch)
            fits = max(d for d in range(1, len(documents) + 1) if global_batch_size % d == 0) if len(documents) else 0
            raise ValueError(f"{len(documents)} documents cannot feed {num_streams} streams (data.num_streams, one "
                             f"per row of global batch {global_batch_size} unless set): ingest more documents"
                             + (f", or set --config.data.num_streams={fits}" if fits else ""))
        self.seq_len = seq_len
        self.num_streams = int(num_streams)
        self.rows_per_stream = global_batch_size // num_streams
        self.stream_ids = list(stream_ranges(num_streams, process_index, process_count))
        self.worker_count = int(worker_count)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped = collections.Counter()
        self._transform = transform
        self._skips = _Skips(seq_len)
        streams = [self._stream(documents, s, num_streams, seed, shuffle) for s in self.stream_ids]
        ds = grain_exp.ZipIterDataset(streams).map(self._skips.assemble)
        if self.worker_count:
            if not flags.FLAGS.is_parsed():
                # Grain's worker start-up reads its absl flags; outside an absl app (tests, notebooks)
                # they keep their defaults
                flags.FLAGS.mark_as_parsed()
            # batches come back pickled, not in shared memory: they are small next to the work that
            # makes them, arrive as plain arrays, and leave nothing to unlink if a run dies
            ds = grain_exp.WithOptionsIterDataset(ds, grain_exp.DatasetOptions(min_shm_size=2 ** 62))
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                             per_worker_buffer_size=int(worker_buffer_size)))
        self._iterator = iter(ds)
        # workers stop when this iterator goes away or, at the latest, at interpreter exit (before
        # the modules Grain's clean-up needs are torn down)
        self._close = weakref.finalize(self, self._iterator.close) if self.worker_count else None

    def _stream(self, documents, stream, num_streams, seed, shuffle):
        ds = documents[stream::num_streams]
        if shuffle:
            ds = ds.shuffle(seed=grain_seed(seed * 1_000_003 + stream))  # reshuffled every epoch by grain
        ds = ds.repeat(None)
        if self._transform is not None:
            ds = ds.random_map(self._transform, seed=grain_seed(seed * 1_000_003 + stream + 7919))
        # no reader threads: the transforms hold the GIL, threads would only contend for it
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return FirstFitPackDataset(ds, seq_len=self.seq_len, rows=self.rows_per_stream, skips=self._skips,
                                   max_consecutive_skips=self.max_consecutive_skips)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._iterator))
        for reason, n in zip(_Skips.REASONS, batch.pop(_Skips.KEY).tolist()):
            if n:
                self.skipped[reason] += n
        return batch

    def get_state(self) -> bytes:
        state = {"streams": self.stream_ids, "worker_count": self.worker_count, "state": self._iterator.get_state(),
                 "skipped": dict(self.skipped)}   # so the count a run logs goes on across a resume
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if state["streams"] != self.stream_ids:
            raise ValueError(f"data state is for streams {state['streams']}, this process owns {self.stream_ids}; "
                             "resume with the same data.num_streams")
        self._check_worker_count(state)
        self._iterator.set_state(state["state"])
        self.skipped = collections.Counter(state.get("skipped", {}))

    def _check_worker_count(self, state: dict) -> None:
        if state.get("worker_count") != self.worker_count:
            raise ValueError(f"data state was saved with data.worker_count={state.get('worker_count')}, this run has "
                             f"{self.worker_count}; the packing depends on it: resume with the same worker count")

    def set_state_from_processes(self, states: Sequence[bytes]) -> None:
        """Resumes from the positions that every process of a run with another process count saved.

        Each stream is its own Grain pipeline and the global batch does not depend on the process
        count, so this process takes each of its streams' positions from whichever process held
        that stream: the run continues with exactly the batches it would have seen. Needs the same
        `num_streams` and `worker_count` (with workers, every worker's position is split the same
        way; the interleaving position is shared by all processes)."""
        saved = [json.loads(raw) for raw in states]
        if not saved:
            raise ValueError("no saved data state to resume from")
        by_stream: dict[int, list] = {}
        skeletons = set()
        for state in saved:
            self._check_worker_count(state)
            skeleton, per_worker = _split_zip_states(state["state"], self.worker_count)
            skeletons.add(json.dumps(skeleton, sort_keys=True))
            for i, stream in enumerate(state["streams"]):
                by_stream[int(stream)] = [parents[i] for parents in per_worker]
        if sorted(by_stream) != list(range(self.num_streams)):
            raise ValueError(f"the saved data states cover streams {sorted(by_stream)}, this run has "
                             f"data.num_streams={self.num_streams}: resume with the same num_streams")
        if len(skeletons) > 1:
            raise ValueError("the processes saved their data positions at different points of the worker cycle; "
                             "resume with the process count they were saved with")
        skeleton = json.loads(skeletons.pop())
        mine = [[by_stream[s][w] for s in self.stream_ids] for w in range(max(self.worker_count, 1))]
        self._iterator.set_state(_join_zip_states(skeleton, mine, self.worker_count))
        # each saved count goes to the process now holding that saver's first stream: the total is kept
        self.skipped = sum((collections.Counter(state.get("skipped", {})) for state in saved
                            if int(state["streams"][0]) in self.stream_ids), collections.Counter())

    def start_prefetch(self) -> None:
        """Part of grain's checkpoint interface; batches are produced on demand."""

    def close(self) -> None:
        """Stops Grain's worker processes (also done at garbage collection and exit)."""
        if self._close is not None:
            self._close()


def _split_zip_states(state: dict, worker_count: int) -> tuple[dict, list[list]]:
    """A PackedBatchIterator's Grain state -> (the rest, each worker's per-stream positions in
    stream order). In-process the state is the zip's `{"parents": [...]}`; with workers, Grain's
    multiprocess prefetch keeps one such zip state per worker beside its interleaving position."""
    if not worker_count:
        return {}, [list(state["parents"])]
    rest = {k: v for k, v in state.items() if k != "iterators_in_use_states"}
    if rest.get("future_states"):
        raise ValueError("the saved data state holds in-flight worker results; resume with the process count "
                         "it was saved with")
    return rest, [list(zipped["parents"]) for zipped in state["iterators_in_use_states"]]


def _join_zip_states(rest: dict, per_worker: list[list], worker_count: int) -> dict:
    if not worker_count:
        return {"parents": per_worker[0]}
    return {**rest, "iterators_in_use_states": [{"parents": parents} for parents in per_worker]}


class _Skips:
    """Counts the documents the packer skips, and the neighbours its examples lost to the length
    budget (`cm3.NEIGHBOURS_CUT`); it runs wherever the pipeline runs (a Grain worker too), so the
    counts since the previous batch travel inside the batch."""
    REASONS = ("document_longer_than_seq_len", "empty_document", NEIGHBOURS_CUT)
    KEY = "_skipped"

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.counts = np.zeros(len(self.REASONS), np.int64)
        self.reported = np.zeros(len(self.REASONS), np.int64)

    def count(self, length: int) -> None:
        self.counts[0 if length > self.seq_len else 1] += 1

    def count_cut_neighbours(self, n) -> None:
        self.counts[2] += int(n)

    def assemble(self, rows) -> dict[str, np.ndarray]:
        """The streams' rows -> one batch (+ the skip counts since the last batch)."""
        batch = {key: np.concatenate([r[key] for r in rows]) if len(rows) > 1 else rows[0][key] for key in BATCH_KEYS}
        delta, self.reported = self.counts - self.reported, self.counts.copy()
        batch[self.KEY] = delta
        return batch


def validate_batch(batch: dict[str, Any], rows: int, seq_len: int) -> None:
    for key in BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"batch lacks {key!r}; a batch needs {BATCH_KEYS}")
        if batch[key].shape != (rows, seq_len):
            raise ValueError(f"batch[{key!r}] has shape {batch[key].shape}, expected {(rows, seq_len)}")
