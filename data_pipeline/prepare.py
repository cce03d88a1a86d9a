"""Ingestion: raw image-text pairs -> tokenized multimodal documents in ArrayRecord (a TFDS dataset).

    python -m data_pipeline.prepare --config experiments/data_shapes.py --out DIR \
        [--config.vq_workdir=VQ_DIR --config.spm_model=spm.model]

Sources: the built-in shapes world (default), a folder of images with `.txt` sidecars (first line),
a JSONL manifest `{"image": path, "text": caption}`, or any TFDS dataset with image and text
features. Images are VQ-encoded in batches; each document is `caption <break> image <break>` in
the unified vocabulary. A manifest row may instead be an interleaved document (Chameleon's
mixed-modal data), `{"segments": [{"text": ...}, {"image": path}, {"text": ...}, ...]}`: its parts in
order, each image between `<break>`s (`text1 <break> image1 <break> text2 <break> image2 <break>`). Bad records are skipped and counted by reason in `ingest_report.json`
beside the data; the run fails only if a split keeps nothing. Record i of a split is document i
(TFDS shuffling is off), which is what the neighbour sidecars index.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import io
import json
import os
import shutil
import threading
import time
import zlib
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from cm3leon_jax import config_defaults, metrics, vocab as vocab_lib, workdir_io
from data_pipeline import images as image_io

BUILDER_NAME = "cm3_documents"
REPORT_FILE = "ingest_report.json"
MAX_SKIPPED_EXAMPLES = 50     # skipped records named in the report (the counts cover every one)
VOCAB_DIR = "vocab"


class SkipRecord(Exception):
    """A record that cannot become a document; `reason` is its bucket in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class RawRecord:
    key: str                 # where it came from (path, index), for the report
    image: Any               # encoded bytes, a path, a PIL image or a uint8 array; None: text only
    caption: Any             # str or bytes
    meta: dict | None = None  # ground truth kept with the document (shapes attributes)
    segments: list | None = None   # an interleaved document: [("text" | "image", value), ...] in order
    position: int = -1       # its place in the source's order (set by the ingest loop; a part's merge key)


class Shard:
    """Which raw records one ingestion run owns: every `count`-th from `index` in the source's
    order (round robin keeps the parts balanced whatever the order, and the merge restores the
    single-run order from the positions). A source calls `owns()` once per raw record it would
    yield, before any costly decode, so a part never decodes another part's images; `position`
    is then that record's place in the source."""

    def __init__(self, index: int = 0, count: int = 1):
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard {index} of {count}: need num_shards >= 1 and 0 <= shard_index < num_shards")
        self.index, self.count, self.position = index, count, -1

    def owns(self) -> bool:
        self.position += 1
        return self.position % self.count == self.index

    @property
    def is_part(self) -> bool:
        return self.count > 1


# ---------------------------------------------------------------- sources

def _split_of(key: str, validation_fraction: float) -> str:
    """A stable split by content key, so adding files never moves old ones between splits."""
    return "validation" if (zlib.crc32(key.encode()) % 10_000) < validation_fraction * 10_000 else "train"


def shapes_records(cfg, split: str, shard: Shard) -> Iterator[RawRecord]:
    from data_pipeline import shapes_world
    world = shapes_world.ShapesWorld(shapes_world.ShapesWorldConfig(image_size=int(cfg.image_size), seed=int(cfg.seed)),
                                     split)
    for i in range(int(cfg.num_documents[split])):
        if not shard.owns():
            continue
        ex = world[i]
        meta = {"objects": ex["objects"], "background": ex["background"]}
        yield RawRecord(f"shapes:{split}:{i}", ex["image"], ex["caption"], meta)


def folder_records(cfg, split: str, shard: Shard) -> Iterator[RawRecord]:
    """Every image under the folder, subfolders included, with the first line of its sidecar
    `.txt`; every other file is a record too, skipped by reason (a caption with no image, an
    unsupported file), so nothing in the folder goes uncounted. The split key is the path inside
    the folder: adding files never moves old ones."""
    root = cfg.folder
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder source {root!r} is not a directory")
    for directory, _, names in image_io.walk(root):
        stems = {os.path.splitext(n)[0] for n in names if n.lower().endswith(image_io.IMAGE_EXTENSIONS)}
        sidecars: dict[str, str] = {}   # each stem's caption file as spelled (`a.TXT` too; `a.txt` first)
        for n in sorted(names, key=lambda n: (not n.endswith(".txt"), n)):
            if os.path.splitext(n)[1].lower() == ".txt":
                sidecars.setdefault(os.path.splitext(n)[0], n)
        for name in sorted(names):
            path = os.path.join(directory, name)
            stem, ext = os.path.splitext(name)
            if stem in stems and sidecars.get(stem) == name:
                continue   # a sidecar: read with its image
            if _split_of(os.path.relpath(path, root), cfg.validation_fraction) != split or not shard.owns():
                continue
            if ext.lower() == ".txt":
                yield RawRecord(path, None, None, {"error": "a caption file with no image beside it",
                                                   "reason": "caption_without_image"})
            elif not name.lower().endswith(image_io.IMAGE_EXTENSIONS):
                yield RawRecord(path, None, None, {"error": f"not an image ({', '.join(image_io.IMAGE_EXTENSIONS)})",
                                                   "reason": "unsupported_file"})
            else:
                sidecar = os.path.join(directory, sidecars.get(stem, stem + ".txt"))
                caption = None   # no sidecar: counted as missing_caption
                if os.path.exists(sidecar):
                    with open(sidecar, "rb") as f:
                        caption = f.read().split(b"\n", 1)[0]
                yield RawRecord(path, path, caption)


def jsonl_records(cfg, split: str, shard: Shard) -> Iterator[RawRecord]:
    base = os.path.dirname(os.path.abspath(cfg.jsonl))
    with open(cfg.jsonl, "rb") as f:
        for line_no, line in enumerate(f, 1):
            key = f"{cfg.jsonl}:{line_no}"
            # split by the row's content, not its line number or the manifest's path: inserting rows
            # moves no old one, and a row given twice lands in one split (no train/validation leak)
            if not line.strip() or _split_of(line.strip().decode("utf-8", "replace"), cfg.validation_fraction) != split \
                    or not shard.owns():
                continue
            resolve = lambda image: image if os.path.isabs(image) else os.path.join(base, image)
            try:
                row = json.loads(line)
                if isinstance(row, dict) and "segments" in row:
                    segments = _manifest_segments(row["segments"])
                    yield RawRecord(key, None, None, segments=[(kind, resolve(v) if kind == "image" else v)
                                                               for kind, v in segments])
                    continue
                image, caption = row.get("image"), row["text"]
                if image is not None and not isinstance(image, str):
                    raise TypeError(f"image must be a path, got {type(image).__name__}")
                if image == "":   # else it resolved to the manifest's folder, read as an unreadable image
                    raise ValueError("image is an empty path (leave it out for a text-only row)")
                if caption is not None and not isinstance(caption, str):
                    raise TypeError(f"text must be a string, got {type(caption).__name__}")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                yield RawRecord(key, None, None, {"error": f"bad manifest line: {e!r}"})
                continue
            yield RawRecord(key, None if image is None else resolve(image), caption)


def _manifest_segments(segments) -> list[tuple[str, Any]]:
    """A manifest's `segments` list -> [("text" | "image", value)]; TypeError/ValueError when malformed."""
    if not isinstance(segments, list) or not segments:
        raise ValueError("segments must be a non-empty list")
    out = []
    for k, seg in enumerate(segments):
        if not isinstance(seg, dict) or len(seg) != 1 or next(iter(seg)) not in ("text", "image"):
            raise ValueError(f"segment {k} must be {{\"text\": ...}} or {{\"image\": path}}, got {seg!r}")
        kind, value = next(iter(seg.items()))
        if not isinstance(value, str):   # a text of 5 or null was read as "" and counted as an empty caption
            raise TypeError(f"segment {k}: {kind} must be a {'path' if kind == 'image' else 'string'}, "
                            f"got {type(value).__name__}")
        if kind == "image" and not value:
            raise ValueError(f"segment {k}: image is an empty path")
        out.append((kind, value))
    return out


def tfds_records(cfg, split: str, shard: Shard) -> Iterator[RawRecord]:
    tfds_split = {"train": cfg.tfds_train_split, "validation": cfg.tfds_validation_split}[split]
    source = tfds.data_source(cfg.tfds_name, split=tfds_split, data_dir=cfg.tfds_data_dir or None)
    for i in range(min(len(source), int(cfg.num_documents[split]) or len(source))):
        if not shard.owns():
            continue
        row = source[i]
        image = row[cfg.tfds_image_key] if cfg.tfds_image_key else None   # "": a text-only dataset
        yield RawRecord(f"{cfg.tfds_name}:{tfds_split}:{i}", image, row[cfg.tfds_text_key])


SOURCES: dict[str, Callable[[Any, str, Shard], Iterator[RawRecord]]] = {
    "shapes": shapes_records, "folder": folder_records, "jsonl": jsonl_records, "tfds": tfds_records}


# ---------------------------------------------------------------- validation

def load_image(raw: Any, image_size: int, min_size: int) -> np.ndarray:
    """Any image form -> uint8 [S, S, 3] by the VQ trainer's own conversion and crop
    (`images.center_crop_resize`); SkipRecord when unusable."""
    try:
        if isinstance(raw, (np.ndarray, Image.Image)):
            image = raw
        elif isinstance(raw, (bytes, bytearray)):
            image = Image.open(io.BytesIO(raw))
        elif isinstance(raw, str):
            if not os.path.exists(raw):
                raise SkipRecord("missing_image", raw)
            image = Image.open(raw)
        else:
            raise SkipRecord("unreadable_image", f"unsupported image value {type(raw).__name__}")
        if isinstance(image, Image.Image):
            image.load()  # forces a full decode: truncated files fail here, not later
        image = image_io.to_rgb(image)
    except SkipRecord:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise SkipRecord("unreadable_image", str(e)[:200]) from None
    if min(image.size) < min_size:
        raise SkipRecord("image_too_small", f"{image.size} < {min_size}")
    return image_io.center_crop_resize(image, image_size)


def decode_caption(raw: Any) -> str:
    if raw is None:
        raise SkipRecord("missing_caption")
    if isinstance(raw, (bytes, bytearray, np.bytes_)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise SkipRecord("caption_not_utf8") from None
    if not isinstance(raw, str):
        raise SkipRecord("unsupported_caption", f"a caption must be text, got {type(raw).__name__}")
    try:   # JSON's "\ud800" escape gives a str no tokenizer can encode (a lone surrogate)
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipRecord("caption_not_utf8", "lone surrogate") from None
    # (text spelling <break>/<mask:i>/<eoss> would become control tokens and corrupt CM3 masking)
    caption, reason = vocab_lib.stored_text(raw)
    if reason == "empty_caption":
        raise SkipRecord(reason)
    if reason:
        raise SkipRecord(reason, repr(caption[:40]) if reason == "caption_has_nul" else caption[:80])
    return caption


# ---------------------------------------------------------------- documents

class Cm3Documents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Tokenized documents. Built by `prepare`; read with `tfds.builder_from_directory`. Not in
    TFDS's registry (nothing looks it up by name), so `python -m data_pipeline.prepare` may import
    its own module again (`ingest_parts` does) without a duplicate-name error."""
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, split_examples: dict[str, Callable[[], Iterator]] | None = None, **kwargs):
        self._split_examples = split_examples or {}
        super().__init__(**kwargs)

    def _info(self):
        features = tfds.features.FeaturesDict({
            "id": tfds.features.Scalar(np.int64),
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "text_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "image_codes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "caption": tfds.features.Text(),
            "meta": tfds.features.Text(),  # JSON: source key, ground-truth attributes when known
        })
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {name: make() for name, make in self._split_examples.items()}

    def _generate_examples(self):  # the splits' generators come from prepare()
        raise NotImplementedError


class _Ingest:
    """Validates, VQ-encodes in batches and tokenizes one split, counting every skip."""

    def __init__(self, cfg, vocab: vocab_lib.Vocabulary, encode_images: Callable[[np.ndarray], np.ndarray], split: str,
                 shard: Shard | None = None):
        self.cfg, self.vocab, self.encode_images, self.split = cfg, vocab, encode_images, split
        self.shard = shard or Shard()
        self.kept = self.text_only = self.interleaved = 0
        self.skipped = collections.Counter()
        self.skipped_examples: list[tuple[str, str, str]] = []
        self.skipped_positions: list[int] = []   # the examples' source positions (a part's merge keeps the first 50)
        self.positions: list[int] = []           # source position of each kept document, in id order

    def _skip(self, record: RawRecord, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        # the first MAX_SKIPPED_EXAMPLES in source order, as a merge of parts recomputes them: a document
        # too long is skipped when its encode batch is encoded, after later records' skips
        k = bisect.bisect_right(self.skipped_positions, record.position)
        if k < MAX_SKIPPED_EXAMPLES:
            self.skipped_examples.insert(k, (record.key, reason, detail))
            self.skipped_positions.insert(k, record.position)
            del self.skipped_examples[MAX_SKIPPED_EXAMPLES:], self.skipped_positions[MAX_SKIPPED_EXAMPLES:]

    def _keep(self, record: RawRecord) -> int:
        """The next document id, for `record`."""
        self.positions.append(record.position)
        self.kept += 1
        return self.kept - 1

    def _documents(self, batch: list[tuple[RawRecord, str, list]]):
        """(record, its text, its parts: str text / uint8 images in order) -> documents. Every image
        of the batch is VQ-encoded in one call."""
        images = [part for _, _, parts in batch for part in parts if isinstance(part, np.ndarray)]
        codes = iter(np.asarray(self.encode_images(np.stack(images))).reshape(len(images), -1).astype(np.int32)
                     if images else [])
        for record, caption, parts in batch:
            parts = [next(codes) if isinstance(part, np.ndarray) else part for part in parts]
            image_parts = [part for part in parts if not isinstance(part, str)]
            tokens = self.vocab.encode_document(parts)   # a text-only document: its text alone, no <break>
            if len(tokens) > int(self.cfg.max_document_length):
                self._skip(record, "document_too_long", f"{len(tokens)} tokens")
                continue
            meta = dict(record.meta or {}, source=record.key)
            if len(image_parts) > 1 or (record.segments and len(parts) > 2):
                meta["parts"] = ["image" if not isinstance(part, str) else "text" for part in parts]
            yield {"id": self._keep(record), "tokens": tokens.astype(np.int32),
                   "text_ids": self.vocab.encode_text(caption).astype(np.int32),
                   # raw VQ codes, not vocabulary ids: [h*w] a pair's image, [n*h*w] an interleaved document's
                   # n images in order, [] text-only
                   "image_codes": (np.concatenate(image_parts) if image_parts else np.zeros((0,), np.int32)),
                   "caption": caption, "meta": json.dumps(meta)}
            self.text_only += not image_parts
            self.interleaved += "parts" in meta

    def _records(self) -> Iterator[RawRecord]:
        return SOURCES[self.cfg.source](self.cfg, self.split, self.shard)

    def _validate(self, record: RawRecord):
        """A record -> the batch item `_documents` encodes; SkipRecord when unusable."""
        if record.meta and "error" in record.meta:
            raise SkipRecord(record.meta.get("reason", "bad_manifest_line"), record.meta["error"])
        size, min_size = int(self.cfg.image_size), int(self.cfg.min_image_size)
        if record.segments is not None:
            return self._validate_segments(record, size, min_size)
        caption = decode_caption(record.caption)
        if record.image is None:
            if not self.cfg.get("text_only", False):
                raise SkipRecord("no_image", "text_only=True keeps text-only documents")
            return record, caption, [caption]
        return record, caption, [caption, load_image(record.image, size, min_size)]

    def _validate_segments(self, record: RawRecord, size: int, min_size: int):
        """An interleaved document: every part must be usable, or the document is skipped whole
        (a document with a hole would teach the model text that refers to a missing image).
        Adjacent text segments are joined with a space."""
        parts: list = []
        for k, (kind, value) in enumerate(record.segments):
            try:
                if kind == "image":
                    parts.append(load_image(value, size, min_size))
                elif parts and isinstance(parts[-1], str):
                    parts[-1] += " " + decode_caption(value)
                else:
                    parts.append(decode_caption(value))
            except SkipRecord as e:
                raise SkipRecord(e.reason, f"segment {k}: {e.detail}") from None
        if not any(isinstance(part, np.ndarray) for part in parts) and not self.cfg.get("text_only", False):
            raise SkipRecord("no_image", "text_only=True keeps text-only documents")
        return record, " ".join(part for part in parts if isinstance(part, str)), parts

    def _try_validate(self, record: RawRecord):
        try:
            return self._validate(record)
        except SkipRecord as e:
            return e

    def _validated(self) -> Iterator[tuple[RawRecord, Any]]:
        """(record, batch item or its SkipRecord), in source order. `decode_threads` threads decode
        up to two encode batches ahead of the VQ encoder (PIL decodes with the GIL released, and
        jitted encoding releases it too), so image decoding is neither serial nor idle while the
        encoder runs."""
        threads = int(self.cfg.get("decode_threads", 0)) or min(8, os.cpu_count() or 1)
        records = self._records()
        if threads == 1:
            for record in records:
                record.position = self.shard.position
                yield record, self._try_validate(record)
            return
        from concurrent.futures import ThreadPoolExecutor
        window: collections.deque = collections.deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
            for record in records:
                record.position = self.shard.position   # read on this thread, as the source advances
                window.append((record, pool.submit(self._try_validate, record)))
                if len(window) > 2 * int(self.cfg.encode_batch_size):
                    record, item = window.popleft()
                    yield record, item.result()
            while window:
                record, item = window.popleft()
                yield record, item.result()

    def examples(self) -> Iterator[tuple[int, dict]]:
        start, seen, batch = time.time(), 0, []
        for record, item in self._validated():
            seen += 1
            if isinstance(item, SkipRecord):
                self._skip(record, item.reason, item.detail)
            else:
                batch.append(item)
            if len(batch) == int(self.cfg.encode_batch_size):
                for doc in self._documents(batch):
                    yield doc["id"], doc
                batch = []
            if seen % int(self.cfg.log_every) == 0:
                logging.info("%s: %d records read, %d kept, %d skipped (%.0f records/s)", self.split, seen,
                             self.kept, sum(self.skipped.values()), seen / max(time.time() - start, 1e-9))
        if batch:
            for doc in self._documents(batch):
                yield doc["id"], doc
        if self.kept == 0 and not self.shard.is_part:   # a part may own none: the merge checks the whole split
            hint = " (set validation_fraction=0 / num_documents.validation=0 for no validation split)" \
                if self.split == "validation" else ""
            raise RuntimeError(f"no usable record in the {self.split} split of source {self.cfg.source!r}: "
                               f"{seen} read, skipped by reason {dict(self.skipped)}{hint}")

    def report(self) -> dict:
        return {"kept": self.kept, "text_only": self.text_only, "interleaved": self.interleaved,
                "skipped": dict(self.skipped),
                "skipped_examples": self.skipped_examples}


def splits_of(cfg) -> tuple[str, ...]:
    """train, plus validation unless the config asks for none."""
    if cfg.source in ("folder", "jsonl"):
        wants_validation = float(cfg.validation_fraction) > 0
    else:
        wants_validation = int(cfg.num_documents.get("validation", 0)) > 0
    return ("train", "validation") if wants_validation else ("train",)


def documents_dir(data_dir: str) -> str:
    return os.path.join(data_dir, BUILDER_NAME, str(Cm3Documents.VERSION))


def documents_builder(data_dir: str, split: str):
    """The prepared dataset's TFDS builder, or a clear error when DATA_DIR is not one or lacks `split`."""
    directory = documents_dir(data_dir)
    if not os.path.exists(os.path.join(directory, "dataset_info.json")):
        raise FileNotFoundError(f"{data_dir!r} is not a dataset made by `python -m data_pipeline.prepare` "
                                f"(no {os.path.join(BUILDER_NAME, str(Cm3Documents.VERSION), 'dataset_info.json')})")
    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
        raise ValueError(f"{data_dir} has no {split!r} split; it has {sorted(builder.info.splits)}")
    return builder


def load_documents(data_dir: str, split: str):
    """Random-access documents of a prepared split (no TensorFlow needed)."""
    return documents_builder(data_dir, split).as_data_source(split)


class TokenDocuments:
    """Random access to the `id` and `tokens` of a prepared split, for the training hot path.

    `load_documents` decodes every feature through TFDS and reads through ArrayRecord's batched
    `read([i])` (a thread pool per call): ~400 us a document. The trainer needs two features of
    4 documents per example, so this reads the same records by seek + read (no pool, ~12 us),
    parses the tf.Example and converts only those two (~15 us). Picklable for Grain workers
    (readers reopen lazily); a lock keeps seek + read atomic across threads.
    """

    def __init__(self, data_dir: str, split: str):
        from tensorflow_datasets.core.data_sources import base as tfds_sources
        builder = documents_builder(data_dir, split)
        self._files = [(fi.filename, int(fi.skip), int(fi.take))
                       for fi in tfds_sources.file_instructions(builder.info, split)]
        self._ends = np.cumsum([take for _, _, take in self._files]).tolist()
        self._readers: list | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self):
        return {"_files": self._files, "_ends": self._ends}

    def __setstate__(self, state):
        self.__dict__.update(state, _readers=None, _lock=threading.Lock())

    def _read(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} outside [0, {len(self)})")
        f = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[f - 1] if f else 0) + self._files[f][1]
        with self._lock:
            if self._readers is None:
                self._readers = [None] * len(self._files)
            reader = self._readers[f]
            if reader is None:  # opened on first use: a large split has many shard files
                from array_record.python import array_record_module
                reader = array_record_module.ArrayRecordReader(self._files[f][0],
                                                               "readahead_buffer_size:0,max_parallelism:0")
                self._readers[f] = reader
            reader.seek(position)
            return reader.read()

    def __getitem__(self, index) -> dict[str, Any]:
        from tensorflow_datasets.proto import tf_example_pb2
        feature = tf_example_pb2.Example.FromString(self._read(int(index))).features.feature
        try:
            return {"id": int(feature["id"].int64_list.value[0]),
                    "tokens": np.array(feature["tokens"].int64_list.value, np.int32)}
        except (KeyError, IndexError):
            raise ValueError(f"document {index} lacks the int64 'id'/'tokens' features of {BUILDER_NAME}") from None


def load_tokens(data_dir: str, split: str) -> TokenDocuments:
    """Random-access `{"id", "tokens"}` of a prepared split (what training reads)."""
    return TokenDocuments(data_dir, split)


SOURCE_INPUTS = {"folder": "folder", "jsonl": "jsonl", "tfds_name": "tfds"}   # each source's input field


def check_source_inputs(cfg) -> None:
    """Another source's input is refused: `--config.folder=DIR` without `--config.source=folder`
    used to ingest the default source (the shapes world) and never look at DIR."""
    for field, source in SOURCE_INPUTS.items():
        if cfg.get(field) and cfg.source != source:
            raise ValueError(f"config.{field}={cfg.get(field)!r} is read by source={source!r} only, but "
                             f"source={cfg.source!r}: set --config.source={source} (or leave {field} empty)")


def prepare(cfg, out_dir: str, vocab: vocab_lib.Vocabulary, encode_images: Callable[[np.ndarray], np.ndarray], *,
            ingest_cls=_Ingest, builder_cls=Cm3Documents, sources=SOURCES, shard_index: int = 0,
            num_shards: int = 1) -> dict:
    """Writes the documents, the vocabulary and the report; returns the report. The SFT ingestion
    (`sft_prepare`) passes its own ingest (validation, tokenization) and builder (features).
    With num_shards > 1 this run ingests only part `shard_index` of the source, into
    `out_dir/parts/` (`ingest_parts`); `ingest_parts.merge_parts` then writes the dataset."""
    if cfg.source not in sources:
        raise ValueError(f"unknown source {cfg.source!r}; choose one of {sorted(sources)}")
    check_source_inputs(cfg)
    shard = Shard(shard_index, num_shards)   # checked before any work
    if shard.is_part:
        from data_pipeline import ingest_parts
        return ingest_parts.write_part(cfg, out_dir, vocab, encode_images, shard, ingest_cls=ingest_cls,
                                       builder_cls=builder_cls)
    os.makedirs(out_dir, exist_ok=True)
    # a rebuild (--overwrite) starts from nothing: TFDS reuses a dataset already in the directory
    # ("Reusing dataset"), which kept the old documents under this run's vocabulary and report
    if os.path.exists(os.path.join(out_dir, REPORT_FILE)):
        os.remove(os.path.join(out_dir, REPORT_FILE))   # first: an interrupted rebuild is unfinished
    shutil.rmtree(os.path.join(out_dir, builder_cls.name), ignore_errors=True)
    remove_retrieval_outputs(out_dir)
    ingests = {split: ingest_cls(cfg, vocab, encode_images, split) for split in splits_of(cfg)}
    builder = builder_cls(split_examples={s: i.examples for s, i in ingests.items()}, data_dir=out_dir,
                          file_format="array_record")
    builder.download_and_prepare()
    vocab.save(os.path.join(out_dir, VOCAB_DIR))
    report = {"source": cfg.source, "vq_workdir": os.path.abspath(cfg.vq_workdir) if cfg.vq_workdir else "",
              "splits": {s: i.report() for s, i in ingests.items()}}
    write_report(out_dir, report)
    return report


def remove_retrieval_outputs(out_dir: str) -> None:
    """Removes the neighbour sidecar and the multi-host index parts, both made from the documents:
    with them left beside rebuilt documents, `index` skipped the directory (it has neighbours.json)
    or a finished embed part, and training joined the old documents' neighbours by id."""
    from data_pipeline import index_parts, neighbours
    for name in (neighbours.NEIGHBOURS_JSON, neighbours.NEIGHBOURS_IDS, neighbours.NEIGHBOURS_SCORES):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, index_parts.WORK_DIR), ignore_errors=True)


def write_report(out_dir: str, report: dict, name: str = REPORT_FILE) -> None:
    """Written last, through a rename: its presence marks finished data (reruns skip it)."""
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    for split, r in report["splits"].items():
        logging.info("%s: kept %d documents (%d text-only), skipped %s", split, r["kept"], r["text_only"],
                     r["skipped"] or "none")


# ---------------------------------------------------------------- command line

def _define_flags() -> None:
    """Only when run as a program, so importing `prepare` never clashes with another CLI's flags."""
    config_flags.DEFINE_config_file("config", None, "ingestion config (experiments/data_*.py)", lock_config=True)
    define_output_flags()


def define_output_flags() -> None:
    """--out, --overwrite and the parts flags, shared by the ingestion CLIs (documents, SFT)."""
    flags.DEFINE_string("out", None, "output data directory")
    flags.DEFINE_bool("overwrite", False, "rebuild even if the directory already holds prepared documents")
    flags.DEFINE_integer("num_shards", 1, "ingest the source in this many parts (one per host or job, each run with "
                         "its --shard_index, all with the same --out on shared storage), then --merge")
    flags.DEFINE_integer("shard_index", 0, "the part this run ingests: every num_shards-th record of the source, "
                         "from this one")
    flags.DEFINE_bool("merge", False, "join the finished parts under OUT/parts into OUT's dataset (no --config "
                      "needed); record i is then the document a single run would have made i")
    flags.DEFINE_bool("remove_parts", False, "with --merge: delete OUT/parts once the dataset is written")
    flags.DEFINE_integer("merge_workers", 0, "with --merge: files written at once, each by its own process (files "
                         "hold ~256 MB; 0 = one per CPU core)")


def check_image_size(cfg, vq) -> None:
    """config.image_size must be the VQ tokenizer's (images are resized to it, then encoded)."""
    if int(cfg.image_size) != vq.image_size:
        raise ValueError(f"--config.image_size={cfg.image_size} but the VQ tokenizer {cfg.vq_workdir} encodes "
                         f"{vq.image_size}x{vq.image_size} images: pass --config.image_size={vq.image_size}")


def load_vocab_and_encoder(cfg) -> tuple[vocab_lib.Vocabulary, Callable[[np.ndarray], np.ndarray]]:
    """The unified vocabulary (SentencePiece + the VQ tokenizer's codebook) and a batch encoder."""
    from cm3leon_jax import text_tokenizer
    from cm3leon_jax.vq_tokenizer import VQTokenizer
    if not cfg.spm_model or not cfg.vq_workdir:
        raise ValueError("--config.spm_model (a SentencePiece model) and --config.vq_workdir (a train_vq workdir) "
                         "are required")
    vq = VQTokenizer.from_workdir(cfg.vq_workdir)
    check_image_size(cfg, vq)
    vocab = vocab_lib.Vocabulary(text_tokenizer.TextTokenizer(cfg.spm_model), num_image_codes=vq.codebook_size,
                                 image_tokens_per_image=vq.tokens_per_image, num_sentinels=int(cfg.num_sentinels),
                                 image_grid=(vq.latent_size, vq.latent_size))
    return vocab, vq.encode


def run_cli(prepare_fn, load_fn=None, builder_cls=Cm3Documents) -> None:
    """The ingestion CLIs' shared body (documents and SFT tasks): --out, --overwrite, --config, the
    parts flags; `load_fn(cfg) -> (vocab, encode)` defaults to `load_vocab_and_encoder`."""
    from data_pipeline import ingest_parts
    metrics.quiet_library_logs()
    F = flags.FLAGS
    if F.out is None:
        raise app.UsageError("--out is required")
    out = workdir_io.require_local(F.out, "--out")
    # a flag the chosen mode does not read was ignored without a word
    for name in (("num_shards", "shard_index", "config") if F.merge else ("remove_parts", "merge_workers")):
        if F[name].present:
            raise app.UsageError(f"--{name} does not go with --merge (the parts' own settings are merged)" if F.merge
                                 else f"--{name} goes with --merge only")
    if os.path.exists(os.path.join(out, REPORT_FILE)) and not F.overwrite:
        logging.info("%s already holds prepared documents; pass --overwrite to rebuild", out)
        return
    if F.merge:
        ingest_parts.merge_parts(out, builder_cls, remove_parts=F.remove_parts,
                                 workers=F.merge_workers or os.cpu_count() or 1)
        return
    try:
        Shard(F.shard_index, F.num_shards)
    except ValueError as e:
        raise app.UsageError(f"--shard_index={F.shard_index} --num_shards={F.num_shards}: {e}") from None
    if F.num_shards > 1:
        done = os.path.join(ingest_parts.part_dir(out, F.shard_index, F.num_shards), ingest_parts.PART_REPORT)
        if os.path.exists(done) and not F.overwrite:
            logging.info("part %d of %d is already in %s; pass --overwrite to redo it", F.shard_index, F.num_shards,
                         os.path.dirname(done))
            return
    if F.config is None:
        raise app.UsageError("--config is required (only --merge runs without one)")
    cfg = F.config
    vocab, encode = (load_fn or load_vocab_and_encoder)(cfg)
    prepare_fn(cfg, out, vocab, encode, shard_index=F.shard_index, num_shards=F.num_shards)


def main(argv):
    del argv
    run_cli(prepare)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=config_defaults.parse_flags)
