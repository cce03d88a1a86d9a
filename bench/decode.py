"""Decoding speed: the compiled KV-cache decoder against a no-cache decode of the same model, and
with int8 weight-only kernels (`quantization.py`) or bfloat16 compute against float32.

    python bench/decode.py [--batches 1,8,32] [--new_tokens 64] [--prompt_length 32] [--noint8] [--nobf16]

Text -> image shaped work with CFG (two streams per prompt) on the small config of
bench/train_step.py. The no-cache baseline recomputes the whole padded sequence for every token
(one compiled forward, a host loop over tokens: what a framework without a cache does). Host
overhead = wall time of `Generator`-style calls minus the compiled executable's own time. The last
line printed is one JSON object of the figures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list("batches", ["1", "8", "32"], "prompts per call (each with a conditional and an unconditional row)")
flags.DEFINE_integer("new_tokens", 64, "tokens generated per prompt (an 8x8 image)", lower_bound=1)
flags.DEFINE_integer("prompt_length", 32, "prompt tokens", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "timed repeats (median)", lower_bound=1)
flags.DEFINE_bool("baseline", True, "also time the no-cache decode")
flags.DEFINE_bool("int8", True, "also time the cached decode with int8 weight-only kernels (quantization.py)")
flags.DEFINE_bool("bf16", True, "also time the cached decode in bfloat16 compute (activations and KV cache)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import flag_checks  # noqa: E402
from bench.train_step import small_config  # noqa: E402
from cm3leon_jax import decoding, quantization, sampling, sharding, trainer  # noqa: E402
from cm3leon_jax.model import Transformer  # noqa: E402

GUIDED = sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0)
flag_checks.int_list("batches")


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def no_cache_forward(model):
    """The baseline's forward, jitted once: a new jit per decode would compile inside the timing."""
    return jax.jit(lambda p, t, pos, s: model.apply({"params": p}, t, pos, s))


def no_cache_decode(forward, params, tokens, mask, new_tokens, rng, length=None):
    """The baseline: every token re-runs the full forward over the padded sequence (of `length`,
    default prompt + new_tokens: a warm-up of fewer tokens compiles the timed run's shape)."""
    rows, prompt = tokens.shape
    total = length or prompt + new_tokens
    buf = np.zeros((rows, total), np.int32)
    seg = np.zeros((rows, total), np.int32)
    buf[:, :prompt], seg[:, :prompt] = tokens, mask
    streams = 2
    for step in range(new_tokens):
        positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
        logits = forward(params, buf, positions, seg)[:, prompt + step - 1]
        per_stream = logits.reshape(streams, -1, logits.shape[-1])
        guided = sampling.next_token_logits(per_stream, GUIDED)
        token = np.asarray(sampling.draw(jax.random.fold_in(rng, step), guided, GUIDED.temperature))
        buf[:, prompt + step] = np.tile(token, streams)
        seg[:, prompt + step] = 1
    return buf


def main(argv):
    flag_checks.no_arguments(argv)
    f = flags.FLAGS
    config = small_config()
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    params = t.init_state(0).params
    model_config = t.model_config
    rng = np.random.default_rng(0)
    results = {"device": jax.devices()[0].device_kind, "config": "small (d=512, 8 layers, vocab 8192)",
               "new_tokens": f.new_tokens, "prompt_length": f.prompt_length}
    params_int8 = quantization.quantize_params(params) if f.int8 else None
    if f.int8:
        results["weight_bytes"] = {"float32": quantization.weight_bytes(params),
                                   "int8": quantization.weight_bytes(params_int8)}
    for batch in map(int, f.batches):
        cond = [list(rng.integers(8, 8192, f.prompt_length)) for _ in range(batch)]
        uncond = [[1, 4, 2]] * batch
        tokens, mask = decoding.stream_rows([cond, uncond], multiple=sharding.data_parallel_size(mesh))
        kw = dict(model_config=model_config, streams=2, num_tokens=f.new_tokens, config=GUIDED)
        key = jax.random.key(0)
        with sharding.activate(mesh):
            compiled = decoding.generate_fixed.lower(params, tokens, mask, key, **kw).compile()
            call = lambda: decoding.generate_fixed(params, tokens, mask, key, **kw)  # noqa: E731
            jax.block_until_ready(call())
            wall = _median_time(call, f.repeats)
            device = _median_time(lambda: compiled(params, tokens, mask, key), f.repeats)
            variants = {}  # timed beside the float32 decode: int8 weights, bfloat16 compute
            if f.int8:
                variants["int8"] = lambda: decoding.generate_fixed(params_int8, tokens, mask, key, **kw)
            if f.bf16:
                kw_bf16 = dict(kw, model_config=dataclasses.replace(model_config, dtype="bfloat16"))
                variants["bf16"] = lambda: decoding.generate_fixed(params, tokens, mask, key, **kw_bf16)
            walls = {}
            for name, fn in variants.items():
                jax.block_until_ready(fn())
                walls[name] = _median_time(fn, f.repeats)
        r = {"cached_seconds": wall, "tokens_per_second": batch * f.new_tokens / wall,
             "seconds_per_image": wall / batch, "host_overhead_share": max(wall - device, 0.0) / wall}
        for name, w in walls.items():
            r.update({f"{name}_seconds": w, f"{name}_tokens_per_second": batch * f.new_tokens / w,
                      f"{name}_speedup": wall / w})
        if f.baseline:
            forward = no_cache_forward(Transformer(model_config))
            length = tokens.shape[1] + f.new_tokens
            jax.block_until_ready(no_cache_decode(forward, params, tokens, mask, 1, jax.random.key(0),
                                                  length))  # compiles the timed run's shape
            base = _median_time(lambda: no_cache_decode(forward, params, tokens, mask, f.new_tokens,
                                                        jax.random.key(0)), 1)
            r.update(no_cache_seconds=base, speedup_vs_no_cache=base / wall)
        results[f"batch_{batch}"] = r
        print(f"batch {batch:3d}: {r['tokens_per_second']:8.1f} tokens/s, {r['seconds_per_image']:.3f} s/image, "
              f"host overhead {100 * r['host_overhead_share']:.1f}%"
              + (f", {r['speedup_vs_no_cache']:.1f}x the no-cache decode" if f.baseline else "")
              + "".join(f", {name} {r[name + '_speedup']:.2f}x" for name in walls), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
