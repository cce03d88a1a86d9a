import json

import numpy as np

from cm3leon_jax import memory_plan
from tests.helpers import run_cli, tiny_config


def test_plan_counts_sharded_bytes_exactly():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    plan = memory_plan.plan(config)
    m = config.model
    pos = m.max_length * m.d_model
    total = plan["num_params"]
    # every parameter is split over fsdp x tensor = 4 devices except positions (fsdp only)
    expected = ((total - pos) / 4 + pos / 2) * 4 / 2 ** 30
    np.testing.assert_allclose(plan["params_gib"], expected, rtol=1e-9)
    np.testing.assert_allclose(plan["optimizer_state_gib"], 2 * expected, rtol=1e-3)  # Adam mu + nu
    assert plan["activations_and_temporaries_gib"] > 0
    assert plan["total_gib"] > plan["params_gib"] + plan["optimizer_state_gib"]


def test_cli_simulates_a_larger_slice_without_allocating():
    # no XLA_FLAGS from the test session: the 16 devices are the tool's own
    out = run_cli("cm3leon_jax.memory_plan", "--config", "experiments/tiny_cpu.py", "--num_devices", "16",
                  "--config.mesh.data=4", "--config.mesh.fsdp=4", "--device_memory_gib", "0.001", num_devices=None)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_devices"] == 16 and result["mesh"] == {"data": 4, "fsdp": 4, "tensor": 1}
    assert result["fits"] is False and "NO" in out.stdout
    assert result["gradient_accumulation_steps"] == 1 and result["rows_per_device_per_microbatch"] == 1   # 16 rows, 16 devices


def test_the_step_on_a_three_axis_mesh_compiles_without_replicating_activations():
    """The embedding lookups gathered from tables split over fsdp, so their [b, l, d] output was split
    over d and XLA replicated it to reach the batch sharding ("Involuntary full rematerialization",
    logged once per compile: the persistent cache is off so the step is really compiled here)."""
    out = run_cli("cm3leon_jax.memory_plan", "--config", "experiments/tiny_cpu.py", "--num_devices", "8",
                  "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", num_devices=None,
                  JAX_ENABLE_COMPILATION_CACHE="false")
    assert json.loads(out.stdout.strip().splitlines()[-1])["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert "Involuntary full rematerialization" not in out.stderr, out.stderr[-3000:]


def test_flash_attention_is_planned_with_the_kernel_not_the_score_matrix():
    """A flash config planned on a CPU: the interpreted splash kernel's buffers replace the [l, l] scores."""
    overrides = {"data.seq_len": 1024, "model.max_length": 1024, "model.remat_policy": "full"}  # a row a device
    dense = memory_plan.plan(tiny_config(**overrides))
    flash = memory_plan.plan(tiny_config(**overrides, **{"model.attention_impl": "flash"}))
    assert (dense["attention"], flash["attention"]) == ("xla", "splash_interpret")
    assert flash["params_gib"] == dense["params_gib"]
    # 4 heads x 1,024^2 float32 scores (16 MiB a layer) and their softmax dominate the dense plan
    assert flash["activations_and_temporaries_gib"] < dense["activations_and_temporaries_gib"] / 3


def test_a_lora_plan_holds_adam_state_for_the_adapters_and_frozen_weights_in_the_compute_dtype():
    from cm3leon_jax import lora, sharding, trainer
    overrides = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.dtype": "bfloat16"}
    full = memory_plan.plan(tiny_config(**overrides))
    config = tiny_config(**overrides, **{"model.lora_rank": 2})
    adapted = memory_plan.plan(config)
    assert full["num_trained_params"] == full["num_params"]
    assert adapted["num_trained_params"] == adapted["num_params"] - full["num_params"] > 0   # the adapters, alone
    adapters, frozen = lora.split(trainer.Trainer(config, sharding.make_mesh(config.mesh)).abstract_state.params)
    gib = lambda tree: memory_plan.per_device_bytes(tree) / 2 ** 30
    # Adam's mu + nu, and a few scalar counters (step count, the non-finite guard's)
    np.testing.assert_allclose(adapted["optimizer_state_gib"], 2 * gib(adapters), rtol=0, atol=64 / 2 ** 30)
    np.testing.assert_allclose(adapted["params_gib"], gib(adapters) + gib(frozen), rtol=1e-9)
    np.testing.assert_allclose(gib(frozen), (full["params_gib"]) / 2, rtol=1e-9)   # frozen in bfloat16


def test_an_int8_base_plan_holds_a_byte_per_frozen_kernel_weight_plus_its_scales():
    from cm3leon_jax import quantization
    # replicated over 8 devices, so a device's bytes are the whole model's
    overrides = {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1, "model.dtype": "bfloat16", "model.lora_rank": 2}
    plain = memory_plan.plan(tiny_config(**overrides))
    int8 = memory_plan.plan(tiny_config(**overrides, **{"model.lora_base_int8": True}))
    assert int8["num_params"] == plain["num_params"] and int8["num_trained_params"] == plain["num_trained_params"]
    cfg = tiny_config().model   # a frozen kernel: 2 bytes a weight in bfloat16 -> 1 byte + 4 per output channel
    d, f, v, layers = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers
    kernels = {"query": (d, d, layers), "key": (d, d, layers), "value": (d, d, layers), "out": (d, d, layers),
               "up": (d, f, layers), "down": (f, d, layers)}
    if not cfg.tie_embeddings:
        kernels["output_head"] = (d, v, 1)
    assert cfg.mlp != "swiglu" and set(quantization.CONTRACTED_AXES) >= set(kernels)
    saved = sum(n * (2 * i * o - (i * o + 4 * o)) for i, o, n in kernels.values())
    np.testing.assert_allclose((plain["params_gib"] - int8["params_gib"]) * 2 ** 30, saved, rtol=0, atol=0.5)


def test_cli_refuses_a_device_count_or_memory_of_zero_or_below():
    """--num_devices 0 planned this host's devices and -2 one device; --device_memory_gib 0 printed no verdict;
    no --config was an AttributeError."""
    import subprocess
    import sys
    from tests.helpers import REPO, cli_env
    for flag, value, message in (("--device_memory_gib", "1", "--config is required"),
                                 ("--num_devices", "0", "--num_devices=0 must be >= 1"),
                                 ("--num_devices", "-2", "--num_devices=-2 must be >= 1"),
                                 ("--device_memory_gib", "0", "--device_memory_gib=0.0 must be > 0")):
        config = [] if message == "--config is required" else ["--config", "experiments/tiny_cpu.py"]
        proc = subprocess.run([sys.executable, "-m", "cm3leon_jax.memory_plan", *config, flag, value], cwd=REPO, capture_output=True, text=True, env=cli_env(None), timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_a_plan_that_does_not_fit_says_what_to_change():
    from cm3leon_jax.memory_plan import fit_hint
    plan = dict(params_gib=10.0, optimizer_state_gib=20.0, activations_and_temporaries_gib=260.0, total_gib=290.0,
                rows_per_device_per_microbatch=32, gradient_accumulation_steps=1)
    assert fit_hint(plan, 300.0) is None
    # 65 GiB left for 260 GiB of temporaries: at least a quarter of the rows at a time
    assert fit_hint(plan, 95.0).startswith("--config.gradient_accumulation_steps=4 (8 rows per device at a time)")
    assert "gradient_accumulation_steps=8 " in fit_hint(dict(plan, gradient_accumulation_steps=2), 95.0)
    assert "gradient_accumulation_steps=5 (6 rows" in fit_hint(dict(plan, rows_per_device_per_microbatch=30), 95.0)  # a divisor
    assert "even one row per device" in fit_hint(plan, 35.0)
    assert "parameters and optimizer state alone" in fit_hint(plan, 25.0)
