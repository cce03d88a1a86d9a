"""Attention math as pure functions: masks for packed sequences, rotary positions, normalisation.

Kept apart from the Flax modules so each piece is testable alone and shared by training and the
cached decoder.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows (padding) give zeros instead of NaNs


def layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm without learnable scale or offset (CM3Leon), computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """RMSNorm without scale; the optional learned scale lives in the module."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    """[batch, 1, q, kv] boolean: causal within a document, never across documents or into padding.

    Causality is decided by positions, not by array index, so the same mask serves packed
    training rows (positions restart per document) and the decoder's cache (absolute slots).
    """
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    not_pad = (kv_segment_ids != 0)[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return (same_doc & not_pad & causal)[:, None, :, :]


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary positions on [batch, length, heads, head_dim] (half-split convention, as Llama)."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention. q: [b, q, h, d]; k, v: [b, kv, h, d]; mask: [b, 1, q, kv] -> [b, q, h, d].

    Scores and softmax in float32 whatever the compute dtype, for stability in bf16.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # rows with nothing visible (padding) -> zeros
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def blockwise_causal_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                               block_size: int) -> jax.Array:
    """Causal attention over query blocks that only read the keys up to their own block.

    For training rows (query i and key i are the same token) the upper triangle of blocks is never
    computed: about half of the score FLOPs and memory of the dense version at long lengths. A length
    the block size does not divide ends in a shorter block (it fell back to the dense [l, l] scores).
    """
    length = q.shape[1]
    if length <= block_size:
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
        return dot_product_attention(q, k, v, mask)
    outputs = []
    for start in range(0, length, block_size):
        stop = min(start + block_size, length)
        mask = attention_mask(q_segment_ids[:, start:stop], kv_segment_ids[:, :stop],
                              q_positions[:, start:stop], kv_positions[:, :stop])
        outputs.append(dot_product_attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask))
    return jnp.concatenate(outputs, axis=1)


# --- Flash kernels (Pallas): causal attention within packed documents without a [q, kv] matrix ---

FLASH_KERNELS = ("splash", "triton")        # TPU (Mosaic) and GPU (Triton) Pallas kernels
FLASH_BACKENDS = {"tpu": "splash", "gpu": "triton"}
FLASH_SEQ_MULTIPLE = 128                     # both kernels tile the sequence in blocks of 128


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, kernel: str,
                    interpret: bool = False) -> jax.Array:
    """Causal attention within packed documents by a Pallas flash kernel. q, k, v: [b, l, h, d].

    Memory is linear in the length: the scores never exist as a whole, so 4k-token Chameleon rows fit
    where the XLA path's [b, h, l, l] float32 scores would not. Same result as `dot_product_attention`
    with `attention_mask` on training rows (queries and keys are the same tokens and positions grow
    along each document), except at padding (segment 0), which the kernels let attend to itself and
    which no real token and no loss reads. `interpret` runs the kernel in Pallas's interpreter on any
    backend: the numerics without the speed (tests on a CPU).
    """
    length, head_dim = q.shape[1], q.shape[-1]
    if length % FLASH_SEQ_MULTIPLE:
        raise ValueError(f"flash attention needs a length divisible by {FLASH_SEQ_MULTIPLE}, got {length}")
    scale = head_dim ** -0.5
    segment_ids = segment_ids.astype(jnp.int32)
    if kernel == "triton":
        from jax.experimental.pallas.ops.gpu import attention as triton_attention
        return triton_attention.mha(q, k, v, segment_ids, sm_scale=scale, causal=True, interpret=interpret)
    if kernel != "splash":
        raise ValueError(f"unknown flash kernel {kernel!r}; known: {FLASH_KERNELS}")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    splash_kernel = _splash_kernel(q.shape[2], length, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's layout: [h, l, d] per row
    out = jax.vmap(splash_kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v),
                                  segment_ids=splash.SegmentIds(q=segment_ids, kv=segment_ids))
    return heads_first(out)


def _splash_kernel(num_heads: int, length: int, interpret: bool):
    """The splash kernel for (heads, length). Built per trace (a layer scan traces once): a kernel
    cached across traces carries its block tables in as tracers of the first one."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    block = next(b for b in (512, 256, 128) if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    causal = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(num_heads)])
    return splash.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
