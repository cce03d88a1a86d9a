"""The training machinery: sharded state creation, the jitted step, and the resumable loop.

`train.py` is the command line around `train()`; `memory_plan.py` reuses `Trainer` to compile the
step on abstract shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

import data_pipeline
from data_pipeline import cm3, mixture
from cm3leon_jax import attention as attn_lib
from cm3leon_jax import (checkpointing, config_defaults, flops, lora, losses, metrics, model as model_lib, optimizer,
                         quantization, sharding, workdir_io)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def validate_config(config, mesh, process_count: int) -> None:
    """Every check that would otherwise fail deep inside XLA, with the field to fix."""
    m, d = config.model, config.data
    batch, dp = int(d.global_batch_size), sharding.data_parallel_size(mesh)
    # counts that must be positive: 0 would divide by zero after the first (compiled) step, or, for
    # keep_checkpoints, have orbax delete every checkpoint, the last one too; checkpoint_every_steps=0
    # (elsewhere 0 means "off") used to save every step
    for name in ("data.global_batch_size", "data.seq_len", "log_every_steps", "keep_checkpoints",
                 "checkpoint_every_steps"):
        value = int(config_defaults.get_field(config, name))
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if not 0 <= float(config.z_loss_weight) < math.inf:   # a negative weight rewards exploding logits
        raise ValueError(f"z_loss_weight={config.z_loss_weight} must be >= 0 and finite (0: no z-loss)")
    if int(config.optimizer.warmup_steps) < 0:
        raise ValueError(f"optimizer.warmup_steps={config.optimizer.warmup_steps} must be >= 0 (0: no warmup)")
    if batch % dp:
        raise ValueError(f"data.global_batch_size={batch} is not divisible by the data-parallel size "
                         f"mesh.data*mesh.fsdp={dp}")
    if batch % process_count:
        raise ValueError(f"data.global_batch_size={batch} is not divisible by the {process_count} processes")
    if dp % process_count:   # each process feeds only its own rows: its devices must not need the others'
        raise ValueError(f"the data-parallel size mesh.data*mesh.fsdp={dp} is not a multiple of the {process_count} "
                         "processes: each process loads only its own rows of the batch, so the batch must be split "
                         "over at least as many devices as processes (keep mesh.tensor within a host)")
    accumulation = accumulation_steps(config)
    if accumulation < 1 or batch % (accumulation * dp):
        raise ValueError(f"gradient_accumulation_steps={accumulation} must be >= 1 and split "
                         f"data.global_batch_size={batch} into microbatches whose rows divide over the "
                         f"data-parallel size mesh.data*mesh.fsdp={dp}")
    if d.get("data_dir") and d.source == "synthetic":   # it never reads one: the run trained on Markov walks
        raise ValueError(f"data.data_dir={d.data_dir!r} is read by data.source='cm3' (data_pipeline.prepare) or "
                         "'sft' (sft_prepare); data.source='synthetic' reads none: set --config.data.source=cm3")
    if d.get("mix_with") and d.source != "cm3":
        raise ValueError(f"data.mix_with mixes prepared cm3 datasets; data.source={d.source!r} has none "
                         "(SFT data is mixed by task: data.sft_task_weights)")
    if m.positions == "learned" and d.seq_len > m.max_length:
        raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_length={m.max_length} (learned positions)")
    model_config = model_lib.TransformerConfig.from_config(m)  # also checks every model field
    _validate_attention(model_config.attention_impl, int(d.seq_len), model_config.resolved_head_dim)
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    for name, size, logical in (("model.num_heads", m.num_heads, "heads"), ("model.d_ff", m.d_ff, "mlp"),
                                ("model.vocab_size", m.vocab_size, "vocab"), ("model.d_model", m.d_model, "embed")):
        sharding.check_divisible(name, int(size), mesh, rules[logical])
    if int(config.total_steps) <= 0:
        raise ValueError(f"total_steps must be positive, got {config.total_steps}")
    if int(config.seed) < 0:
        raise ValueError(f"seed must be >= 0 (NumPy's generators take no negative seed), got {config.seed}")
    eval_every, eval_batches = int(config.get("eval_every_steps", 0)), int(config.get("eval_batches", 1))
    if eval_every < 0 or (eval_every and eval_batches < 1):
        raise ValueError(f"eval_every_steps={eval_every} must be >= 0 (0: no held-out loss) and "
                         f"eval_batches={eval_batches} >= 1 when it is on")
    optimizer.skip_nonfinite_limit(config.optimizer)
    optimizer.grad_clip_norm(config.optimizer)
    optimizer.check_adamw_fields(config.optimizer)
    optimizer.learning_rate_schedule(config.optimizer, int(config.total_steps))   # checks the schedule's fields
    optimizer.warn_if_warmup_outlasts_training(config.optimizer, int(config.total_steps))


def accumulation_steps(config) -> int:
    """Microbatches per step; configs saved before the field existed mean 1."""
    return int(config.get("gradient_accumulation_steps", 1))


def split_microbatches(x: jax.Array, steps: int) -> jax.Array:
    """[rows, ...] -> [steps, rows / steps, ...], microbatch j holding rows j, j + steps, ...: each
    device's contiguous block of rows holds an equal share of every microbatch, so splitting the
    sharded batch moves no data."""
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)


def _validate_attention(impl: str, seq_len: int, head_dim: int, backend: str | None = None) -> None:
    if impl == "xla":
        return
    backend = backend or jax.default_backend()
    if impl == "flash" and backend not in attn_lib.FLASH_BACKENDS:
        raise ValueError(f"model.attention_impl='flash' needs a TPU or an NVIDIA GPU; this backend is {backend}. "
                         f"Use 'xla' here ('splash_interpret'/'triton_interpret' check the kernels' numerics, slowly)")
    kernel, _ = model_lib.flash_kernel_for(impl, backend)
    if kernel == "triton" and head_dim < 16:
        raise ValueError(f"the Triton flash kernel needs head_dim >= 16 (its smallest matrix tile); got {head_dim}")
    if seq_len % attn_lib.FLASH_SEQ_MULTIPLE:
        raise ValueError(f"model.attention_impl={impl!r} tiles the sequence in blocks of "
                         f"{attn_lib.FLASH_SEQ_MULTIPLE}: data.seq_len={seq_len} is not a multiple")


class Trainer:
    """Everything derived from a config and a mesh: the model, optimizer, sharded state and step."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.model_config = model_lib.TransformerConfig.from_config(config.model)
        self.model = model_lib.Transformer(self.model_config)
        # with adapters (model.lora_rank > 0) they are all the optimizer sees and all that is differentiated
        self.adapters_only = self.model_config.lora_rank > 0
        # ... and the frozen weights are kept in the compute dtype when it is narrower: every parameter is
        # cast to it where it is used, so no number changes and their memory halves (bfloat16 over float32)
        compute, stored = jnp.dtype(self.model_config.dtype), jnp.dtype(self.model_config.param_dtype)
        self.frozen_dtype = compute if self.adapters_only and compute.itemsize < stored.itemsize else None
        # ... and with model.lora_base_int8 (QLoRA-style) their projection kernels as int8 + scales
        self.frozen_int8 = self.adapters_only and self.model_config.lora_base_int8
        self.tx, self.schedule = optimizer.make_optimizer(config.optimizer, int(config.total_steps))
        seq_len = int(config.data.seq_len)
        self.tokens_per_step = int(config.data.global_batch_size) * seq_len
        self.flops_per_step = flops.flops_per_token(self.model_config, seq_len) * self.tokens_per_step

        with sharding.activate(mesh):
            boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
            self.state_shardings = sharding.tree_shardings(mesh, boxed)
        self.abstract_state = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.meta.unbox(boxed), self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.accumulation_steps = accumulation_steps(config)
        self.microbatch_sharding = NamedSharding(mesh, PartitionSpec(None, *self.batch_sharding.spec))
        self._init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)), out_shardings=self.state_shardings)
        self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                             out_shardings=(self.state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
        self._eval_sums = jax.jit(self._loss_sums, in_shardings=(self.state_shardings.params, self.batch_sharding),
                                  out_shardings=sharding.replicated(mesh))
        if self.adapters_only:
            frozen_shardings = lora.split(self.state_shardings.params)[1]
            self._store_frozen = jax.jit(self.stored_frozen, out_shardings=frozen_shardings, donate_argnums=(0,))

    def _init_boxed(self, rng) -> TrainState:
        length = int(self.config.data.seq_len)
        tokens = jnp.zeros((1, length), jnp.int32)
        params = self.model.init(rng, tokens)["params"]
        trained, frozen = self.trainable(params)
        if self.adapters_only:
            params = self.whole(trained, self.stored_frozen(frozen))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(trained))

    def stored_frozen(self, frozen):
        """The frozen weights as this run holds them: in the compute dtype when it is narrower, then
        (lora_base_int8) the projection kernels quantized to int8 from that. Boxed or not."""
        if self.frozen_dtype is not None:
            frozen = jax.tree_util.tree_map(lambda x: x.astype(self.frozen_dtype), frozen)
        return quantization.quantize_params(frozen) if self.frozen_int8 else frozen

    @property
    def frozen_float_abstract(self):
        """The frozen weights' ShapeDtypeStructs before int8 quantization (what a checkpoint is
        restored into before `store_frozen`): a kernel's dtype is the other frozen weights'."""
        frozen = lora.split(self.abstract_state.params)[1]
        dtype = self.frozen_dtype or jnp.dtype(self.model_config.param_dtype)
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.values.shape, dtype, sharding=x.values.sharding)
            if quantization.is_int8(x) else x, frozen, is_leaf=quantization.is_int8)

    def store_frozen(self, frozen):
        """`stored_frozen` of restored float weights, in this run's frozen shardings (the float
        tree is donated: with int8 its memory is freed as the kernels are quantized)."""
        with sharding.activate(self.mesh):
            return self._store_frozen(frozen)

    def float_frozen(self, frozen):
        """The frozen weights as float arrays (int8 kernels dequantized: what the adapters trained on).
        Dequantized in the compute dtype, as `Projection` does: in the frozen float dtype instead
        (param_dtype bfloat16 under float32 or float16 compute) the scale was rounded otherwise."""
        return quantization.dequantize_params(frozen, self.model_config.compute_dtype)

    def trainable(self, tree) -> tuple[Any, Any]:
        """(what is trained, what is frozen) of params or a tree shaped like them: the adapters and
        the rest with LoRA, else everything and nothing; `whole` joins them again."""
        return lora.split(tree) if self.adapters_only else (tree, {})

    def whole(self, trained, frozen):
        return lora.join(trained, frozen) if self.adapters_only else trained

    def saved_state(self, state: TrainState) -> TrainState:
        """What a checkpoint holds: with LoRA the adapters and their optimizer state only (a 7B
        model's frozen weights are 28 GB; they are re-read from init_from on resume), else all."""
        return state.replace(params=self.trainable(state.params)[0]) if self.adapters_only else state

    def init_state(self, seed: int) -> TrainState:
        """Created already sharded: each device computes only its own shard of every parameter."""
        with sharding.activate(self.mesh):
            return self._init(jax.random.key(seed))

    def loss_fn(self, params, batch, denominator=None):
        logits = self.model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"],
                                             float(self.config.z_loss_weight), denominator)

    def _gradients(self, params, frozen, batch):
        """(metrics, gradients of `params`) of the whole batch, `frozen` (the rest of the model)
        held constant. With gradient accumulation a scan runs the microbatches one after another,
        each loss divided by the whole batch's token weight, so the float32 sums are the whole
        batch's metrics and gradients, up to rounding."""
        grad_fn = jax.value_and_grad(lambda p, b, d=None: self.loss_fn(self.whole(p, frozen), b, d), has_aux=True)
        steps = self.accumulation_steps
        if steps == 1:
            (_, aux), grads = grad_fn(params, batch)
            return aux, grads
        denominator = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
        micro = self._microbatches(batch)
        grad_shardings = self.trainable(self.state_shardings.params)[0]

        def accumulate(total, microbatch):
            (_, aux), grads = grad_fn(params, microbatch, denominator)
            grads = jax.lax.with_sharding_constraint(
                jax.tree_util.tree_map(lambda t, g: t + g.astype(jnp.float32), total[1], grads), grad_shardings)
            return (jax.tree_util.tree_map(jnp.add, total[0], aux), grads), None

        (_, aux_shape), _ = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), denominator)
        zero = (jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape),
                jax.lax.with_sharding_constraint(
                    jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params), grad_shardings))
        (aux, grads), _ = jax.lax.scan(accumulate, zero, micro)
        return aux, jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)

    def _microbatches(self, batch):
        """The batch as [N, rows / N, ...] microbatches (strided rows: no data moves)."""
        return jax.lax.with_sharding_constraint(
            jax.tree_util.tree_map(lambda x: split_microbatches(x, self.accumulation_steps), batch),
            jax.tree_util.tree_map(lambda _: self.microbatch_sharding, batch))

    def _loss_sums(self, params, batch):
        """(summed cross-entropy, token weight) of a batch, forward only, a microbatch at a time
        (the whole batch's logits may not fit where its gradients needed accumulation)."""
        def add(total, microbatch):
            _, aux = self.loss_fn(params, microbatch, denominator=1.0)
            return (total[0] + aux["loss"], total[1] + aux["num_tokens"]), None

        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        return jax.lax.scan(add, zero, self._microbatches(batch))[0]

    def evaluate(self, params, batches) -> dict[str, float]:
        """Mean held-out loss per token over `batches` (global arrays on the mesh)."""
        total, tokens = 0.0, 0.0
        with sharding.activate(self.mesh):
            for batch in batches:
                loss_sum, weight = jax.device_get(self._eval_sums(params, batch))
                total, tokens = total + float(loss_sum), tokens + float(weight)
        return {"eval_loss": total / max(tokens, 1.0), "eval_tokens": tokens}

    def _train_step(self, state: TrainState, batch):
        trained, frozen = self.trainable(state.params)
        aux, grads = self._gradients(trained, frozen, batch)
        _, skipped_before = optimizer.skipped_updates(state.opt_state)
        updates, opt_state = self.tx.update(grads, state.opt_state, trained)
        params = self.whole(optax.apply_updates(trained, updates), frozen)   # a skipped update is zeros: params unchanged
        streak, skipped = optimizer.skipped_updates(opt_state)
        # the optimizer's schedule counts applied updates only
        aux = dict(aux, grad_norm=optax.tree.norm(grads), learning_rate=self.schedule(state.step - skipped_before),
                   nonfinite_streak=streak, skipped_steps=skipped,
                   # share of the step's positions holding a document (the rest is padding): tokens/s counts both
                   packed_fraction=jnp.mean((batch["segment_ids"] > 0).astype(jnp.float32)))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), aux

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        with sharding.activate(self.mesh):
            return self._step(state, batch)

    def lower_train_step(self):
        """The step lowered on abstract shapes only (used by memory_plan: nothing is allocated)."""
        rows, length = int(self.config.data.global_batch_size), int(self.config.data.seq_len)
        batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.float32 if k == "weights" else jnp.int32,
                                         sharding=self.batch_sharding) for k in data_pipeline.BATCH_KEYS}
        with sharding.activate(self.mesh):
            return self._step.lower(self.abstract_state, batch)


def _truncate_metrics(workdir: str, last_step: int) -> None:
    """On resume, drop records past the checkpoint so metrics.jsonl reads as one clean run."""
    path = workdir_io.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not workdir_io.exists(path):
        return
    kept = []
    for line in workdir_io.read_text(path).splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:   # a line torn by a crash mid-write (host lost, disk full): past the checkpoint anyway
            logging.warning("metrics.jsonl: dropped an unreadable line: %r", line[:80])
            continue
        if record is not None and record["step"] <= last_step:
            kept.append(line + "\n")   # every line ends a record, so the next one appended starts its own
    workdir_io.write_text(path, "".join(kept))


def _save_vocabulary(config, workdir: str) -> None:
    """The data's vocabulary travels with the checkpoints, so a model is never paired with
    another vocabulary (a resumed run on re-tokenized data fails here, not silently)."""
    if config.data.source not in ("cm3", "sft"):
        return
    from cm3leon_jax import vocab as vocab_lib
    from data_pipeline import prepare
    data_vocab = vocab_lib.Vocabulary.load(os.path.join(config.data.data_dir, prepare.VOCAB_DIR))
    target = workdir_io.join(workdir, prepare.VOCAB_DIR)
    if vocab_lib.Vocabulary.saved_in(target):
        vocab_lib.Vocabulary.load(target).check_compatible(data_vocab)
    else:
        data_vocab.save(target)


# Model fields that change how the step runs, not the parameters: free to differ from init_from's.
_RUNTIME_MODEL_FIELDS = ("dtype", "remat_policy", "attention_block_size", "attention_impl")
# Adapters come and go on top of the same base weights: fine-tune with LoRA from a full run, or from
# a LoRA run (its adapters are merged into its kernels first).
_ADAPTER_MODEL_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_base_int8")


def saved_config(workdir: str) -> dict | None:
    """A workdir's config.json (the settings its run saved with) as a dict; None when it has none."""
    path = workdir_io.join(workdir_io.resolve(workdir), "config.json")
    return json.loads(workdir_io.read_text(path)) if workdir_io.exists(path) else None


def pretrained_config(workdir: str) -> dict:
    """A training workdir's (or an `import_hf` workdir's) config.json as a dict, checked to have a
    model section: what a fine-tuning config takes its model from (experiments/sft_tiny.py:DIR)."""
    config = saved_config(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir!r} is not a training workdir (no config.json)")
    if not isinstance(config.get("model"), dict) or not config["model"]:
        raise ValueError(f"{workdir_io.join(workdir_io.resolve(workdir), 'config.json')} has no model section")
    return config


def _model_as_read(model: dict) -> dict:
    """A model section as `TransformerConfig.from_config` reads it: a field that a run's config.json
    predates takes its default, as when that run's checkpoints are restored (restore_run_params)."""
    defaults = {f.name: f.default for f in dataclasses.fields(model_lib.TransformerConfig)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **model}


def init_from_pretrained(config, trainer, workdir: str, fresh_params=None):
    """Parameters of `config.init_from`'s latest checkpoint, sharded like this run's (the optimizer
    state and step stay fresh: fine-tuning starts at step 0), with this run's adapters, if any,
    from `fresh_params`. The architecture and the vocabulary must be the pretrained run's; any
    difference is a ValueError naming it."""
    source = workdir_io.resolve(config.init_from)
    try:
        theirs = pretrained_config(source)["model"]
    except FileNotFoundError:
        raise FileNotFoundError(f"config.init_from={config.init_from!r} is not a training workdir (no config.json)") from None
    mine, theirs = _model_as_read(config.model.to_dict()), _model_as_read(theirs)
    diff = sorted(k for k in set(mine) | set(theirs)
                  if k not in _RUNTIME_MODEL_FIELDS + _ADAPTER_MODEL_FIELDS
                  and json.dumps(mine.get(k)) != json.dumps(theirs.get(k)))
    if diff:
        raise ValueError("config.init_from: the model differs from the pretrained one in " + "; ".join(
            f"model.{k}={mine.get(k)!r} vs {theirs.get(k)!r}" for k in diff) + ". To fine-tune with the pretrained "
            f"model's architecture, name the workdir as the config's argument (--config experiments/sft_tiny.py:"
            f"{config.init_from}), which takes its model section and sets init_from")
    if config.data.source in ("cm3", "sft"):
        from cm3leon_jax import vocab as vocab_lib
        from data_pipeline import prepare
        pretrained_vocab = workdir_io.join(source, prepare.VOCAB_DIR)
        if not vocab_lib.Vocabulary.saved_in(pretrained_vocab):
            raise ValueError(f"config.init_from={config.init_from!r} has no vocabulary ({pretrained_vocab}): it was not "
                             "trained on tokenized data, so its ids cannot be matched with data.data_dir's")
        data_vocab = vocab_lib.Vocabulary.load(os.path.join(config.data.data_dir, prepare.VOCAB_DIR))
        try:
            vocab_lib.Vocabulary.load(pretrained_vocab).check_compatible(data_vocab)
        except ValueError as e:
            how = (f"--config.vocab_dir={pretrained_vocab}" if config.data.source == "sft" else
                   f"--config.spm_model={os.path.join(pretrained_vocab, 'spm.model')} and the pretrained data's "
                   "--config.vq_workdir")
            raise ValueError(f"the vocabulary of data.data_dir={config.data.data_dir!r} is not the one of "
                             f"config.init_from={config.init_from!r}: {e}. Prepare the data with that run's vocabulary "
                             f"({how})") from None
    params, step = pretrained_weights(source, None, trainer)
    if trainer.adapters_only:   # this run's adapters start fresh (B = 0: the pretrained model's outputs)
        fresh_params = trainer.init_state(int(config.seed)).params if fresh_params is None else fresh_params
        params = lora.join(lora.split(fresh_params)[0], params)
        logging.info("LoRA: training %s adapter parameters of %s", *(f"{n:,}" for n in lora.count(params)))
    logging.info("initialised parameters from %s step %d (optimizer fresh, step 0)", source, step)
    if jax.process_index() == 0:
        workdir_io.write_text(workdir_io.join(workdir, INIT_FROM_FILE),
                              json.dumps({"workdir": source, "step": int(step)}, indent=2))
    return params


INIT_FROM_FILE = "init_from.json"   # where a fine-tuning run started: {"workdir": ..., "step": ...}


def init_from_record(workdir: str) -> dict | None:
    """{"workdir": ..., "step": ...}: the checkpoint a fine-tuning run started from, or None."""
    path = workdir_io.join(workdir, INIT_FROM_FILE)
    return json.loads(workdir_io.read_text(path)) if workdir_io.exists(path) else None


def pretrained_weights(source: str, step: int | None, trainer):
    """(params, step) of the training workdir `source` at `step` (None: its latest), as `trainer`'s
    frozen (non-adapter) parameters in its shardings; a LoRA run's adapters merged into its weights."""
    abstract = trainer.abstract_state.params
    base_abstract = trainer.frozen_float_abstract if trainer.adapters_only else abstract
    theirs = ml_collections.ConfigDict(pretrained_config(source))
    if not int(theirs.model.get("lora_rank", 0)):
        params, step = checkpointing.restore_params(source, base_abstract, step)
    else:
        params, step = restore_run_params(source, theirs, trainer.mesh, step)
        logging.info("merged the LoRA adapters of %s (rank %d) into its weights", source, int(theirs.model.lora_rank))
        params = lora.merge_params_like(params, int(theirs.model.lora_rank), float(theirs.model.lora_alpha), base_abstract)
    return (trainer.store_frozen(params) if trainer.frozen_int8 else params), step


def restore_run_params(workdir: str, config, mesh, step: int | None = None):
    """(params, step) of a training run's checkpoint, whole, in `config`'s shardings on `mesh`. A
    LoRA run's checkpoints hold its adapters only; its frozen weights are re-read from where it
    started (`frozen_weights`); an int8 frozen base comes back dequantized, as its adapters saw it.
    Generation, export and init_from read LoRA runs through this."""
    t = Trainer(config, mesh)
    if not t.adapters_only:
        return checkpointing.restore_params(workdir, t.abstract_state.params, step)
    adapters, step = checkpointing.restore_params(workdir, lora.split(t.abstract_state.params)[0], step)
    return lora.join(adapters, t.float_frozen(frozen_weights(config, t, workdir))), step


def frozen_weights(config, trainer, workdir: str):
    """A LoRA run's frozen weights: its init_from.json's workdir at that step (a LoRA run's merged
    in turn, so fine-tuning stages stack), else its seed's initialisation."""
    record = init_from_record(workdir)
    if record is None:
        return lora.split(trainer.init_state(int(config.seed)).params)[1]
    record_path = workdir_io.join(workdir, INIT_FROM_FILE)
    try:
        return pretrained_weights(record["workdir"], int(record["step"]), trainer)[0]
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{workdir} is a LoRA run: its checkpoints hold the adapters only, on top of the frozen weights of "
            f"{record['workdir']} at step {record['step']} ({record_path}), which cannot be read: {e}. Restore that "
            f"checkpoint, or point {INIT_FROM_FILE} at a copy of it") from None


# data fields a resumed run may change: where the data lives (a dataset moved to another disk) and
# image-decoding threads, which keep the order. Every other data field, and the seed, fix the order.
_DATA_FIELDS_FREE_ON_RESUME = ("data_dir", "image_dir", "val_image_dir", "num_threads")


def _mix_weights(spec):
    """data.mix_with as its weights in order: its directories may move, as data_dir may; the weights
    and their order fix the data order."""
    try:
        return [weight for _, weight in mixture.parse_weights(spec or "", what="DIR")]
    except ValueError:   # malformed: compared as written (the data pipeline names the error)
        return spec


# data fields compared by what fixes the order rather than as written
_DATA_FIELDS_COMPARED_AS = {"mix_with": _mix_weights}


def check_resume_keeps_data_order(workdir: str, config) -> None:
    """A checkpoint's data position counts batches of the saved run's data order: resumed under
    another seed, batch size, sequence length or mixture, it points into a different order, and the
    run would silently repeat some documents and skip others. Such changes are refused (the
    saved config.json holds the run's settings), unless config.allow_data_change_on_resume."""
    saved = saved_config(workdir)
    if config.get("allow_data_change_on_resume", False) or saved is None:
        return
    current = json.loads(config.to_json_best_effort())
    pairs = [("seed", saved.get("seed"), current.get("seed"))]
    saved_data, current_data = saved.get("data") or {}, current.get("data") or {}
    for k in sorted(saved_data):   # (a field the saved run did not know yet is not compared)
        if k not in _DATA_FIELDS_FREE_ON_RESUME and saved_data[k] is not None:
            as_compared = _DATA_FIELDS_COMPARED_AS.get(k, lambda value: value)
            pairs.append((f"data.{k}", as_compared(saved_data[k]), as_compared(current_data.get(k))))
    changed = [f"{name}: {old!r} -> {new!r}" for name, old, new in pairs if old is not None and old != new]
    if changed:
        raise ValueError(f"{workdir} holds a checkpoint whose data position belongs to its saved settings, and this "
                         f"run changes them ({'; '.join(changed)}): resuming would silently repeat and skip data. "
                         "Resume with the saved values (config.json), start a new workdir (an LM run can take "
                         "this one's weights with config.init_from), or set config.allow_data_change_on_resume=True")


def check_resume_keeps_adapters(workdir: str, config) -> None:
    """A LoRA run's checkpoint holds adapters trained at its saved lora_alpha (their scale) on its
    saved frozen base (lora_base_int8): resumed under other values, the same adapters would silently
    compute another model (rank and targets change the adapters' shapes: orbax refuses those)."""
    saved = saved_config(workdir)
    if saved is None:
        return
    saved = _model_as_read(saved.get("model") or {})
    current = _model_as_read(config.model.to_dict())
    changed = [f"model.{k}: {saved[k]!r} -> {current[k]!r}" for k, kind in (("lora_alpha", float), ("lora_base_int8", bool))
               if kind(saved[k]) != kind(current[k])]
    if changed:
        raise ValueError(f"{workdir} holds LoRA adapters trained with its saved settings, and this run changes them "
                         f"({'; '.join(changed)}): resumed, the adapters would compute another model. Resume with the "
                         "saved values (config.json), or start a new workdir with config.init_from set to this one")


def restore_or_init(ckpt, trainer, data_iter, config, workdir: str):
    """The workdir's latest checkpoint (model and data position) if any, else fresh sharded state;
    config.json is (re)written either way. Shared by the LM and VQ trainers."""
    latest = ckpt.latest_step()
    adapters_only = getattr(trainer, "adapters_only", False)   # (the VQ trainer has none)
    if latest is not None:
        check_resume_keeps_data_order(workdir, config)
        logging.info("resuming from step %d in %s", latest, ckpt.directory)
        if adapters_only:   # the checkpoint holds the adapters and their optimizer; the frozen weights are re-read
            check_resume_keeps_adapters(workdir, config)
            state = ckpt.restore(latest, trainer.saved_state(trainer.abstract_state), data_iter)
            state = state.replace(params=lora.join(state.params, frozen_weights(config, trainer, workdir)))
        else:
            state = ckpt.restore(latest, trainer.abstract_state, data_iter)
        _truncate_metrics(workdir, latest)
    else:   # a run killed before its first checkpoint starts over: its records (and a line it tore) go too
        _truncate_metrics(workdir, 0)
        state = trainer.init_state(int(config.seed))
        if config.get("init_from"):
            state = state.replace(params=init_from_pretrained(config, trainer, workdir, state.params))
        elif adapters_only:
            logging.warning("model.lora_rank=%d without config.init_from: adapters on a frozen, randomly "
                            "initialised model", trainer.model_config.lora_rank)
    if jax.process_index() == 0:
        workdir_io.write_text(workdir_io.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    return state


def check_nonfinite(record: dict, step: int, limit: int, skipped_before: float, ckpt) -> float:
    """At a logged step (after its record is written): a warning when the non-finite guard skipped
    updates since the last log; a FloatingPointError (the parameters still finite) once more than
    `limit` were skipped in a row. Returns the skipped total, for the next call. Both trainers."""
    skipped = record.get("skipped_steps", 0.0)
    if limit and record.get("nonfinite_streak", 0.0) > limit:
        raise FloatingPointError(
            f"the gradients were NaN or inf for the last {int(record['nonfinite_streak'])} steps, up to step {step} "
            f"(more than optimizer.skip_nonfinite={limit}; loss {record.get('loss')}): their updates were skipped and the "
            f"run stops here. The last checkpoint is step {ckpt.latest_step()}; resume from it with a lower "
            "optimizer.peak_lr, a longer optimizer.warmup_steps or a z_loss_weight, or check the data")
    if skipped > skipped_before:
        logging.warning("step %d: %d update(s) with NaN/inf gradients skipped since the last log (%d in all)",
                        step, int(skipped - skipped_before), int(skipped))
    return skipped


def close_run(trace, ckpt, *others) -> None:
    """Ends a run of either trainer, also on an error: pending checkpoint writes finish, the trace and
    records reach the workdir. A failed async save raises from `ckpt.close()`; `others` (the logger's
    last records, data workers, the preemption watcher giving SIGTERM back) are closed all the same."""
    try:
        trace.close()
        ckpt.close()
    finally:
        for thing in others:
            thing.close()


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) to config.total_steps; returns the last logged metrics."""
    mesh = sharding.make_mesh(config.mesh)
    validate_config(config, mesh, jax.process_count())
    trace = metrics.TraceWindow.from_config(config, workdir_io.join(workdir, "tensorboard"))
    trainer = Trainer(config, mesh)
    adapter_count, param_count = lora.count(trainer.abstract_state.params)
    logging.info("mesh %s; %s parameters%s; %d rows a step in %d microbatch(es)", dict(mesh.shape), f"{param_count:,}",
                 f" ({adapter_count:,} in LoRA adapters, the only ones trained)" if trainer.adapters_only else "",
                 int(config.data.global_batch_size), trainer.accumulation_steps)
    data_iter = data_pipeline.make_train_iterator(config, jax.process_index(), jax.process_count())
    eval_every = int(config.get("eval_every_steps", 0))
    eval_sets = {suffix: [sharding.global_batch_from_local(b, mesh) for b in
                          data_pipeline.make_eval_batches(set_config, jax.process_index(), jax.process_count())]
                 for suffix, set_config in data_pipeline.heldout_sets(config)} if eval_every else {}
    ckpt = checkpointing.CheckpointManager(workdir, save_every_steps=int(config.checkpoint_every_steps),
                                           keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing))
    state = restore_or_init(ckpt, trainer, data_iter, config, workdir)
    if jax.process_index() == 0:
        _save_vocabulary(config, workdir)

    step = int(jax.device_get(state.step))
    logger = metrics.MetricsLogger(workdir, resumed_step=step)
    peak, peak_source = flops.peak_flops()
    logging.info("MFU peak: %.3g FLOP/s (%s)", peak, peak_source)
    per_step = {"tokens_per_second": trainer.tokens_per_step}
    if math.isfinite(peak):   # an unknown device's MFU is left out: a NaN in every record is no valid JSON
        per_step["mfu"] = trainer.flops_per_step / peak
    preemption = checkpointing.PreemptionWatcher()
    preempted = False
    total_steps, log_every = int(config.total_steps), int(config.log_every_steps)
    nonfinite_limit = optimizer.skip_nonfinite_limit(config.optimizer)
    last, skipped_logged = {}, float(jax.device_get(optimizer.skipped_updates(state.opt_state)[1]))
    timer = metrics.StepTimer()
    try:
        while step < total_steps:
            batch = sharding.global_batch_from_local(next(data_iter), mesh)
            state, step_metrics = trace.run(step + 1, trainer.train_step, state, batch)
            step += 1
            evaluating = bool(eval_every) and (step % eval_every == 0 or step == total_steps)
            if step % log_every == 0 or step == total_steps or evaluating:
                last = metrics.step_record(step_metrics, timer, step, total_steps, per_step)
                last["tokens_seen"] = float(step * trainer.tokens_per_step)   # the x-axis to compare runs of other batch sizes
                if "tokens_per_second" in last:   # document tokens only, at the logged step's packing
                    last["document_tokens_per_second"] = last["tokens_per_second"] * last["packed_fraction"]
                # documents that fit no row so far (this process's streams; batches prefetched count too)
                last["packer_skipped"] = float(sum(n for reason, n in data_iter.skipped.items()
                                                   if reason != cm3.NEIGHBOURS_CUT))
                # sampled neighbours dropped so that examples fit data.seq_len: retrieval lost, not documents
                last["neighbours_cut"] = float(data_iter.skipped.get(cm3.NEIGHBOURS_CUT, 0))
                if evaluating:   # after the step's timing, and the timer restarts after it: not counted as training
                    for suffix, batches in eval_sets.items():
                        last.update({k + suffix: v for k, v in trainer.evaluate(state.params, batches).items()})
                logger.write(step, last, total_steps)
                skipped_logged = check_nonfinite(last, step, nonfinite_limit, skipped_logged, ckpt)
            if not timer.started or step % log_every == 0 or evaluating:
                jax.block_until_ready(step_metrics)
                timer.restart(step)
            if ckpt.save_or_stop(step, trainer.saved_state(state), data_iter, preemption, logger):
                preempted = True
                break
        ckpt.save(step, trainer.saved_state(state), data_iter, force=True)
    finally:
        close_run(trace, ckpt, logger, data_iter, preemption)
    if data_iter.skipped:
        logging.warning("documents skipped by the packer, and neighbours cut to fit data.seq_len: %s",
                        dict(data_iter.skipped))
    return dict(last, final_step=int(step), preempted=preempted)  # callers (e2e) must not take a stop for an end
