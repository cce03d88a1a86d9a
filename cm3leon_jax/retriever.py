"""A small CLIP-style dual encoder: the retriever that picks each document's neighbours.

CM3Leon retrieves with a frozen CLIP bi-encoder. CLIP weights cannot be had offline, so this
module ships a small dual encoder trained contrastively on the corpus itself (`train_retriever`),
and also accepts embeddings computed elsewhere (`load_embeddings`, a `.npy` aligned with the
documents).

Inputs follow the ingestion schema, one document per index (its document id):
  text_ids     int32 [T]    text token ids in the unified vocabulary (may be empty)
  image_codes  int32 [h*w]  VQ codes of the image grid (may be empty); raw codes in
                            [0, num_image_codes), or unified ids with `image_code_offset` set to
                            the vocabulary's `image_offset`.

Model: a text encoder (token + position embedding, pre-LN transformer blocks with a padding mask,
masked mean pooling, projection) and an image encoder (code embedding on the (h, w) grid,
stride-2 convolutions, transformer blocks, mean pooling, projection), both to `embed_dim` and
l2-normalised. Modules hold parameters only; normalisation, pooling, the document-embedding rule,
the InfoNCE loss and query dropout are pure functions.

Document embedding (the paper's rule): normalise the text and the image embedding separately,
average the ones the document has, normalise again. A document with neither gets a zero row.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3leon_jax import attention as attn_lib
from cm3leon_jax import sharding, workdir_io

RETRIEVER_SUBDIR = "retriever"
PARAMS_SUBDIR = "params"
CONFIG_JSON = "config.json"
FORMAT = "cm3leon_jax.retriever/1"


# --------------------------------------------------------------------------- config

def retriever_config(**overrides) -> ml_collections.ConfigDict:
    """Default retriever config; keyword overrides replace fields (unknown names are errors)."""
    config = ml_collections.ConfigDict(dict(
        # inputs
        text_vocab_size=65536,        # text ids must lie in [0, text_vocab_size) (unified vocabulary)
        num_image_codes=8192,         # VQ codebook size
        image_code_offset=0,          # subtracted from image_codes (vocab.image_offset for unified ids)
        image_grid=(32, 32),          # (h, w) of the code grid; every image must have h*w codes
        max_text_len=64,              # longer texts are truncated to their first tokens
        # model
        width=256,
        num_heads=4,
        mlp_ratio=4,
        text_layers=2,
        image_layers=2,
        image_downsample=2,           # stride-2 convolutions before the image transformer
        embed_dim=256,
        init_temperature=0.07,
        max_logit_scale=100.0,
        # training
        batch_size=256,               # global batch (split over all devices, data parallel)
        steps=2000,
        learning_rate=1e-3,
        warmup_steps=100,
        weight_decay=0.05,
        grad_clip=1.0,
        seed=0,
        log_every=50,
        max_train_documents=-1,       # -1: all paired documents; else the first M paired ones
        # retrieval
        query_dropout=0.2,            # fraction of a query's tokens dropped before embedding
        embed_batch_size=256,
    ))
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"unknown retriever config field {key!r}; known: {sorted(config.keys())}")
        config[key] = value
    return config


def _as_retriever_config(config) -> ml_collections.ConfigDict:
    """Accepts the retriever config itself or a parent config with a `retriever` field."""
    try:
        nested = "retriever" in config
    except TypeError:
        nested = False
    if nested:
        config = config["retriever"]
    base = retriever_config()
    values = dict(config)
    unknown = set(values) - set(base.keys())
    if unknown:
        raise ValueError(f"unknown retriever config fields {sorted(unknown)}")
    base.update(values)
    base.image_grid = tuple(int(v) for v in base.image_grid)
    return base


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The hashable slice of the config the modules need."""
    text_vocab_size: int
    num_image_codes: int
    image_grid: tuple[int, int]
    max_text_len: int
    width: int
    num_heads: int
    mlp_ratio: int
    text_layers: int
    image_layers: int
    image_downsample: int
    embed_dim: int
    init_temperature: float

    @classmethod
    def from_config(cls, config) -> "EncoderConfig":
        config = _as_retriever_config(config)
        names = [f.name for f in dataclasses.fields(cls)]
        values = {n: config[n] for n in names}
        values["image_grid"] = tuple(int(v) for v in values["image_grid"])
        out = cls(**values)
        if out.width % out.num_heads:
            raise ValueError(f"width={out.width} is not divisible by num_heads={out.num_heads}")
        return out

    @property
    def image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def dropped_image_code(self) -> int:
        """Extra embedding row standing for an image token removed by query dropout."""
        return self.num_image_codes


# --------------------------------------------------------------------------- pure math

def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / |x|; a zero vector stays zero (no NaN). Works on numpy and jax arrays."""
    xp = jnp if isinstance(x, jax.Array) else np
    norm = xp.sqrt(xp.sum(xp.square(x), axis=axis, keepdims=True))
    return x / xp.maximum(norm, eps)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over axis 1 of [B, L, D] counting only mask=True positions; all-masked rows -> 0."""
    m = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def combine_document_embeddings(text_emb, image_emb, has_text, has_image):
    """The paper's document embedding: normalise each modality, average the present ones,
    normalise again. text_emb/image_emb [N, D] (rows of absent modalities are ignored),
    has_text/has_image [N] bool. Documents with neither modality get a zero row. numpy float32."""
    t = l2_normalize(np.asarray(text_emb, np.float32))
    i = l2_normalize(np.asarray(image_emb, np.float32))
    ht = np.asarray(has_text, bool)[:, None]
    hi = np.asarray(has_image, bool)[:, None]
    count = ht.astype(np.float32) + hi.astype(np.float32)
    summed = np.where(ht, t, 0.0) + np.where(hi, i, 0.0)
    mean = summed / np.maximum(count, 1.0)
    return l2_normalize(mean).astype(np.float32)


def info_nce_loss(text_emb: jax.Array, image_emb: jax.Array, logit_scale: jax.Array,
                  max_logit_scale: float = 100.0, row_ids: jax.Array | None = None,
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE (CLIP): pair i's text must pick image i among the batch and vice versa.

    text_emb, image_emb: [B, D] l2-normalised; logit_scale: log of the inverse temperature
    (learned), capped at log(max_logit_scale) (the trainer also clamps the parameter itself after
    each step, as CLIP does, so it never sits in the cap's zero gradient). row_ids [B]: which
    document each row is; a batch larger than the corpus repeats documents, and a copy is neither
    a negative of its original nor counted twice. Returns (loss, metrics) where metrics hold the
    in-batch retrieval accuracy in both directions."""
    scale = jnp.exp(jnp.minimum(logit_scale, math.log(max_logit_scale)))
    logits = scale * jnp.einsum("id,jd->ij", text_emb.astype(jnp.float32), image_emb.astype(jnp.float32))
    b = logits.shape[0]
    labels = jnp.arange(b)
    weight = jnp.ones((b,), jnp.float32)
    if row_ids is not None:   # each row sees every document once: its own column and the others' first copies
        other = ~jnp.eye(b, dtype=bool)
        same = (row_ids[:, None] == row_ids[None, :]) & other
        first = ~jnp.any(same & (labels[None, :] < labels[:, None]), axis=1)
        logits = jnp.where((same | ~first[None, :] | ~first[:, None]) & other, -jnp.inf, logits)
        weight = first.astype(jnp.float32)

    def mean(x):
        return jnp.sum(x * weight) / jnp.sum(weight)

    loss_t2i = mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    loss_i2t = mean(optax.softmax_cross_entropy_with_integer_labels(logits.T, labels))
    acc_t2i = mean(jnp.argmax(logits, axis=1) == labels)
    acc_i2t = mean(jnp.argmax(logits, axis=0) == labels)
    loss = 0.5 * (loss_t2i + loss_i2t)
    metrics = {"loss": loss, "accuracy_t2i": acc_t2i, "accuracy_i2t": acc_i2t,
               "accuracy": 0.5 * (acc_t2i + acc_i2t), "temperature": 1.0 / scale}
    return loss, metrics


def query_token_dropout(tokens, rate: float, seed: int, doc_id: int = 0, *, fill: int | None = None) -> np.ndarray:
    """Drops round(rate * n) of a query's n tokens at positions drawn from (seed, doc_id).

    fill=None removes the dropped tokens (text: a shorter sequence, order kept); an int replaces
    them in place (images keep their grid; use the encoder's `dropped_image_code`). At least one
    token is always kept. Pure and deterministic: same (tokens, rate, seed, doc_id) -> same output."""
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"query dropout rate must be in [0, 1), got {rate}")
    num_drop = min(int(math.floor(rate * n + 0.5)), max(n - 1, 0))
    if num_drop == 0:
        return tokens.copy()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(doc_id) & 0xFFFFFFFF, 0x9E37])
    dropped = rng.choice(n, size=num_drop, replace=False)
    if fill is None:
        keep = np.ones(n, bool)
        keep[dropped] = False
        return tokens[keep]
    out = tokens.copy()
    out[dropped] = fill
    return out


# --------------------------------------------------------------------------- modules

class Block(nn.Module):
    """Pre-LN transformer block; attention math from `attention.dot_product_attention`."""
    width: int
    num_heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x, mask):
        head_dim = self.width // self.num_heads
        h = nn.LayerNorm(name="norm_attn")(x)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name="qkv")(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = attn_lib.dot_product_attention(q, k, v, mask)
        x = x + nn.DenseGeneral(self.width, axis=(-2, -1), name="attn_out")(att)
        h = nn.LayerNorm(name="norm_mlp")(x)
        h = nn.Dense(self.width * self.mlp_ratio, name="mlp_in")(h)
        return x + nn.Dense(self.width, name="mlp_out")(jax.nn.gelu(h))


class TextEncoder(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, ids, mask):
        """ids [B, L] int32, mask [B, L] bool -> [B, embed_dim] (not normalised)."""
        c = self.cfg
        x = nn.Embed(c.text_vocab_size, c.width, embedding_init=nn.initializers.normal(0.02), name="tokens")(ids)
        pos = self.param("positions", nn.initializers.normal(0.01), (c.max_text_len, c.width))
        x = x + pos[None, : ids.shape[1]]
        attn_mask = mask[:, None, None, :]
        for i in range(c.text_layers):
            x = Block(c.width, c.num_heads, c.mlp_ratio, name=f"block_{i}")(x, attn_mask)
        x = nn.LayerNorm(name="norm_out")(x)
        return nn.Dense(c.embed_dim, use_bias=False, name="proj")(masked_mean(x, mask))


class ImageEncoder(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, codes):
        """codes [B, h*w] int32 (dropped tokens = dropped_image_code) -> [B, embed_dim]."""
        c = self.cfg
        h, w = c.image_grid
        x = nn.Embed(c.num_image_codes + 1, c.width, embedding_init=nn.initializers.normal(0.02), name="codes")(codes)
        x = x.reshape(codes.shape[0], h, w, c.width)
        for i in range(c.image_downsample):
            x = jax.nn.gelu(nn.Conv(c.width, (3, 3), strides=(2, 2), padding="SAME", name=f"down_{i}")(x))
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        pos = self.param("positions", nn.initializers.normal(0.01), (gh * gw, d))
        x = x + pos[None]
        full = jnp.ones((b, 1, 1, gh * gw), bool)
        for i in range(c.image_layers):
            x = Block(c.width, c.num_heads, c.mlp_ratio, name=f"block_{i}")(x, full)
        x = nn.LayerNorm(name="norm_out")(x)
        return nn.Dense(c.embed_dim, use_bias=False, name="proj")(jnp.mean(x, axis=1))


class DualEncoder(nn.Module):
    cfg: EncoderConfig

    def setup(self):
        self.text_encoder = TextEncoder(self.cfg)
        self.image_encoder = ImageEncoder(self.cfg)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(1.0 / self.cfg.init_temperature)), ())

    def encode_text(self, ids, mask):
        return self.text_encoder(ids, mask)

    def encode_image(self, codes):
        return self.image_encoder(codes)

    def __call__(self, ids, mask, codes):
        return self.encode_text(ids, mask), self.encode_image(codes), self.logit_scale


def init_params(config, seed: int = 0):
    cfg = EncoderConfig.from_config(config)
    model = DualEncoder(cfg)
    ids = jnp.zeros((1, cfg.max_text_len), jnp.int32)
    mask = jnp.ones((1, cfg.max_text_len), bool)
    codes = jnp.zeros((1, cfg.image_tokens), jnp.int32)
    return jax.jit(lambda key: model.init(key, ids, mask, codes)["params"])(jax.random.key(seed))


# --------------------------------------------------------------------------- input arrays

def pad_text(text_ids_list: Sequence[Any], config) -> tuple[np.ndarray, np.ndarray]:
    """Pads/truncates texts to max_text_len -> (ids [N, L] int32, mask [N, L] bool). Validates ids."""
    config = _as_retriever_config(config)
    length, vocab = int(config.max_text_len), int(config.text_vocab_size)
    n = len(text_ids_list)
    ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), bool)
    for row, t in enumerate(text_ids_list):
        t = np.asarray(t if t is not None else (), dtype=np.int64).reshape(-1)[:length]
        if t.size and (t.min() < 0 or t.max() >= vocab):
            raise ValueError(f"document {row}: text ids must be in [0, {vocab}), got range [{t.min()}, {t.max()}]")
        ids[row, : t.size] = t
        mask[row, : t.size] = True
    return ids, mask


def stack_images(image_codes_list: Sequence[Any], config, *, allow_dropped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stacks image code grids -> (codes [N, h*w] int32, present [N] bool); empty -> zeros, absent.

    Codes are shifted by `image_code_offset` and must then lie in [0, num_image_codes)
    (or equal the dropped-token code when allow_dropped, for query dropout)."""
    config = _as_retriever_config(config)
    cfg = EncoderConfig.from_config(config)
    offset = int(config.image_code_offset)
    n = len(image_codes_list)
    codes = np.zeros((n, cfg.image_tokens), np.int32)
    present = np.zeros(n, bool)
    hi = cfg.num_image_codes + (1 if allow_dropped else 0)
    for row, c in enumerate(image_codes_list):
        c = np.asarray(c if c is not None else (), dtype=np.int64).reshape(-1)
        if c.size == 0:
            continue
        if c.size != cfg.image_tokens:
            raise ValueError(f"document {row}: image has {c.size} codes, the retriever expects "
                             f"{cfg.image_tokens} (grid {cfg.image_grid})")
        c = c - offset
        if c.min() < 0 or c.max() >= hi:
            raise ValueError(f"document {row}: image codes minus offset {offset} must be in "
                             f"[0, {cfg.num_image_codes}), got [{c.min()}, {c.max()}]")
        codes[row] = c
        present[row] = True
    return codes, present


def _present(arrays) -> np.ndarray:
    """[N] bool: which documents have a non-empty array (text ids or image codes)."""
    return np.array([a is not None and np.asarray(a).size > 0 for a in arrays], bool)


# --------------------------------------------------------------------------- embedding

def _local_data_sharding(batch_size: int):
    """Splits an embedding batch over this process's devices when it divides evenly."""
    devices = jax.local_devices()
    if len(devices) > 1 and batch_size % len(devices) == 0:
        mesh = Mesh(np.asarray(devices), ("data",))
        return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    return None, None


@functools.lru_cache(maxsize=16)
def _embed_fns(cfg: EncoderConfig):
    model = DualEncoder(cfg)

    @jax.jit
    def text_fn(params, ids, mask):
        return l2_normalize(model.apply({"params": params}, ids, mask, method=DualEncoder.encode_text))

    @jax.jit
    def image_fn(params, codes):
        return l2_normalize(model.apply({"params": params}, codes, method=DualEncoder.encode_image))

    return text_fn, image_fn


def _run_batched(fn, params, arrays: Sequence[np.ndarray], batch_size: int, embed_dim: int) -> np.ndarray:
    """Runs fn on fixed-size batches (the last one padded) so it compiles once."""
    n = arrays[0].shape[0]
    out = np.zeros((n, embed_dim), np.float32)
    if n == 0:
        return out
    data_sharding, repl = _local_data_sharding(batch_size)
    if data_sharding is not None:
        params = jax.device_put(params, repl)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = []
        for a in arrays:
            chunk = a[start:stop]
            if stop - start < batch_size:
                pad = np.zeros((batch_size - (stop - start),) + a.shape[1:], a.dtype)
                chunk = np.concatenate([chunk, pad])
            batch.append(jax.device_put(chunk, data_sharding) if data_sharding is not None else chunk)
        out[start:stop] = np.asarray(fn(params, *batch))[: stop - start]
    return out


def embed_text(params, config, text_ids_list: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
    """l2-normalised text embeddings float32 [N, D]; empty texts get zero rows."""
    config = _as_retriever_config(config)
    cfg = EncoderConfig.from_config(config)
    batch_size = int(batch_size or config.embed_batch_size)
    ids, mask = pad_text(text_ids_list, config)
    present = mask.any(axis=1)
    text_fn, _ = _embed_fns(cfg)
    out = _run_batched(text_fn, params, [ids, mask], batch_size, cfg.embed_dim)
    out[~present] = 0.0
    return out


def embed_images(params, config, image_codes_list: Sequence[Any], batch_size: int | None = None,
                 *, allow_dropped: bool = False) -> np.ndarray:
    """l2-normalised image embeddings float32 [N, D]; documents without an image get zero rows."""
    config = _as_retriever_config(config)
    cfg = EncoderConfig.from_config(config)
    batch_size = int(batch_size or config.embed_batch_size)
    codes, present = stack_images(image_codes_list, config, allow_dropped=allow_dropped)
    _, image_fn = _embed_fns(cfg)
    out = _run_batched(image_fn, params, [codes], batch_size, cfg.embed_dim)
    out[~present] = 0.0
    return out


def embed_documents(params, config, text_ids_list: Sequence[Any], image_codes_list: Sequence[Any],
                    batch_size: int | None = None, *, return_parts: bool = False):
    """Document embeddings float32 [N, D] by the paper's rule (see combine_document_embeddings).

    Batched with fixed shapes (one compilation per batch size), deterministic. Documents with
    neither text nor image get zero rows (they are never anyone's neighbour). With return_parts,
    returns (doc_emb, text_emb, image_emb, has_text, has_image)."""
    if len(text_ids_list) != len(image_codes_list):
        raise ValueError(f"{len(text_ids_list)} texts but {len(image_codes_list)} images: the lists must "
                         "be aligned by document id")
    text_emb = embed_text(params, config, text_ids_list, batch_size)
    image_emb = embed_images(params, config, image_codes_list, batch_size)
    has_text = _present(text_ids_list)
    has_image = _present(image_codes_list)
    doc = combine_document_embeddings(text_emb, image_emb, has_text, has_image)
    if return_parts:
        return doc, text_emb, image_emb, has_text, has_image
    return doc


def embed_queries(params, config, text_ids_list: Sequence[Any], image_codes_list: Sequence[Any],
                  batch_size: int | None = None, *, dropout: float | None = None, seed: int = 0,
                  first_id: int = 0):
    """Retrieval queries per document, after query-token dropout (config.query_dropout, 20%).

    Returns (text_queries [N, D], image_queries [N, D], has_text [N], has_image [N]); the text of
    document i (id first_id + i: a host embedding a range of the bank passes its start) loses
    tokens drawn from (seed, id), its image has the same fraction of grid cells replaced by the
    dropped-token code. Rows of absent modalities are zero."""
    config = _as_retriever_config(config)
    cfg = EncoderConfig.from_config(config)
    rate = float(config.query_dropout if dropout is None else dropout)
    offset = int(config.image_code_offset)
    texts = [query_token_dropout(np.asarray(t if t is not None else (), np.int64).reshape(-1)[: cfg.max_text_len],
                                 rate, seed, first_id + i) for i, t in enumerate(text_ids_list)]
    images = []
    for i, c in enumerate(image_codes_list):
        c = np.asarray(c if c is not None else (), np.int64).reshape(-1)
        images.append(query_token_dropout(c, rate, seed + 1, first_id + i, fill=cfg.dropped_image_code + offset) if c.size else c)
    text_q = embed_text(params, config, texts, batch_size)
    image_q = embed_images(params, config, images, batch_size, allow_dropped=True)
    return text_q, image_q, _present(text_ids_list), _present(image_codes_list)


# --------------------------------------------------------------------------- user embeddings

def load_embeddings(npy_path: str, num_documents: int | None, *, allow_zero_rows: bool = False,
                    start: int = 0, stop: int | None = None, chunk: int = 65_536) -> np.ndarray:
    """Embeddings computed elsewhere: a [N, D] float .npy aligned with document ids.

    Checks the shape (N must equal num_documents), finiteness and non-zero rows (zero rows are
    accepted with allow_zero_rows: documents with nothing to embed), and l2-normalises each row
    in float32 after dividing it by its largest magnitude, so rows far outside float32's range
    (1e20, 1e-25, float64 beyond 3e38) keep their direction instead of overflowing to zero or inf.
    Returns rows [start, stop) (default all; the file is memory-mapped and read `chunk` rows at a
    time, so a host of a multi-host run reads only its own range)."""
    try:
        array = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read embeddings from {npy_path}: {e}") from e
    if not isinstance(array, np.ndarray):   # np.load opens an .npz archive as a mapping of arrays
        raise ValueError(f"{npy_path}: embeddings must be one [num_documents, dim] array saved with np.save "
                         f"(.npy), got {type(array).__name__}")
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{npy_path}: embeddings must be [num_documents, dim], got shape {array.shape}")
    if num_documents is not None and array.shape[0] != int(num_documents):
        raise ValueError(f"{npy_path}: {array.shape[0]} embeddings for {num_documents} documents "
                         "(rows must be aligned with document ids)")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{npy_path}: embeddings must be floating point, got {array.dtype}")
    stop = array.shape[0] if stop is None else int(stop)
    if not 0 <= start <= stop <= array.shape[0]:
        raise ValueError(f"{npy_path}: rows [{start}, {stop}) are not within its {array.shape[0]} rows")
    out = np.empty((stop - start, array.shape[1]), np.float32)
    for lo in range(start, stop, chunk):
        rows = np.asarray(array[lo:min(lo + chunk, stop)])
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise ValueError(f"{npy_path}: rows hold NaN or inf (first: row {lo + int(np.flatnonzero(bad)[0])})")
        scale = np.abs(rows).max(axis=1, keepdims=True)
        zero = scale[:, 0] == 0
        if zero.any() and not allow_zero_rows:
            raise ValueError(f"{npy_path}: all-zero rows (first: row {lo + int(np.flatnonzero(zero)[0])}): a zero "
                             "vector has no direction to search by, so every document needs a non-zero embedding "
                             "(the Python API's allow_zero_rows=True marks documents with nothing to embed)")
        out[lo - start:lo - start + len(rows)] = l2_normalize((rows / np.where(zero[:, None], 1, scale)).astype(np.float32))
    return out


# --------------------------------------------------------------------------- training

def _collect_paired(documents, config) -> tuple[list, list, dict[str, int]]:
    """Texts and images of the documents that have both (the contrastive pairs)."""
    if isinstance(documents, Mapping):
        texts, images = documents["text_ids"], documents["image_codes"]
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        items: Iterable = zip(texts, images)
    else:
        items = ((d["text_ids"], d["image_codes"]) if isinstance(d, Mapping) else tuple(d) for d in documents)
    limit = int(config.max_train_documents)
    paired_t, paired_i = [], []
    counts = {"documents": 0, "paired": 0, "text_only": 0, "image_only": 0, "empty": 0, "beyond_limit": 0}
    for t, i in items:
        counts["documents"] += 1
        ht = t is not None and np.asarray(t).size > 0
        hi = i is not None and np.asarray(i).size > 0
        if ht and hi:
            if limit >= 0 and counts["paired"] >= limit:
                counts["beyond_limit"] += 1
                continue
            counts["paired"] += 1
            paired_t.append(np.asarray(t))
            paired_i.append(np.asarray(i))
        else:
            counts["text_only" if ht else "image_only" if hi else "empty"] += 1
    return paired_t, paired_i, counts


def _decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
    config = _as_retriever_config(config)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, float(config.learning_rate), max(int(config.warmup_steps), 1),
        max(int(config.steps), int(config.warmup_steps) + 1), end_value=0.1 * float(config.learning_rate))
    # grad_clip <= 0: no clipping, as in the LM and VQ trainers (clip_by_global_norm(0) zeroes every gradient)
    clip = [optax.clip_by_global_norm(float(config.grad_clip))] if float(config.grad_clip) > 0 else []
    return optax.chain(*clip, optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6,
                                          weight_decay=float(config.weight_decay), mask=_decay_mask))


def make_train_step(config):
    config = _as_retriever_config(config)
    cfg = EncoderConfig.from_config(config)
    model = DualEncoder(cfg)
    tx = make_optimizer(config)
    max_scale = float(config.max_logit_scale)

    def loss_fn(params, batch):
        t, i, scale = model.apply({"params": params}, batch["text_ids"], batch["text_mask"], batch["image_codes"])
        return info_nce_loss(l2_normalize(t), l2_normalize(i), scale, max_scale, batch["row_ids"][:, 0])

    def train_step(state, batch):
        params, opt_state = state
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = {**params, "logit_scale": jnp.minimum(params["logit_scale"], math.log(max_scale))}   # CLIP's clamp
        metrics["grad_norm"] = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        return (params, opt_state), metrics

    def eval_step(params, batch):
        return loss_fn(params, batch)[1]

    return tx, jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def _batch_from_rows(text_ids, text_mask, codes, rows) -> dict[str, np.ndarray]:
    return {"text_ids": text_ids[rows], "text_mask": text_mask[rows], "image_codes": codes[rows],
            "row_ids": np.asarray(rows, np.int32)[:, None]}   # [B, 1]: batches are placed as rank >= 2


def train_retriever(config, documents, workdir: str, *, mesh: Mesh | None = None,
                    trained_on: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains the dual encoder contrastively on the corpus's paired (text and image) documents.

    documents: a mapping {"text_ids": [...], "image_codes": [...]} of aligned lists, or an
    iterable of documents, each a mapping with those keys or a (text_ids, image_codes) pair.
    Data parallel over all devices (the global batch split over data x fsdp of a (-1, 1, 1) mesh;
    each process feeds its rows of the same seeded global batch). Logs loss, in-batch retrieval
    accuracy and temperature to workdir/retriever/metrics.jsonl (+ TensorBoard), saves the
    parameters with orbax under workdir/retriever/params and the config beside them (with
    `trained_on`, a record of the data, so a later run can tell whether it still fits).
    Returns {"params", "history", "final", "counts", "directory"}."""
    from cm3leon_jax.metrics import MetricsLogger

    config = _as_retriever_config(config)
    texts, images, counts = _collect_paired(documents, config)
    logging.info("retriever training documents: %s", counts)
    if counts["paired"] < 2:
        raise ValueError(f"contrastive training needs at least 2 documents with both text and image; got {counts}")
    text_ids, text_mask = pad_text(texts, config)
    codes, _ = stack_images(images, config)
    num = text_ids.shape[0]

    if mesh is None:
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    global_batch = int(config.batch_size)
    sharding.check_divisible("retriever batch_size", global_batch, mesh, sharding.BATCH_AXES)
    if global_batch % jax.process_count():
        raise ValueError(f"retriever batch_size={global_batch} is not divisible by {jax.process_count()} processes")
    per_process = global_batch // jax.process_count()
    first_row = jax.process_index() * per_process
    effective_batch = min(global_batch, num)
    if effective_batch < global_batch:
        logging.warning("retriever: %d paired documents < batch_size %d; batches repeat documents (a copy is no "
                        "negative and counts once)", num, global_batch)

    repl = sharding.replicated(mesh)
    tx, train_step, eval_step = make_train_step(config)
    params = jax.device_put(init_params(config, int(config.seed)), repl)
    opt_state = jax.jit(tx.init, out_shardings=repl)(params)
    state = (params, opt_state)

    out_dir = os.path.join(os.path.abspath(workdir), RETRIEVER_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    # training starts from scratch every time: the records of a run before it (killed, or one with
    # other settings being replaced) go, so metrics.jsonl reads as this one run (TensorBoard hides them)
    if jax.process_index() == 0 and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        os.remove(os.path.join(out_dir, "metrics.jsonl"))
    logger = MetricsLogger(out_dir)
    rng = np.random.default_rng(int(config.seed))

    def sample_rows():
        # Without replacement within a batch when possible (duplicates would be false negatives).
        if num >= global_batch:
            rows = rng.choice(num, size=global_batch, replace=False)
        else:
            rows = np.concatenate([rng.permutation(num) for _ in range(-(-global_batch // num))])[:global_batch]
        return rows

    def place(rows):
        local = _batch_from_rows(text_ids, text_mask, codes, rows[first_row:first_row + per_process])
        return sharding.global_batch_from_local(local, mesh)

    eval_rows = np.random.default_rng(int(config.seed) + 1).choice(num, size=min(global_batch, num), replace=False)
    if eval_rows.size < global_batch:
        eval_rows = np.resize(eval_rows, global_batch)

    history: list[dict[str, float]] = []
    steps = int(config.steps)
    start = time.time()
    with sharding.activate(mesh):
        initial = {k: float(v) for k, v in eval_step(state[0], place(eval_rows)).items()}
        history.append({"step": 0, **{f"eval_{k}": v for k, v in initial.items()}})
        for step in range(1, steps + 1):
            state, metrics = train_step(state, place(sample_rows()))
            if step % max(int(config.log_every), 1) == 0 or step == steps:
                m = {k: float(v) for k, v in metrics.items()}
                m["steps_per_second"] = step / max(time.time() - start, 1e-9)
                history.append({"step": step, **m})
                logger.write(step, m, steps)
        final = {k: float(v) for k, v in eval_step(state[0], place(eval_rows)).items()}
    final_record = {f"eval_{k}": v for k, v in final.items()}
    final_record["eval_chance_accuracy"] = 1.0 / effective_batch
    logger.write(steps, final_record, steps)
    logger.close()
    history.append({"step": steps, **final_record})

    params = state[0]
    save_retriever(out_dir, params, config, trained_on=trained_on)
    return {"params": params, "history": history, "final": final, "initial": initial, "counts": counts,
            "directory": out_dir}


def save_retriever(directory: str, params, config, *, trained_on: dict[str, Any] | None = None) -> None:
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, PARAMS_SUBDIR), params, force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    if jax.process_index() == 0:
        config = _as_retriever_config(config)
        tmp = os.path.join(directory, CONFIG_JSON + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "config": json.loads(config.to_json()),
                       **({"trained_on": trained_on} if trained_on else {})}, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(directory, CONFIG_JSON))


# --------------------------------------------------------------------------- a user's CLIP as the retriever

CLIP_JSON = "clip.json"
CLIP_EMBEDDINGS = "document_embeddings.npy"


def save_clip_reference(data_dir: str, clip_model: str, document_embeddings: np.ndarray) -> None:
    """Records that DATA_DIR's bank was embedded by the CLIP checkpoint `clip_model` (the paper's
    frozen bi-encoder), with the embeddings beside it: queries must go through the same model.
    The embeddings are written in chunks: a multi-host run passes its parts read as one."""
    out = os.path.join(os.path.abspath(data_dir), RETRIEVER_SUBDIR)
    workdir_io.write_npy_rows(os.path.join(out, CLIP_EMBEDDINGS), document_embeddings, np.float32)
    with open(os.path.join(out, CLIP_JSON), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT + "+clip", "clip_model": os.path.abspath(clip_model),
                   "embeddings": CLIP_EMBEDDINGS, "shape": list(np.shape(document_embeddings))}, f, indent=1)


def load_clip_reference(data_dir: str) -> dict | None:
    """{"clip_model", "embeddings" (path)} when DATA_DIR's bank was embedded by a user's CLIP, else None."""
    path = os.path.join(os.path.abspath(data_dir or ""), RETRIEVER_SUBDIR, CLIP_JSON)
    if not data_dir or not os.path.exists(path):
        return None
    saved = workdir_io.read_format_json(path, FORMAT + "+clip", what="CLIP embedding reference")
    return {"clip_model": saved["clip_model"], "embeddings": os.path.join(os.path.dirname(path), saved["embeddings"])}


def saved_retriever_record(directory: str) -> tuple[str, dict[str, Any]]:
    """(the retriever's directory, its config.json: {"config", "trained_on"?}); `directory` is the
    workdir or workdir/retriever."""
    directory = os.path.abspath(directory)
    if not os.path.exists(os.path.join(directory, CONFIG_JSON)) and os.path.isdir(os.path.join(directory, RETRIEVER_SUBDIR)):
        directory = os.path.join(directory, RETRIEVER_SUBDIR)
    return directory, workdir_io.read_format_json(os.path.join(directory, CONFIG_JSON), FORMAT, what="trained retriever",
                                                  hint="python -m data_pipeline.index trains one")


def load_retriever(directory: str):
    """Loads (params, config) saved by train_retriever; `directory` is the workdir or workdir/retriever."""
    import orbax.checkpoint as ocp
    directory, saved = saved_retriever_record(directory)
    config = _as_retriever_config(saved["config"])
    abstract = jax.eval_shape(lambda: init_params(config, 0))
    device = jax.local_devices()[0]
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), abstract)
    ckpt = ocp.StandardCheckpointer()
    params = ckpt.restore(os.path.join(directory, PARAMS_SUBDIR), abstract)
    ckpt.close()
    return params, config
