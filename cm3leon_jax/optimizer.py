"""optax AdamW with linear warmup, cosine decay, gradient clipping and masked weight decay, and a
guard that skips an update whose gradients hold a NaN or an inf."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from absl import logging

# optax.apply_if_finite gives up after this many skipped updates in a row and applies the next one:
# never, here. The training loop stops the run itself after `skip_nonfinite` in a row (a clear error
# while the parameters are still finite), so no NaN ever reaches them.
_NEVER_GIVE_UP = 2**31 - 1


SCHEDULES = ("cosine", "linear", "wsd", "constant")


def warn_if_warmup_outlasts_training(opt_config, total_steps: int) -> None:
    """A warmup as long as the run never reaches the peak: allowed (a short smoke run of a big
    config), but said, since a loss that barely moves is otherwise the only sign."""
    warmup, total = int(opt_config.warmup_steps), int(total_steps)
    if warmup >= total > 0:
        logging.warning("optimizer.warmup_steps=%d >= total_steps=%d: the learning rate never reaches its peak "
                        "(at most %.3g of it); lower the warmup for a short run", warmup, total, (total - 1) / warmup)


def learning_rate_schedule(opt_config, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to the peak (`peak`, else peak_lr), then by `schedule`: "cosine" (the paper's)
    or "linear" decay to end_lr_ratio * peak at total_steps; "wsd" (warmup-stable-decay) holds the
    peak and decays linearly over the last `decay_fraction` of the steps, so one run's stable phase
    can be branched into decays at several lengths; "constant" holds the peak. Both trainers."""
    kind = str(opt_config.get("schedule", "cosine"))
    warmup, total = int(opt_config.warmup_steps), int(total_steps)
    peak = float(opt_config.peak_lr if peak is None else peak)
    end = peak * float(opt_config.end_lr_ratio)
    decay_steps = max(total, warmup + 1)
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={kind!r} is not one of {SCHEDULES}")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                                  decay_steps=decay_steps, end_value=end)
    if kind == "constant" and warmup <= 0:
        return optax.constant_schedule(peak)
    warm = optax.linear_schedule(0.0, peak, warmup)
    if kind == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    if kind == "linear":
        return optax.join_schedules([warm, optax.linear_schedule(peak, end, decay_steps - warmup)], [warmup])
    fraction = float(opt_config.get("decay_fraction", 0.2))
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"optimizer.decay_fraction={fraction} must be in (0, 1] for schedule='wsd'")
    decay_start = max(warmup, total - int(round(fraction * total)))
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, end, max(total - decay_start, 1))],
        [warmup, decay_start])


NO_DECAY_NAMES = ("scale", "bias")  # norm scales, QK-norm's learned bias (Chameleon), any bias


def decay_mask(params):
    """Weight decay on kernels and embeddings only, not on norm scales or biases: pulling a norm's
    scale towards 0 or a bias towards 0 is not regularisation. Chosen by name, because stacked
    layers make every parameter look like a matrix."""
    def decays(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(decays, params)


def check_adamw_fields(opt_config) -> None:
    """AdamW's numbers, each a ValueError naming it: eps=0 divides 0 by 0 for every parameter whose
    gradient is 0 (an unused embedding row) and b1 or b2 = 1 zeroes the bias correction, so the first
    update made the parameters NaN (the guard checks gradients only, and blamed the learning rate);
    a negative learning rate, ratio or decay trains silently the wrong way, and an end ratio above 1
    turns the decay into a rise."""
    for name in ("b1", "b2"):
        if not 0.0 <= float(opt_config[name]) < 1.0:
            raise ValueError(f"optimizer.{name}={opt_config[name]} must be in [0, 1)")
    if not 0.0 < float(opt_config.eps) < math.inf:
        raise ValueError(f"optimizer.eps={opt_config.eps} must be > 0 and finite")
    for name in ("peak_lr", "lr", "disc_lr", "end_lr_ratio", "weight_decay", "disc_weight_decay"):
        if name in opt_config and not 0.0 <= float(opt_config[name]) < math.inf:
            raise ValueError(f"optimizer.{name}={opt_config[name]} must be >= 0 and finite")
    if "end_lr_ratio" in opt_config and float(opt_config.end_lr_ratio) > 1.0:   # the "decay" raised the rate
        raise ValueError(f"optimizer.end_lr_ratio={opt_config.end_lr_ratio} must be in [0, 1]: the schedule decays to "
                         "end_lr_ratio x the peak (1: no decay)")


def grad_clip_norm(opt_config) -> float:
    """The global-norm clip, 0 meaning none (as the VQ trainer's). optax clips to a norm of 0 as
    asked, which zeroes every gradient: the run would only decay its weights. Negative: ValueError."""
    clip = float(opt_config.grad_clip)
    if not clip >= 0:
        raise ValueError(f"optimizer.grad_clip={clip} must be >= 0 (0: no gradient clipping)")
    return clip


def make_optimizer(opt_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_config, total_steps)
    clip = grad_clip_norm(opt_config)
    tx = optax.chain(
        # (identity keeps the state's structure: a checkpoint resumes whether clipping is on or off)
        optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=float(opt_config.b1), b2=float(opt_config.b2), eps=float(opt_config.eps),
                    weight_decay=float(opt_config.weight_decay), mask=decay_mask),
    )
    return with_nonfinite_guard(tx, opt_config), schedule


def with_nonfinite_guard(tx: optax.GradientTransformation, opt_config) -> optax.GradientTransformation:
    """`tx` skipping (a zero update, its state kept) any update whose gradients are not all finite,
    when `opt_config.skip_nonfinite` > 0; the training loop decides when a streak ends the run."""
    if skip_nonfinite_limit(opt_config):
        return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP)
    return tx


def skip_nonfinite_limit(opt_config) -> int:
    """Consecutive non-finite updates a run tolerates (skipped) before it stops; 0: no guard (configs
    saved before the field existed). A negative value is a ValueError (both trainers check it first)."""
    limit = int(opt_config.get("skip_nonfinite", 0))
    if limit < 0:
        raise ValueError(f"optimizer.skip_nonfinite={limit} must be >= 0 (0: no guard against NaN/inf gradients)")
    return limit


def skipped_updates(opt_state) -> tuple[jax.Array, jax.Array]:
    """(updates skipped in a row up to now, updates skipped in all) by the non-finite guard; zeros
    without it."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.notfinite_count, opt_state.total_notfinite
    zero = jnp.zeros((), jnp.int32)
    return zero, zero
