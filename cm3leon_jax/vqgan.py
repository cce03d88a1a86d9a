"""VQ-GAN image tokenizer (taming-style conv autoencoder + LlamaGen-style quantizer).

CM3Leon feeds a decoder-only LM one token stream in which images are grids of discrete codes
(Make-A-Scene VQ: 256x256 -> 32x32 codes out of 8192).  This module is that tokenizer:

* ``VQGAN``: a Flax Linen model (encoder -> quantizer -> decoder) whose methods ``encode``,
  ``decode`` and ``__call__`` are meant to be used through ``model.apply(..., method=...)``.
* ``encode`` / ``decode``: jitted public functions that take a params tree and a config, so
  callers (the LM data pipeline, sampling code) never touch Flax.
* ``quantize``, ``reseed_dead_codes``, ``update_usage``: pure math, jittable, so the training step
  (owned elsewhere) can compose them inside its own sharded ``jit``.

Config is a frozen dataclass (hashable, so it can be a static jit argument); build it from an
``ml_collections.ConfigDict`` or plain dict with ``VQGANConfig.from_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Optional, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _config_to_dict(cfg: Any) -> dict:
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a mapping or ConfigDict, got {type(cfg).__name__}")
    return dict(cfg)


def _dataclass_from_config(cls, cfg: Any):
    """Rejects unknown keys: a typo in an experiment config must fail, not be silently ignored."""
    if isinstance(cfg, cls):
        return cfg
    d = _config_to_dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known: {sorted(names)}")
    # Lists (from ConfigDict / JSON) become tuples so the config stays hashable for jit.
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


PIXEL_SCALE = 1 / 127.5         # uint8 -> [-1, 1]
CHAMELEON_PIXEL_SCALE = 0.0078  # Chameleon's image processor: rescale_factor 0.0078, then minus 1 (mean 1, std 1)


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Hyper-parameters of the tokenizer.

    Frozen and made of scalars/tuples so that it is hashable: the jitted ``encode``/``decode``
    take it as a static argument, and one config object can never be mutated under a
    compiled function.  ``dtype`` is the compute dtype; parameters are always float32 so that
    optimizer updates and checkpoints do not depend on the compute precision.
    """

    image_size: int = 64
    in_channels: int = 3
    channels: int = 64  # base width; level i has channels * channel_multipliers[i]
    channel_multipliers: Tuple[int, ...] = (1, 2, 2, 4)  # downsampling = 2 ** (len - 1)
    num_res_blocks: int = 2
    attention_at_lowest: bool = True
    codebook_size: int = 8192
    code_dim: int = 8  # LlamaGen: low-dim lookup space gives far higher codebook usage
    embed_dim: int = 256  # encoder output / decoder input width around the quantizer
    commitment_beta: float = 0.25
    l2_normalize_codes: bool = True  # cosine-similarity lookup (LlamaGen)
    num_groups: int = 32  # GroupNorm groups (reduced automatically for narrow layers)
    dtype: str = "float32"
    # Attention placement for imported tokenizers (Chameleon's attn_resolutions / attn_type): None
    # keeps ours, attention after every ResBlock of the lowest level and in the middle iff
    # attention_at_lowest. `attention_levels` lists encoder levels (the decoder mirrors them).
    attention_levels: Optional[Tuple[int, ...]] = None
    mid_attention: Optional[bool] = None
    # False for an encoder-only import (transformers' ChameleonVQVAE has no decoder): the params
    # then hold no decoder and decoding raises.
    has_decoder: bool = True
    # Space-to-depth stem: the encoder starts by folding patch_size x patch_size pixel patches
    # into channels and the decoder ends by unfolding them (pixel shuffle). On a CPU, wide
    # convolutions at 1/patch_size resolution are several times faster per FLOP than 8-channel
    # ones at full resolution, and every layer keeps enough channels for GroupNorm not to wash
    # out colour; 1 is taming's full-resolution stem.
    patch_size: int = 1
    # uint8 pixels x enter the encoder as x * pixel_scale - 1 (`normalize_images`). Ours: 1/127.5
    # ([-1, 1]); Chameleon's image processor: 0.0078 (CHAMELEON_PIXEL_SCALE, set by its import).
    pixel_scale: float = PIXEL_SCALE
    # "group": taming's GroupNorm over space and channel groups. "layer": LayerNorm over the
    # channels of each position, which never mixes statistics across the image: GroupNorm's
    # per-image statistics are dominated by the background, and on the shapes world they
    # wash object colours out to grey for thousands of steps. "none": no normalisation.
    norm: str = "group"
    # True: the encoder sees only each token's own downsample_factor x downsample_factor patch
    # (patches are encoded as separate images), so identical patches always get the same code. A
    # global receptive field lets a code also carry its surroundings: on the shapes world identical
    # flat background patches had 4 nats of code entropy (noise per token for the LM to model).
    # The decoder keeps its full view and draws across patch borders.
    local_encoder: bool = False

    def __post_init__(self):
        sizes = {name: getattr(self, name) for name in ("image_size", "in_channels", "channels", "codebook_size",
                                                        "code_dim", "embed_dim", "num_groups")}
        sizes.update({f"channel_multipliers[{i}]": m for i, m in enumerate(self.channel_multipliers)})
        bad = [f"{name}={value}" for name, value in sizes.items() if not value >= 1]
        bad += [f"num_res_blocks={self.num_res_blocks}"] if self.num_res_blocks < 0 else []
        if bad:   # else an empty codebook or a 0-wide layer fails deep inside Flax
            raise ValueError(f"VQ sizes must be >= 1 (num_res_blocks >= 0), got {', '.join(bad)}")
        if self.norm not in ("group", "layer", "none"):
            raise ValueError(f"norm must be 'group', 'layer' or 'none', got {self.norm!r}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if not self.channel_multipliers:
            raise ValueError("channel_multipliers must not be empty")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor}"
            )
        bad = [lv for lv in self.attention_levels or () if not 0 <= lv < len(self.channel_multipliers)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside the {len(self.channel_multipliers)} levels")

    @classmethod
    def from_config(cls, cfg: Any) -> "VQGANConfig":
        return _dataclass_from_config(cls, cfg)

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_multipliers) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def has_level_attention(self, level: int) -> bool:
        if self.attention_levels is None:
            return self.attention_at_lowest and level == len(self.channel_multipliers) - 1
        return level in self.attention_levels

    @property
    def has_mid_attention(self) -> bool:
        return self.attention_at_lowest if self.mid_attention is None else bool(self.mid_attention)


# --------------------------------------------------------------------------------------------
# Image range helpers
# --------------------------------------------------------------------------------------------


def pixel_table(pixel_scale: float) -> np.ndarray:
    """float32 [256]: uint8 value x -> x * pixel_scale - 1, the product rounded from float64 as
    transformers' image processors rescale (numpy float64 multiply, then float32), so a
    Chameleon-imported tokenizer sees exactly the pixel values Chameleon's processor gives."""
    return (np.arange(256, dtype=np.float64) * float(pixel_scale)).astype(np.float32) - np.float32(1.0)


def normalize_images(images: Array, pixel_scale: float = PIXEL_SCALE) -> Array:
    """uint8 [0,255] -> float32 x * pixel_scale - 1 (the config's `pixel_scale`: [-1, 1] for ours);
    float input is taken to be normalised already; other dtypes raise a TypeError.

    The default divides by 127.5 as always (the same op, so the same values as before the field
    existed; XLA may turn it into a multiply by the float32 reciprocal); any other scale looks its
    256 values up in `pixel_table`, exact whatever the backend's float32 arithmetic. Dispatching on
    dtype lets data loaders hand over raw uint8 (4x less host->device traffic) while tests and
    sampling code keep working with floats.
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
        # int64 pixels (np.random.randint, arithmetic on uint8) would pass as "normalised" 0..255
        raise TypeError(f"images must be uint8 [0, 255] or float [-1, 1], got {images.dtype}: "
                        "cast integer pixels with .astype(np.uint8)")
    if images.dtype == jnp.uint8:
        if pixel_scale == PIXEL_SCALE:
            return images.astype(jnp.float32) / 127.5 - 1.0
        return jnp.take(jnp.asarray(pixel_table(pixel_scale)), images.astype(jnp.int32), axis=0)
    return images.astype(jnp.float32)


def to_uint8(images: Array, pixel_scale: float = PIXEL_SCALE) -> Array:
    """float -> uint8 [0,255] (clipped, rounded), for PNG grids and evaluation: the inverse of
    `normalize_images` at the config's `pixel_scale` ([-1, 1] for ours)."""
    x = jnp.asarray(images, jnp.float32)
    x = (jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5 if pixel_scale == PIXEL_SCALE else (x + 1.0) / float(pixel_scale)
    return jnp.round(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


# --------------------------------------------------------------------------------------------
# Pure quantizer math
# --------------------------------------------------------------------------------------------


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


class QuantizeResult(NamedTuple):
    quantized: Array  # z + sg(e[codes] - z): value of the code, gradient of the input
    codes: Array  # int32, shape z.shape[:-1]
    codebook_loss: Array  # mean ||e[codes] - sg(z)||^2, moves the codebook
    commitment_loss: Array  # beta * mean ||sg(e[codes]) - z||^2, moves the encoder


def quantize(z: Array, codebook: Array, beta: float = 0.25) -> QuantizeResult:
    """Nearest-code lookup with the VQ-VAE losses and a straight-through estimator.

    ``z`` [..., D] and ``codebook`` [K, D] must already live in the lookup space (the model
    l2-normalises both first, so squared distance = 2 - 2 cos and nearest == most similar).
    Squared Euclidean distance is used rather than a dot product so the same function stays
    correct when normalisation is switched off.  Losses are element means (as torch's
    ``mse_loss``), matching taming/LlamaGen so their loss weights transfer.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    flat = z.reshape(-1, z.shape[-1])
    dist = (
        jnp.sum(flat * flat, axis=-1, keepdims=True)
        - 2.0 * flat @ codebook.T
        + jnp.sum(codebook * codebook, axis=-1)[None, :]
    )
    codes = jnp.argmin(dist, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])
    z_q = jnp.take(codebook, codes, axis=0)
    codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    commitment_loss = beta * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    quantized = z + jax.lax.stop_gradient(z_q - z)
    return QuantizeResult(quantized, codes, codebook_loss, commitment_loss)


def code_counts(codes: Array, codebook_size: int) -> Array:
    """Per-code occurrence counts (float32 [K]); bincount keeps memory O(K), not O(N*K)."""
    return jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)


def perplexity_from_counts(counts: Array) -> Array:
    """exp(entropy) of the code distribution: the 'effective number of codes' in use."""
    counts = counts.astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)


def update_usage(usage: Array, counts: Array, decay: Optional[float] = 0.99) -> Array:
    """Running code usage for dead-code detection.

    ``decay=None`` accumulates raw counts (reset them after each reseed); a float gives an EMA,
    which forgets codes that were used long ago and then abandoned.
    """
    if decay is None:
        return usage + counts
    return decay * usage + (1.0 - decay) * counts


def reseed_dead_codes(
    codebook: Array,
    usage: Array,
    encodings: Array,
    rng: Array,
    threshold: float = 1e-3,
    noise_std: float = 1e-3,
) -> Tuple[Array, Array]:
    """Move codes whose ``usage < threshold`` onto randomly chosen encoder outputs.

    Dead codes never receive gradient (nothing maps to them), so without intervention the
    codebook collapses to the few codes the encoder happened to hit early.  Putting a dead code
    exactly where an encoder output lives guarantees it will be nearest to something next step;
    the small noise stops several re-seeded codes from landing on identical points.
    ``encodings`` are the (normalised, code_dim) quantizer inputs of a batch, any leading
    shape.  Sampling is without replacement when the batch has at least K vectors, so re-seeded
    codes are spread over the batch.  Shapes are static, so this runs inside ``jit``.
    Returns the new codebook and the boolean mask of re-seeded codes (the caller should reset
    their usage and, ideally, their optimizer moments).
    """
    k, d = codebook.shape
    flat = jax.lax.stop_gradient(encodings).reshape(-1, d).astype(codebook.dtype)
    n = flat.shape[0]
    pick_rng, noise_rng = jax.random.split(rng)
    idx = jax.random.choice(pick_rng, n, shape=(k,), replace=n < k)
    candidates = flat[idx] + noise_std * jax.random.normal(noise_rng, (k, d), codebook.dtype)
    dead = usage < threshold
    return jnp.where(dead[:, None], candidates, codebook), dead


def reseed_params(
    params: PyTree,
    usage: Array,
    encodings: Array,
    rng: Array,
    threshold: float = 1e-3,
    noise_std: float = 1e-3,
) -> Tuple[PyTree, Array]:
    """``reseed_dead_codes`` applied to a VQGAN params tree (returns a new tree + dead mask)."""
    params = dict(params)
    quant = dict(params["quantizer"])
    quant["codebook"], dead = reseed_dead_codes(
        quant["codebook"], usage, encodings, rng, threshold, noise_std
    )
    params["quantizer"] = quant
    return params, dead


# --------------------------------------------------------------------------------------------
# Linen modules
# --------------------------------------------------------------------------------------------


def _groups(channels: int, max_groups: int) -> int:
    """Largest divisor of ``channels`` not above ``max_groups``: tiny test widths still work."""
    return math.gcd(channels, max_groups)


def _norm(cfg: VQGANConfig, channels: int, name: Optional[str] = None):
    if cfg.norm == "layer":
        return nn.LayerNorm(epsilon=1e-6, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name)
    if cfg.norm == "none":
        return lambda x: x
    return nn.GroupNorm(
        num_groups=_groups(channels, cfg.num_groups),
        epsilon=1e-6,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _conv(cfg: VQGANConfig, features: int, kernel: int = 3, strides: int = 1, padding: Any = "SAME",
          name: Optional[str] = None) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def decoder_out_conv(cfg: VQGANConfig, name: Optional[str] = "conv_out") -> nn.Conv:
    """The decoder's last layer, shared by the model and the adaptive GAN weight (vq_losses).

    The adaptive weight needs d loss / d (last-layer kernel); re-applying exactly this conv to the
    decoder's final features is far cheaper than differentiating the whole network twice.
    """
    return _conv(cfg, cfg.in_channels * cfg.patch_size**2, 3, name=name)


def space_to_depth(x: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p pixel patch becomes one position."""
    if patch == 1:
        return x
    return einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=patch, q=patch)


def pixels_from_head(cfg: VQGANConfig, out: Array) -> Array:
    """The decoder head's output as float32 images: the inverse of ``space_to_depth``."""
    p = cfg.patch_size
    if p > 1:
        out = einops.rearrange(out, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p)
    return out.astype(jnp.float32)


class ResBlock(nn.Module):
    cfg: VQGANConfig
    out_channels: int

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = nn.swish(_norm(cfg, x.shape[-1], "norm1")(x))
        h = _conv(cfg, self.out_channels, name="conv1")(h)
        h = nn.swish(_norm(cfg, self.out_channels, "norm2")(h))
        h = _conv(cfg, self.out_channels, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(cfg, self.out_channels, 1, name="shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; only used at the lowest resolution where it is cheap
    and gives every latent a global view (colour/layout consistency across the image)."""

    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        b, hh, ww, c = x.shape
        h = _norm(cfg, c, "norm")(x)
        dense = lambda name: nn.Dense(c, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name)
        q = dense("q")(h).reshape(b, hh * ww, c)
        k = dense("k")(h).reshape(b, hh * ww, c)
        v = dense("v")(h).reshape(b, hh * ww, c)
        # Scores and softmax in float32: bf16 logits over 1024 positions lose too much precision.
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        attn = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", attn, v).reshape(b, hh, ww, c)
        return x + dense("proj_out")(out)


class Encoder(nn.Module):
    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        mults = cfg.channel_multipliers
        last = len(mults) - 1
        if cfg.local_encoder:
            # The latent grid comes from the input, not cfg.image_size: `encode` takes any multiple
            # of the downsampling factor, and the patches must be folded back in their own layout.
            batch, f = x.shape[0], cfg.downsample_factor
            rows = x.shape[1] // f
            x = einops.rearrange(x, "b (h p) (w q) c -> (b h w) p q c", p=f, q=f)
        x = space_to_depth(x.astype(cfg.compute_dtype), cfg.patch_size)
        h = _conv(cfg, cfg.channels * mults[0], name="conv_in")(x)
        for level, mult in enumerate(mults):
            for i in range(cfg.num_res_blocks):
                h = ResBlock(cfg, cfg.channels * mult, name=f"down{level}_res{i}")(h)
                if cfg.has_level_attention(level):
                    h = AttnBlock(cfg, name=f"down{level}_attn{i}")(h)
            if level != last:
                # Asymmetric (0,1) padding + VALID stride-2 conv, as taming: exact halving.
                h = _conv(cfg, h.shape[-1], 3, 2, ((0, 1), (0, 1)), name=f"down{level}_downsample")(h)
        h = ResBlock(cfg, h.shape[-1], name="mid_res0")(h)
        if cfg.has_mid_attention:
            h = AttnBlock(cfg, name="mid_attn")(h)
        h = ResBlock(cfg, h.shape[-1], name="mid_res1")(h)
        h = nn.swish(_norm(cfg, h.shape[-1], "norm_out")(h))
        z = _conv(cfg, cfg.embed_dim, name="conv_out")(h)
        if cfg.local_encoder:  # [(b h w), 1, 1, d] -> [b, h, w, d]
            z = einops.rearrange(z, "(b h w) 1 1 d -> b h w d", b=batch, h=rows)
        return z


class Decoder(nn.Module):
    cfg: VQGANConfig

    @nn.compact
    def __call__(self, z, return_features: bool = False):
        cfg = self.cfg
        mults = cfg.channel_multipliers
        h = _conv(cfg, cfg.channels * mults[-1], name="conv_in")(z.astype(cfg.compute_dtype))
        h = ResBlock(cfg, h.shape[-1], name="mid_res0")(h)
        if cfg.has_mid_attention:
            h = AttnBlock(cfg, name="mid_attn")(h)
        h = ResBlock(cfg, h.shape[-1], name="mid_res1")(h)
        for level in reversed(range(len(mults))):
            for i in range(cfg.num_res_blocks + 1):
                h = ResBlock(cfg, cfg.channels * mults[level], name=f"up{level}_res{i}")(h)
                if cfg.has_level_attention(level):
                    h = AttnBlock(cfg, name=f"up{level}_attn{i}")(h)
            if level != 0:
                b, hh, ww, c = h.shape
                # Nearest + conv rather than transposed conv: no checkerboard artefacts.
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = _conv(cfg, c, name=f"up{level}_upsample")(h)
        feats = nn.swish(_norm(cfg, h.shape[-1], "norm_out")(h))
        out = pixels_from_head(cfg, decoder_out_conv(cfg)(feats))
        if return_features:
            return out, feats
        return out


class QuantizerOutput(NamedTuple):
    quantized: Array  # [B,h,w,embed_dim] straight-through latents, projected back up
    codes: Array  # int32 [B,h,w]
    codebook_loss: Array
    commitment_loss: Array
    counts: Array  # float32 [K] code counts over this batch
    perplexity: Array
    encodings: Array  # [B,h,w,code_dim] normalised quantizer inputs (for dead-code reseeding)


class VectorQuantizer(nn.Module):
    """LlamaGen-style quantizer: project to a low-dim space, l2-normalise, cosine lookup.

    Looking codes up in 8-d on the unit sphere (instead of 256-d raw space) is what lifts
    codebook usage from a few percent to ~97% in LlamaGen: distances are well-conditioned and no
    code can win by having a large norm.
    """

    cfg: VQGANConfig

    def setup(self):
        cfg = self.cfg
        dense = lambda f, name: nn.Dense(f, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
        self.quant_proj = dense(cfg.code_dim, "quant_proj")
        self.post_quant_proj = dense(cfg.embed_dim, "post_quant_proj")

        def init_codebook(key, shape, dtype=jnp.float32):
            # Uniform on the sphere: every code starts equally reachable.
            return l2_normalize(jax.random.normal(key, shape, dtype)).astype(dtype)

        self.codebook = self.param("codebook", init_codebook, (cfg.codebook_size, cfg.code_dim))

    def lookup_codebook(self):
        cb = self.codebook
        return l2_normalize(cb) if self.cfg.l2_normalize_codes else cb.astype(jnp.float32)

    def __call__(self, z) -> QuantizerOutput:
        cfg = self.cfg
        # The quantizer runs in float32 regardless of compute dtype: argmin over 8192 codes in
        # bf16 would flip codes on near-ties and make tokens non-deterministic across hardware.
        z = self.quant_proj(z.astype(jnp.float32))
        if cfg.l2_normalize_codes:
            z = l2_normalize(z)
        res = quantize(z, self.lookup_codebook(), cfg.commitment_beta)
        counts = code_counts(res.codes, cfg.codebook_size)
        return QuantizerOutput(
            quantized=self.post_quant_proj(res.quantized),
            codes=res.codes,
            codebook_loss=res.codebook_loss,
            commitment_loss=res.commitment_loss,
            counts=counts,
            perplexity=perplexity_from_counts(counts),
            encodings=jax.lax.stop_gradient(z),
        )

    def embed(self, codes):
        return self.post_quant_proj(jnp.take(self.lookup_codebook(), codes, axis=0))


NO_DECODER = ("this VQ tokenizer has no decoder (has_decoder=False: it was imported from transformers' "
              "ChameleonVQVAE, which holds only the encoder and codebook), so it encodes images to codes but "
              "cannot decode codes to images; pass a VQ tokenizer with a decoder (e.g. --vq_workdir)")


class NoDecoderError(ValueError):
    """Decoding with an encoder-only tokenizer."""


class VQGAN(nn.Module):
    """Encoder -> VectorQuantizer -> Decoder.  Param tree: encoder / quantizer / decoder."""

    cfg: VQGANConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.quantizer = VectorQuantizer(self.cfg)
        self.decoder = Decoder(self.cfg) if self.cfg.has_decoder else None

    def _decoder(self):
        if self.decoder is None:
            raise NoDecoderError(NO_DECODER)
        return self.decoder

    def quantize_images(self, images) -> QuantizerOutput:
        return self.quantizer(self.encoder(normalize_images(images, self.cfg.pixel_scale)))

    def __call__(self, images, return_features: bool = False):
        """Training forward.  Returns (reconstruction, QuantizerOutput) and, with
        ``return_features``, the decoder's last-layer input (for the adaptive GAN weight).
        The reconstruction is NOT clipped: clipping would zero gradients of saturated pixels."""
        q = self.quantize_images(images)
        out = self._decoder()(q.quantized, return_features=return_features)
        if return_features:
            return out[0], q, out[1]
        return out, q

    def encode(self, images):
        """uint8 [0,255] or float [-1,1] images [B,H,W,C] -> int32 codes [B,h,w]."""
        return self.quantize_images(images).codes

    def decode_latents(self, quantized):
        return self._decoder()(quantized)

    def decode(self, codes):
        """int codes [B,h,w] -> float32 images [B,H,W,C] clipped to [-1,1]."""
        codes = jnp.asarray(codes).astype(jnp.int32)
        return jnp.clip(self._decoder()(self.quantizer.embed(codes)), -1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Public functional API
# --------------------------------------------------------------------------------------------


def _as_variables(params: PyTree) -> dict:
    """Accept either the bare params tree or a ``{'params': ...}`` variables dict."""
    if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
        return dict(params)
    return {"params": params}


def init_params(rng: Array, config: Any, batch_size: int = 1, fast: bool = True) -> PyTree:
    """Fresh float32 params for ``config`` (bare tree, without the ``'params'`` wrapper).

    ``fast=True`` draws every leaf from the same distributions as Flax's defaults for these
    layers (lecun-normal kernels, zero biases, unit GroupNorm scales, unit-sphere codebook) but
    from ONE random stream: ``model.init`` emits one threefry kernel per parameter, and XLA on a
    small CPU spends 15-25 s compiling them, which dominated tests and CPU training start-up.
    ``fast=False`` is plain ``model.init`` (values differ, distributions do not).
    """
    cfg = VQGANConfig.from_config(config)
    model = VQGAN(cfg)
    dummy = jnp.zeros((batch_size, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    init = functools.partial(model.init, method=None if cfg.has_decoder else VQGAN.quantize_images)
    if not fast:
        return jax.jit(init)(rng, dummy)["params"]
    shapes = jax.eval_shape(init, rng, dummy)["params"]
    return jax.jit(functools.partial(_init_like_flax_defaults, shapes))(rng)


def _init_like_flax_defaults(shapes: PyTree, rng: Array) -> PyTree:
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = [str(getattr(path[-1], "key", path[-1])) for path, _ in path_leaves]
    sizes = [int(np.prod(leaf.shape)) for _, leaf in path_leaves]
    for (path, _), name in zip(path_leaves, names):
        if name not in ("kernel", "bias", "scale", "codebook"):
            # A new layer type with its own initializer must be added here explicitly, rather
            # than silently receiving the wrong distribution.
            raise NotImplementedError(f"fast init has no rule for {jax.tree_util.keystr(path)}")
    k_kernel, k_code = jax.random.split(rng)
    n_kernel = sum(sz for sz, n in zip(sizes, names) if n == "kernel")
    # lecun_normal = variance_scaling(1, fan_in, truncated_normal): N(0,1) cut at +-2, rescaled
    # to unit variance (0.8796... is the std of the cut normal), times 1/sqrt(fan_in).
    flat = jax.random.truncated_normal(k_kernel, -2.0, 2.0, (n_kernel,), jnp.float32) / 0.87962566103423978
    out, offset = [], 0
    for (_, leaf), name, sz in zip(path_leaves, names, sizes):
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            out.append(flat[offset:offset + sz].reshape(leaf.shape) / np.sqrt(fan_in))
            offset += sz
        elif name == "codebook":
            out.append(l2_normalize(jax.random.normal(k_code, leaf.shape, jnp.float32)))
        elif name == "scale":
            out.append(jnp.ones(leaf.shape, jnp.float32))
        else:
            out.append(jnp.zeros(leaf.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("config",))
def _encode(params, images, config: VQGANConfig):
    return VQGAN(config).apply(_as_variables(params), images, method=VQGAN.encode)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode(params, codes, config: VQGANConfig):
    return VQGAN(config).apply(_as_variables(params), codes, method=VQGAN.decode)


def encode(params: PyTree, images: Any, config: Any) -> Array:
    """uint8 [0,255] or float [-1,1] images [B,H,W,C] -> int32 codes [B, H/f, W/f] (jitted)."""
    cfg = VQGANConfig.from_config(config)
    params = _as_variables(params)["params"]  # one pytree shape -> one compiled program
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
        raise ValueError(f"expected images [B,H,W,{cfg.in_channels}], got {images.shape}")
    f = cfg.downsample_factor
    if images.shape[1] % f or images.shape[2] % f:
        raise ValueError(f"image size {images.shape[1:3]} not divisible by downsampling {f}")
    return _encode(params, images, cfg)


def decode(params: PyTree, codes: Any, config: Any) -> Array:
    """int codes [B,h,w] -> float32 images [B, h*f, w*f, C] in [-1,1] (jitted)."""
    cfg = VQGANConfig.from_config(config)
    if not cfg.has_decoder:
        raise NoDecoderError(NO_DECODER)
    params = _as_variables(params)["params"]
    codes = jnp.asarray(codes)
    if codes.ndim != 3:
        raise ValueError(f"expected codes [B,h,w], got shape {codes.shape}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    if codes.size and not isinstance(codes, jax.core.Tracer):
        # The lookup would wrap a negative code onto the codebook's end and turn one >= K into NaN
        # (a black image): both silently wrong pictures, so refuse them.
        lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < 0 or hi >= cfg.codebook_size:
            raise ValueError(f"codes must lie in [0, {cfg.codebook_size}), got [{lo}, {hi}]")
    return _decode(params, codes, cfg)


def decode_to_uint8(params: PyTree, codes: Any, config: Any) -> np.ndarray:
    """``decode`` followed by ``to_uint8``, as a host numpy array ready for PIL."""
    return np.asarray(to_uint8(decode(params, codes, config), VQGANConfig.from_config(config).pixel_scale))
