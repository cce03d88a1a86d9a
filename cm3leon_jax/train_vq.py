"""Trains the VQ-GAN image tokenizer on the LM trainer's machinery, and loads it back.

    python -m cm3leon_jax.train_vq --config experiments/vq_tiny.py --workdir /tmp/vq \
        [--config.X=Y] [--coordinator_address=host:port --num_processes=N --process_id=i]

Rerunning the same command resumes from the latest checkpoint in the workdir. Same mesh
(`sharding`), checkpoints (`checkpointing`: items `state` and `data`, SIGTERM), logs (`metrics`)
and multi-process start-up (`distributed`) as `cm3leon_jax.train`. Data parallel over
mesh data x fsdp; with mesh.fsdp > 1 every parameter (and Adam moment) whose last dimension the
fsdp size divides is split over `fsdp` through the logical axis `embed`.

The public API for later stages: `load_tokenizer(workdir) -> (params, VQGANConfig)` and
`VQTokenizer.from_workdir(workdir)` with `encode(uint8 images) -> int codes` and
`decode(codes) -> uint8 images`. The VQ config is saved as `DIR/vq_config.json`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, logging
from flax import linen as nn

from cm3leon_jax import checkpointing, config_defaults, image_grid, metrics, optimizer, sharding, trainer as lm_trainer, vq_losses, vqgan, workdir_io
from cm3leon_jax import train as _lm_cli  # its --config / --workdir flags and start-up serve both CLIs
from cm3leon_jax.vq_tokenizer import VQ_CONFIG_FILE, VQTokenizer, load_tokenizer, load_vq_config, save_vq_config  # noqa: F401
from data_pipeline import images as image_data, shapes_world

STDOUT_KEYS = ("loss", "recon_loss", "psnr", "val_psnr", "codebook_usage", "perplexity", "commitment_loss",
               "disc_loss", "adaptive_weight")
_NEVER = -(2**30)  # last_used of a code never seen


@flax.struct.dataclass
class VQTrainState:
    step: jax.Array
    params: Any  # the VQGAN (encoder, quantizer, decoder)
    opt_state: Any
    disc_params: Any  # PatchGAN (always present, so the GAN can be switched on in a resumed run)
    disc_opt_state: Any
    usage: jax.Array  # [K] EMA of each code's share of the tokens (dead-code detection)
    last_used: jax.Array  # [K] int32, last step a code was used (codebook_usage over a window)
    reseeded_total: jax.Array  # codes re-seeded so far


def validate_config(config, mesh, process_count: int) -> None:
    """Every check that would otherwise fail deep inside XLA, with the field to fix."""
    batch, dp = int(config.data.global_batch_size), sharding.data_parallel_size(mesh)
    # as the LM's: 0 failed inside Grain (batch), as a modulo by zero after the first compiled step (log),
    # or had orbax keep no checkpoint / save every step; negatives were taken too
    for name in ("data.global_batch_size", "log_every_steps", "keep_checkpoints", "checkpoint_every_steps"):
        value = int(config_defaults.get_field(config, name))
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if batch % dp:
        raise ValueError(f"data.global_batch_size={batch} is not divisible by the data-parallel size "
                         f"mesh.data*mesh.fsdp={dp}")
    if batch % process_count:
        raise ValueError(f"data.global_batch_size={batch} is not divisible by the {process_count} processes")
    if mesh.shape["tensor"] != 1:
        raise ValueError(f"the VQ tokenizer is trained data/fsdp parallel; set mesh.tensor=1 "
                         f"(got {mesh.shape['tensor']})")
    if int(config.total_steps) <= 0:
        raise ValueError(f"total_steps must be positive, got {config.total_steps}")
    optimizer.warn_if_warmup_outlasts_training(config.optimizer, int(config.total_steps))
    if int(config.num_sample_images) < 0:
        raise ValueError(f"num_sample_images must be >= 0 (0: no sample grids), got {config.num_sample_images}")
    if int(config.seed) < 0:
        raise ValueError(f"seed must be >= 0 (NumPy's generators take no negative seed), got {config.seed}")
    if not config.data.image_dir:   # the shapes world's own checks (seed, object counts), before any compilation
        shapes_world.ShapesWorldConfig(image_size=int(config.vq.image_size), seed=int(config.data.shapes_seed),
                                       min_objects=int(config.data.min_objects), max_objects=int(config.data.max_objects))
    if config.optimizer.schedule not in ("constant", "cosine"):
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {config.optimizer.schedule!r}")
    optimizer.skip_nonfinite_limit(config.optimizer)
    optimizer.check_adamw_fields(config.optimizer)
    # 0 turns these off; a negative or NaN one was taken (a negative reseed threshold or noise, clip or budget)
    for name in ("codebook.reseed_every_steps", "codebook.usage_window_steps", "codebook.dead_threshold",
                 "codebook.reseed_noise", "optimizer.grad_clip", "max_train_seconds", "sample_every_steps",
                 "loss.disc_start", "data.num_threads"):
        value = float(config_defaults.get_field(config, name))
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value} must be a finite number >= 0")
    if not 0.0 <= float(config.codebook.usage_decay) < 1.0:  # 1 leaves the EMA at 0 and its bias correction 0/0
        raise ValueError(f"codebook.usage_decay must be in [0, 1), got {config.codebook.usage_decay}")
    vqgan.VQGANConfig.from_config(config.vq)  # unknown keys, image size vs downsampling
    if int(config.vq.in_channels) != 3:
        raise ValueError(f"vq.in_channels={config.vq.in_channels}, but train_vq's images (the shapes world, "
                         "image folders) are RGB: set vq.in_channels=3")
    vq_losses.VQLossConfig.from_config(config.loss)


def _adamw(schedule, ocfg, weight_decay: float):
    parts = [optax.clip_by_global_norm(float(ocfg.grad_clip))] if float(ocfg.grad_clip) > 0 else []
    parts.append(optax.adamw(schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
                             weight_decay=weight_decay))
    return optimizer.with_nonfinite_guard(optax.chain(*parts), ocfg)


def _box(tree, fsdp: int):
    """Logical axis names for a conv/dense tree: the last dim is `embed` (-> mesh fsdp) when fsdp
    divides it, otherwise the leaf is replicated."""
    def box(x):
        names = [None] * x.ndim
        if fsdp > 1 and x.ndim >= 2 and x.shape[-1] % fsdp == 0:
            names[-1] = "embed"
        return nn.LogicallyPartitioned(x, tuple(names))
    return jax.tree_util.tree_map(box, tree)


def _reset_code_rows(opt_state, dead):
    """Zeroes the Adam moments of re-seeded codes, so they start without the old code's momentum."""
    def reset(path, x):
        keys = [getattr(p, "key", None) for p in path]
        if "codebook" in keys and getattr(x, "ndim", 0) == 2 and x.shape[0] == dead.shape[0]:
            return jnp.where(dead[:, None], jnp.zeros_like(x), x)
        return x
    return jax.tree_util.tree_map_with_path(reset, opt_state)


class VQTrainer:
    """Everything derived from a config and a mesh: the models, optimizers, sharded state and step."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.vq_config = vqgan.VQGANConfig.from_config(config.vq)
        self.loss_config = vq_losses.VQLossConfig.from_config(config.loss)
        self.use_disc = self.loss_config.disc_weight > 0
        self.perceptual_weights = None
        if self.loss_config.perceptual_weights_path and self.loss_config.perceptual_weight > 0:
            self.perceptual_weights = vq_losses.load_perceptual_weights(self.loss_config.perceptual_weights_path)
        ocfg, total = config.optimizer, int(config.total_steps)
        self.schedule = optimizer.learning_rate_schedule(ocfg, total, peak=float(ocfg.lr))
        self.disc_schedule = optimizer.learning_rate_schedule(ocfg, total, peak=float(ocfg.disc_lr))
        self.tx = _adamw(self.schedule, ocfg, float(ocfg.weight_decay))
        self.disc_tx = _adamw(self.disc_schedule, ocfg, float(ocfg.disc_weight_decay))
        self.images_per_step = int(config.data.global_batch_size)

        with sharding.activate(mesh):
            boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
            self.state_shardings = sharding.tree_shardings(mesh, boxed)
        self.abstract_state = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)  # [batch, H, W, C]: rows over data x fsdp
        self.replicated = sharding.replicated(mesh)
        self._init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)), out_shardings=self.state_shardings)
        self._step = jax.jit(self._train_step,
                             in_shardings=(self.state_shardings, {"image": self.batch_sharding}, self.replicated),
                             out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        self._reconstruct = jax.jit(self._reconstruct_fn, in_shardings=(self.state_shardings.params, self.replicated),
                                    out_shardings=self.replicated)

    # ------------------------------------------------------------------ state
    def _init_boxed(self, rng) -> VQTrainState:
        g_rng, d_rng = jax.random.split(rng)
        size, k = self.vq_config.image_size, self.vq_config.codebook_size
        fsdp = self.mesh.shape["fsdp"]
        params = _box(vqgan.init_params(g_rng, self.vq_config), fsdp)
        disc = _box(vq_losses.init_discriminator(d_rng, self.loss_config, (size, size, self.vq_config.in_channels)),
                    fsdp)
        return VQTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                            disc_params=disc, disc_opt_state=self.disc_tx.init(disc),
                            usage=jnp.zeros((k,), jnp.float32), last_used=jnp.full((k,), _NEVER, jnp.int32),
                            reseeded_total=jnp.zeros((), jnp.int32))

    def init_state(self, seed: int) -> VQTrainState:
        """Created already sharded: each device computes only its own shard."""
        with sharding.activate(self.mesh):
            return self._init(jax.random.key(seed))

    # ------------------------------------------------------------------ step
    def _reseed(self, params, opt_state, usage, encodings, step):
        """Dead codes (EMA share < dead_threshold / K) move onto this batch's encoder outputs, drawn
        with probability proportional to their squared quantization error (k-means++ seeding): new
        codes go where the codebook is missing codes, never onto outputs already coded exactly
        (e.g. the many identical background patches), so both usage and PSNR gain."""
        ccfg, k = self.config.codebook, self.vq_config.codebook_size
        threshold = float(ccfg.dead_threshold) / k
        flat = encodings.reshape(-1, encodings.shape[-1])
        codebook = params["quantizer"]["codebook"]
        lookup = vqgan.l2_normalize(codebook) if self.vq_config.l2_normalize_codes else codebook
        dist = (jnp.sum(flat * flat, -1, keepdims=True) - 2.0 * flat @ lookup.T
                + jnp.sum(lookup * lookup, -1)[None, :])
        error = jnp.maximum(jnp.min(dist, axis=-1), 0.0) + 1e-12
        rng = jax.random.fold_in(jax.random.key(int(self.config.seed)), step)
        pick_rng, rng = jax.random.split(rng)
        picked = jax.random.choice(pick_rng, flat.shape[0], (k,), replace=True, p=error / jnp.sum(error))
        # The EMA starts at zero: bias-correct it (as Adam) so early re-seeds see true shares.
        corrected = usage / (1.0 - float(ccfg.usage_decay) ** (step + 1).astype(jnp.float32))
        params, dead = vqgan.reseed_params(params, corrected, flat[picked], rng, threshold=threshold,
                                           noise_std=float(ccfg.reseed_noise))
        # A re-seeded code gets one re-seed interval to be picked before it counts as dead again. At
        # most a whole share (1): a short EMA over a long interval made it inf in float32 (never dead
        # again, perplexity_window NaN), and usage_decay=0 divided by zero.
        kept = float(ccfg.usage_decay) ** int(ccfg.reseed_every_steps)
        grace = min(threshold * 1.01 / kept, 1.0) if kept > 0 else 1.0
        usage = jnp.where(dead, grace, usage)
        return params, _reset_code_rows(opt_state, dead), usage, jnp.sum(dead).astype(jnp.int32)

    def _train_step(self, state: VQTrainState, batch, perceptual_weights):
        step, images = state.step, batch["image"]
        mcfg, lcfg, ccfg = self.vq_config, self.loss_config, self.config.codebook
        (_, aux), grads = jax.value_and_grad(vq_losses.vq_loss_fn, has_aux=True)(
            state.params, state.disc_params if self.use_disc else None, images, None, step, mcfg, lcfg,
            perceptual_weights)
        _, skipped_before = optimizer.skipped_updates(state.opt_state)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)   # a skipped update is zeros: params unchanged
        m = dict(aux["metrics"])
        m["batch_codebook_usage"] = m.pop("codebook_usage")
        m["recon_loss"] = (lcfg.l1_weight * m["recon_l1"] + lcfg.l2_weight * m["recon_l2"]
                           + lcfg.perceptual_weight * m["perceptual"])
        m.update(grad_norm=optax.tree.norm(grads), learning_rate=self.schedule(step - skipped_before))

        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        if self.use_disc:
            def disc_update(operand):
                d_params, d_opt = operand
                (_, dm), d_grads = jax.value_and_grad(vq_losses.disc_loss_fn, has_aux=True)(
                    d_params, images, aux["recon"], step, lcfg, mcfg.compute_dtype, mcfg.pixel_scale)
                d_updates, d_opt = self.disc_tx.update(d_grads, d_opt, d_params)
                dm = dict(dm, disc_grad_norm=optax.tree.norm(d_grads))
                return (optax.apply_updates(d_params, d_updates), d_opt), dm

            def disc_idle(operand):
                zero = jnp.zeros((), jnp.float32)
                return operand, {"disc_loss": zero, "logits_real": zero, "logits_fake": zero,
                                 "disc_factor": zero, "disc_grad_norm": zero}

            (disc_params, disc_opt_state), dm = jax.lax.cond(
                step >= lcfg.disc_start, disc_update, disc_idle, (disc_params, disc_opt_state))
            m.update(dm)
        streak, skipped = optimizer.skipped_updates(opt_state)
        disc_streak, disc_skipped = optimizer.skipped_updates(disc_opt_state)
        m.update(nonfinite_streak=jnp.maximum(streak, disc_streak), skipped_steps=skipped, disc_skipped_steps=disc_skipped)

        counts = aux["counts"]
        usage = vqgan.update_usage(state.usage, counts / jnp.maximum(jnp.sum(counts), 1.0), float(ccfg.usage_decay))
        last_used = jnp.where(counts > 0, step, state.last_used)
        reseeded = jnp.zeros((), jnp.int32)
        every = int(ccfg.reseed_every_steps)
        if every > 0:
            params, opt_state, usage, reseeded = jax.lax.cond(
                ((step + 1) % every == 0) & (streak == 0),   # never onto a skipped (non-finite) step's encodings
                lambda p, o, u: self._reseed(p, o, u, aux["encodings"], step),
                lambda p, o, u: (p, o, u, jnp.zeros((), jnp.int32)),
                params, opt_state, usage)
        m.update(codebook_usage=jnp.mean((last_used > step - int(ccfg.usage_window_steps)).astype(jnp.float32)),
                 perplexity_window=vqgan.perplexity_from_counts(usage),
                 reseeded_total=state.reseeded_total + reseeded)
        new_state = VQTrainState(step=step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
                                 disc_opt_state=disc_opt_state, usage=usage, last_used=last_used,
                                 reseeded_total=state.reseeded_total + reseeded)
        return new_state, m

    def train_step(self, state: VQTrainState, batch) -> tuple[VQTrainState, dict]:
        with sharding.activate(self.mesh):
            return self._step(state, batch, self.perceptual_weights)

    def _reconstruct_fn(self, params, images):
        recon, q = vqgan.VQGAN(self.vq_config).apply({"params": params}, images)
        recon = jnp.clip(recon, -1.0, 1.0)
        return vqgan.to_uint8(recon, self.vq_config.pixel_scale), vq_losses.psnr(recon, vqgan.normalize_images(images, self.vq_config.pixel_scale))

    def reconstruct(self, params, images_uint8: np.ndarray) -> tuple[np.ndarray, float]:
        """uint8 images (the same on every process) -> (uint8 reconstructions, mean PSNR)."""
        images = jax.make_array_from_process_local_data(self.replicated, np.asarray(images_uint8), images_uint8.shape)
        with sharding.activate(self.mesh):
            recon, psnr = self._reconstruct(params, images)
        return np.asarray(recon.addressable_data(0)), float(np.asarray(psnr.addressable_data(0)))


# ---------------------------------------------------------------------- files beside the checkpoints


def sample_grid(originals: np.ndarray, reconstructions: np.ndarray, per_row: int = 8, pad: int = 2) -> np.ndarray:
    """Rows of originals, each with its reconstructions right below, on a white background."""
    n, h, w, c = originals.shape
    per_row = max(1, min(per_row, n))
    rows = -(-n // per_row)
    grid = np.full((rows * 2 * (h + pad) + pad, per_row * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, per_row)
        x = pad + col * (w + pad)
        for j, image in enumerate((originals[i], reconstructions[i])):
            y = pad + (2 * r + j) * (h + pad)
            grid[y:y + h, x:x + w] = image
    return grid


def write_sample_grid(workdir: str, step: int, originals: np.ndarray, reconstructions: np.ndarray) -> str:
    path = workdir_io.join(workdir, "samples", f"step_{step:06d}.png")
    return image_grid.save_png(path, sample_grid(originals, reconstructions))


# ---------------------------------------------------------------------- the loop


def _held_out(config) -> int:
    """Files a folder holds out of training for the sample grid (`images.make_train_source`)."""
    if not config.get("data", {}).get("image_dir") or config["data"].get("val_image_dir"):
        return 0
    return max(int(config.get("num_sample_images", 0)), 0)


def check_resume_keeps_held_out(workdir: str, config) -> None:
    """A folder's last num_sample_images files are held out of training: resumed with another count
    (or val_image_dir), the training set and so its shuffled order change under the saved data
    position, which `trainer.check_resume_keeps_data_order` (data.* and seed) does not see."""
    saved = lm_trainer.saved_config(workdir)
    if config.get("allow_data_change_on_resume", False) or saved is None:
        return
    if "num_sample_images" in saved and _held_out(saved) != _held_out(config.to_dict()):
        raise ValueError(f"{workdir} holds a checkpoint whose data position belongs to a training set without its last "
                         f"{_held_out(saved)} images (num_sample_images={saved['num_sample_images']}, val_image_dir="
                         f"{saved['data'].get('val_image_dir')!r}); this run holds out {_held_out(config.to_dict())} "
                         "(num_sample_images, data.val_image_dir), which reorders the data: resume with the saved "
                         "values (config.json) or set config.allow_data_change_on_resume=True")


_VQ_FIELDS_FREE_ON_RESUME = ("image_size", "dtype", "commitment_beta")   # the weights mean the same under them


def check_resume_keeps_vq_config(workdir: str, vq_config: vqgan.VQGANConfig) -> None:
    """The saved weights belong to the workdir's vq_config.json: norm, l2_normalize_codes or
    local_encoder leave the parameter shapes alone, so a resume that changed them restored the
    weights into a model computing something else and rewrote vq_config.json (a shape change failed
    inside orbax instead)."""
    if not workdir_io.exists(workdir_io.join(workdir, VQ_CONFIG_FILE)):
        return
    saved = load_vq_config(workdir)
    changed = [f"vq.{f.name}: {getattr(saved, f.name)!r} -> {getattr(vq_config, f.name)!r}"
               for f in dataclasses.fields(saved)
               if f.name not in _VQ_FIELDS_FREE_ON_RESUME and getattr(saved, f.name) != getattr(vq_config, f.name)]
    if changed:
        raise ValueError(f"{workdir} holds a tokenizer trained with other settings ({'; '.join(changed)}): resume "
                         f"with the saved values ({VQ_CONFIG_FILE}) or train in a new workdir")


def _time_is_up(start: float, budget_seconds: float) -> bool:
    if budget_seconds <= 0:
        return False
    up = time.perf_counter() - start >= budget_seconds
    if jax.process_count() > 1:  # every process stops at the same step: process 0's clock decides
        from jax.experimental import multihost_utils
        up = bool(multihost_utils.broadcast_one_to_all(np.asarray(up)))
    return up


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) to config.total_steps (or config.max_train_seconds); returns the last
    logged metrics."""
    start = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh)
    validate_config(config, mesh, jax.process_count())
    trace = metrics.TraceWindow.from_config(config, workdir_io.join(workdir, "tensorboard"))
    t = VQTrainer(config, mesh)
    logging.info("mesh %s; %s VQGAN parameters, %d tokens per image", dict(mesh.shape),
                 f"{sum(x.size for x in jax.tree_util.tree_leaves(t.abstract_state.params)):,}",
                 t.vq_config.tokens_per_image)
    data_iter = image_data.make_train_iterator(config, jax.process_index(), jax.process_count())
    ckpt = checkpointing.CheckpointManager(workdir, save_every_steps=int(config.checkpoint_every_steps),
                                           keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing))
    if ckpt.latest_step() is not None:
        check_resume_keeps_held_out(workdir, config)
        check_resume_keeps_vq_config(workdir, t.vq_config)
    state = lm_trainer.restore_or_init(ckpt, t, data_iter, config, workdir)
    if jax.process_index() == 0:
        save_vq_config(workdir, t.vq_config)

    logger = metrics.MetricsLogger(workdir, stdout_keys=STDOUT_KEYS, rate=("images_per_second", "images/s"),
                                   resumed_step=int(jax.device_get(state.step)))
    val_images = image_data.validation_images(config, int(config.num_sample_images))
    preemption = checkpointing.PreemptionWatcher()
    preempted = False
    total_steps, log_every = int(config.total_steps), int(config.log_every_steps)
    sample_every, budget = int(config.sample_every_steps), float(config.max_train_seconds)

    def write_samples(step_):
        if not len(val_images):   # num_sample_images=0: no grids, no val_psnr
            return
        recon, psnr = t.reconstruct(state.params, val_images)
        if jax.process_index() == 0:
            write_sample_grid(workdir, step_, val_images, recon)
        logger.write(step_, {"val_psnr": psnr}, total_steps)

    step = first_step = int(jax.device_get(state.step))
    last, sampled_at = {}, None
    nonfinite_limit = optimizer.skip_nonfinite_limit(config.optimizer)
    skipped_logged = float(jax.device_get(optimizer.skipped_updates(state.opt_state)[1]))
    timer = metrics.StepTimer()
    try:
        while step < total_steps:
            batch = sharding.global_batch_from_local(next(data_iter), mesh)
            state, step_metrics = trace.run(step + 1, t.train_step, state, batch)
            step += 1
            time_up = _time_is_up(start, budget)   # the last step is logged, whatever its number
            if step % log_every == 0 or step == total_steps or time_up:
                last = metrics.step_record(step_metrics, timer, step, total_steps, {"images_per_second": t.images_per_step},
                                           seconds_left=budget - (time.perf_counter() - start) if budget > 0 else None)
                logger.write(step, last, total_steps)
                skipped_logged = lm_trainer.check_nonfinite(last, step, nonfinite_limit, skipped_logged, ckpt)
            if not timer.started or step % log_every == 0:
                jax.block_until_ready(step_metrics)
                timer.restart(step)
            if sample_every > 0 and step % sample_every == 0:
                write_samples(step)
                sampled_at = step
                timer.restart(step)
            if ckpt.save_or_stop(step, state, data_iter, preemption, logger):
                preempted = True
                break
            if time_up:
                logging.info("max_train_seconds=%g reached at step %d", budget, step)
                break
        if step > first_step and sampled_at != step:
            write_samples(step)
        ckpt.save(step, state, data_iter, force=True)
    finally:
        lm_trainer.close_run(trace, ckpt, logger, preemption)
    if data_iter.skipped:
        logging.warning("images skipped: %s", dict(data_iter.skipped))
    return dict(last, final_step=int(step), preempted=preempted)  # callers (e2e) must not take a stop for an end


# ---------------------------------------------------------------------- public API: the tokenizer


def main(argv):
    del argv
    _lm_cli.run(train)


if __name__ == "__main__":
    app.run(main, flags_parser=config_defaults.parse_flags)
