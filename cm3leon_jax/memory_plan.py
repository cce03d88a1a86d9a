"""Per-device memory of a config on a mesh, before launching: nothing is allocated.

    python -m cm3leon_jax.memory_plan --config experiments/cm3leon_7b.py --num_devices 64 \
        [--config.mesh.fsdp=64 --config.mesh.data=1] [--device_memory_gib 95]

Parameters and optimizer state are counted exactly from their shardings; activations and other
temporaries come from XLA's memory analysis of the train step compiled on abstract shapes for
`num_devices` host devices (the CPU compiler's fusion differs from TPU/GPU, so treat the
activation figure as an estimate). A config with `model.attention_impl=flash` is planned with the
TPU splash kernel run by Pallas's interpreter: its block buffers, not the [l, l] scores
(CM3Leon-350M, one 4,096-token row per device: 6.3 GiB of temporaries against 8.0 GiB).
"""
from __future__ import annotations

import copy
import json
import math

from absl import app, flags
from ml_collections import config_flags

from cm3leon_jax import config_defaults



def _define_flags() -> None:
    """Only when run as a program: importing `plan` must not clash with other CLIs' flags."""
    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_integer("num_devices", None, "devices in the target slice (simulated on the host CPU)")
    flags.DEFINE_float("device_memory_gib", None, "memory of one device, to print whether the plan fits")

GIB = 1024 ** 3


def per_device_bytes(abstract_tree) -> int:
    import jax
    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def step_temporaries_bytes(trainer) -> int:
    """Activations and other temporaries of the compiled train step per device (XLA's account)."""
    analysis = trainer.lower_train_step().compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0


def plan(config) -> dict[str, float]:
    import jax
    from cm3leon_jax import attention, lora, sharding, trainer as trainer_lib
    planned_attention = config.model.get("attention_impl", "xla")
    if planned_attention == "flash" and jax.default_backend() not in attention.FLASH_BACKENDS:  # no kernel here
        config = copy.deepcopy(config)
        config.model.attention_impl = planned_attention = "splash_interpret"
    mesh = sharding.make_mesh(config.mesh)
    trainer_lib.validate_config(config, mesh, process_count=1)
    trainer = trainer_lib.Trainer(config, mesh)
    params = per_device_bytes(trainer.abstract_state.params)
    opt_state = per_device_bytes(trainer.abstract_state.opt_state)
    temp = step_temporaries_bytes(trainer)
    n_trained, n_params = lora.count(trainer.abstract_state.params)
    return {"num_devices": len(mesh.devices.flat), "mesh": dict(mesh.shape), "num_params": int(n_params),
            "num_trained_params": int(n_trained if trainer.adapters_only else n_params),
            "attention": planned_attention, "gradient_accumulation_steps": trainer.accumulation_steps,
            "rows_per_device_per_microbatch": int(config.data.global_batch_size) // sharding.data_parallel_size(mesh)
                                              // trainer.accumulation_steps,
            "params_gib": params / GIB, "optimizer_state_gib": opt_state / GIB,
            "activations_and_temporaries_gib": temp / GIB, "total_gib": (params + opt_state + temp) / GIB}


def fit_hint(result: dict, device_memory_gib: float) -> str | None:
    """What to change when the plan does not fit: the temporaries scale with the rows a device holds
    at a time, so the smallest gradient_accumulation_steps whose microbatch would leave room for them
    (assuming that scaling: re-plan with it); else what shrinks the parameters or temporaries."""
    if result["total_gib"] <= device_memory_gib:
        return None
    fixed = result["params_gib"] + result["optimizer_state_gib"]
    if fixed >= device_memory_gib:
        return (f"parameters and optimizer state alone take {fixed:.1f} GiB per device: spread them over more "
                "devices (mesh.fsdp), or train LoRA adapters (model.lora_rank, model.lora_base_int8)")
    rows, steps = int(result["rows_per_device_per_microbatch"]), int(result["gradient_accumulation_steps"])
    needed = result["activations_and_temporaries_gib"] / (device_memory_gib - fixed)
    split = next((d for d in range(1, rows + 1) if rows % d == 0 and d >= needed), None)
    if split is None:
        return (f"even one row per device needs about {result['activations_and_temporaries_gib'] / rows:.1f} GiB of "
                "temporaries: model.remat_policy (e.g. full), model.attention_impl=flash, or more mesh.tensor")
    return (f"--config.gradient_accumulation_steps={steps * split} ({rows // split} rows per device at a time) "
            f"leaves room for the temporaries if they shrink with the rows; re-plan with it (model.remat_policy "
            "and model.attention_impl=flash shrink them too)")


def main(argv):
    del argv
    import jax
    if flags.FLAGS.config is None:   # else an AttributeError on None deep inside plan()
        raise app.UsageError("--config is required")
    # 0 or below were ignored (a plan for this host's devices) or silently planned one device
    if flags.FLAGS.num_devices is not None and flags.FLAGS.num_devices < 1:
        raise app.UsageError(f"--num_devices={flags.FLAGS.num_devices} must be >= 1")
    if flags.FLAGS.device_memory_gib is not None and not flags.FLAGS.device_memory_gib > 0:
        raise app.UsageError(f"--device_memory_gib={flags.FLAGS.device_memory_gib} must be > 0")
    if flags.FLAGS.num_devices:
        jax.config.update("jax_num_cpu_devices", flags.FLAGS.num_devices)
        jax.config.update("jax_platforms", "cpu")
    result = plan(flags.FLAGS.config)
    for key in ("params_gib", "optimizer_state_gib", "activations_and_temporaries_gib", "total_gib"):
        print(f"{key:>34}: {result[key]:10.3f} GiB per device")
    print(f"{'parameters':>34}: {result['num_params']:,} on mesh {result['mesh']}"
          + (f" ({result['num_trained_params']:,} trained: LoRA adapters)"
             if result['num_trained_params'] < result['num_params'] else ""))
    print(f"{'rows per device at a time':>34}: {result['rows_per_device_per_microbatch']} "
          f"({result['gradient_accumulation_steps']} microbatch(es) a step)")
    if flags.FLAGS.device_memory_gib:
        result["fits"] = result["total_gib"] <= flags.FLAGS.device_memory_gib
        print(f"{'fits in':>34}: {flags.FLAGS.device_memory_gib} GiB -> {'yes' if result['fits'] else 'NO'}")
        hint = fit_hint(result, flags.FLAGS.device_memory_gib)
        if hint:
            result["hint"] = hint
            print(f"{'try':>34}: {hint}")
    print(json.dumps(result))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=config_defaults.parse_flags)
