"""Inference precision: int8 weight-only kernels, bfloat16 compute, and decoding through them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from cm3leon_jax import decoding, quantization, sampling
from cm3leon_jax.model import Transformer, TransformerConfig

CFG = dict(vocab_size=64, num_layers=2, d_model=64, num_heads=4, d_ff=128, max_length=48)


def _model(**opts):
    cfg = TransformerConfig(**CFG, **opts)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # no zero-init layers: every kernel matters
    params = jax.tree_util.tree_unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return cfg, model, params


def test_kernel_round_trip_is_within_half_a_step_per_channel():
    kernel = jax.random.normal(jax.random.key(0), (3, 16, 4, 8))  # [layers, d_model, heads, head_dim]
    kernel = kernel.at[1, :, 2, :].set(0.0)  # a zero channel stays exactly zero
    q = quantization.quantize_kernel(kernel, (-3,))
    assert q.values.dtype == jnp.int8 and q.scale.shape == (3, 1, 4, 8)
    step = np.abs(np.asarray(kernel)).max(axis=1, keepdims=True) / 127
    err = np.abs(np.asarray(q.astype(jnp.float32)) - np.asarray(kernel))
    assert np.all(err <= step / 2 + 1e-7)
    assert np.all(np.asarray(q.astype(jnp.float32))[1, :, 2, :] == 0.0)


@pytest.mark.parametrize("opts", [{}, {"positions": "rotary", "qk_norm": True, "mlp": "swiglu",
                                       "tie_embeddings": False}])
def test_int8_logits_follow_the_float_model_and_decoding_runs_on_them(opts):
    cfg, model, params = _model(**opts)
    int8 = quantization.quantize_params(params)
    flat, flat_int8 = (traverse_util.flatten_dict(p) for p in (params, int8))
    kernels = [k for k in flat if k[-1] == "kernel"]
    assert len(kernels) >= 6 and all(isinstance(flat_int8[k], quantization.Int8Kernel) for k in kernels)
    assert all(flat_int8[k] is flat[k] for k in flat if k[-1] != "kernel")  # embeddings, norms: untouched
    # an already int8 tree (e.g. a Generator's with --int8) comes back as it is, not a TypeError from float()
    again = traverse_util.flatten_dict(quantization.quantize_params(int8))
    assert all(again[k] is flat_int8[k] for k in flat_int8)
    # weight memory: the projections drop to a quarter (+ their scales); the embedding stays float
    assert quantization.weight_bytes(int8) < 0.45 * quantization.weight_bytes(params)
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, CFG["vocab_size"])
    exact, approx = model.apply({"params": params}, tokens), model.apply({"params": int8}, tokens)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(approx - exact))))
    assert rms < 0.04 * float(jnp.std(exact))  # ~1.4-2.5% here: half a step of 127 per channel
    assert float(jnp.mean(jnp.argmax(approx, -1) == jnp.argmax(exact, -1))) > 0.9
    # the cached, scanned decoder takes the int8 tree as it is: its greedy tokens are the int8
    # model's full-pass argmax at every step
    prompt = np.array([[5, 9, 3, 17, 2]], np.int32)
    out, _ = decoding.generate_fixed(int8, prompt, np.ones_like(prompt), jax.random.key(0), model_config=cfg,
                                     streams=1, num_tokens=10, config=sampling.SamplingConfig(temperature=0.0))
    full = model.apply({"params": int8}, np.concatenate([prompt, np.asarray(out)], axis=1))
    np.testing.assert_array_equal(np.argmax(full[0, prompt.shape[1] - 1:-1], -1), np.asarray(out[0]))


def test_an_unknown_projection_is_refused():
    with pytest.raises(ValueError, match="no int8 rule"):
        quantization.quantize_params({"mystery": {"kernel": jnp.ones((4, 4))}})


def test_bfloat16_compute_follows_float32_on_the_same_weights():
    cfg, model, params = _model()
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, CFG["vocab_size"])
    exact = model.apply({"params": params}, tokens)
    bf16 = Transformer(TransformerConfig(**CFG, dtype="bfloat16"))
    approx = bf16.apply({"params": params}, tokens)
    assert approx.dtype == jnp.float32  # logits stay float32 for sampling
    rms = float(jnp.sqrt(jnp.mean(jnp.square(approx - exact))))
    assert 0 < rms < 0.05 * float(jnp.std(exact))  # changed, by bf16's ~3 significant digits
