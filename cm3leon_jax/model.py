"""The CM3Leon decoder-only transformer (Flax Linen), with the options used at scale.

Defaults follow the paper: no biases, no dropout, LayerNorm without parameters, learned absolute
positions (std 0.0002), truncated-normal init (std 0.006, cut at 3 std), output projections
initialised at zero. Options: rotary positions, QK-norm (optionally with Chameleon's learned
per-head scale and bias), Swin-style norm placement, RMSNorm,
SwiGLU, bf16 compute over fp32 parameters. Layers are scanned (one compiled layer, parameters
stacked on a leading `layers` axis) and rematerialised by a named policy.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from cm3leon_jax import attention as attn_lib
from cm3leon_jax import lora, sharding

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    max_length: int
    head_dim: int = 0                  # 0: d_model // num_heads
    positions: str = "learned"         # learned | rotary
    rotary_base: float = 10000.0
    norm: str = "layernorm"            # layernorm (no params) | rmsnorm (learned scale, Chameleon)
    norm_placement: str = "pre"        # pre: x + f(norm(x)) | swin: x + norm(f(x)) (Chameleon)
    qk_norm: bool = False
    qk_norm_params: bool = False       # qk_norm with a learned per-head scale and bias [heads, head_dim] (Chameleon)
    mlp: str = "relu"                  # relu (OPT) | gelu | swiglu (Chameleon)
    tie_embeddings: bool = False
    init_std: float = 0.006
    position_init_std: float = 0.0002
    dtype: str = "float32"             # compute dtype; params are always param_dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"         # see REMAT_POLICIES
    scan_layers: bool = True
    attention_block_size: int = 0      # >0: the XLA path's blockwise causal attention (skips the upper triangle)
    attention_impl: str = "xla"        # see ATTENTION_IMPLS: xla, or a Pallas flash kernel for training rows
    lora_rank: int = 0                 # >0: low-rank adapters on lora_targets, the only trained parameters (lora.py)
    lora_alpha: float = 16.0           # the adapter's output is scaled by lora_alpha / lora_rank
    lora_targets: str = "query,key,value,out,up,gate,down"   # comma-separated projection names (lora.TARGETS)
    lora_base_int8: bool = False       # QLoRA-style: the frozen projection kernels held in int8 (quantization.py)

    @classmethod
    def from_config(cls, model_config) -> "TransformerConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(model_config)
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**values)

    def __post_init__(self):
        choices = {"positions": ("learned", "rotary"), "norm": ("layernorm", "rmsnorm"),
                   "norm_placement": ("pre", "swin"), "mlp": ("relu", "gelu", "swiglu"),
                   "remat_policy": tuple(REMAT_POLICIES), "attention_impl": ATTENTION_IMPLS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
        sizes = {name: getattr(self, name) for name in ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff",
                                                         "max_length")}
        for name, value in sizes.items():   # 0 or negative failed deep inside JAX (a modulo by zero, a negative shape)
            if value < 1:
                raise ValueError(f"model.{name}={value} must be >= 1")
        for name in ("dtype", "param_dtype"):   # "int8" ran the model in integers (zero logits); "bf16" was a bare TypeError
            try:
                floating = jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not a floating dtype "
                                 "(float32, bfloat16, float16); int8 weights: quantization.py (--int8)")
        if not 1 < self.rotary_base < math.inf:   # 1 makes every rotation angle 0, below it NaN positions; inf all but the first pair's
            raise ValueError(f"model.rotary_base={self.rotary_base} must be > 1 and finite")
        for name in ("init_std", "position_init_std"):   # NaN/inf initialised every weight NaN/inf, silently
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 and finite")
        for name in ("head_dim", "attention_block_size"):   # 0 has a meaning: d_model // num_heads; no blocks
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0")
        if not self.head_dim and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.qk_norm_params and not self.qk_norm:
            raise ValueError("model.qk_norm_params=True needs model.qk_norm=True")
        if self.positions == "rotary" and self.resolved_head_dim % 2:
            raise ValueError("rotary positions need an even head_dim")
        lora.validate(self.lora_rank, self.lora_alpha, self.lora_targets)
        if self.lora_base_int8 and not self.lora_rank:
            raise ValueError("model.lora_base_int8=True quantizes the frozen weights of a LoRA run: it needs model.lora_rank > 0")
        if self.lora_rank and self.mlp != "swiglu" and set(lora.parse_targets(self.lora_targets)) == {"gate"}:
            raise ValueError(f"model.lora_targets={self.lora_targets!r}: only 'gate', which model.mlp={self.mlp!r} has not "
                             "(SwiGLU's): no adapter would be trained")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def projection_kwargs(self, name: str) -> dict:
        """Projection's dtype, init and adapter arguments for the projection called `name`."""
        kw = dict(init_std=self.init_std, dtype=self.compute_dtype, param_dtype=jnp.dtype(self.param_dtype))
        if self.lora_rank and name in lora.parse_targets(self.lora_targets):
            kw.update(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
        return kw


# How training rows (no KV cache) compute attention. The decoder's cached steps always use XLA.
ATTENTION_IMPLS = (
    "xla",               # dot_product_attention over attention_mask: any backend, [b, h, l, l] scores in memory
    "flash",             # the backend's Pallas flash kernel: splash on TPU, Triton on NVIDIA GPUs
    "splash_interpret",  # the TPU kernel run by Pallas's interpreter on any backend (numerics tests, slow)
    "triton_interpret",  # the GPU kernel, likewise
)


def flash_kernel_for(attention_impl: str, backend: str | None = None,
                     length: int | None = None) -> tuple[str, bool] | None:
    """(kernel, interpret) for an attention_impl on a backend and row length; None: the XLA path.

    "flash" on a backend without a kernel (a CPU), or on rows the kernels cannot tile (an
    evaluation batch of 100 tokens), takes the XLA path, which computes the same thing: a model
    trained with flash evaluates and generates anywhere. Training refuses both up front
    (trainer.validate_config), where a silent fallback would hide the memory the user asked for.
    """
    if attention_impl == "xla":
        return None
    if length is not None and length % attn_lib.FLASH_SEQ_MULTIPLE:
        _warn_once(f"model.attention_impl={attention_impl!r}: rows of {length} tokens are not a multiple of "
                   f"{attn_lib.FLASH_SEQ_MULTIPLE}; using the XLA attention for them")
        return None
    if attention_impl == "flash":
        backend = backend or jax.default_backend()
        kernel = attn_lib.FLASH_BACKENDS.get(backend)
        if kernel is None:
            _warn_once(f"model.attention_impl='flash' has no kernel on {backend}; using the XLA attention")
            return None
        return kernel, False
    return attention_impl.removesuffix("_interpret"), True


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logging.warning(message)


def sharded_flash_attention(q, k, v, segment_ids, kernel: str, interpret: bool) -> jax.Array:
    """The flash kernel on each device's block of rows and heads (a Pallas call cannot be split by
    the compiler): shard_map over the mesh set by `sharding.activate`, specs from the rules table."""
    attend = functools.partial(attn_lib.flash_attention, kernel=kernel, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return attend(q, k, v, segment_ids)

    def spec(x, logical_axes):  # a dimension the mesh does not divide (init's one row) stays whole
        axes = sharding.logical_to_spec(logical_axes)
        return jax.sharding.PartitionSpec(*(
            a if a is None or size % math.prod(mesh.shape[n] for n in ((a,) if isinstance(a, str) else a)) == 0
            else None for a, size in zip(axes, x.shape)))

    heads = spec(q, ("batch", "activation_length", "activation_heads", "activation_kv"))
    rows = spec(segment_ids, ("batch", "activation_length"))
    return jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, rows), out_specs=heads,
                         check_vma=False)(q, k, v, segment_ids)


# Named rematerialisation policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no remat: keep everything (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query", "key", "value"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("attention_out", "mlp_out"),
}

# Every projection's output, by its checkpoint name.
PROJECTION_OUTPUTS = ("query", "key", "value", "attention_out", "mlp_up", "mlp_gate", "mlp_out")


def _batched_dots_saveable(prim, *_, **params) -> bool:
    return prim is jax.lax.dot_general_p and any(params["dimension_numbers"][1])


def remat_policy(cfg: TransformerConfig) -> Callable | None:
    """REMAT_POLICIES[cfg.remat_policy]. With LoRA adapters a projection is two dots summed (base and
    adapter), so a dot policy would keep both and recompute the sum: twice the projections'
    memory. There the dot policies keep each projection's summed output by name instead, which is
    what they keep of the plain model (its projections are its dots without batch dims)."""
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.lora_rank and cfg.remat_policy in ("dots", "dots_no_batch"):
        policy = jax.checkpoint_policies.save_only_these_names(*PROJECTION_OUTPUTS)
        if cfg.remat_policy == "dots":   # and attention's dots, which have batch dims
            policy = jax.checkpoint_policies.save_from_both_policies(policy, _batched_dots_saveable)
    return policy


def _init(std: float):
    return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def _constrain(x, logical_axes):
    return nn.with_logical_constraint(x, logical_axes)


class Projection(nn.Module):
    """A bias-free einsum projection whose kernel carries logical axis names for sharding, with an
    optional low-rank adapter (lora.py): A [inputs, rank] ~ N(0, 1/fan_in), B [rank, outputs] = 0."""
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    equation: str
    init_std: float
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.zero_init else _init(self.init_std)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.logical_axes),
                            self.shape, self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.einsum(self.equation, x, kernel.astype(self.dtype))
        if not self.lora_rank:
            return y
        down, up, n_in = lora.adapter_equations(self.equation)
        a_init = _init(1.0 / math.sqrt(math.prod(self.shape[:n_in])))
        a = self.param("lora_a", nn.with_logical_partitioning(a_init, self.logical_axes[:n_in] + ("lora_rank",)),
                       self.shape[:n_in] + (self.lora_rank,), self.param_dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + self.logical_axes[n_in:]),
                       (self.lora_rank,) + self.shape[n_in:], self.param_dtype)
        low = jnp.einsum(down, x, a.astype(self.dtype))
        return y + jnp.einsum(up, low, (b * lora.scale(self.lora_rank, self.lora_alpha)).astype(self.dtype))


class Norm(nn.Module):
    """LayerNorm without parameters (CM3Leon) or RMSNorm with a learned scale (Chameleon)."""
    kind: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.kind == "layernorm":
            return attn_lib.layer_norm(x).astype(self.dtype)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        return (attn_lib.rms_norm(x) * scale.astype(x.dtype)).astype(self.dtype)


class HeadNorm(nn.Module):
    """The learned part of Chameleon's QK-norm: a per-head scale (init 1) and bias (init 0) applied
    after the parameter-free LayerNorm over head_dim. x: [batch, length, heads, head_dim]."""
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = x.shape[-2:]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("heads", "kv")),
                           shape, self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")),
                          shape, self.param_dtype)
        return x * scale.astype(x.dtype) + bias.astype(x.dtype)


class Attention(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv_cache=None, cache_meta=None):
        cfg = self.config
        h, d = cfg.num_heads, cfg.resolved_head_dim

        def project(name):
            y = Projection((cfg.d_model, h, d), ("embed", "heads", "kv"), "bld,dhk->blhk", name=name,
                           **cfg.projection_kwargs(name))(x)
            return checkpoint_name(_constrain(y, ("batch", "activation_length", "activation_heads", "activation_kv")), name)

        q, k, v = project("query"), project("key"), project("value")
        if cfg.qk_norm:  # before rotary, as Chameleon
            q, k = attn_lib.layer_norm(q), attn_lib.layer_norm(k)
            if cfg.qk_norm_params:
                pdt = jnp.dtype(cfg.param_dtype)
                q = HeadNorm(pdt, name="query_norm")(q)
                k = HeadNorm(pdt, name="key_norm")(k)
        if cfg.positions == "rotary":
            q = attn_lib.rotary_embedding(q, positions, cfg.rotary_base)
            k = attn_lib.rotary_embedding(k, positions, cfg.rotary_base)
        new_cache = None
        if kv_cache is not None:
            # Decoding: write this call's keys/values at the cache index, attend over every slot.
            # Empty and padded slots have segment 0, so they are never attended.
            index, cache_positions, cache_segments = cache_meta
            k_cache = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), (0, index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), (0, index, 0, 0))
            new_cache = (k_cache, v_cache)
            mask = attn_lib.attention_mask(segment_ids, cache_segments, positions, cache_positions)
            out = attn_lib.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
        elif (flash := flash_kernel_for(cfg.attention_impl, length=x.shape[1])) is not None:
            out = sharded_flash_attention(q, k, v, segment_ids, *flash)
        elif cfg.attention_block_size:
            out = attn_lib.blockwise_causal_attention(q, k, v, segment_ids, segment_ids, positions, positions,
                                                      cfg.attention_block_size)
        else:
            mask = attn_lib.attention_mask(segment_ids, segment_ids, positions, positions)
            out = attn_lib.dot_product_attention(q, k, v, mask)
        out = Projection((h, d, cfg.d_model), ("heads", "kv", "embed"), "blhk,hkd->bld", zero_init=True,
                         name="out", **cfg.projection_kwargs("out"))(out)
        return checkpoint_name(out, "attention_out"), new_cache


class MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        up = checkpoint_name(Projection((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "bld,df->blf", name="up",
                                        **cfg.projection_kwargs("up"))(x), "mlp_up")
        if cfg.mlp == "swiglu":
            gate = checkpoint_name(Projection((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "bld,df->blf", name="gate",
                                              **cfg.projection_kwargs("gate"))(x), "mlp_gate")
            hidden = jax.nn.silu(gate) * up
        else:
            hidden = jax.nn.relu(up) if cfg.mlp == "relu" else jax.nn.gelu(up)
        hidden = _constrain(hidden, ("batch", "activation_length", "activation_mlp"))
        out = Projection((cfg.d_ff, cfg.d_model), ("mlp", "embed"), "blf,fd->bld", zero_init=True,
                         name="down", **cfg.projection_kwargs("down"))(hidden)
        return checkpoint_name(out, "mlp_out")


class DecoderLayer(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv_cache=None, cache_meta=None):
        cfg = self.config
        norm = lambda name: Norm(cfg.norm, cfg.compute_dtype, jnp.dtype(cfg.param_dtype), name=name)
        attention = Attention(cfg, name="attention")
        x = _constrain(x, ("batch", "activation_length", "activation_embed"))
        if cfg.norm_placement == "pre":
            attn_out, kv_cache = attention(norm("attention_norm")(x), positions, segment_ids, kv_cache, cache_meta)
            x = x + attn_out
            x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x))
        else:  # swin: normalise each sublayer's output before the residual add
            attn_out, kv_cache = attention(x, positions, segment_ids, kv_cache, cache_meta)
            x = x + norm("attention_norm")(attn_out)
            x = x + norm("mlp_norm")(MLP(cfg, name="mlp")(x))
        return x, kv_cache


class _ScannedLayer(nn.Module):
    """Adapts DecoderLayer to nn.scan: the residual stream is the carry, each layer's cache a slice."""
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv_cache, cache_meta):
        return DecoderLayer(self.config, name="layer")(x, positions, segment_ids, kv_cache, cache_meta)


class Transformer(nn.Module):
    """tokens [b, l] -> float32 logits [b, l, vocab]."""
    config: TransformerConfig

    def setup(self):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        self.token_embedding = self.param(
            "token_embedding", nn.with_logical_partitioning(_init(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), pdt)
        if cfg.positions == "learned":
            self.position_embedding = self.param(
                "position_embedding", nn.with_logical_partitioning(_init(cfg.position_init_std), ("position", "embed")),
                (cfg.max_length, cfg.d_model), pdt)
        if not cfg.tie_embeddings:
            self.output_head = Projection((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), "bld,dv->blv",
                                          init_std=cfg.init_std, dtype=cfg.compute_dtype, param_dtype=pdt)
        layer = _ScannedLayer
        policy = remat_policy(cfg)
        if cfg.remat_policy != "none":
            layer = nn.remat(layer, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        else:
            self.layer_list = [layer(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.final_norm = Norm(cfg.norm, cfg.compute_dtype, pdt)

    def embed(self, tokens, positions):
        cfg = self.config
        # The tables are gathered whole over fsdp first (as every layer's weights are): a lookup in a
        # table split over d gives rows split over d, which XLA could only reach the batch sharding
        # from by replicating them ("involuntary full rematerialization").
        table = _constrain(self.token_embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)
        if cfg.positions == "learned":
            table = _constrain(self.position_embedding, ("position", None))
            x = x + jnp.take(table, positions, axis=0).astype(cfg.compute_dtype)
        return _constrain(x, ("batch", "activation_length", "activation_embed"))

    def logits(self, x):
        cfg = self.config
        x = self.final_norm(x)
        if cfg.tie_embeddings:
            logits = jnp.einsum("bld,vd->blv", x, self.token_embedding.astype(cfg.compute_dtype))
        else:
            logits = self.output_head(x)
        logits = _constrain(logits, ("batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
        """Training: `cache` None, returns logits. Decoding: `cache` is a `DecodeCache`; the
        tokens are written at `cache.index` and the call returns (logits, updated cache)."""
        cfg = self.config
        if positions is None:
            # the default positions run to the row's length: past the learned table, every logit was NaN
            if cfg.positions == "learned" and tokens.shape[1] > cfg.max_length:
                raise ValueError(f"rows of {tokens.shape[1]} tokens exceed model.max_length={cfg.max_length} "
                                 "(learned positions); pass positions that restart per document, or shorter rows")
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
        kv, meta = None, None
        if cache is not None:
            slots = cache.positions.shape[1]
            if tokens.shape[1] > slots:
                raise ValueError(f"{tokens.shape[1]} tokens written at once into a DecodeCache of {slots} slots")
            fits = cache.index + tokens.shape[1] <= slots
            cache = cache.write_meta(positions, segment_ids)
            kv, meta = (cache.keys, cache.values), (cache.index, cache.positions, cache.segment_ids)
        x = self.embed(tokens, positions)
        if cfg.scan_layers:
            x, kv = self.layers(x, positions, segment_ids, kv, meta)
        else:
            new_kv = []
            for i, layer in enumerate(self.layer_list):
                x, layer_kv = layer(x, positions, segment_ids, None if kv is None else (kv[0][i], kv[1][i]), meta)
                new_kv.append(layer_kv)
            if kv is not None:
                kv = tuple(jnp.stack([c[j] for c in new_kv]) for j in range(2))
        logits = self.logits(x)
        if cache is None:
            return logits
        # A write past the last slot would land on the last slots (dynamic_update_slice clamps its
        # start): such logits are NaN, so the overflow shows instead of decoding from a corrupt cache.
        logits = jnp.where(fits, logits, jnp.nan)
        return logits, cache.replace(keys=kv[0], values=kv[1], index=cache.index + tokens.shape[1])


@flax.struct.dataclass
class DecodeCache:
    """Preallocated keys/values for every layer and slot, with each slot's position and segment.

    Slots are filled left to right at `index`; a slot with segment 0 (empty, or a prompt's left
    padding) is never attended, and positions are per row, so rows of different prompt lengths
    decode together without padding artefacts.
    """
    keys: jax.Array         # [layers, batch, slots, heads, head_dim]
    values: jax.Array
    positions: jax.Array    # [batch, slots] int32
    segment_ids: jax.Array  # [batch, slots] int32, 0 = never attend
    index: jax.Array        # int32 scalar: next slot to write

    @classmethod
    def allocate(cls, config: TransformerConfig, batch: int, slots: int, dtype=None) -> "DecodeCache":
        dtype = dtype or config.compute_dtype
        shape = (config.num_layers, batch, slots, config.num_heads, config.resolved_head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   positions=jnp.zeros((batch, slots), jnp.int32), segment_ids=jnp.zeros((batch, slots), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    def write_meta(self, positions, segment_ids) -> "DecodeCache":
        start = (0, self.index)
        return self.replace(
            positions=jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), start),
            segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, segment_ids.astype(jnp.int32), start))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
