"""Model FLOPs per token and each device's peak, for MFU.

Model FLOPs per trained token (forward + backward = 3x forward; remat recompute is not counted):
    6 * (L * (4 * d * H * Dh + M * d * F) + d * V)   the matmuls (M = 2, or 3 for SwiGLU)
  + 6 * L * T * H * Dh                                causal attention scores and values
where the attention term is the full T x T score matrix (12 * L * T * H * Dh) halved for
causality, as MaxText counts it. With LoRA adapters (model.lora_rank > 0) the frozen matmuls count
4x forward (no weight gradients) and the adapters' own 6x. MFU = model FLOPs per step / step time / summed device peak.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax import lora

# Dense bf16 peak FLOP/s per JAX device (vendor figures per chip; a TPU v3 chip is two devices, one per
# TensorCore). Matched in order as substrings of `device.device_kind`, so the longer names come first:
# a v5p reports itself as "TPU v5", a v5e as "TPU v5 lite"; an "NVIDIA L40S" contains "L4", an "H100 NVL" "H100".
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12 / 2,
    "H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
}


def flops_per_token(model_config, seq_len: int) -> float:
    c = model_config
    head_dim = c.head_dim or c.d_model // c.num_heads
    attn_width = c.num_heads * head_dim
    mlp_matrices = 3 if c.mlp == "swiglu" else 2
    matmul_params = c.num_layers * (4 * c.d_model * attn_width + mlp_matrices * c.d_model * c.d_ff) + c.d_model * c.vocab_size
    attention = 6.0 * c.num_layers * seq_len * attn_width
    rank = c.lora_rank
    if not rank:
        return 6.0 * matmul_params + attention
    # LoRA: frozen weights get no weight gradients (forward + input gradients: 4x), the adapters all three
    widths = {"query": (c.d_model, attn_width), "key": (c.d_model, attn_width), "value": (c.d_model, attn_width),
              "out": (attn_width, c.d_model), "up": (c.d_model, c.d_ff), "down": (c.d_ff, c.d_model),
              "gate": (c.d_model, c.d_ff) if c.mlp == "swiglu" else (0, 0)}
    adapter_params = c.num_layers * sum(rank * sum(widths[t]) for t in lora.parse_targets(c.lora_targets))
    return 4.0 * matmul_params + 6.0 * adapter_params + attention


@functools.lru_cache(maxsize=None)
def measured_cpu_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """The host's float32 matmul throughput, the honest peak for a CPU (no vendor figure applies)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size ** 3 / float(np.median(times))


def peak_flops(devices=None) -> tuple[float, str]:
    """Summed peak FLOP/s of the devices and where the figure came from."""
    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Fake CPU devices share the host's cores: the host's measured peak is the whole budget.
        return measured_cpu_matmul_flops() * jax.process_count(), "measured float32 matmul on the host CPU"
    for name, peak in PEAK_FLOPS_BY_DEVICE_KIND.items():
        if name.lower() in kind.lower():
            return peak * len(devices), f"table: {name} bf16 peak x {len(devices)}"
    return float("nan"), f"unknown device kind {kind!r}: MFU not reported"
