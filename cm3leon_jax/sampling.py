"""Sampling math as pure functions on logits: guidance, filters, contrastive decoding, draws.

Order used by the decoder (as LlamaGen/Chameleon): guidance on raw logits -> allowed-id
restriction -> temperature -> TopK -> TopP -> draw (`next_token_logits`). Filtered-out tokens get
-inf. CD-K restricts each stream first: its plausible set and both normalisations are over the ids
that may be drawn.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Hashable, so a compiled decoder is cached per setting."""
    temperature: float = 1.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    cfg_scale: float = 1.0     # 1: conditional stream only (no guidance)
    image_cfg_scale: float = 1.0  # three-stream (editing) guidance; used when streams == 3
    cd_k: int = 0              # >0: contrastive decoding TopK (expert=cond, amateur=uncond)
    cd_alpha: float = 0.1

    def __post_init__(self):
        """Refuses settings the math silently misreads: a negative temperature would sample at 1
        (never dividing), a cd_alpha above 1 (with k = 1) or at 0 leaves no or every token plausible; a
        NaN or infinite temperature or guidance scale turns every logit NaN, and the draw is id 0, outside
        any allowed range."""
        problems = [f"{name}={value!r} ({why})" for name, value, bad, why in (
            ("temperature", self.temperature, not 0 <= self.temperature < math.inf, "0 is greedy; >0 samples"),
            ("cfg_scale", self.cfg_scale, not math.isfinite(self.cfg_scale), "finite; 1 is off"),
            ("image_cfg_scale", self.image_cfg_scale, not math.isfinite(self.image_cfg_scale), "finite; 1 is off"),
            ("top_k", self.top_k, self.top_k < 0, "0 is off"),
            ("top_p", self.top_p, not 0 <= self.top_p <= 1, "in [0, 1]; 1 is off"),
            ("cd_k", self.cd_k, self.cd_k < 0, "0 is off"),
            ("cd_alpha", self.cd_alpha, not 0 < self.cd_alpha <= 1, "in (0, 1]")) if bad]
        if problems:
            raise ValueError("sampling settings out of range: " + "; ".join(problems))


# CD-K's k where a caller names none. Chosen on the validation split (README, "CD-K"): with k >= 2 the
# plausible set keeps tokens far below a confident expert's choice, and the score `log p_exp - log
# p_ama` favours exactly those the amateur rules out (a background the caption fixed loses to noise).
DEFAULT_CD_K = 1


def classifier_free_guidance(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
    """`uncond + scale * (cond - uncond)`: scale 1 is the conditional stream, 0 the unconditional."""
    return uncond + scale * (cond - uncond)


def three_stream_guidance(full: jax.Array, image_only: jax.Array, uncond: jax.Array,
                          image_scale: float, text_scale: float) -> jax.Array:
    """InstructPix2Pix-style editing guidance: `u + s_img (img - u) + s_txt (full - img)`."""
    return uncond + image_scale * (image_only - uncond) + text_scale * (full - image_only)


def restrict_to_ranges(logits: jax.Array, ranges: tuple[tuple[int, int], ...]) -> jax.Array:
    """Only ids in the [low, high) ranges may be drawn (image codes inside an image; text ids and
    `<eoss>` in a caption)."""
    ids = jnp.arange(logits.shape[-1])
    allowed = jnp.zeros(logits.shape[-1], bool)
    for low, high in ranges:
        allowed = allowed | ((ids >= low) & (ids < high))
    return jnp.where(allowed, logits, NEG_INF)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits (and any tied with the k-th)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest most-probable set whose probability reaches p (the top token always)."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # the top token stays whatever p (at p = 0 nothing else reaches "mass before < p": without it a
    # row of -inf would draw id 0, outside any allowed range)
    kept = (mass_before < p) | (jnp.arange(logits.shape[-1]) == 0)
    # the smallest kept logit is the threshold: everything at or above it stays
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def contrastive_topk_scores(expert: jax.Array, amateur: jax.Array, k: int, alpha: float) -> jax.Array:
    """CD-K (CM3Leon): `log p_exp - log p_ama` on V = {t: p_exp(t) >= alpha * kth_largest(p_exp)}.

    The paper uses the k-th largest expert probability because with the maximum (k = 1, the original
    CD) its decoding collapsed to greedy. Here the scores are sampled, not maximised, so k = 1 keeps
    most of TopP's sample diversity; larger k lets tokens far below a confident expert's choice
    compete on the ratio alone (see DEFAULT_CD_K).
    """
    log_exp = jax.nn.log_softmax(expert, axis=-1)
    log_ama = jax.nn.log_softmax(amateur, axis=-1)
    k = min(max(k, 1), expert.shape[-1])
    kth = jax.lax.top_k(log_exp, k)[0][..., -1:]
    plausible = log_exp >= jnp.log(alpha) + kth
    return jnp.where(plausible, log_exp - log_ama, NEG_INF)


def guided_logits(stream_logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """[streams, batch, vocab] -> [batch, vocab]: stream 0 conditional, the last unconditional."""
    streams = stream_logits.shape[0]
    if streams == 1:
        return stream_logits[0]
    if config.cd_k > 0:
        return contrastive_topk_scores(stream_logits[0], stream_logits[-1], config.cd_k, config.cd_alpha)
    if streams == 2:
        return classifier_free_guidance(stream_logits[0], stream_logits[1], config.cfg_scale)
    return three_stream_guidance(stream_logits[0], stream_logits[1], stream_logits[2],
                                 config.image_cfg_scale, config.cfg_scale)


def next_token_logits(stream_logits: jax.Array, config: SamplingConfig,
                      allowed: tuple[tuple[int, int], ...] | None = None) -> jax.Array:
    """[streams, batch, vocab] raw logits -> [batch, vocab] logits to draw from. CD-K's plausible set
    is taken among the allowed ids: over the whole vocabulary a caption token the expert prefers
    could leave no image code plausible, and a row of -inf draws id 0."""
    if allowed is not None and config.cd_k > 0:
        stream_logits = restrict_to_ranges(stream_logits, allowed)
    guided = guided_logits(stream_logits, config)
    if allowed is not None:
        guided = restrict_to_ranges(guided, allowed)
    return filter_logits(guided, config)


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    if config.temperature > 0:
        logits = logits / config.temperature
    return top_p_filter(top_k_filter(logits, config.top_k), config.top_p)


def draw(rng: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
    """Greedy when temperature is 0, else a categorical draw from the (filtered) logits."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
