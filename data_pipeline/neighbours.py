"""The memory bank index (ScaNN) and each document's retrieved neighbours, stored as a sidecar.

Pieces (all arrays are aligned with document ids = row numbers):
  * `ScannIndex`: ScaNN over a bank of unit vectors (maximum inner product): a k-means
    partitioning tree, asymmetric hashing (anisotropic, 4-bit codes per 2 dims) and exact float
    reordering, with parameters chosen from the bank size (`scann_params`); banks too small for
    training use ScaNN's exact brute-force scorer. Saved to / loaded from a directory.
  * `exact_search`: brute-force numpy top-k, the reference for recall.
  * `build_sharded` / `ShardedIndex`: one index per contiguous shard of the bank (each records
    its document-id offset), searched shard by shard and merged with `merge_topk` (pure), so the
    bank never has to fit one machine (see `build_sharded` for the multi-host path).
  * `select_neighbours` (pure numpy): the paper's choice among candidates: maximum inner
    product, never the query itself, nothing scoring above 0.9 (near duplicates; also checked
    document to document), multimodal documents first, a candidate too similar to one already
    chosen skipped, up to K per document, -1 padding.
  * `neighbours_of_queries`: the same choice for queries from outside the bank (captions at
    inference), widening the search for queries whose top candidates are all near duplicates.
  * `compute_neighbours`: per document, retrieve by its text query and by its image query (after
    20% query-token dropout, done by the retriever), keep 2 by text and 2 by image (slots a
    modality cannot fill go to the best remaining candidates of the other), and count everything
    skipped; `save_neighbours` / `load_neighbours`: the sidecar `.npy` files in the data
    directory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from cm3leon_jax import workdir_io

INDEX_FORMAT = "cm3leon_jax.scann_index/1"
SHARDS_FORMAT = "cm3leon_jax.scann_shards/1"
NEIGHBOURS_FORMAT = "cm3leon_jax.neighbours/1"
INDEX_JSON = "index.json"
SHARDS_JSON = "shards.json"
NEIGHBOURS_IDS = "neighbours_ids.npy"
NEIGHBOURS_SCORES = "neighbours_scores.npy"
NEIGHBOURS_JSON = "neighbours.json"

# Below this many vectors, ScaNN's tree and hashing have too little to train on: exact scoring.
MIN_TREE_SIZE = 4096


# A query still short of its k neighbours after `num_candidates` is searched again 4x wider, up to this
# many candidates per list (select_neighbours compares every pair of a row's candidates).
MAX_CANDIDATES = 4096
NEAR_DUPLICATE_SCORE = 0.9  # the paper: candidates scoring above this are near duplicates, never used


def _scann():
    from scann.scann_ops.py import scann_ops_pybind
    return scann_ops_pybind


# --------------------------------------------------------------------------- parameters

def scann_params(num_points: int, *, k: int = 10, search_fraction: float = 0.15,
                 reorder: int | None = None, **overrides) -> dict[str, Any]:
    """ScaNN parameters from the bank size.

    num_leaves ~ sqrt(N) (at least 50 points per leaf), leaves_to_search = search_fraction of
    them (real embeddings are clustered: ~10-20% reaches recall@10 >= 0.95; random vectors need
    far more, see bench/retrieval.py), 2 dimensions per 4-bit hashing block with anisotropic
    loss (threshold 0.2, the MIPS setting), float reordering of the top `reorder` (default
    max(1000, 20 k)) candidates: bench/retrieval.py at 1M points lifts recall@10 from 0.948 to
    0.972 going from 300 to 1000, while the exact rescoring stays small next to the hashed scan.
    Keyword overrides replace any field; optional ones: mode="ah" (hashing over every point, no
    tree), reorder_quantize ("float32" default, "int8", "bfloat16": ScaNN's reordering precision),
    rescore=C (ScaNN returns its top C after reordering and they are rescored exactly in float
    against a kept copy of the bank, saved as bank.npy: an exact final ranking after a quantized
    reorder), ah_training_sample_size (default 100,000), hash_type ("lut16" default: 4-bit codes;
    "lut256": 8-bit), avq=ETA (tree mode: ScaNN's anisotropic vector quantization of the leaf
    centres, trained for inner products: at 1M random 512-d vectors, 2.5 lifts recall@10 from
    0.937 to 0.943 at 85% of the leaves and from 0.953 to 0.958 at 90%, at the same queries/s;
    bench/retrieval.py --avq 2.5). bench/retrieval.py uses dims_per_block=4,
    int8 reorder of 10,000-20,000 and rescore=50 on random vectors, where no partition helps."""
    n = int(num_points)
    mode = overrides.get("mode", "tree_ah" if n >= MIN_TREE_SIZE else "brute_force")
    params: dict[str, Any] = {"mode": mode}
    if mode == "tree_ah":
        leaves = int(min(max(round(math.sqrt(n)), 16), n // 50))
        if leaves < 1:
            raise ValueError(f"mode='tree_ah' needs at least 50 points a leaf; {n} points: use 'brute_force' or 'ah'")
        params.update(num_leaves=leaves,
                      leaves_to_search=int(min(leaves, max(math.ceil(search_fraction * leaves), 4))),
                      training_sample_size=int(min(n, 250_000)))
    if mode in ("tree_ah", "ah"):   # hashing and reordering (an "ah" index on a small bank too)
        params.update(dims_per_block=2, anisotropic_quantization_threshold=0.2,
                      reorder=int(reorder if reorder is not None else max(1000, 20 * k)))
    if mode == "tree_ah":
        params["soar_lambda"] = None
    params.update(overrides)
    return params


def _reorder_type(name: str):
    from scann.scann_ops.py.scann_builder import ReorderType
    types = {"float32": ReorderType.FLOAT32, "int8": ReorderType.INT8, "bfloat16": ReorderType.BFLOAT16}
    if name not in types:
        raise ValueError(f"reorder_quantize must be one of {sorted(types)}, got {name!r}")
    return types[name]


# --------------------------------------------------------------------------- exact search

def exact_search(bank: np.ndarray, queries: np.ndarray, k: int, *, batch_size: int = 512,
                 doc_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force maximum inner product: (ids int64 [Q, k], scores float32 [Q, k]), best first,
    ties broken by the smaller id, -1 / -inf padding when the bank has fewer than k rows.
    doc_ids maps bank rows to document ids (default: the row numbers)."""
    bank = np.asarray(bank, np.float32)
    queries = np.asarray(queries, np.float32)
    n, q = bank.shape[0], queries.shape[0]
    ids = np.full((q, k), -1, np.int64)
    scores = np.full((q, k), -np.inf, np.float32)
    kk = min(k, n)
    if kk == 0 or q == 0:
        return ids, scores
    for start in range(0, q, batch_size):
        s = queries[start:start + batch_size] @ bank.T
        if kk < n:
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            part_scores = np.take_along_axis(s, part, axis=1)
            # argpartition picks arbitrary members of a tie at the k-th score: redo those rows so
            # the smaller ids win (what merging shards assumes)
            kth = part_scores.min(axis=1, keepdims=True)
            for r in np.flatnonzero((s >= kth).sum(axis=1) > kk):
                above = np.flatnonzero(s[r] > kth[r])
                tied = np.flatnonzero(s[r] == kth[r])[: kk - above.size]
                part[r] = np.concatenate([above, tied])
                part_scores[r] = s[r, part[r]]
        else:
            part = np.broadcast_to(np.arange(n), s.shape).copy()
            part_scores = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=-1)
        top = np.take_along_axis(part, order, axis=1)
        ids[start:start + batch_size, :kk] = top
        scores[start:start + batch_size, :kk] = np.take_along_axis(part_scores, order, axis=1)
    if doc_ids is not None:
        doc_ids = np.asarray(doc_ids, np.int64)
        ids = np.where(ids >= 0, doc_ids[np.maximum(ids, 0)], -1)
    return ids, scores


def merge_topk(ids_list: Sequence[np.ndarray], scores_list: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-shard top-k lists ([Q, k_i] each, global ids, -1 = none) into the global top-k:
    (ids int64 [Q, k], scores float32 [Q, k]) by score, ties by the smaller id, -1 / -inf padding."""
    ids = np.concatenate([np.asarray(a, np.int64) for a in ids_list], axis=1)
    scores = np.concatenate([np.asarray(s, np.float32) for s in scores_list], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.where(np.isfinite(top_scores), top_ids, -1)
    if top_ids.shape[1] < k:
        pad = k - top_ids.shape[1]
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_ids, top_scores.astype(np.float32)


# --------------------------------------------------------------------------- ScaNN index

class ScannIndex:
    """A ScaNN searcher over some bank rows, returning document ids (doc_ids[row])."""

    def __init__(self, searcher, params: dict[str, Any], doc_ids: np.ndarray, dim: int,
                 bank: np.ndarray | None = None):
        self.searcher = searcher
        self.params = dict(params)
        self.doc_ids = np.asarray(doc_ids, np.int64)
        self.dim = int(dim)
        self.bank = bank   # float rows, only with params["rescore"] (exact rescoring of the final candidates)

    @property
    def size(self) -> int:
        return int(self.doc_ids.shape[0])

    @classmethod
    def build(cls, bank: np.ndarray, *, doc_ids: np.ndarray | None = None, offset: int = 0,
              params: dict[str, Any] | None = None, k: int = 10, threads: int = 1) -> "ScannIndex":
        """Builds over bank [n, d] (unit vectors, MIPS). doc_ids defaults to offset + arange(n).
        Same bank -> same index, since same seed must mean same batches: one training thread by
        default (ScaNN's multi-threaded tree training is not deterministic) and a k-means++ start for
        the tree (`random_init=False`: ScaNN's default random start differs from build to build; on
        the e2e data it gave 9% of queries other top-32 lists and 2% of documents other neighbours,
        even with one thread). `threads=0` uses every core for faster builds of huge banks."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"cannot index a bank of shape {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("the bank holds NaN or inf")
        n, d = bank.shape
        params = dict(params) if params is not None else scann_params(n, k=k)
        if params["mode"] == "tree_ah" and n < MIN_TREE_SIZE:
            params = scann_params(n, k=k)
        doc_ids = offset + np.arange(n, dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
        if doc_ids.shape != (n,):
            raise ValueError(f"doc_ids has shape {doc_ids.shape}, expected ({n},)")
        if params["mode"] not in ("brute_force", "tree_ah", "ah"):
            raise ValueError(f"unknown ScaNN mode {params['mode']!r}")
        builder = _scann().builder(bank, k, "dot_product")
        if params["mode"] == "brute_force":
            builder = builder.score_brute_force()
        else:
            if params["mode"] == "tree_ah":
                builder = builder.tree(
                    num_leaves=params["num_leaves"], num_leaves_to_search=params["leaves_to_search"],
                    training_sample_size=params["training_sample_size"], soar_lambda=params.get("soar_lambda"),
                    avq=params.get("avq"),
                    random_init=False)  # ScaNN's default random k-means start differs from build to build
            threshold = params["anisotropic_quantization_threshold"]
            builder = builder.score_ah(params["dims_per_block"], training_sample_size=params.get("ah_training_sample_size", 100_000),
                                       anisotropic_quantization_threshold=float("nan") if threshold is None else threshold,
                                       hash_type=params.get("hash_type", "lut16"))
            builder = builder.reorder(params["reorder"], quantize=_reorder_type(params.get("reorder_quantize", "float32")))
        if threads:
            builder = builder.set_n_training_threads(threads)
        # exact float rescoring of ScaNN's final candidates needs the float rows: kept only then
        keep = bank if params.get("rescore") else None
        return cls(builder.build(), params, doc_ids, d, bank=keep)

    def search(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
               reorder: int | None = None, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (doc ids int64 [Q, k], scores float32 [Q, k]), -1 / -inf padding."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        q = queries.shape[0]
        ids = np.full((q, k), -1, np.int64)
        scores = np.full((q, k), -np.inf, np.float32)
        if q == 0:
            return ids, scores
        rescore = int(self.params.get("rescore") or 0) if self.bank is not None else 0
        final = max(int(k), rescore)
        kw: dict[str, Any] = {"final_num_neighbors": final}
        if self.params["mode"] == "tree_ah":
            kw["leaves_to_search"] = int(leaves_to_search or self.params["leaves_to_search"])
        if self.params["mode"] in ("tree_ah", "ah"):
            kw["pre_reorder_num_neighbors"] = int(max(reorder or self.params["reorder"], final))
        rows, dist = self.searcher.search_batched_parallel(queries, batch_size=batch_size, **kw)
        rows = np.asarray(rows, np.int64)
        dist = np.asarray(dist, np.float32)
        if rescore and rows.ndim == 2 and rows.shape[1]:
            # ScaNN's reordering was quantized (int8 / bfloat16): its final candidates are rescored
            # exactly in float, so near ties at the k-th place are decided by the true scores
            ok = (rows >= 0) & (rows < self.size) & np.isfinite(dist)
            safe = np.where(ok, rows, 0)
            exact = np.einsum("qcd,qd->qc", self.bank[safe], queries)
            exact = np.where(ok, exact, np.nan)
            order = np.argsort(np.where(ok, -exact, np.inf), axis=1, kind="stable")[:, :k]
            rows = np.take_along_axis(rows, order, axis=1)
            dist = np.take_along_axis(exact, order, axis=1).astype(np.float32)
        width = min(rows.shape[1], k) if rows.ndim == 2 else 0
        if width:
            # ScaNN pads with row 0 and a NaN distance when fewer than k points are found
            valid = (rows[:, :width] >= 0) & (rows[:, :width] < self.size) & np.isfinite(dist[:, :width])
            ids[:, :width] = np.where(valid, self.doc_ids[np.clip(rows[:, :width], 0, self.size - 1)], -1)
            scores[:, :width] = np.where(valid, dist[:, :width], -np.inf)
        return ids, scores

    def save(self, directory: str) -> None:
        directory = os.path.abspath(directory)
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "scann"))
        self.searcher.serialize(os.path.join(tmp, "scann"), relative_path=True)
        np.save(os.path.join(tmp, "doc_ids.npy"), self.doc_ids)
        if self.bank is not None:
            np.save(os.path.join(tmp, "bank.npy"), self.bank)
        with open(os.path.join(tmp, INDEX_JSON), "w", encoding="utf-8") as f:
            json.dump({"format": INDEX_FORMAT, "size": self.size, "dim": self.dim, "params": self.params,
                       "first_doc_id": int(self.doc_ids[0]), "last_doc_id": int(self.doc_ids[-1])}, f, indent=1)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)

    @classmethod
    def load(cls, directory: str) -> "ScannIndex":
        directory = os.path.abspath(directory)
        meta = workdir_io.read_format_json(os.path.join(directory, INDEX_JSON), INDEX_FORMAT, what="ScaNN index")
        doc_ids = np.load(os.path.join(directory, "doc_ids.npy"))
        if doc_ids.shape != (meta["size"],):
            raise ValueError(f"{directory}: doc_ids.npy has {doc_ids.shape[0]} rows, index.json says {meta['size']}")
        # Assets were serialised with relative paths: they resolve against this directory, so an
        # index directory can be moved or copied (e.g. from shared storage to local disk).
        searcher = _scann().load_searcher(os.path.join(directory, "scann"))
        bank = None
        if meta["params"].get("rescore"):
            bank = np.load(os.path.join(directory, "bank.npy"), mmap_mode="r")
        return cls(searcher, meta["params"], doc_ids, meta["dim"], bank=bank)


def build_index(embeddings: np.ndarray, out_dir: str | None = None, *, valid: np.ndarray | None = None,
                params: dict[str, Any] | None = None, k: int = 10) -> ScannIndex:
    """One ScaNN index over the whole bank (rows with valid=False are left out), saved if out_dir."""
    embeddings = np.asarray(embeddings, np.float32)
    doc_ids = np.arange(embeddings.shape[0], dtype=np.int64)
    if valid is not None:
        doc_ids = doc_ids[np.asarray(valid, bool)]
        embeddings = embeddings[doc_ids]
    index = ScannIndex.build(embeddings, doc_ids=doc_ids, params=params, k=k)
    if out_dir is not None:
        index.save(out_dir)
    return index


# --------------------------------------------------------------------------- sharded bank

def shard_bounds(num_documents: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) document ranges, sizes differing by at most one."""
    if num_shards < 1 or num_shards > max(num_documents, 1):
        raise ValueError(f"num_shards={num_shards} must be in [1, {num_documents}]")
    cuts = [i * num_documents // num_shards for i in range(num_shards + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class ConcatenatedRows:
    """Several [n_i, ...] arrays (memory-mapped part files) read as one [sum n_i, ...] array without
    loading them: row slices and integer-array gathers, which is all the shard builds and the
    neighbour selection read. A multi-host run's bank is its hosts' embedding parts read this way
    (no host ever holds, or writes, the whole bank)."""

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise ValueError("ConcatenatedRows needs at least one part")
        self.parts = list(parts)
        trailing = {tuple(p.shape[1:]) for p in self.parts}
        dtypes = {np.dtype(p.dtype) for p in self.parts}
        if len(trailing) != 1 or len(dtypes) != 1:
            raise ValueError(f"parts disagree: row shapes {sorted(trailing)}, dtypes {sorted(map(str, dtypes))}")
        self.starts = np.cumsum([0] + [p.shape[0] for p in self.parts]).astype(np.int64)
        self.shape = (int(self.starts[-1]),) + trailing.pop()
        self.dtype = dtypes.pop()
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("ConcatenatedRows slices take step 1 only")
            pieces = [p[max(start - a, 0):max(min(stop, b) - a, 0)]
                      for p, a, b in zip(self.parts, self.starts[:-1], self.starts[1:]) if a < stop and b > start]
            return (np.concatenate(pieces) if pieces else np.empty((0,) + self.shape[1:], self.dtype))
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"ConcatenatedRows takes row slices or integer arrays, got {idx.dtype}")
        flat = idx.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"row ids must be in [0, {self.shape[0]}), got [{flat.min()}, {flat.max()}]")
        out = np.empty((flat.size,) + self.shape[1:], self.dtype)
        part = np.searchsorted(self.starts, flat, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][flat[sel] - self.starts[p]]
        return out.reshape(idx.shape + self.shape[1:])


def _rows(x):
    """An array of rows as the selection reads it: parts stay parts, anything else an ndarray."""
    return x if isinstance(x, ConcatenatedRows) else np.asarray(x)


def _embedding_reader(source, num_documents: int | None):
    """(num_documents, read(start, stop) -> float32 array) for an array (or `ConcatenatedRows`), a
    .npy path (memory-mapped: only the requested rows are read) or a callable(start, stop) with
    num_documents given."""
    if callable(source):
        if num_documents is None:
            raise ValueError("a callable embeddings source needs num_documents")
        return int(num_documents), lambda a, b: np.asarray(source(a, b), np.float32)
    if isinstance(source, (str, os.PathLike)):
        source = np.load(source, mmap_mode="r")
    if len(source.shape) != 2:
        raise ValueError(f"embeddings must be [N, D], got {source.shape}")
    return int(source.shape[0]), lambda a, b: np.asarray(source[a:b], np.float32)


def shard_dir(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, f"shard_{shard:05d}")


def build_sharded(embeddings_source, num_shards: int, out_dir: str, *, shard_ids: Sequence[int] | None = None,
                  num_documents: int | None = None, valid: np.ndarray | None = None,
                  params: dict[str, Any] | None = None, k: int = 10) -> dict[str, Any]:
    """Builds one ScaNN index per contiguous shard of the bank under out_dir/shard_XXXXX/.

    Each shard records its document-id range (offset); `ShardedIndex` searches every shard and
    merges the per-shard top-k with `merge_topk`. `shard_ids` restricts the build to some shards:
    on H hosts, host h passes shard_ids=range(h, num_shards, H) (reading only those rows of a
    memory-mapped .npy / a callable source), writing to shared storage; the manifest
    (out_dir/shards.json) is a pure function of (N, num_shards, dim), so any host may write it.
    Per-shard parameters come from the shard size unless `params` is given. Returns the manifest."""
    n, read = _embedding_reader(embeddings_source, num_documents)
    bounds = shard_bounds(n, num_shards)
    todo = range(num_shards) if shard_ids is None else sorted(set(int(s) for s in shard_ids))
    os.makedirs(out_dir, exist_ok=True)
    dim = None
    valid = None if valid is None else np.asarray(valid, bool)
    built = []
    for s in todo:
        start, stop = bounds[s]
        bank = read(start, stop)
        dim = bank.shape[1]
        doc_ids = np.arange(start, stop, dtype=np.int64)
        if valid is not None:
            keep = valid[start:stop]
            bank, doc_ids = bank[keep], doc_ids[keep]
        if bank.shape[0] == 0:
            raise ValueError(f"shard {s} [{start}, {stop}) has no valid documents; use fewer shards")
        index = ScannIndex.build(bank, doc_ids=doc_ids, params=params, k=k)
        index.save(shard_dir(out_dir, s))
        built.append({"shard": s, "start": start, "stop": stop, "size": index.size, "params": index.params})
    if dim is None:
        dim = read(0, 1).shape[1]
    manifest = {"format": SHARDS_FORMAT, "num_documents": n, "num_shards": num_shards, "dim": int(dim),
                "shards": [{"shard": i, "start": a, "stop": b, "dir": os.path.basename(shard_dir(out_dir, i))}
                           for i, (a, b) in enumerate(bounds)]}
    tmp = os.path.join(out_dir, SHARDS_JSON + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, SHARDS_JSON))
    return {**manifest, "built": built}


class ShardedIndex:
    """The shards of a bank (all, or this host's), searched one after another and merged."""

    def __init__(self, shards: list[ScannIndex], manifest: dict[str, Any]):
        self.shards = shards
        self.manifest = manifest

    @classmethod
    def load(cls, out_dir: str, shard_ids: Sequence[int] | None = None) -> "ShardedIndex":
        manifest = workdir_io.read_format_json(os.path.join(out_dir, SHARDS_JSON), SHARDS_FORMAT,
                                               what="sharded ScaNN index")
        ids = range(manifest["num_shards"]) if shard_ids is None else shard_ids
        missing = [s for s in ids if not os.path.exists(os.path.join(shard_dir(out_dir, s), INDEX_JSON))]
        if missing:
            raise FileNotFoundError(f"{out_dir}: shards {missing} are not built")
        return cls([ScannIndex.load(shard_dir(out_dir, s)) for s in ids], manifest)

    def search_shards(self, queries: np.ndarray, k: int, **kw) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-shard partial top-k (global doc ids), e.g. to write out and merge on another host."""
        return [shard.search(queries, k, **kw) for shard in self.shards]

    def search(self, queries: np.ndarray, k: int, **kw) -> tuple[np.ndarray, np.ndarray]:
        parts = self.search_shards(queries, k, **kw)
        return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)


# --------------------------------------------------------------------------- neighbour selection

SKIP_REASONS = ("self", "invalid", "near_duplicate", "duplicate", "diversity")


def select_neighbours(query_ids: np.ndarray, candidate_ids: Sequence[np.ndarray], candidate_scores: Sequence[np.ndarray],
                      quotas: Sequence[int], embeddings: np.ndarray, is_multimodal: np.ndarray, *,
                      valid: np.ndarray | None = None, max_score: float = NEAR_DUPLICATE_SCORE,
                      diversity_threshold: float = 0.9, chunk: int = 1024,
                      query_embeddings: np.ndarray | None = None, per_row_counts: bool = False):
    """The paper's neighbour choice over candidate lists (pure numpy).

    query_ids [Q]; candidate_ids[j] / candidate_scores[j] [Q, C_j]: list j's candidates (e.g.
    j=0 retrieved by text, j=1 by image; -1 = none); quotas[j]: how many to take from list j.
    Rules: a candidate is never the query itself, nor invalid (-1, or valid[id] False), nor a near
    duplicate (its retrieval score in any list, or its document embedding's cosine with the query
    document's, above max_score). Within each list multimodal documents come first, then by score. List j
    fills its quota in that order, skipping any candidate already chosen or with cosine >
    diversity_threshold to one already chosen; slots left over are then filled from all lists'
    remaining candidates by the same order. Returns (ids int32 [Q, K], scores float32 [Q, K],
    counts) with K = sum(quotas), chosen ids first in pick order, -1 / -inf padding, and counts
    of skipped candidates by reason (SKIP_REASONS, each candidate counted once: self, invalid
    (an id outside the bank or not valid), near_duplicate, duplicate (already chosen from another
    list), diversity); -1 padding in the candidate lists is not counted. A query from outside the
    bank (a caption at inference) has id -1 and its own embedding in `query_embeddings` [Q, D]
    (default: the bank's row of each query id). `per_row_counts`: each count an int array [Q]."""
    query_ids = np.asarray(query_ids, np.int64)
    embeddings = _rows(embeddings)
    is_multimodal = np.asarray(is_multimodal, bool)
    n = embeddings.shape[0]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    ids_all = np.concatenate([np.asarray(c, np.int64) for c in candidate_ids], axis=1)
    scores_all = np.concatenate([np.asarray(s, np.float32) for s in candidate_scores], axis=1)
    source = np.concatenate([np.full(np.shape(c)[1], j) for j, c in enumerate(candidate_ids)])
    q_total, c_total = ids_all.shape
    k_total = int(sum(quotas))
    out_ids = np.full((q_total, k_total), -1, np.int32)
    out_scores = np.full((q_total, k_total), -np.inf, np.float32)
    row_counts = {r: np.zeros(q_total, np.int64) for r in SKIP_REASONS}

    def result():
        return out_ids, out_scores, (row_counts if per_row_counts else {r: int(v.sum()) for r, v in row_counts.items()})

    if c_total == 0 or k_total == 0:
        return result()
    chunk = max(1, min(int(chunk), 2 ** 26 // (c_total * c_total)))  # the [chunk, C, C] pair similarities
    for lo in range(0, q_total, chunk):
        hi = min(lo + chunk, q_total)
        qid = query_ids[lo:hi]
        cid = ids_all[lo:hi]
        csc = scores_all[lo:hi]
        rows = np.arange(hi - lo)
        safe = np.clip(cid, 0, n - 1)
        is_self = (cid == qid[:, None]) & (cid >= 0)
        invalid = ((cid < 0) | (cid >= n) | ~valid[safe]) & ~is_self
        emb = embeddings[safe].astype(np.float32)                       # [q, C, D]
        q_emb = (embeddings[np.clip(qid, 0, n - 1)] if query_embeddings is None
                 else np.asarray(query_embeddings[lo:hi])).astype(np.float32)   # [q, D]
        # matmul, not einsum: BLAS per row (numpy's einsum loops in C: 5x slower here); each
        # row's product is its own, so a row's result does not depend on the rows beside it
        doc_sim = np.matmul(emb, q_emb[:, :, None])[:, :, 0]
        near = ((csc > max_score) | (doc_sim > max_score)) & ~is_self & ~invalid
        if len(candidate_ids) > 1 and near.any():
            # too similar to the query in one list (the same caption, found by text) is a near
            # duplicate in every list: the image list must not bring it back
            key = rows[:, None] * (n + 1) + cid
            near |= np.isin(key, key[near]) & ~is_self & ~invalid
        row_counts["self"][lo:hi] += is_self.sum(axis=1)
        row_counts["invalid"][lo:hi] += (invalid & (cid >= 0)).sum(axis=1)   # -1 padding is not a candidate
        row_counts["near_duplicate"][lo:hi] += near.sum(axis=1)
        eligible = ~(is_self | invalid | near)
        pair_sim = np.matmul(emb, emb.transpose(0, 2, 1))               # [q, C, C]
        # Preference rank inside the row: multimodal first, then higher score, then list order.
        mm = is_multimodal[safe] & (cid >= 0)
        order = np.lexsort((np.broadcast_to(np.arange(c_total), cid.shape), -np.where(np.isfinite(csc), csc, -np.inf),
                            ~mm), axis=-1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(c_total), cid.shape), axis=1)
        filled = np.zeros(hi - lo, np.int64)

        def pick(allowed_cols: np.ndarray, quota_left: np.ndarray) -> np.ndarray:
            can = eligible & allowed_cols[None, :] & (quota_left > 0)[:, None]
            key = np.where(can, rank, c_total)
            j = np.argmin(key, axis=1)
            got = can[rows, j]
            r = rows[got]
            jj = j[got]
            out_ids[lo + r, filled[r]] = cid[r, jj]
            out_scores[lo + r, filled[r]] = csc[r, jj]
            filled[r] += 1
            # Whatever duplicates or resembles the pick is no longer eligible in that row.
            dup = (cid[r] == cid[r, jj][:, None]) & eligible[r]
            div = (pair_sim[r, jj] > diversity_threshold) & eligible[r] & ~dup
            row_counts["duplicate"][lo + r] += dup.sum(axis=1) - 1   # the pick itself is not a duplicate
            row_counts["diversity"][lo + r] += div.sum(axis=1)
            eligible[r] &= ~(dup | div)
            return got

        for j, quota in enumerate(quotas):
            left = np.full(hi - lo, int(quota))
            cols = source == j
            for _ in range(int(quota)):
                got = pick(cols, left)
                left -= got
                if not got.any():
                    break
        everything = np.ones(c_total, bool)
        left = k_total - filled
        while True:
            got = pick(everything, left)
            left -= got
            if not got.any():
                break
    return result()


def _select_widening(search_fns: Sequence[Callable], query_ids: np.ndarray, query_lists: Sequence[np.ndarray],
                     query_masks: Sequence[np.ndarray], quotas: Sequence[int], embeddings: np.ndarray,
                     is_multimodal: np.ndarray, *, num_candidates: int, max_candidates: int,
                     query_embeddings: np.ndarray | None = None, one_query: bool = False, **select_kw):
    """`select_neighbours` over each list's `num_candidates` candidates (list j: search_fns[j](
    query_lists[j][rows], width) where query_masks[j]: vectors searched, or document ids looked up);
    rows still short of sum(quotas) are searched again 4x wider, up to `max_candidates` or the
    whole bank. `one_query`: every list has the same search and queries (a user's embeddings serve
    as both the text and the image query), so one search over the rows any list asks for serves
    all of them, each keeping its own rows. Returns (ids, scores, skip counts from each row's last
    search, rows searched again)."""
    n, q = embeddings.shape[0], len(query_ids)
    k_total = int(sum(quotas))
    ids = np.full((q, k_total), -1, np.int32)
    scores = np.full((q, k_total), -np.inf, np.float32)
    counts = {r: 0 for r in SKIP_REASONS}
    has_query = np.logical_or.reduce([np.asarray(m, bool) for m in query_masks])
    widest = min(max(int(max_candidates), int(num_candidates)), n)
    width = min(int(num_candidates), widest)
    rows, widened = np.arange(q), 0

    def retrieve(search_fn, queries, mask):
        out_i = np.full((mask.shape[0], width), -1, np.int64)
        out_s = np.full((mask.shape[0], width), -np.inf, np.float32)
        if mask.any():
            i, sc = search_fn(queries[mask], width)
            out_i[mask, :np.shape(i)[1]], out_s[mask, :np.shape(sc)[1]] = i, sc   # a lookup may hold fewer
        return out_i, out_s

    while rows.size and k_total:
        if one_query:
            shared_i, shared_s = retrieve(search_fns[0], query_lists[0][rows], has_query[rows])
            found = [(np.where(m[rows, None], shared_i, -1), np.where(m[rows, None], shared_s, -np.inf))
                     for m in (np.asarray(m, bool) for m in query_masks)]
        else:
            found = [retrieve(fn, qs[rows], np.asarray(m, bool)[rows])
                     for fn, qs, m in zip(search_fns, query_lists, query_masks)]
        chosen, chosen_scores, c = select_neighbours(
            query_ids[rows], [f[0] for f in found], [f[1] for f in found], quotas, embeddings, is_multimodal,
            query_embeddings=None if query_embeddings is None else query_embeddings[rows], per_row_counts=True,
            **select_kw)
        ids[rows], scores[rows] = chosen, chosen_scores
        final = ((chosen >= 0).sum(axis=1) == k_total) | (width >= widest) | ~has_query[rows]
        for r in SKIP_REASONS:
            counts[r] += int(c[r][final].sum())
        rows = rows[~final]
        widened += rows.size
        width = min(4 * width, widest)
    return ids, scores, counts, widened


def _vector_search(search: Callable | Any) -> Callable:
    """callable(query vectors, k) -> (ids, scores) from an index (anything with .search) or a callable."""
    fn = search.search if hasattr(search, "search") else search
    return lambda queries, k: fn(np.asarray(queries, np.float32), k)


def neighbours_of_queries(search: Callable | Any, queries: np.ndarray, k: int, embeddings: np.ndarray,
                          is_multimodal: np.ndarray, *, num_candidates: int = 64,
                          max_candidates: int = MAX_CANDIDATES, max_score: float = NEAR_DUPLICATE_SCORE,
                          diversity_threshold: float = 0.9):
    """k neighbours for queries from outside the bank (captions at inference), chosen by
    `select_neighbours`'s rules; a query still short of k is searched again 4x wider, up to
    `max_candidates` or the whole bank. Where the bank holds many near duplicates of a query
    (shapes captions repeat), its top candidates all score above `max_score`: with a fixed 8
    candidates, evaluation found a neighbour for 19% of the e2e validation captions (report.json's
    neighbours_found). Returns (ids int32 [Q, k], scores float32 [Q, k]), -1 / -inf padding."""
    queries = np.asarray(queries, np.float32)
    everyone = np.ones(queries.shape[0], bool)
    ids, scores, _, _ = _select_widening(
        [_vector_search(search)], np.full(queries.shape[0], -1), [queries], [everyone], [k], embeddings, is_multimodal,
        num_candidates=max(int(num_candidates), k), max_candidates=max(int(max_candidates), k),
        max_score=max_score, diversity_threshold=diversity_threshold, query_embeddings=queries)
    return ids, scores


def compute_neighbours(doc_embeddings: np.ndarray, text_queries: np.ndarray | None, image_queries: np.ndarray | None,
                       has_text: np.ndarray, has_image: np.ndarray, *, search: Callable | Any = None,
                       candidate_lookups: Sequence[Callable] | None = None,
                       k_text: int = 2, k_image: int = 2, num_candidates: int = 32,
                       max_candidates: int = MAX_CANDIDATES, max_score: float = NEAR_DUPLICATE_SCORE,
                       diversity_threshold: float = 0.9, query_batch: int = 16384, progress: bool = False,
                       start: int = 0, stop: int | None = None):
    """Neighbours of every document: `num_candidates` retrieved by its text query and by its image
    query (rows of an absent modality are not searched), then `select_neighbours` with quotas
    (k_text, k_image); a document still short of k_text + k_image is searched again 4x wider, up
    to `max_candidates` (denser corpora hold more near duplicates: on 30,000 shapes documents a
    fixed 32 left 5,008 without any neighbour). Skips are counted in each document's last search.
    `search` is a ScannIndex / ShardedIndex or a callable(queries, k) -> (ids, scores). Instead, a
    multi-host run gives `candidate_lookups` (text, image): callables(document ids, width) -> the
    first `width` of those documents' candidates searched earlier (no queries needed then), with
    max_candidates = the number stored, since it cannot widen past them. Returns (ids int32 [M, K],
    scores float32 [M, K], stats) for documents [start, stop) (default all; a host of a multi-host
    run takes its own range), rows aligned with those ids. The arrays may be memory-mapped, the
    embeddings also `ConcatenatedRows`. One array given as both text and image queries (a user's
    embeddings), or one lookup as both, is searched once for both lists. Nothing is dropped
    silently: documents left without any neighbour keep -1 rows and are counted."""
    doc_embeddings = _rows(doc_embeddings)
    n = doc_embeddings.shape[0]
    has_text = np.asarray(has_text, bool)
    has_image = np.asarray(has_image, bool)
    if (search is None) == (candidate_lookups is None):
        raise ValueError("give either search or candidate_lookups")
    if candidate_lookups is None:
        for name, a in (("text_queries", text_queries), ("image_queries", image_queries)):
            if np.shape(a) != doc_embeddings.shape:
                raise ValueError(f"{name} has shape {np.shape(a)}, expected {doc_embeddings.shape} (aligned with documents)")
        search_fns = [_vector_search(search)] * 2
        one_query = text_queries is image_queries
    elif len(candidate_lookups) != 2:
        raise ValueError(f"candidate_lookups takes (text, image) lookups, got {len(candidate_lookups)}")
    else:
        search_fns = list(candidate_lookups)
        one_query = candidate_lookups[0] is candidate_lookups[1]
    for name, a in (("has_text", has_text), ("has_image", has_image)):
        if a.shape != (n,):
            raise ValueError(f"{name} has shape {a.shape}, expected ({n},)")
    valid = has_text | has_image
    multimodal = has_text & has_image
    k_total = k_text + k_image
    stop = n if stop is None else int(stop)
    if not 0 <= start <= stop <= n:
        raise ValueError(f"document range [{start}, {stop}) is not within [0, {n})")
    ids = np.full((stop - start, k_total), -1, np.int32)
    scores = np.full((stop - start, k_total), -np.inf, np.float32)
    counts = {r: 0 for r in SKIP_REASONS}
    start_time = time.time()
    widest = min(max(int(max_candidates), int(num_candidates)), n)
    widened = 0
    for lo in range(start, stop, query_batch):
        hi = min(lo + query_batch, stop)
        rows = np.arange(lo, hi)
        query_lists = ([rows, rows] if candidate_lookups is not None else [text_queries[lo:hi], image_queries[lo:hi]])
        batch_ids, batch_scores, c, w = _select_widening(
            search_fns, rows, query_lists,
            [has_text[lo:hi], has_image[lo:hi]], [k_text, k_image], doc_embeddings, multimodal,
            num_candidates=num_candidates, max_candidates=widest, valid=valid, max_score=max_score,
            diversity_threshold=diversity_threshold, one_query=one_query)
        ids[lo - start:hi - start], scores[lo - start:hi - start] = batch_ids, batch_scores
        for r in SKIP_REASONS:
            counts[r] += c[r]
        widened += w
        if progress:
            done = hi - start
            print(f"neighbours: {done}/{stop - start} documents ({done / max(time.time() - start_time, 1e-9):,.0f}/s)",
                  flush=True)

    per_row = (ids >= 0).sum(axis=1)
    valid = valid[start:stop]
    has_text, has_image = has_text[start:stop], has_image[start:stop]
    stats = {
        "num_documents": int(stop - start), "start": int(start), "stop": int(stop),
        "k": int(k_total), "k_text": int(k_text), "k_image": int(k_image), "num_candidates": int(num_candidates),
        "max_candidates": int(widest), "widened_searches": int(widened),
        "max_score": float(max_score), "diversity_threshold": float(diversity_threshold),
        "documents_without_embedding": int((~valid).sum()),
        "text_queries": int(has_text.sum()), "image_queries": int(has_image.sum()),
        "documents_without_neighbours": int((per_row == 0).sum()),
        "documents_with_full_neighbours": int((per_row == k_total).sum()),
        "neighbours_histogram": np.bincount(per_row, minlength=k_total + 1).tolist(),
        "mean_neighbours": float(per_row.mean()) if per_row.size else 0.0,
        "skipped": counts,
        "seconds": time.time() - start_time,
    }
    return ids, scores, stats


# --------------------------------------------------------------------------- sidecar

def save_neighbours(data_dir: str, ids: np.ndarray, scores: np.ndarray, stats: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Writes DATA_DIR/neighbours_ids.npy (int32 [N, K], -1 = none), neighbours_scores.npy
    (float32 [N, K], -inf = none) and neighbours.json (shapes, stats), row i = document i. The
    arrays are written in chunks: a multi-host run passes its hosts' parts read as one."""
    ids, scores = _rows(ids), _rows(scores)
    if len(ids.shape) != 2 or tuple(ids.shape) != tuple(scores.shape):
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be the same [N, K]")
    # the old meta goes first and the new comes last: a write killed between the arrays left new ids
    # beside the old scores, read as one sidecar when the shapes agreed
    if os.path.exists(os.path.join(data_dir, NEIGHBOURS_JSON)):
        os.remove(os.path.join(data_dir, NEIGHBOURS_JSON))
    for name, array, dtype in ((NEIGHBOURS_IDS, ids, np.int32), (NEIGHBOURS_SCORES, scores, np.float32)):
        workdir_io.write_npy_rows(os.path.join(data_dir, name), array, dtype)
    meta = {"format": NEIGHBOURS_FORMAT, "num_documents": int(ids.shape[0]), "k": int(ids.shape[1]),
            "ids": NEIGHBOURS_IDS, "scores": NEIGHBOURS_SCORES, "stats": stats or {}, **(extra or {})}
    tmp = os.path.join(data_dir, NEIGHBOURS_JSON + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(data_dir, NEIGHBOURS_JSON))


def load_neighbours(data_dir: str, num_documents: int | None = None, *, mmap: bool = True):
    """(ids [N, K] int32, scores [N, K] float32, meta) from the sidecar; memory-mapped by default
    (random access for the Grain join). Checks alignment with num_documents when given."""
    meta = workdir_io.read_format_json(os.path.join(data_dir, NEIGHBOURS_JSON), NEIGHBOURS_FORMAT,
                                       what="neighbour sidecar", hint="python -m data_pipeline.index builds it")
    mode = "r" if mmap else None
    ids = np.load(os.path.join(data_dir, meta["ids"]), mmap_mode=mode)
    scores = np.load(os.path.join(data_dir, meta["scores"]), mmap_mode=mode)
    if ids.shape != (meta["num_documents"], meta["k"]) or scores.shape != ids.shape or ids.dtype != np.int32:
        raise ValueError(f"{data_dir}: neighbour arrays {ids.shape}/{scores.shape} do not match neighbours.json")
    if num_documents is not None and ids.shape[0] != int(num_documents):
        raise ValueError(f"{data_dir}: neighbours for {ids.shape[0]} documents, the data has {num_documents}")
    for lo in range(0, ids.shape[0], 1 << 22):   # ids name documents or are -1: checked here, not mid-training
        rows = np.asarray(ids[lo:lo + (1 << 22)])
        if rows.size and (rows.min() < -1 or rows.max() >= ids.shape[0]):
            bad = lo + int(np.flatnonzero(((rows < -1) | (rows >= ids.shape[0])).any(axis=1))[0])
            raise ValueError(f"{data_dir}: neighbour ids must be -1 or in [0, {ids.shape[0]}): row {bad} holds "
                             f"{ids[bad].tolist()}; rebuild with `python -m data_pipeline.index --overwrite`")
    return ids, scores, meta


def build_neighbours(data_dir: str, doc_embeddings: np.ndarray, text_queries: np.ndarray, image_queries: np.ndarray,
                     has_text: np.ndarray, has_image: np.ndarray, *, num_shards: int = 1,
                     index_dir: str | None = None, params: dict[str, Any] | None = None,
                     k_text: int = 2, k_image: int = 2, num_candidates: int = 32,
                     max_score: float = NEAR_DUPLICATE_SCORE,
                     diversity_threshold: float = 0.9, progress: bool = False,
                     embedder: dict[str, Any] | None = None) -> dict[str, Any]:
    """Single-machine convenience: index the bank (DATA_DIR/scann_index, sharded when num_shards >
    1), retrieve and select every document's neighbours, write the sidecar (with `embedder`: what
    embedded the bank, so generation queries it the same way). Returns the stats."""
    doc_embeddings = np.asarray(doc_embeddings, np.float32)
    valid = np.asarray(has_text, bool) | np.asarray(has_image, bool)
    if not valid.any():
        raise ValueError("no document has text or an image: nothing to index")
    index_dir = index_dir or os.path.join(data_dir, "scann_index")
    t0 = time.time()
    if num_shards > 1:
        build_sharded(doc_embeddings, num_shards, index_dir, valid=valid, params=params, k=num_candidates)
        index: Any = ShardedIndex.load(index_dir)
    else:
        index = build_index(doc_embeddings, index_dir, valid=valid, params=params, k=num_candidates)
    build_seconds = time.time() - t0
    ids, scores, stats = compute_neighbours(
        doc_embeddings, text_queries, image_queries, has_text, has_image, search=index, k_text=k_text,
        k_image=k_image, num_candidates=num_candidates, max_score=max_score,
        diversity_threshold=diversity_threshold, progress=progress)
    stats["index_build_seconds"] = build_seconds
    stats["num_shards"] = int(num_shards)
    save_neighbours(data_dir, ids, scores, stats, extra={"index_dir": os.path.relpath(index_dir, data_dir),
                                                         **({"embedder": embedder} if embedder else {})})
    return stats


def index_embedder(data_dir: str) -> dict[str, Any] | None:
    """What embedded DATA_DIR's bank, as its last index build recorded it: {"kind": "retriever"},
    {"kind": "clip", "clip_model": DIR} or {"kind": "embeddings", "path": FILE} (a user's vectors,
    with no query encoder); None when there is no sidecar or it predates the record."""
    path = os.path.join(data_dir or "", NEIGHBOURS_JSON)
    if not data_dir or not os.path.exists(path):
        return None
    return workdir_io.read_format_json(path, NEIGHBOURS_FORMAT, what="neighbour sidecar").get("embedder")


def load_index(index_dir: str):
    """The bank's index as built by `build_neighbours`: one ScaNN index, or shards merged at search."""
    if os.path.exists(os.path.join(index_dir, SHARDS_JSON)):
        return ShardedIndex.load(index_dir)
    return ScannIndex.load(index_dir)
