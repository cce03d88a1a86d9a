"""optax AdamW with linear warmup, cosine decay, gradient clipping and masked weight decay."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
    warmup = int(opt_config.warmup_steps)
    decay_steps = max(int(total_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(opt_config.peak_lr), warmup_steps=warmup,
        decay_steps=decay_steps, end_value=float(opt_config.peak_lr) * float(opt_config.end_lr_ratio))


def _decay_mask(params):
    """Weight decay on kernels and embeddings, not on norm scales (by name: stacked layers make
    every parameter look like a matrix)."""
    def decays(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) != "scale"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_config, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(float(opt_config.grad_clip)),
        optax.adamw(schedule, b1=float(opt_config.b1), b2=float(opt_config.b2), eps=float(opt_config.eps),
                    weight_decay=float(opt_config.weight_decay), mask=_decay_mask),
    )
    return tx, schedule
