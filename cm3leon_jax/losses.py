"""Losses as pure functions."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                           z_loss_weight: float = 0.0,
                           denominator: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over tokens with weight > 0, plus the optional z-loss.

    Per-token weights carry the objective: CM3 sentinels, SFT prompts and padding get weight 0.
    The z-loss (`weight * log(Z)^2`, Chameleon/PaLM) keeps the softmax normaliser near 1 so bf16
    logits do not drift. Returns (total loss, metrics) with sums so callers can reduce across
    steps exactly.

    `denominator`: the whole batch's token weight when `weights` are one microbatch of it, so the
    microbatches' losses, metrics and gradients add up to the whole batch's (gradient accumulation).
    """
    weights = weights.astype(jnp.float32)
    token_ce, log_z = token_cross_entropy(logits, targets)
    denom = jnp.maximum(jnp.sum(weights), 1.0) if denominator is None else denominator
    ce = jnp.sum(token_ce * weights) / denom
    z_loss = jnp.sum(jnp.square(log_z) * weights) / denom
    total = ce + z_loss_weight * z_loss
    return total, {"loss": ce, "z_loss": z_loss, "num_tokens": jnp.sum(weights)}


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each position's next-token cross-entropy and log-normaliser, in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], log_z
