import grain
import numpy as np
import pytest

import data_pipeline
from data_pipeline.packing import PackedBatchIterator
from data_pipeline.synthetic_tokens import MarkovDocuments
from tests.helpers import tiny_config


def _batches(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_rows_hold_whole_shifted_documents():
    config = tiny_config()
    batch = next(data_pipeline.make_train_iterator(config, 0, 1))
    assert set(batch) == set(data_pipeline.BATCH_KEYS)
    for key in data_pipeline.BATCH_KEYS:
        assert batch[key].shape == (8, 32)
    seg, pos = batch["segment_ids"], batch["positions"]
    for row in range(8):
        for s in set(seg[row]) - {0}:
            where = np.flatnonzero(seg[row] == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))  # positions restart
            # next-token targets stay inside the document: input i+1 == target i
            np.testing.assert_array_equal(batch["inputs"][row, where[1:]], batch["targets"][row, where[:-1]])
            assert batch["inputs"][row, where[0]] == 1  # each document starts with <eos>
    assert np.all(batch["weights"][seg == 0] == 0) and np.all(batch["weights"][seg > 0] == 1)


def test_same_seed_same_batches_and_other_seed_differs():
    a = _batches(data_pipeline.make_train_iterator(tiny_config(), 0, 1), 3)
    b = _batches(data_pipeline.make_train_iterator(tiny_config(), 0, 1), 3)
    c = _batches(data_pipeline.make_train_iterator(tiny_config(seed=1), 0, 1), 3)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_any_nonnegative_seed_works_and_small_seeds_keep_their_order():
    """Each stream's Grain seed is derived as seed * 1,000,003 + stream, past Grain's 2**32 limit for
    seeds >= 4,295: it is reduced into range, which leaves the seeds that fitted unchanged."""
    big = [_batches(data_pipeline.make_train_iterator(tiny_config(seed=2 ** 40 + 12_345), 0, 1), 2) for _ in range(2)]
    for x, y in zip(*big):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(big[0][0]["inputs"], _batches(data_pipeline.make_train_iterator(tiny_config(), 0, 1), 1)[0]["inputs"])
    docs = grain.MapDataset.source([{"tokens": np.arange(i, i + 6, dtype=np.int32)} for i in range(40)])
    new = next(PackedBatchIterator(docs, seq_len=8, global_batch_size=2, num_streams=2, seed=4_294))
    streams = [docs[s::2].shuffle(seed=4_294 * 1_000_003 + s) for s in range(2)]   # Grain's own, unreduced
    for row, stream in enumerate(streams):
        np.testing.assert_array_equal(new["inputs"][row, :5], stream[0]["tokens"][:5])


def test_global_batch_is_independent_of_process_count():
    config = tiny_config()
    whole = _batches(data_pipeline.make_train_iterator(config, 0, 1), 3)
    halves = [_batches(data_pipeline.make_train_iterator(config, p, 2), 3) for p in range(2)]
    for step in range(3):
        for key in whole[step]:
            np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key])
    # processes read disjoint documents: their rows never share a document start
    with pytest.raises(ValueError, match="divisible by the process count"):
        data_pipeline.make_train_iterator(tiny_config(**{"data.num_streams": 3, "data.global_batch_size": 3}), 0, 2)


def test_state_restore_gives_identical_following_batches():
    it = data_pipeline.make_train_iterator(tiny_config(), 0, 1)
    _batches(it, 5)
    state = it.get_state()
    expected = _batches(it, 4)
    fresh = data_pipeline.make_train_iterator(tiny_config(), 0, 1)
    fresh.set_state(state)
    for x, y in zip(expected, _batches(fresh, 4)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    other_process = data_pipeline.make_train_iterator(tiny_config(), 1, 2)
    with pytest.raises(ValueError, match="owns"):
        other_process.set_state(state)


def _resumed_elsewhere(config, saved_by: int, resumed_on: int, steps_before: int = 3, steps_after: int = 3):
    """Runs `saved_by` processes for `steps_before` batches, then resumes their saved positions on
    `resumed_on` processes; returns (the global batches the saving run goes on with, the resumed
    run's global batches)."""
    saving = [data_pipeline.make_train_iterator(config, p, saved_by) for p in range(saved_by)]
    for it in saving:
        _batches(it, steps_before)
    states = [it.get_state() for it in saving]
    going_on = [_batches(it, steps_after) for it in saving]
    resumed = [data_pipeline.make_train_iterator(config, p, resumed_on) for p in range(resumed_on)]
    for it in resumed:
        it.set_state_from_processes(states)
    after = [_batches(it, steps_after) for it in resumed]
    for it in saving + resumed:
        it.close()
    glue = lambda per_process, step: {k: np.concatenate([b[step][k] for b in per_process])  # noqa: E731
                                      for k in per_process[0][step]}
    return [glue(going_on, s) for s in range(steps_after)], [glue(after, s) for s in range(steps_after)]


@pytest.mark.parametrize("saved_by,resumed_on", [(1, 2), (2, 1), (2, 4)])
def test_a_data_position_resumes_on_another_process_count(saved_by, resumed_on):
    expected, resumed = _resumed_elsewhere(tiny_config(), saved_by, resumed_on)
    for x, y in zip(expected, resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_a_data_position_with_workers_resumes_on_another_process_count():
    expected, resumed = _resumed_elsewhere(tiny_config(**{"data.worker_count": 2}), 1, 2, steps_before=3)
    for x, y in zip(expected, resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_redistributed_positions_are_checked():
    it = data_pipeline.make_train_iterator(tiny_config(), 0, 1)
    _batches(it, 2)
    state = it.get_state()
    with pytest.raises(ValueError, match="num_streams"):  # 8 saved streams, 4 wanted
        data_pipeline.make_train_iterator(tiny_config(**{"data.num_streams": 4}), 0, 2).set_state_from_processes([state])
    half = data_pipeline.make_train_iterator(tiny_config(), 0, 2)
    with pytest.raises(ValueError, match="num_streams"):  # one of two processes' files only
        data_pipeline.make_train_iterator(tiny_config(), 0, 1).set_state_from_processes([half.get_state()])
    with pytest.raises(ValueError, match="worker_count"):
        data_pipeline.make_train_iterator(tiny_config(**{"data.worker_count": 1}), 0, 2).set_state_from_processes(
            [state])


def test_oversize_and_empty_documents_are_skipped_and_counted():
    docs = [{"tokens": np.arange(n, dtype=np.int32) + 8} for n in (5, 50, 1, 6, 7, 40, 4)]
    it = PackedBatchIterator(grain.MapDataset.source(docs), seq_len=16, global_batch_size=1, num_streams=1,
                             seed=0, shuffle=False)
    seen = set()
    for _ in range(3):
        batch = next(it)
        seen.update(int(t) for t in batch["inputs"][0][batch["segment_ids"][0] > 0])
    assert it.skipped["document_longer_than_seq_len"] >= 2
    assert it.skipped["empty_document"] >= 1
    assert max(seen) < 8 + 16
    # the counts are part of the data position: a resumed run's count goes on from the saved one
    state, counted = it.get_state(), dict(it.skipped)
    next(it)
    again = PackedBatchIterator(grain.MapDataset.source(docs), seq_len=16, global_batch_size=1, num_streams=1,
                                seed=0, shuffle=False)
    again.set_state(state)
    assert dict(again.skipped) == counted
    # redistributed to another process count, the saved counts are kept in total
    moved = PackedBatchIterator(grain.MapDataset.source(docs), seq_len=16, global_batch_size=1, num_streams=1,
                                seed=0, shuffle=False)
    moved.set_state_from_processes([state])
    assert dict(moved.skipped) == counted


def test_a_stream_with_no_document_that_fits_is_an_error_not_an_endless_loop():
    def packed(lengths, **kwargs):
        docs = grain.MapDataset.source([{"tokens": np.arange(n, dtype=np.int32) + 8} for n in lengths])
        return PackedBatchIterator(docs, seq_len=16, global_batch_size=2, num_streams=2, seed=0, **kwargs)

    # two streams: documents 0, 2 (both fit) and 1, 3 (neither fits a 16-token row); the default
    # allows 10,000 misses in a row (a fitting document can be a rare draw of the transform)
    with pytest.raises(ValueError, match="5 documents in a row fit no row of data.seq_len=16"):
        next(packed((5, 40, 6, 50), max_consecutive_skips=4))
    # one fitting document in four per stream is enough
    it = packed((5, 40, 40, 40, 40, 6, 40, 50), max_consecutive_skips=6)   # it recurs within two passes
    for _ in range(6):
        assert (next(it)["segment_ids"] > 0).any(axis=1).all()


def test_markov_documents_are_deterministic():
    a, b = MarkovDocuments(64, 100, 4, 20, seed=3), MarkovDocuments(64, 100, 4, 20, seed=3)
    for i in (0, 7, 99):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
    assert 0 < a.entropy_per_token < np.log(4)


def test_worker_processes_give_deterministic_batches_and_resume_exactly():
    config = tiny_config(**{"data.worker_count": 2})
    it = data_pipeline.make_train_iterator(config, 0, 1)
    first = _batches(it, 3)
    state = it.get_state()
    following = _batches(it, 3)
    it.close()
    again = data_pipeline.make_train_iterator(config, 0, 1)
    for x, y in zip(first, _batches(again, 3)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    again.set_state(state)  # also rewinds an iterator that has already moved on
    for x, y in zip(following, _batches(again, 3)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    again.close()
    assert set(first[0]) == set(data_pipeline.BATCH_KEYS) and first[0]["inputs"].shape == (8, 32)
    with pytest.raises(ValueError, match="worker_count"):
        data_pipeline.make_train_iterator(tiny_config(), 0, 1).set_state(state)


def test_skips_are_counted_inside_worker_processes():
    docs = [{"tokens": np.arange(n, dtype=np.int32) + 8} for n in (5, 50, 1, 6, 7, 40, 4)]
    it = PackedBatchIterator(grain.MapDataset.source(docs), seq_len=16, global_batch_size=1, num_streams=1,
                             seed=0, shuffle=False, worker_count=1)
    for _ in range(4):
        next(it)
    it.close()
    assert it.skipped["document_longer_than_seq_len"] >= 2 and it.skipped["empty_document"] >= 1


def test_too_few_documents_for_the_streams_names_the_field_and_a_value_that_works():
    """3 documents, 16 rows (one stream each by default): the error said only "3 documents cannot
    feed 16 streams"; it now names data.num_streams and a divisor of the batch that fits."""
    docs = grain.MapDataset.source([{"tokens": np.arange(5, dtype=np.int32) + 8} for _ in range(3)])
    with pytest.raises(ValueError, match=r"data.num_streams.*--config.data.num_streams=2"):
        PackedBatchIterator(docs, seq_len=16, global_batch_size=16, num_streams=0, seed=0)
    it = PackedBatchIterator(docs, seq_len=16, global_batch_size=16, num_streams=2, seed=0)
    assert next(it)["inputs"].shape == (16, 16)
