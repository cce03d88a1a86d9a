"""Neighbour selection rules, the ScaNN index (recall, save/load, shards, merge) and the sidecar."""
import os
import time
from unittest import mock

import numpy as np
import pytest

from data_pipeline import neighbours as NB


def _basis(i, d=8):
    v = np.zeros(d, np.float32)
    v[i] = 1
    return v


def _unit(v):
    return (v / np.linalg.norm(v)).astype(np.float32)


def _hand_made_bank():
    """Documents 0..7 in 8-d; which are multimodal, and the embeddings the diversity rule reads."""
    e = np.stack([
        _basis(0),                            # 0: the query
        _basis(1),                            # 1: near duplicate by its retrieval score (0.95)
        _basis(2),                            # 2: text-only
        _basis(3),                            # 3: multimodal
        _unit(_basis(3) + 0.1 * _basis(4)),   # 4: multimodal, cosine 0.995 with 3 (diversity)
        _basis(5),                            # 5: multimodal
        _basis(6),                            # 6: image-only
        _unit(_basis(0) + 0.05 * _basis(7)),  # 7: near duplicate of the query document (cos 0.999)
    ])
    multimodal = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    return e, multimodal


def test_selection_rules_on_hand_made_candidates():
    e, multimodal = _hand_made_bank()
    inf = -np.inf
    # rows: query 0 (both lists), query 6 (nothing usable), query 2 (text list only: fill rule)
    text_ids = np.array([[0, 1, 2, 3, 4, 5, -1],
                         [6, -1, -1, -1, -1, -1, -1],
                         [3, 5, 6, 0, 4, -1, -1]])
    text_scores = np.array([[1.0, 0.95, 0.85, 0.8, 0.79, 0.7, inf],
                            [1.0, inf, inf, inf, inf, inf, inf],
                            [0.8, 0.7, 0.6, 0.5, 0.79, inf, inf]], np.float32)
    image_ids = np.array([[3, 7, 1, 6, 2], [-1] * 5, [-1] * 5])
    image_scores = np.array([[0.88, 0.5, 0.65, 0.6, 0.5], [inf] * 5, [inf] * 5], np.float32)
    ids, scores, counts = NB.select_neighbours(
        np.array([0, 6, 2]), [text_ids, image_ids], [text_scores, image_scores], [2, 2], e, multimodal)
    assert ids.dtype == np.int32 and ids.shape == (3, 4)
    # query 0: by text, multimodal first (3, then 5: 4 resembles 3; the higher-scoring text-only 2
    # waits); by image: 3 already chosen, 7 a near duplicate of the query, 1 too (by its text
    # score: a near duplicate in one list is one in all, though multimodal), then 6 and 2.
    assert ids[0].tolist() == [3, 5, 6, 2]
    np.testing.assert_allclose(scores[0], [0.8, 0.7, 0.6, 0.5])
    # query 6: only itself and padding -> nothing, -1 row
    assert ids[1].tolist() == [-1, -1, -1, -1] and np.all(np.isneginf(scores[1]))
    # query 2: text quota (3, 5), then the empty image slots filled from what is left, multimodal first
    assert ids[2].tolist() == [3, 5, 0, 6]
    for row, q in enumerate([0, 6, 2]):
        assert q not in ids[row]
    assert np.all(scores[ids >= 0] <= 0.9)
    assert counts["self"] == 2
    assert counts["near_duplicate"] == 3            # doc 1 (score 0.95) in both lists, doc 7 (document cosine)
    assert counts["duplicate"] == 2                 # docs 3 and 2 are in both lists of query 0
    assert counts["diversity"] == 2                 # doc 4 for query 0 and for query 2


def test_selection_thresholds_and_validity():
    e, multimodal = _hand_made_bank()
    cand = np.array([[1, 3, 4]])
    sc = np.array([[0.95, 0.8, 0.79]], np.float32)
    # raising max_score admits the near duplicate; raising diversity_threshold admits 4
    ids, _, _ = NB.select_neighbours(np.array([0]), [cand], [sc], [3], e, multimodal, max_score=0.99)
    assert ids[0].tolist() == [1, 3, -1]
    ids, _, _ = NB.select_neighbours(np.array([0]), [cand], [sc], [3], e, multimodal, diversity_threshold=0.999)
    assert ids[0].tolist() == [3, 4, -1]
    valid = np.ones(8, bool)
    valid[3] = False   # e.g. a document with nothing to embed
    ids, _, counts = NB.select_neighbours(np.array([0]), [cand], [sc], [3], e, multimodal, valid=valid)
    assert ids[0].tolist() == [4, -1, -1] and counts["invalid"] == 1


def test_queries_from_outside_the_bank_search_wider_past_near_duplicates():
    rng = np.random.default_rng(0)
    d = 16
    dupes = np.stack([_unit(_basis(0, d) + 0.05 * rng.normal(size=d)) for _ in range(40)])  # cos > 0.9 with q0
    a = _unit(_basis(0, d) + 0.8 * _basis(1, d))                   # cos 0.78 with q0
    b = _unit(_basis(0, d) + 0.8 * _basis(1, d) + 0.05 * _basis(2, d))  # resembles a: the diversity rule
    c = _unit(_basis(0, d) + 1.0 * _basis(3, d))                   # cos 0.71 with q0
    e = _unit(_basis(5, d) + 0.5 * _basis(6, d))
    bank = np.concatenate([dupes, np.stack([a, b, c, e, _basis(5, d)])])
    multimodal = np.ones(len(bank), bool)
    queries = np.stack([_basis(0, d), _unit(_basis(5, d) + _basis(7, d))])
    widths = []

    def search(q, k):
        widths.append((len(q), k))
        return NB.exact_search(bank, q, k)

    ids, scores = NB.neighbours_of_queries(search, queries, 2, bank, multimodal, num_candidates=8)
    assert ids[0].tolist() == [40, 42] and np.all(scores[0] <= 0.9)   # a, then c (b resembles a)
    assert ids[1].tolist() == [44, 43]                                 # found in the first 8 candidates
    assert widths == [(2, 8), (1, 32), (1, 45)]                        # only the short query searched wider
    # without widening, the first query's 8 candidates are all near duplicates
    top_ids, top_scores = NB.exact_search(bank, queries[:1], 8)
    fixed, _, counts = NB.select_neighbours(np.array([-1]), [top_ids], [top_scores], [2], bank, multimodal,
                                            query_embeddings=queries[:1])
    assert fixed[0].tolist() == [-1, -1] and counts["near_duplicate"] == 8 and counts["self"] == 0


def test_documents_short_of_neighbours_are_searched_wider():
    """Five clusters of 34 near duplicates: each document's first 34 candidates are itself and its
    duplicates, so 8 and then 32 candidates find nothing, and 128 find one per other cluster."""
    rng = np.random.default_rng(0)
    d = 16
    centres = [_basis(0, d)] + [_unit(_basis(0, d) + _basis(i, d)) for i in range(1, 5)]
    doc = np.stack([_unit(c + 0.03 * rng.normal(size=d)) for c in centres for _ in range(34)])
    n = len(doc)
    both = np.ones(n, bool)
    kw = dict(search=lambda q, k: NB.exact_search(doc, q, k), k_text=2, k_image=2)
    ids, scores, stats = NB.compute_neighbours(doc, doc, doc, both, both, num_candidates=8, **kw)
    assert stats["widened_searches"] == 2 * n        # every document: 8 -> 32 -> 128
    assert stats["documents_with_full_neighbours"] == n
    cluster = np.arange(n) // 34
    for r in range(n):                               # one neighbour from each other cluster, none from its own
        assert sorted(cluster[ids[r]].tolist()) == sorted(set(range(5)) - {cluster[r]})
    assert np.all(scores <= 0.9)
    # each document's skips are counted once, in its last search: as if it had searched 128 at once
    ids128, scores128, stats128 = NB.compute_neighbours(doc, doc, doc, both, both, num_candidates=128, **kw)
    np.testing.assert_array_equal(ids, ids128)
    assert stats["skipped"] == stats128["skipped"] and stats128["widened_searches"] == 0
    # without widening nobody has a neighbour
    _, _, narrow = NB.compute_neighbours(doc, doc, doc, both, both, num_candidates=8, max_candidates=8, **kw)
    assert narrow["documents_without_neighbours"] == n and narrow["skipped"]["near_duplicate"] > 0


def test_one_query_array_for_both_lists_is_searched_once_with_the_same_result():
    """A user's embeddings serve as the text and the image query: one search (over the rows either
    list wants) must give what two searches give, widening included, each list keeping its rows."""
    rng = np.random.default_rng(1)
    d = 16
    centres = [_basis(0, d)] + [_unit(_basis(0, d) + _basis(i, d)) for i in range(1, 5)]
    doc = np.stack([_unit(c + 0.03 * rng.normal(size=d)) for c in centres for _ in range(34)])
    n = len(doc)
    has_text, has_image = rng.random(n) < 0.8, rng.random(n) < 0.8
    has_text[:10], has_image[:10] = True, False       # text-only, image-only and absent rows
    has_text[10:20], has_image[10:20] = False, True
    has_text[20:25] = has_image[20:25] = False
    searched = []

    def search(q, k):
        searched.append(len(q))
        return NB.exact_search(doc, q, k)

    kw = dict(search=search, k_text=2, k_image=2, num_candidates=8, query_batch=64)
    two = NB.compute_neighbours(doc, doc, doc.copy(), has_text, has_image, **kw)
    two_searched, searched[:] = sum(searched), []
    one = NB.compute_neighbours(doc, doc, doc, has_text, has_image, **kw)
    np.testing.assert_array_equal(one[0], two[0])
    # scores to the last bits: BLAS rounds a row's dot products by the shape of the batch it is in
    np.testing.assert_allclose(one[1], two[1], rtol=1e-6)
    assert {k: v for k, v in one[2].items() if k != "seconds"} == {k: v for k, v in two[2].items() if k != "seconds"}
    assert one[2]["widened_searches"] > 0 and (one[0][20:25] == -1).all()
    # each round searches the rows with either query once: far fewer vectors than the two lists' sum
    assert sum(searched) < 0.7 * two_searched


def test_merge_topk_equals_single_index():
    rng = np.random.default_rng(0)
    # small integers: inner products are exact, so there are many ties (across shards too), and
    # the merged order must break them by the smaller id exactly as the single search does
    bank = rng.integers(-3, 4, (1000, 16)).astype(np.float32)
    queries = rng.integers(-3, 4, (50, 16)).astype(np.float32)
    full_ids, full_scores = NB.exact_search(bank, queries, 10)
    parts = [NB.exact_search(bank[a:b], queries, 10, doc_ids=np.arange(a, b)) for a, b in NB.shard_bounds(1000, 3)]
    ids, scores = NB.merge_topk([p[0] for p in parts], [p[1] for p in parts], 10)
    np.testing.assert_array_equal(ids, full_ids)
    np.testing.assert_array_equal(scores, full_scores)
    # short shards are padded; padding never beats a real candidate
    ids, scores = NB.merge_topk([np.array([[4, -1]]), np.array([[9, 2]])],
                                [np.array([[0.5, 0.0]]), np.array([[0.7, 0.5]])], 4)
    assert ids.tolist() == [[9, 2, 4, -1]] and np.isneginf(scores[0, 3])


def _clustered(n, d=48, clusters=64, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(ids, truth):
    return np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth)])


def test_scann_recall_save_load_and_shards(tmp_path):
    bank = _clustered(12000)
    queries = _clustered(400, seed=1)
    truth, _ = NB.exact_search(bank, queries, 10)
    index = NB.build_index(bank, str(tmp_path / "index"))
    assert index.params["mode"] == "tree_ah" and index.params["num_leaves"] == round(np.sqrt(12000))
    ids, scores = index.search(queries, 10)
    assert _recall(ids, truth) >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # saved and loaded back (from a moved directory): identical answers
    os.rename(tmp_path / "index", tmp_path / "moved")
    loaded = NB.ScannIndex.load(str(tmp_path / "moved"))
    ids2, scores2 = loaded.search(queries, 10)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(scores2, scores)
    # sharded: each shard an index with its offset, built host by host, merged top-k
    for host in range(2):
        NB.build_sharded(bank, 3, str(tmp_path / "shards"), shard_ids=range(host, 3, 2))
    sharded = NB.ShardedIndex.load(str(tmp_path / "shards"))
    assert [s.doc_ids[0] for s in sharded.shards] == [0, 4000, 8000]
    sids, _ = sharded.search(queries, 10)
    assert _recall(sids, truth) >= 0.95
    with pytest.raises(FileNotFoundError):
        NB.ShardedIndex.load(str(tmp_path / "missing"))


def test_avq_leaf_centres_reach_the_searcher(tmp_path):
    """params["avq"] is passed to ScaNN's tree (its saved config says so) and keeps the recall."""
    bank = _clustered(12000)
    queries = _clustered(200, seed=1)
    truth, _ = NB.exact_search(bank, queries, 10)
    index = NB.build_index(bank, str(tmp_path / "avq"), params=NB.scann_params(12000, avq=2.5))
    assert _recall(index.search(queries, 10)[0], truth) >= 0.95
    from scann.proto import scann_pb2

    def saved_avq(name):
        config = scann_pb2.ScannConfig()
        config.ParseFromString((tmp_path / name / "scann" / "scann_config.pb").read_bytes())
        return config.partitioning.avq

    assert saved_avq("avq") == 2.5
    NB.build_index(bank, str(tmp_path / "plain"))
    assert saved_avq("plain") != 2.5


def test_small_bank_uses_exact_scorer():
    bank = _clustered(300)
    index = NB.build_index(bank)
    assert index.params["mode"] == "brute_force"
    ids, scores = index.search(bank[:20], 10)
    truth, truth_scores = NB.exact_search(bank, bank[:20], 10)
    assert _recall(ids, truth) == 1.0
    ids, _ = NB.build_index(bank[:5]).search(bank[:2], 8)   # fewer documents than k: padded
    assert ids.shape == (2, 8) and np.all(ids[:, 5:] == -1)
    # hashing over every point asked for on a small bank gets its hashing parameters; a tree needs 50 points a leaf
    hashed = NB.build_index(bank, params=NB.scann_params(300, mode="ah"))
    assert hashed.params["dims_per_block"] == 2 and _recall(hashed.search(bank[:20], 10)[0], truth) >= 0.95
    with pytest.raises(ValueError, match="50 points a leaf"):
        NB.scann_params(30, mode="tree_ah")


def test_compute_neighbours_and_sidecar(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    doc = _clustered(n, d=32, clusters=20)
    doc[1] = doc[0]                                   # an exact duplicate pair
    kind = rng.choice(3, n, p=[0.6, 0.2, 0.2])        # both, text only, image only
    has_text, has_image = kind != 2, kind != 1
    has_text[:2] = has_image[:2] = True
    has_text[5] = has_image[5] = False                # nothing to embed
    doc[5] = 0
    noise = 0.05 * rng.standard_normal(doc.shape).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    text_q = np.where(has_text[:, None], unit(doc + noise), 0).astype(np.float32)
    image_q = np.where(has_image[:, None], unit(doc - noise), 0).astype(np.float32)
    stats = NB.build_neighbours(str(tmp_path), doc, text_q, image_q, has_text, has_image, num_candidates=16)
    ids, scores, meta = NB.load_neighbours(str(tmp_path), n)
    assert ids.shape == (n, 4) and ids.dtype == np.int32 and scores.dtype == np.float32
    assert meta["stats"]["documents_without_neighbours"] == stats["documents_without_neighbours"]
    rows = np.arange(n)[:, None]
    assert not np.any(ids == rows)                    # never the query itself
    assert np.all(scores[ids >= 0] <= 0.9)
    assert 1 not in ids[0] and 0 not in ids[1]        # the duplicate is skipped
    assert np.all(ids[5] == -1)
    assert not np.any(ids == 5)                       # empty documents are nobody's neighbour
    valid = has_text | has_image
    assert not np.any(np.isin(ids[ids >= 0], np.flatnonzero(~valid)))
    for r in range(n):                                # no repeats within a row, padding at the end
        chosen = ids[r][ids[r] >= 0]
        assert len(set(chosen.tolist())) == chosen.size
        assert np.all(ids[r, chosen.size:] == -1)
    per_row = (ids >= 0).sum(axis=1)
    assert stats["documents_without_neighbours"] == int((per_row == 0).sum()) == 1   # doc 5
    assert sum(stats["neighbours_histogram"]) == n and stats["documents_without_embedding"] == 1
    assert stats["skipped"]["self"] > 0 and stats["skipped"]["near_duplicate"] > 0
    assert stats["mean_neighbours"] > 3.5
    # multimodal documents are preferred: more of them among neighbours than in the bank
    mm = has_text & has_image
    assert mm[ids[ids >= 0]].mean() > mm[valid].mean()
    # round trip of the sidecar
    NB.save_neighbours(str(tmp_path / "copy"), ids, scores, stats)
    ids2, scores2, _ = NB.load_neighbours(str(tmp_path / "copy"), n, mmap=False)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(scores2, scores)
    with pytest.raises(ValueError, match="neighbours for 400 documents"):
        NB.load_neighbours(str(tmp_path), n + 1)
    for bad_id in (n, -7):   # an id outside the documents, or negative but not padding
        broken = ids.copy()
        broken[5, 0] = bad_id
        NB.save_neighbours(str(tmp_path / "broken"), broken, scores, stats)
        with pytest.raises(ValueError, match=r"ids must be -1 or in \[0, 400\): row 5 holds"):
            NB.load_neighbours(str(tmp_path / "broken"), n)
    # a truncated or foreign sidecar manifest is a clear error naming the file, never a KeyError later
    sidecar = tmp_path / "copy" / NB.NEIGHBOURS_JSON
    sidecar.write_text(sidecar.read_text()[:40])
    with pytest.raises(ValueError, match=r"neighbours\.json: corrupted neighbour sidecar"):
        NB.load_neighbours(str(tmp_path / "copy"), n)
    sidecar.write_text('{"format": "cm3leon_jax.neighbours/0"}')
    with pytest.raises(ValueError, match="format 'cm3leon_jax.neighbours/0', expected 'cm3leon_jax.neighbours/1'"):
        NB.load_neighbours(str(tmp_path / "copy"), n)
    with pytest.raises(FileNotFoundError, match="no neighbour sidecar there .python -m data_pipeline.index"):
        NB.load_neighbours(str(tmp_path / "missing"), n)
    # a rewrite killed between the arrays left new ids beside the old scores, read as one sidecar
    NB.save_neighbours(str(tmp_path / "killed"), ids, scores, stats)
    real_write, calls = NB.workdir_io.write_npy_rows, []

    def killed_after_ids(path, array, dtype):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, array, dtype)

    with mock.patch.object(NB.workdir_io, "write_npy_rows", killed_after_ids), pytest.raises(KeyboardInterrupt):
        NB.save_neighbours(str(tmp_path / "killed"), np.roll(ids, 1, axis=0), scores[::-1], stats)
    with pytest.raises(FileNotFoundError, match="no neighbour sidecar there"):
        NB.load_neighbours(str(tmp_path / "killed"), n)
    # the sharded path gives the same neighbours (exact scorer on these small shards)
    NB.build_neighbours(str(tmp_path / "sharded"), doc, text_q, image_q, has_text, has_image,
                        num_candidates=16, num_shards=3)
    ids3, _, _ = NB.load_neighbours(str(tmp_path / "sharded"), n)
    np.testing.assert_array_equal(ids3, ids)
    # hosts each taking a range of documents produce the same rows
    index = NB.ScannIndex.load(str(tmp_path / "scann_index"))
    parts = [NB.compute_neighbours(doc, text_q, image_q, has_text, has_image, search=index, num_candidates=16,
                                   start=a, stop=b) for a, b in [(0, 150), (150, n)]]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), ids)
    assert parts[1][2]["num_documents"] == n - 150 and parts[1][2]["start"] == 150


def test_two_builds_of_one_bank_give_the_same_neighbours():
    """Same seed -> same batches needs the index to be a function of the bank. ScaNN's default
    random k-means start is not, on banks with repeated rows like the shapes corpus's: two builds
    of this one disagreed on 40% of the top-10 lists."""
    rng = np.random.default_rng(0)
    bank = np.repeat(rng.standard_normal((1000, 32)).astype(np.float32), 5, axis=0)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    params = NB.scann_params(5000, k=10, num_leaves=50, leaves_to_search=5, reorder=20)
    first, _ = NB.ScannIndex.build(bank, params=params).search(bank[:1000], 10)
    for _ in range(3):  # ScaNN's random start varies with the clock: builds close together often agree
        time.sleep(1.1)
        again, _ = NB.ScannIndex.build(bank, params=params).search(bank[:1000], 10)
        np.testing.assert_array_equal(first, again)


def test_concatenated_rows_read_parts_as_one_array(tmp_path):
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((23, 5)).astype(np.float32)
    for i, (a, b) in enumerate([(0, 7), (7, 8), (8, 23)]):
        np.save(tmp_path / f"p{i}.npy", whole[a:b])
    rows = NB.ConcatenatedRows([np.load(tmp_path / f"p{i}.npy", mmap_mode="r") for i in range(3)])
    assert rows.shape == (23, 5) and len(rows) == 23 and rows.dtype == np.float32
    for a, b in [(0, 23), (3, 9), (7, 8), (8, 8), (20, 40), (-5, None)]:
        np.testing.assert_array_equal(rows[a:b], whole[a:b])
    idx = np.array([[22, 0, 7], [7, 8, 3]])
    np.testing.assert_array_equal(rows[idx], whole[idx])   # gathers keep the index's shape, in its order
    np.testing.assert_array_equal(rows[np.int64(9)], whole[9])
    for bad in (np.array([23]), np.array([-1]), np.array([0.5]), slice(0, 10, 2)):
        with pytest.raises(IndexError):
            rows[bad]
    with pytest.raises(ValueError, match="disagree"):
        NB.ConcatenatedRows([whole, whole[:, :4]])
    # what the selection reads: the same choice from parts as from the array
    ids = rng.integers(0, 23, (4, 6))
    args = (np.arange(4), [ids], [np.sort(rng.random((4, 6)))[:, ::-1] * 0.8], [3])
    multimodal = np.ones(23, bool)
    expected = NB.select_neighbours(*args, whole, multimodal)
    got = NB.select_neighbours(*args, rows, multimodal)
    for e, g in zip(expected[:2], got[:2]):
        np.testing.assert_array_equal(e, g)
