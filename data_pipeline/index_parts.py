"""The retrieval stage over many machines: embed, search and select each split across hosts.

    python -m data_pipeline.index --data DIR --stage train                                # once, one host
    python -m data_pipeline.index --data DIR --stage embed  --num_hosts H --host_index h  # H runs, any hosts
    python -m data_pipeline.index --data DIR --stage search --num_hosts H --host_index h [--num_shards S]
        [--candidates C]
    python -m data_pipeline.index --data DIR --stage select --num_hosts H --host_index h
    python -m data_pipeline.index --data DIR --stage finish [--remove_parts]             # once

The paper's memory bank is 340M documents: 700 GB of 512-d float32 embeddings, and every one of
them is also a query. No host holds the bank, its index, or all the queries' candidates; each
stage splits the work into H parts and writes them under DIR/index_parts/STAGE/host-h-of-H/:
- train: the CLIP-style retriever, on one host (`--embeddings` / `--clip_model` need none);
- embed: host h embeds documents shard_bounds(N, H)[h] (document vectors, text and image queries
  after the 20% query dropout drawn from each document's id, so the split does not change them);
- search: host h builds ScaNN shards h, h + H, ... of S (DIR/scann_index/shard_XXXXX, the sharded
  index generation loads) from those rows of the embed parts, read as one bank
  (`neighbours.ConcatenatedRows`, memory-mapped), and writes every document's top-C candidates
  by text and by image over its shards, [N, C] each;
- select: host h merges the H hosts' lists of its documents (`merge_topk`, a batch at a time) and
  chooses their neighbours by the paper's rules (`compute_neighbours` with candidate lookups);
- finish: joins the hosts' rows into the sidecar the trainer reads, with their summed statistics
  (and a CLIP run's bank embeddings, which generation queries).

A part is finished when its part.json exists (written last, after everything else of the part
was renamed into place): a host whose part finished exits at once, so resubmitting a stage redoes
only failed hosts, and each stage checks that every host of the stage before finished with the same
settings. The result equals a single-host `--num_shards S` run when C covers that run's widest
search (`neighbours.MAX_CANDIDATES`, or N below it) and C is at most ScaNN's reorder count (1,000 by
default; exact shards below 4,096 documents are exact anyway): selecting from the first w of a
document's merged top-C is searching w wide. With a smaller C, a document still short of
neighbours after C is not searched wider (`max_candidates` in the stats says so).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from typing import Any

import numpy as np
from absl import logging

from cm3leon_jax import retriever, workdir_io
from data_pipeline import index as index_lib
from data_pipeline import neighbours, prepare

WORK_DIR = "index_parts"
PART_JSON = "part.json"
PART_FORMAT = "cm3leon_jax.index_part/1"
STAGES = ("train", "embed", "search", "select", "finish")
DEFAULT_CANDIDATES = 128   # per list and document: 4x the first search's 32, the single run's first widening
_HOST_NAME = re.compile(r"^host-(\d{5})-of-(\d{5})$")


def part_dir(data_dir: str, stage: str, host_index: int, num_hosts: int) -> str:
    return os.path.join(data_dir, WORK_DIR, stage, f"host-{host_index:05d}-of-{num_hosts:05d}")


def _read_part(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, PART_JSON)
    if not os.path.exists(path):
        return None
    return workdir_io.read_format_json(path, PART_FORMAT, what="retrieval part")


def _finished_part(directory: str, overwrite: bool, inputs: dict[str, list] | None = None) -> dict[str, Any] | None:
    """The part's part.json when it finished (and is not to be redone), else None. A part made
    from other `inputs` (the part ids of the stages it read) than those there now is redone: an
    embed stage rerun with other embeddings must not leave the search and selection of the old."""
    done = None if overwrite else _read_part(directory)
    if done is not None and inputs is not None and done.get("inputs") != inputs:
        logging.info("%s was made from earlier %s parts: redoing it", directory, "/".join(inputs))
        return None
    if done is not None:
        logging.info("%s already finished (--overwrite redoes it)", directory)
    return done


def _part_ids(data_dir: str, stages: tuple[str, ...], num_hosts: int) -> dict[str, list]:
    """{stage: the part_id of each host's part (None where unfinished)}: what a later part is made from."""
    return {stage: [(_read_part(part_dir(data_dir, stage, h, num_hosts)) or {}).get("part_id")
                    for h in range(num_hosts)] for stage in stages}


def _check_made_from(data_dir: str, stage: str, metas: list[dict[str, Any]], inputs: dict[str, list]) -> None:
    """Every host's `stage` part must have been made from the parts there now."""
    stale = [h for h, meta in enumerate(metas) if meta.get("inputs") != inputs]
    if stale:
        raise ValueError(f"{data_dir}: the {stage} parts of hosts {stale[:20]} were made from earlier "
                         f"{'/'.join(inputs)} parts: run `--stage {stage}` again on those hosts")


def _write_part(directory: str, fill, meta: dict[str, Any]) -> dict[str, Any]:
    """Runs fill(tmp_dir) (which writes the part's arrays there), then part.json, then renames the
    whole directory into place: a part directory is complete or absent."""
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {"format": PART_FORMAT, "part_id": uuid.uuid4().hex, **meta, **(fill(tmp) or {})}
    with open(os.path.join(tmp, PART_JSON), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return meta


def _check_host(num_hosts: int, host_index: int) -> None:
    if num_hosts < 1:
        raise ValueError(f"--num_hosts must be >= 1, got {num_hosts}")
    if not 0 <= host_index < num_hosts:
        raise ValueError(f"--host_index must be in [0, {num_hosts}), got {host_index}")


def _finished(data_dir: str, stage: str, num_hosts: int, agree: tuple[str, ...]) -> list[dict[str, Any]]:
    """part.json of every host of `stage`, or a clear error naming the hosts to run (again);
    the fields in `agree` must be the same on every host."""
    metas, missing = [], []
    for h in range(num_hosts):
        meta = _read_part(part_dir(data_dir, stage, h, num_hosts))
        (missing.append(h) if meta is None else metas.append(meta))
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{data_dir}: {len(missing)} of {num_hosts} hosts have not finished the {stage} stage "
                         f"(no {PART_JSON}): run `python -m data_pipeline.index --data {data_dir} --stage {stage} "
                         f"--num_hosts {num_hosts} --host_index h` for h in {shown}")
    for h, meta in enumerate(metas):
        differ = [key for key in agree if meta.get(key) != metas[0].get(key)]
        if differ:
            raise ValueError(f"{data_dir}: host {h}'s {stage} part differs from host 0's in {differ} "
                             f"({[meta.get(k) for k in differ]} vs {[metas[0].get(k) for k in differ]}): "
                             f"every host of a stage must run with the same flags")
    return metas


def _check_ranges(data_dir: str, stage: str, metas: list[dict[str, Any]]) -> None:
    """Host h's part of `stage` must hold host h's documents (its `start`, `stop`)."""
    bounds = neighbours.shard_bounds(metas[0]["num_documents"], len(metas))
    for h, meta in enumerate(metas):
        if (meta["start"], meta["stop"]) != bounds[h]:
            raise ValueError(f"{data_dir}: {stage} part {h} holds documents [{meta['start']}, {meta['stop']}), "
                             f"not host {h}'s of {len(metas)}")


def num_hosts_of(data_dir: str, stage: str) -> int:
    """The host count a stage ran with, from its part directories' names (one count only)."""
    stage_dir = os.path.join(data_dir, WORK_DIR, stage)
    counts = {int(m.group(2)) for m in map(_HOST_NAME.match, os.listdir(stage_dir) if os.path.isdir(stage_dir) else ())
              if m}
    if len(counts) != 1:
        raise ValueError(f"{stage_dir}: parts of {sorted(counts) or 'no'} host counts; expected the parts of one "
                         f"--num_hosts (remove stale ones)")
    return counts.pop()


# --------------------------------------------------------------------------- train

def train(data_dir: str, *, seed: int = 0, **retriever_overrides) -> dict[str, Any]:
    """Trains the retriever on the train split (one host), unless one was trained already."""
    documents = prepare.load_documents(data_dir, "train")
    texts, images = index_lib.document_columns(documents, index_lib.image_tokens_of(data_dir))
    params, config = index_lib.train_or_load_retriever(data_dir, texts, images, seed=seed, **retriever_overrides)
    del params
    return config.to_dict()


# --------------------------------------------------------------------------- embed

def embed_part(data_dir: str, num_hosts: int, host_index: int, *, embeddings_path: str | None = None,
               clip_model: str | None = None, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Embeds this host's documents: DIR/index_parts/embed/host-h-of-H/{doc, text_query,
    image_query, has_text, has_image}.npy (a user's embeddings serve as both queries: no query
    files then). Returns the part's part.json (at once when the part already finished, unless
    `overwrite`; so for every host stage)."""
    _check_host(num_hosts, host_index)
    if embeddings_path and clip_model:
        raise ValueError("give --embeddings or --clip_model, not both")
    directory = part_dir(data_dir, "embed", host_index, num_hosts)
    done = _finished_part(directory, overwrite)
    if done is not None:
        return done
    documents = prepare.load_documents(data_dir, "train")
    n = len(documents)
    if num_hosts > n:
        raise ValueError(f"--num_hosts {num_hosts} is more than the {n} train documents")
    start, stop = neighbours.shard_bounds(n, num_hosts)[host_index]
    t0 = time.time()
    texts, images = index_lib.document_columns(documents, index_lib.image_tokens_of(data_dir), start=start, stop=stop)
    has_text = np.array([len(t) > 0 for t in texts], bool)
    has_image = np.array([len(c) > 0 for c in images], bool)
    if clip_model:
        doc, text_q, image_q = index_lib.clip_embeddings(data_dir, clip_model, texts, images, seed=seed, first_id=start)
        source = {"clip_model": os.path.abspath(clip_model)}
    elif embeddings_path:
        doc = retriever.load_embeddings(embeddings_path, n, start=start, stop=stop)
        text_q = image_q = None   # one vector per document serves both queries
        source = {"embeddings": os.path.abspath(embeddings_path)}
    else:
        if not index_lib.has_retriever(data_dir):
            raise ValueError(f"{data_dir} has no trained retriever: run `python -m data_pipeline.index --data {data_dir} "
                             f"--stage train` on one host first (or give --embeddings / --clip_model)")
        params, config = retriever.load_retriever(data_dir)
        doc = retriever.embed_documents(params, config, texts, images)
        text_q, image_q, _, _ = retriever.embed_queries(params, config, texts, images, seed=seed, first_id=start)
        source = {"retriever": config.to_dict()}

    def fill(tmp):
        arrays = {"doc": doc, "text_query": text_q, "image_query": image_q, "has_text": has_text,
                  "has_image": has_image}
        for name, array in arrays.items():
            if array is not None:
                np.save(os.path.join(tmp, f"{name}.npy"), np.asarray(array, bool if name.startswith("has_") else np.float32))

    meta = _write_part(directory, fill, {
        "stage": "embed", "num_hosts": num_hosts, "host_index": host_index, "num_documents": n,
        "start": start, "stop": stop, "dim": int(np.shape(doc)[1]), "seed": seed, "source": source,
        "separate_queries": text_q is not None, "seconds": round(time.time() - t0, 3)})
    logging.info("embed part %d of %d: documents [%d, %d) in %.1fs", host_index, num_hosts, start, stop, meta["seconds"])
    return meta


class Bank:
    """The embed parts read as one bank: document vectors, queries (memory-mapped, never loaded
    whole) and the has_text / has_image masks (loaded: a byte per document)."""

    def __init__(self, data_dir: str, num_hosts: int):
        self.metas = _finished(data_dir, "embed", num_hosts, ("num_documents", "dim", "seed", "source",
                                                              "separate_queries"))
        _check_ranges(data_dir, "embed", self.metas)
        dirs = [part_dir(data_dir, "embed", h, num_hosts) for h in range(num_hosts)]

        def rows(name, mmap=True):
            return neighbours.ConcatenatedRows([np.load(os.path.join(d, f"{name}.npy"), mmap_mode="r" if mmap else None)
                                                for d in dirs])
        self.num_documents = int(self.metas[0]["num_documents"])
        self.source = self.metas[0]["source"]
        self.doc = rows("doc")
        separate = self.metas[0]["separate_queries"]
        self.text_query = rows("text_query") if separate else self.doc
        self.image_query = rows("image_query") if separate else self.doc
        self.has_text = rows("has_text", mmap=False)[:]
        self.has_image = rows("has_image", mmap=False)[:]
        # the lists searched and stored: a user's embeddings are one query for both (searched once)
        self.query_lists = ({"text": (self.text_query, self.has_text), "image": (self.image_query, self.has_image)}
                            if separate else {"query": (self.doc, self.has_text | self.has_image)})
        if self.doc.shape[0] != self.num_documents:
            raise ValueError(f"{data_dir}: the embed parts hold {self.doc.shape[0]} rows for "
                             f"{self.num_documents} documents")


# --------------------------------------------------------------------------- search

def search_part(data_dir: str, num_hosts: int, host_index: int, *, num_shards: int | None = None,
                candidates: int = DEFAULT_CANDIDATES, num_candidates: int = 32, params: dict[str, Any] | None = None,
                query_batch: int = 16384, overwrite: bool = False) -> dict[str, Any]:
    """Builds this host's ScaNN shards and writes every document's top-`candidates` over them:
    DIR/index_parts/search/host-h-of-H/{text,image}_{ids,scores}.npy, [N, C] each (-1 / -inf
    where a document has no such query; a user's embeddings, one query for both lists: a single
    query_{ids,scores}.npy, half the search and the storage). Shard parameters come from the shard size and
    `num_candidates` (as a single run's), unless `params` is given. Returns the part's part.json."""
    _check_host(num_hosts, host_index)
    num_shards = int(num_shards or num_hosts)
    if num_shards < num_hosts:
        raise ValueError(f"--num_shards {num_shards} is fewer than --num_hosts {num_hosts}: every host builds "
                         "and searches at least one shard")
    if candidates < 1:
        raise ValueError(f"--candidates must be >= 1, got {candidates}")
    directory = part_dir(data_dir, "search", host_index, num_hosts)
    inputs = _part_ids(data_dir, ("embed",), num_hosts)
    done = _finished_part(directory, overwrite, inputs)
    if done is not None:
        return done
    bank = Bank(data_dir, num_hosts)
    n = bank.num_documents
    valid = bank.has_text | bank.has_image
    if not valid.any():
        raise ValueError(f"{data_dir}: no document has text or an image: nothing to index")
    mine = list(range(host_index, num_shards, num_hosts))
    index_dir = os.path.join(data_dir, "scann_index")
    t0 = time.time()
    neighbours.build_sharded(lambda a, b: bank.doc[a:b], num_shards, index_dir, shard_ids=mine, num_documents=n,
                             valid=valid, params=params, k=num_candidates)
    build_seconds = time.time() - t0
    index = neighbours.ShardedIndex.load(index_dir, shard_ids=mine)
    lists = bank.query_lists

    def fill(tmp):
        out = {}
        for name in lists:
            out[name] = (np.lib.format.open_memmap(os.path.join(tmp, f"{name}_ids.npy"), "w+", np.int32, (n, candidates)),
                         np.lib.format.open_memmap(os.path.join(tmp, f"{name}_scores.npy"), "w+", np.float32,
                                                   (n, candidates)))
        for lo in range(0, n, query_batch):
            hi = min(lo + query_batch, n)
            for name, (queries, present) in lists.items():
                ids = np.full((hi - lo, candidates), -1, np.int32)
                scores = np.full((hi - lo, candidates), -np.inf, np.float32)
                mask = present[lo:hi]
                if mask.any():
                    ids[mask], scores[mask] = index.search(queries[lo:hi][mask], candidates)
                out[name][0][lo:hi], out[name][1][lo:hi] = ids, scores
            logging.info("search part %d of %d: %d/%d documents' queries (%.0f/s)", host_index, num_hosts, hi, n,
                         hi / max(time.time() - t0 - build_seconds, 1e-9))
        for arrays in out.values():
            for array in arrays:
                array.flush()
        return {"search_seconds": round(time.time() - t0 - build_seconds, 3)}

    return _write_part(directory, fill, {
        "stage": "search", "num_hosts": num_hosts, "host_index": host_index, "num_documents": n,
        "num_shards": num_shards, "shards": mine, "candidates": int(candidates), "num_candidates": int(num_candidates),
        "index_build_seconds": round(build_seconds, 3), "inputs": inputs})


# --------------------------------------------------------------------------- select

def _lookup(parts: list[tuple[np.ndarray, np.ndarray]]):
    """callable(document ids, width) -> their global top-`width` candidates: the merge of every
    host's first `width` (each host's list is sorted, so the merge of prefixes is the prefix)."""
    def lookup(rows, width):
        return neighbours.merge_topk([ids[rows, :width] for ids, _ in parts],
                                     [scores[rows, :width] for _, scores in parts], width)
    return lookup


def select_part(data_dir: str, num_hosts: int, host_index: int, *, k_text: int = 2, k_image: int = 2,
                num_candidates: int = 32, max_score: float = neighbours.NEAR_DUPLICATE_SCORE,
                diversity_threshold: float = 0.9, query_batch: int = 16384, overwrite: bool = False) -> dict[str, Any]:
    """Chooses the neighbours of this host's documents from every host's candidates:
    DIR/index_parts/select/host-h-of-H/{ids,scores}.npy, the stats in part.json."""
    _check_host(num_hosts, host_index)
    directory = part_dir(data_dir, "select", host_index, num_hosts)
    inputs = _part_ids(data_dir, ("embed", "search"), num_hosts)
    done = _finished_part(directory, overwrite, inputs)
    if done is not None:
        return done
    bank = Bank(data_dir, num_hosts)
    searched = _finished(data_dir, "search", num_hosts, ("num_documents", "num_shards", "candidates",
                                                         "num_candidates"))
    _check_made_from(data_dir, "search", searched, {"embed": inputs["embed"]})
    if searched[0]["num_documents"] != bank.num_documents:
        raise ValueError(f"{data_dir}: the search parts cover {searched[0]['num_documents']} documents, the embed "
                         f"parts {bank.num_documents}: rerun the search stage")
    dirs = [part_dir(data_dir, "search", h, num_hosts) for h in range(num_hosts)]
    lookups = {name: _lookup([(np.load(os.path.join(d, f"{name}_ids.npy"), mmap_mode="r"),
                               np.load(os.path.join(d, f"{name}_scores.npy"), mmap_mode="r")) for d in dirs])
               for name in bank.query_lists}
    lookups = [lookups["query"]] * 2 if "query" in lookups else [lookups["text"], lookups["image"]]   # one is searched once
    start, stop = neighbours.shard_bounds(bank.num_documents, num_hosts)[host_index]
    stored = int(searched[0]["candidates"])
    ids, scores, stats = neighbours.compute_neighbours(
        bank.doc, None, None, bank.has_text, bank.has_image, candidate_lookups=lookups, k_text=k_text,
        k_image=k_image, num_candidates=min(num_candidates, stored), max_candidates=stored,
        max_score=max_score, diversity_threshold=diversity_threshold, query_batch=query_batch, start=start, stop=stop)

    def fill(tmp):
        np.save(os.path.join(tmp, "ids.npy"), ids)
        np.save(os.path.join(tmp, "scores.npy"), scores)

    meta = _write_part(directory, fill, {"stage": "select", "num_hosts": num_hosts, "host_index": host_index,
                                         "num_documents": bank.num_documents, "start": start, "stop": stop,
                                         "stats": stats, "inputs": inputs})
    logging.info("select part %d of %d: %s", host_index, num_hosts, stats)
    return meta


# --------------------------------------------------------------------------- finish

_SUMMED_STATS = ("num_documents", "widened_searches", "documents_without_embedding", "text_queries", "image_queries",
                 "documents_without_neighbours", "documents_with_full_neighbours", "seconds")


def summed_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The hosts' selection stats as one run's: counts summed, settings kept, the mean recomputed."""
    out = dict(parts[0])
    for key in _SUMMED_STATS:
        out[key] = sum(p[key] for p in parts)
    out["start"], out["stop"] = parts[0]["start"], parts[-1]["stop"]
    out["neighbours_histogram"] = np.sum([p["neighbours_histogram"] for p in parts], axis=0).tolist()
    out["skipped"] = {r: sum(p["skipped"][r] for p in parts) for r in neighbours.SKIP_REASONS}
    histogram = np.asarray(out["neighbours_histogram"])
    out["mean_neighbours"] = float((histogram * np.arange(histogram.size)).sum() / max(histogram.sum(), 1))
    return out


def finish(data_dir: str, *, remove_parts: bool = False) -> dict[str, Any]:
    """Joins the select parts into DIR/neighbours_{ids,scores}.npy + neighbours.json (as a single
    run writes them) and, for a CLIP bank, DIR/retriever's reference; returns the stats."""
    num_hosts = num_hosts_of(data_dir, "select")
    selected = _finished(data_dir, "select", num_hosts, ("num_documents",))
    searched = _finished(data_dir, "search", num_hosts, ("num_shards", "candidates"))
    _check_made_from(data_dir, "select", selected, _part_ids(data_dir, ("embed", "search"), num_hosts))
    bank = Bank(data_dir, num_hosts)
    _check_ranges(data_dir, "select", selected)
    dirs = [part_dir(data_dir, "select", h, num_hosts) for h in range(num_hosts)]
    ids = neighbours.ConcatenatedRows([np.load(os.path.join(d, "ids.npy"), mmap_mode="r") for d in dirs])
    scores = neighbours.ConcatenatedRows([np.load(os.path.join(d, "scores.npy"), mmap_mode="r") for d in dirs])
    stats = summed_stats([m["stats"] for m in selected])
    stats.update(num_shards=searched[0]["num_shards"], num_hosts=num_hosts, candidates=searched[0]["candidates"],
                 index_build_seconds=sum(m["index_build_seconds"] for m in searched))
    if "clip_model" in bank.source:
        retriever.save_clip_reference(data_dir, bank.source["clip_model"], bank.doc)
    embedder = index_lib.embedder_record(bank.source.get("clip_model"), bank.source.get("embeddings"))
    neighbours.save_neighbours(data_dir, ids, scores, stats, extra={"index_dir": "scann_index", "embedder": embedder})
    if remove_parts:
        del ids, scores, bank
        shutil.rmtree(os.path.join(data_dir, WORK_DIR))
    logging.info("neighbours of %d documents from %d hosts: %s", stats["num_documents"], num_hosts, stats)
    return stats
