"""Ingestion over many machines: each run ingests one part of the source, one merge joins them.

    python -m data_pipeline.prepare --config C --out DIR --num_shards N --shard_index I   # N runs, any hosts
    python -m data_pipeline.prepare --out DIR --merge [--remove_parts] [--merge_workers W] # once, after all N

The paper's memory bank is 340M image-text pairs: at ~1,000 documents a second (image decoding,
VQ encoding, tokenization), four days of one host, so it must run on many at once
(`data_pipeline.sft_prepare` takes the same flags). Part I owns every N-th raw record of the
source from I (`prepare.Shard`), decodes only those, and writes to `DIR/parts/part-I-of-N/`:
- `SPLIT.array_record`: its documents, serialized with the dataset's own TFDS features, ids local;
- `SPLIT.positions.npy`: each document's place in the source;
- `vocab/`, and `part_report.json` last (the part's skip counts, config and shard: a finished part).

The merge checks that every part finished with the same config and vocabulary, orders the
parts' documents by source position, renumbers the ids and writes them as the TFDS dataset a
single run would have written (`record i = document i`, the same documents, ids, report counts
and first skipped examples; files named and described by TFDS's own metadata, so
`tfds.builder_from_directory` and every reader of ours take it as is) and the merged report.
Records are copied without decoding a feature (~50 us each, ArrayRecord's read and write
included), each output file by its own process. Parts must share a file system with the merge
(or be copied under DIR/parts first).
"""
from __future__ import annotations

import collections
import filecmp
import json
import os
import re
import shutil
import time

import numpy as np
from absl import logging

from data_pipeline import prepare

PARTS_DIR = "parts"
PART_REPORT = "part_report.json"
_PART_NAME = re.compile(r"^part-(\d{5})-of-(\d{5})$")
_SUMMED = ("kept", "text_only", "interleaved")
FILE_BYTES = 256 << 20   # merged files of about this size (stored bytes): each one a merge worker's task


def part_dir(out_dir: str, index: int, count: int) -> str:
    return os.path.join(out_dir, PARTS_DIR, f"part-{index:05d}-of-{count:05d}")


def _serializer(builder):
    from tensorflow_datasets.core import example_serializer
    features = builder.info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    return lambda doc: serializer.serialize_example(features.encode_example(doc))


def write_part(cfg, out_dir: str, vocab, encode_images, shard: prepare.Shard, *, ingest_cls, builder_cls) -> dict:
    """Ingests the records `shard` owns into its part directory; returns the part's report."""
    from array_record.python import array_record_module
    directory = part_dir(out_dir, shard.index, shard.count)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, PART_REPORT)):   # redone (--overwrite): unfinished until it ends
        os.remove(os.path.join(directory, PART_REPORT))
    serialize = _serializer(builder_cls(data_dir=directory, file_format="array_record"))
    splits = {}
    for split in prepare.splits_of(cfg):
        ingest = ingest_cls(cfg, vocab, encode_images, split, shard=prepare.Shard(shard.index, shard.count))
        writer = array_record_module.ArrayRecordWriter(os.path.join(directory, f"{split}.array_record"), "group_size:1")
        try:
            for _, doc in ingest.examples():
                writer.write(serialize(doc))
        finally:
            writer.close()
        np.save(os.path.join(directory, f"{split}.positions.npy"), np.asarray(ingest.positions, np.int64))
        splits[split] = dict(ingest.report(), skipped_positions=ingest.skipped_positions)
        if not ingest.kept:
            logging.warning("part %d of %d keeps no %s document (skipped: %s); the merge checks the whole split",
                            shard.index, shard.count, split, dict(ingest.skipped) or "none")
    vocab.save(os.path.join(directory, prepare.VOCAB_DIR))
    report = {"builder": builder_cls.name, "source": cfg.source,
              "vq_workdir": os.path.abspath(cfg.vq_workdir) if cfg.vq_workdir else "",
              "config": json.loads(cfg.to_json()), "shard": {"index": shard.index, "count": shard.count},
              "splits": splits}
    prepare.write_report(directory, report, PART_REPORT)
    return report


def _finished_parts(out_dir: str) -> tuple[list[str], list[dict]]:
    """The parts' directories and reports, in index order; ValueError naming what is missing or odd."""
    root = os.path.join(out_dir, PARTS_DIR)
    if not os.path.isdir(root):
        raise ValueError(f"{root} does not exist: run `prepare --num_shards N --shard_index I --out {out_dir}` for "
                         f"every part first")
    names = sorted(os.listdir(root))
    counts = {int(m.group(2)) for m in map(_PART_NAME.match, names) if m}
    if len(counts) != 1:
        raise ValueError(f"{root} holds parts of {sorted(counts)} shards (need exactly one --num_shards): {names}")
    count = counts.pop()
    dirs = [part_dir(out_dir, i, count) for i in range(count)]
    unfinished = [i for i, d in enumerate(dirs) if not os.path.exists(os.path.join(d, PART_REPORT))]
    if unfinished:
        raise ValueError(f"{len(unfinished)} of {count} parts have not finished (no {PART_REPORT}): --shard_index "
                         f"{', '.join(map(str, unfinished[:20]))}{' ...' if len(unfinished) > 20 else ''}; rerun "
                         f"them with --num_shards {count}")
    reports = []
    for d in dirs:
        with open(os.path.join(d, PART_REPORT), encoding="utf-8") as f:
            reports.append(json.load(f))
    first = reports[0]
    for i, (d, r) in enumerate(zip(dirs, reports)):
        for key in ("builder", "source", "config"):
            if r[key] != first[key]:
                differ = sorted(k for k in set(r[key]) | set(first[key]) if r[key].get(k) != first[key].get(k)) \
                    if isinstance(r[key], dict) else [key]
                raise ValueError(f"part {i} was ingested with a different {key} than part 0 (differs in {differ}): "
                                 f"every part must run the same --config")
        same_vocab = filecmp.dircmp(os.path.join(dirs[0], prepare.VOCAB_DIR), os.path.join(d, prepare.VOCAB_DIR))
        if same_vocab.left_only or same_vocab.right_only or same_vocab.diff_files or same_vocab.funny_files:
            raise ValueError(f"part {i}'s vocabulary differs from part 0's ({d}/{prepare.VOCAB_DIR}): every part "
                             f"must use the same text tokenizer and VQ tokenizer")
    return dirs, reports


def _merged_order(dirs: list[str], positions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(part, local id) of every document, in source order: global id g is part[g]'s document local[g]."""
    part = np.concatenate([np.full(len(ps), p, np.int32) for p, ps in enumerate(positions)])
    local = np.concatenate([np.arange(len(ps), dtype=np.int64) for ps in positions])
    every = np.concatenate(positions)
    order = np.argsort(every, kind="stable")
    merged = every[order]
    if len(merged) > 1 and not (np.diff(merged) > 0).all():
        raise ValueError(f"two parts under {os.path.dirname(dirs[0])} hold the same source record: they were not "
                         f"ingested as shards of one --num_shards")
    return part[order], local[order]


def _write_file(path: str, dirs: list[str], split: str, parts: np.ndarray, locals_: np.ndarray, first_id: int) -> int:
    """One merged file: documents first_id, first_id + 1, ... read from their parts (each part's
    run of local ids is increasing, so every reader seeks once and then reads on); returns its bytes."""
    from array_record.python import array_record_module
    from tensorflow_datasets.proto import tf_example_pb2
    readers, num_bytes = {}, 0
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    try:
        for g, (p, j) in enumerate(zip(parts.tolist(), locals_.tolist()), first_id):
            if p not in readers:
                readers[p] = array_record_module.ArrayRecordReader(os.path.join(dirs[p], f"{split}.array_record"))
                readers[p].seek(j)
            example = tf_example_pb2.Example.FromString(readers[p].read())
            ids = example.features.feature["id"].int64_list.value
            if len(ids) != 1 or ids[0] != j:
                raise ValueError(f"{dirs[p]}/{split}.array_record: record {j} has id {list(ids)}; the part is corrupt")
            ids[0] = g
            record = example.SerializeToString()
            writer.write(record)
            num_bytes += len(record)
    finally:
        writer.close()
        for reader in readers.values():
            reader.close()
    return num_bytes


def _merge_split(dirs: list[str], split: str, reports: list[dict], docs_dir: str, builder_name: str, workers: int):
    """Writes the split's TFDS files in source order, `workers` files at a time; returns (shard
    lengths, bytes, global id of each part's local ids)."""
    positions = [np.load(os.path.join(d, f"{split}.positions.npy")) for d in dirs]
    for d, ps, r in zip(dirs, positions, reports):
        if len(ps) != r["splits"][split]["kept"]:
            raise ValueError(f"{d}: {len(ps)} positions for {r['splits'][split]['kept']} {split} documents")
    parts, locals_ = _merged_order(dirs, positions)
    total = len(parts)
    stored = sum(os.path.getsize(os.path.join(d, f"{split}.array_record")) for d in dirs)
    num_files = max(1, min(total, -(-stored // FILE_BYTES)))
    bounds = [total * k // num_files for k in range(num_files + 1)]
    jobs = [(os.path.join(docs_dir, f"{builder_name}-{split}.array_record-{k:05d}-of-{num_files:05d}"), dirs, split,
             parts[bounds[k]:bounds[k + 1]], locals_[bounds[k]:bounds[k + 1]], bounds[k]) for k in range(num_files)]
    workers, start, num_bytes = min(workers, num_files), time.time(), 0

    def progress(done: int) -> None:
        elapsed = time.time() - start
        logging.info("merge %s: %d of %d files, %d documents, %.0f documents/s, ETA %.0f s", split, done, num_files,
                     bounds[done], bounds[done] / max(elapsed, 1e-9),
                     elapsed * (total - bounds[done]) / max(bounds[done], 1))

    if workers > 1:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done, written in enumerate(pool.map(_write_file, *zip(*jobs)), 1):   # in file order
                num_bytes += written
                progress(done)
    else:
        for done, job in enumerate(jobs, 1):
            num_bytes += _write_file(*job)
            progress(done)
    # each part's documents keep their order in the merge: its j-th global id is its document j's
    by_part = np.argsort(parts, kind="stable")
    global_ids = np.split(by_part.astype(np.int64), np.cumsum([len(ps) for ps in positions])[:-1])
    return [bounds[k + 1] - bounds[k] for k in range(num_files)], num_bytes, global_ids


def _merged_split_report(split_reports: list[dict], global_ids: list[np.ndarray]) -> dict:
    merged = {key: sum(r[key] for r in split_reports) for key in _SUMMED}
    merged["skipped"] = dict(sum((collections.Counter(r["skipped"]) for r in split_reports), collections.Counter()))
    examples = sorted((pos, tuple(ex)) for r in split_reports for pos, ex in zip(r["skipped_positions"],
                                                                                 r["skipped_examples"]))
    merged["skipped_examples"] = [list(ex) for _, ex in examples[:prepare.MAX_SKIPPED_EXAMPLES]]
    if "tasks" in split_reports[0]:   # SFT: each task's id range, contiguous in source order
        ranges: dict[str, list[int]] = {}
        for r, ids in zip(split_reports, global_ids):
            for task, (start, stop) in r["tasks"].items():
                if stop > start:
                    lo, hi = int(ids[start:stop].min()), int(ids[start:stop].max()) + 1
                    old = ranges.get(task, [lo, hi])
                    ranges[task] = [min(old[0], lo), max(old[1], hi)]
        merged["tasks"] = dict(sorted(ranges.items(), key=lambda kv: kv[1]))
    return merged


def merge_parts(out_dir: str, builder_cls=prepare.Cm3Documents, *, remove_parts: bool = False,
                workers: int = 1) -> dict:
    """Joins the finished parts under `out_dir/parts` into `out_dir`'s dataset, writing `workers`
    files at a time (processes); returns its report."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import naming
    dirs, reports = _finished_parts(out_dir)
    if reports[0]["builder"] != builder_cls.name:
        raise ValueError(f"the parts hold {reports[0]['builder']} documents, not {builder_cls.name}: merge them with "
                         f"the CLI that made them")
    builder = builder_cls(data_dir=out_dir, file_format="array_record")
    docs_dir = os.path.join(out_dir, builder.name, str(builder.VERSION))
    staging = docs_dir + ".merging"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    split_infos, split_reports = [], {}
    for split in reports[0]["splits"]:
        parts = [r["splits"][split] for r in reports]
        if not sum(r["kept"] for r in parts):
            skipped = sum((collections.Counter(r["skipped"]) for r in parts), collections.Counter())
            raise RuntimeError(f"no usable record in the {split} split of source {reports[0]['source']!r} across "
                               f"{len(dirs)} parts: skipped by reason {dict(skipped)}")
        lengths, num_bytes, global_ids = _merge_split(dirs, split, reports, staging, builder.name, workers)
        template = naming.ShardedFileTemplate(data_dir=docs_dir, dataset_name=builder.name, split=split,
                                              filetype_suffix="array_record")
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes,
                                               filename_template=template))
        split_reports[split] = _merged_split_report(parts, global_ids)
        logging.info("merged %s: %d documents from %d parts into %d files", split, sum(lengths), len(dirs),
                     len(lengths))
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(staging)
    prepare.remove_retrieval_outputs(out_dir)
    shutil.rmtree(docs_dir, ignore_errors=True)
    os.replace(staging, docs_dir)
    shutil.rmtree(os.path.join(out_dir, prepare.VOCAB_DIR), ignore_errors=True)
    shutil.copytree(os.path.join(dirs[0], prepare.VOCAB_DIR), os.path.join(out_dir, prepare.VOCAB_DIR))
    report = {"source": reports[0]["source"], "vq_workdir": reports[0]["vq_workdir"], "splits": split_reports,
              "parts": len(dirs)}
    prepare.write_report(out_dir, report)
    if remove_parts:
        shutil.rmtree(os.path.join(out_dir, PARTS_DIR))
    return report
