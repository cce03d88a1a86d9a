"""Ingestion of instruction-tuning (SFT) examples into ArrayRecord documents (a TFDS dataset).

    python -m data_pipeline.sft_prepare --config experiments/data_sft_shapes.py --out DIR \
        --config.spm_model=spm.model --config.vq_workdir=VQ_DIR   (or --config.vocab_dir=PRETRAINED/vocab)

Sources: the built-in shapes world (every task generated from the renderer, `sft_tasks.shapes_example`)
or a JSONL file of `{"task": ..., fields}` lines with images by path (relative to the file), e.g.
`{"task": "edit", "source": "a.png", "instruction": "make the circle blue", "target": "b.png"}`;
the fields of each task are its template's (`sft_tasks.TEMPLATES`). Same builder machinery, same
skip-and-count report as `prepare` (bad JSON, unknown task, missing field, unreadable image, text
with special tokens, text the vocabulary cannot spell exactly, too long, template round trip failure); each record also holds
`output_start` (the first output token: the SFT loss mask) and `slots` (per-token template slot,
for condition dropout). The documents of each task are contiguous: the report's
`splits.<split>.tasks` gives each task's [start, stop) ids, which the mixing reads.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import app
from ml_collections import config_flags

from cm3leon_jax import config_defaults, vocab as vocab_lib
from data_pipeline import prepare, sft_tasks

REPORT_FILE = prepare.REPORT_FILE


class SftDocuments(prepare.Cm3Documents, skip_registration=True):
    """SFT sequences; read with `load_sft_documents`."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({
            "id": tfds.features.Scalar(np.int64),
            "task": tfds.features.Text(),
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "slots": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "output_start": tfds.features.Scalar(np.int64),
            "meta": tfds.features.Text(),  # JSON: source key, text fields, ground truth when known
        })
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)


def documents_dir(data_dir: str) -> str:
    return os.path.join(data_dir, SftDocuments.name, str(SftDocuments.VERSION))


def load_sft_documents(data_dir: str, split: str):
    """Random-access SFT documents of a prepared split."""
    path = documents_dir(data_dir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{data_dir} holds no SFT documents ({path} missing); make them with "
                                "`python -m data_pipeline.sft_prepare`")
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise ValueError(f"{data_dir} has no {split!r} split; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split)


def load_report(data_dir: str) -> dict:
    with open(os.path.join(data_dir, REPORT_FILE), encoding="utf-8") as f:
        return json.load(f)


def configured_tasks(cfg) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in str(cfg.tasks).split(",") if t.strip())
    for t in tasks:
        sft_tasks.template(t)
    if not tasks:
        raise ValueError("config.tasks names no task")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:   # a task's documents must be one contiguous id range (the report's task ranges)
        raise ValueError(f"config.tasks={cfg.tasks!r} names {repeated} more than once; name each task once")
    return tasks


# ---------------------------------------------------------------- sources

def shapes_records(cfg, split: str, task: str, shard: prepare.Shard) -> Iterator[prepare.RawRecord]:
    for i in range(int(cfg.num_documents[split])):
        if not shard.owns():
            continue
        ex = sft_tasks.shapes_example(task, split, i, image_size=int(cfg.image_size), seed=int(cfg.seed))
        yield prepare.RawRecord(f"shapes:{task}:{split}:{i}", None, None, {"task": task, "example": ex})


def jsonl_records(cfg, split: str, task: str, first_task: bool, shard: prepare.Shard) -> Iterator[prepare.RawRecord]:
    """The file's lines of one task in this split; bad lines and unknown tasks are reported once
    (on the first task's pass), so every line is counted exactly once (and owned by one shard)."""
    base = os.path.dirname(os.path.abspath(cfg.jsonl))
    known = configured_tasks(cfg)
    with open(cfg.jsonl, "rb") as f:
        for line_no, line in enumerate(f, 1):
            key = f"{cfg.jsonl}:{line_no}"
            # split by the row's content (as prepare's JSONL): not its line number or the file's path,
            # so inserting rows moves no old one and a row given twice cannot land in both splits
            if not line.strip() or prepare._split_of(line.strip().decode("utf-8", "replace"),
                                                     cfg.validation_fraction) != split:
                continue
            try:
                row = json.loads(line)
                row_task = row["task"]
                if not isinstance(row, dict):
                    raise TypeError("a line must be a JSON object")
            except (ValueError, KeyError, TypeError) as e:
                if first_task and shard.owns():
                    yield prepare.RawRecord(key, None, None, {"error": f"bad manifest line: {e}"})
                continue
            if row_task not in known:
                if first_task and shard.owns():
                    yield prepare.RawRecord(key, None, None, {"unknown_task": str(row_task)[:40]})
                continue
            if row_task != task or not shard.owns():
                continue
            tmpl = sft_tasks.template(task)
            ex = {"task": task, "meta": {k: v for k, v in row.items() if k not in tmpl.image_fields}}
            for field in tmpl.text_fields:
                ex[field] = row.get(field)
            for field in tmpl.image_fields:
                path = row.get(field)
                ex[field] = path if not isinstance(path, str) or os.path.isabs(path) else os.path.join(base, path)
            yield prepare.RawRecord(key, None, None, {"task": task, "example": ex})


# ---------------------------------------------------------------- ingestion

class _SftIngest(prepare._Ingest):
    """prepare's ingest loop (batching, VQ encoding, skip counting) with SFT validation and records."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_ranges: dict[str, list[int]] = {}

    def _records(self):
        for k, task in enumerate(configured_tasks(self.cfg)):
            if self.cfg.source == "shapes":
                yield from shapes_records(self.cfg, self.split, task, self.shard)
            else:
                yield from jsonl_records(self.cfg, self.split, task, first_task=k == 0, shard=self.shard)

    def _validate(self, record: prepare.RawRecord):
        meta = record.meta
        if "error" in meta:
            raise prepare.SkipRecord("bad_manifest_line", meta["error"])
        if "unknown_task" in meta:
            raise prepare.SkipRecord("unknown_task", meta["unknown_task"])
        ex = meta["example"]
        tmpl = sft_tasks.template(ex["task"])
        fields: dict[str, Any] = {}
        for field in tmpl.text_fields:
            if ex.get(field) is None:
                raise prepare.SkipRecord("missing_field", field)
            fields[field] = prepare.decode_caption(ex[field])
        images = []
        for field in tmpl.image_fields:
            if ex.get(field) is None:
                raise prepare.SkipRecord("missing_field", field)
            images.append(prepare.load_image(ex[field], int(self.cfg.image_size), int(self.cfg.min_image_size)))
        return record, fields, np.stack(images)

    def _documents(self, batch):
        images = np.concatenate([imgs for _, _, imgs in batch])
        codes = np.asarray(self.encode_images(images)).reshape(len(images), *self.vocab.image_grid)
        offset = 0
        for record, fields, imgs in batch:
            ex = record.meta["example"]
            task = ex["task"]
            tmpl = sft_tasks.template(task)
            fields = dict(fields, **{f: codes[offset + i].astype(np.int32) for i, f in enumerate(tmpl.image_fields)})
            offset += len(imgs)
            try:
                seq = sft_tasks.encode_example(task, fields, self.vocab)
            except ValueError as e:   # a text the vocabulary cannot spell exactly (an imported HF tokenizer's normaliser)
                self._skip(record, "text_not_encodable", str(e)[:200])
                continue
            if len(seq.tokens) > int(self.cfg.max_document_length):
                self._skip(record, "document_too_long", f"{len(seq.tokens)} tokens")
                continue
            try:
                back = sft_tasks.parse_sequence(task, seq.tokens, self.vocab)
                same = all(back[f] == fields[f] for f in tmpl.text_fields) and all(
                    np.array_equal(back[f], fields[f]) for f in tmpl.image_fields)
            except ValueError:
                same = False
            if not same:  # e.g. a question that spells " Answer:": the template would be ambiguous
                self._skip(record, "template_round_trip_failed", task)
                continue
            meta = dict(_jsonable(ex.get("meta") or {}), source=record.key,
                        **{f: fields[f] for f in tmpl.text_fields})
            self.task_ranges.setdefault(task, [self.kept, self.kept])[1] = self.kept + 1
            yield {"id": self._keep(record), "task": task, "tokens": seq.tokens, "slots": seq.slots,
                   "output_start": seq.output_start, "meta": json.dumps(meta)}

    def report(self) -> dict:
        return dict(super().report(), tasks=self.task_ranges)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def prepare_sft(cfg, out_dir: str, vocab: vocab_lib.Vocabulary, encode_images, **parts) -> dict:
    """Writes the SFT documents, the vocabulary and the report; returns the report. `parts`:
    prepare's shard_index / num_shards."""
    configured_tasks(cfg)
    return prepare.prepare(cfg, out_dir, vocab, encode_images, ingest_cls=_SftIngest, builder_cls=SftDocuments,
                           sources=("shapes", "jsonl"), **parts)


def load_vocab_and_encoder(cfg):
    """The pretrained run's vocabulary when `vocab_dir` is given (so the ids match it exactly),
    else one built like `prepare`'s; plus the VQ batch encoder."""
    if not cfg.vocab_dir:
        return prepare.load_vocab_and_encoder(cfg)
    from cm3leon_jax.vq_tokenizer import VQTokenizer
    if not cfg.vq_workdir:
        raise ValueError("--config.vq_workdir (the VQ tokenizer the pretrained data used) is required")
    vocab = vocab_lib.Vocabulary.load(cfg.vocab_dir)
    vq = VQTokenizer.from_workdir(cfg.vq_workdir)
    prepare.check_image_size(cfg, vq)
    if (vq.codebook_size, vq.tokens_per_image) != (vocab.num_image_codes, vocab.image_tokens_per_image):
        raise ValueError(f"VQ tokenizer {cfg.vq_workdir} ({vq.codebook_size} codes, {vq.tokens_per_image} per image) "
                         f"does not match the vocabulary in {cfg.vocab_dir} ({vocab.num_image_codes} codes, "
                         f"{vocab.image_tokens_per_image} per image)")
    return vocab, vq.encode


# ---------------------------------------------------------------- command line

def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "SFT ingestion config (experiments/data_sft_*.py)",
                                    lock_config=True)
    prepare.define_output_flags()


def main(argv):
    del argv
    prepare.run_cli(prepare_sft, load_vocab_and_encoder, SftDocuments)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=config_defaults.parse_flags)
