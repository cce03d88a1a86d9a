"""Train-step speed: tokens/s, model TFLOP/s and MFU for the tiny and a small config.

    python bench/train_step.py [--configs tiny,small,long] [--steps 5] [--variants default,dense,flash,bf16_flash,accum4,noguard,lora16,lora16_int8,...]

MFU on CPU is against the host's float32 matmul peak measured in the same run (side by side, as
timings swing with machine load); on accelerators against the device table in flops.py. The last
line printed is one JSON object with every figure, each with `temp_bytes`: the compiled step's
activations and temporaries per device (what the flash kernels save at `long`, 4,096 tokens a row),
and `state_bytes`: parameters and optimizer state per device (what LoRA saves).
A variant the backend cannot run (flash on a CPU) is reported with its reason.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list("configs", ["tiny", "small"], "which configs to time")
flags.DEFINE_list("variants", ["default"], "model variants: " + ", ".join(
    ["default", "dense (no blockwise attention)", "remat", "bf16", "flash (Pallas kernel: TPU/GPU)", "bf16_flash",
     "accum4 (the global batch in 4 microbatches)", "noguard (no non-finite update guard)",
     "lora16 (LoRA rank 16: adapters trained, the model frozen)", "lora16_int8 (its frozen kernels in int8)",
     "bf16_lora16", "bf16_lora16_int8"]))
flags.DEFINE_integer("steps", 5, "timed steps per config (after 2 warm-up steps)", lower_bound=1)

import jax  # noqa: E402

import data_pipeline  # noqa: E402
from bench import flag_checks  # noqa: E402
from cm3leon_jax import flops, memory_plan, sharding, trainer  # noqa: E402
from cm3leon_jax.config_defaults import base_config, set_field  # noqa: E402
from experiments import tiny_cpu  # noqa: E402


def small_config():
    """The issue's yardstick: d=512, 8 layers, seq 1024."""
    config = base_config()
    config.model.update(vocab_size=8192, num_layers=8, d_model=512, num_heads=8, d_ff=2048, max_length=1024,
                        attention_block_size=256)
    config.data.update(seq_len=1024, global_batch_size=4, min_doc_length=256, max_doc_length=1024)
    return config


def long_config():
    """small at Chameleon's row length: where the [b, h, l, l] attention scores dominate memory."""
    config = small_config()
    config.model.max_length = 4096
    config.data.update(seq_len=4096, global_batch_size=1, max_doc_length=4096)
    return config


CONFIGS = {"tiny": tiny_cpu.get_config, "small": small_config, "long": long_config}
FLASH = {"model.attention_block_size": 0, "model.attention_impl": "flash"}
VARIANTS = {   # config field -> value
    "default": {},
    "dense": {"model.attention_block_size": 0},
    "remat": {"model.remat_policy": "full"},
    "bf16": {"model.dtype": "bfloat16"},
    "flash": FLASH,
    "bf16_flash": dict(FLASH, **{"model.dtype": "bfloat16"}),
    "accum4": {"gradient_accumulation_steps": 4},   # the same global batch in 4 microbatches, one update
    "noguard": {"optimizer.skip_nonfinite": 0},     # without the NaN/inf update guard (default: on)
    "lora16": {"model.lora_rank": 16},              # rank-16 LoRA adapters on every projection, the rest frozen
    "lora16_int8": {"model.lora_rank": 16, "model.lora_base_int8": True},   # ... the frozen kernels in int8
    "bf16_lora16": {"model.dtype": "bfloat16", "model.lora_rank": 16},
    "bf16_lora16_int8": {"model.dtype": "bfloat16", "model.lora_rank": 16, "model.lora_base_int8": True},
}
flag_checks.name_list("configs", CONFIGS)
flag_checks.name_list("variants", VARIANTS)


def time_config(config, steps: int) -> dict[str, float]:
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(config.mesh)
    trainer.validate_config(config, mesh, jax.process_count())
    t = trainer.Trainer(config, mesh)
    state = t.init_state(0)
    batch = sharding.global_batch_from_local(next(data_pipeline.make_train_iterator(config, 0, 1)), mesh)
    for _ in range(2):
        state, m = t.train_step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = t.train_step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    result = {"step_time_s": step_time, "tokens_per_second": t.tokens_per_step / step_time,
              "model_tflops_per_second": t.flops_per_step / step_time / 1e12}
    result["temp_bytes"] = memory_plan.step_temporaries_bytes(t)  # the compiler's own account, per variant
    result["state_bytes"] = memory_plan.per_device_bytes(t.abstract_state)
    return result


def main(argv):
    flag_checks.no_arguments(argv)
    peak, source = flops.peak_flops()
    results = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
               "peak_flops": peak, "peak_source": source}
    for name in flags.FLAGS.configs:
        for variant in flags.FLAGS.variants:
            config = CONFIGS[name]()
            for field, value in VARIANTS[variant].items():
                set_field(config, field, value)
            key = name if variant == "default" else f"{name}_{variant}"
            try:
                r = time_config(config, flags.FLAGS.steps)
            except ValueError as e:  # checked up front (validate_config): this backend cannot run it
                results[key] = {"skipped": str(e)}
                print(f"{key:>14}: skipped: {e}", flush=True)
                continue
            r["mfu"] = r["model_tflops_per_second"] * 1e12 / peak
            results[key] = r
            print(f"{key:>14}: {r['tokens_per_second']:10,.0f} tokens/s  {r['model_tflops_per_second'] * 1e3:8.1f} "
                  f"GFLOP/s  MFU {100 * r['mfu']:5.1f}%  (step {r['step_time_s'] * 1e3:.0f} ms, "
                  f"temporaries {r.get('temp_bytes', 0) / 2**20:,.0f} MiB, state {r['state_bytes'] / 2**20:,.0f} MiB)", flush=True)
    # the peak again after the runs: a drift between the two shows the machine was not quiet
    flops.measured_cpu_matmul_flops.cache_clear()
    if jax.devices()[0].platform == "cpu":
        results["peak_flops_after"] = flops.measured_cpu_matmul_flops()
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
