"""The Pallas flash kernels (TPU splash, GPU Triton) against the XLA attention, run by Pallas's
interpreter on the CPU: packed documents, padding, gradients, the model, and the sharded step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cm3leon_jax import attention, model as model_lib, sharding, trainer
from cm3leon_jax.model import TransformerConfig
from tests.helpers import tiny_config

LENGTH = 128  # the kernels' tile


def _packed_rows(batch, length, seed=0):
    """Rows of 1-3 documents (positions restart per document) with padding at the end."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(8, length - 8), size=rng.integers(1, 3), replace=False))
        ends = list(cuts) + [length - int(rng.integers(0, 12))]
        start = 0
        for doc, end in enumerate(ends, start=1):
            segment_ids[row, start:end] = doc
            positions[row, start:end] = np.arange(end - start)
            start = end
    return jnp.asarray(segment_ids), jnp.asarray(positions)


@pytest.mark.parametrize("kernel", attention.FLASH_KERNELS)
def test_kernels_match_xla_attention_on_packed_rows(kernel):
    b, h, d = 2, 2, 16
    segment_ids, positions = _packed_rows(b, LENGTH)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (b, LENGTH, h, d)) for key in keys[:3])
    upstream = jax.random.normal(keys[3], (b, LENGTH, h, d)) * (segment_ids != 0)[..., None, None]

    def xla(q, k, v):
        mask = attention.attention_mask(segment_ids, segment_ids, positions, positions)
        return attention.dot_product_attention(q, k, v, mask)

    def flash(q, k, v):
        return attention.flash_attention(q, k, v, segment_ids, kernel=kernel, interpret=True)

    real = np.asarray(segment_ids != 0)
    np.testing.assert_allclose(np.asarray(flash(q, k, v))[real], np.asarray(xla(q, k, v))[real], atol=2e-5)
    # gradients of a loss that, like the LM's, reads only real tokens
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * upstream), argnums=(0, 1, 2))(q, k, v) for f in (flash, xla)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 128"):
        attention.flash_attention(q[:, :96], k[:, :96], v[:, :96], segment_ids[:, :96], kernel=kernel, interpret=True)


@pytest.mark.skipif(jax.default_backend() not in attention.FLASH_BACKENDS, reason="needs a TPU or an NVIDIA GPU")
def test_compiled_kernel_of_this_backend_matches_xla_attention():
    """The real kernel (not the interpreter), in bf16 as accelerators train: run on the device machine."""
    b, h, d = 2, 4, 64
    segment_ids, positions = _packed_rows(b, 2 * LENGTH, seed=3)
    q, k, v = (jax.random.normal(key, (b, 2 * LENGTH, h, d), jnp.bfloat16) for key in jax.random.split(jax.random.key(4), 3))
    kernel, interpret = model_lib.flash_kernel_for("flash")
    assert not interpret
    got = jax.jit(lambda q, k, v: attention.flash_attention(q, k, v, segment_ids, kernel=kernel))(q, k, v)
    want = attention.dot_product_attention(q, k, v, attention.attention_mask(segment_ids, segment_ids, positions, positions))
    real = np.asarray(segment_ids != 0)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real], atol=3e-2)


def test_sharded_train_step_with_flash_attention_matches_xla(monkeypatch):
    """On a 2x2x2 mesh the kernel runs per device (shard_map over rows and heads), rematerialised:
    same loss, same update."""
    specs = []
    shard_map = jax.shard_map

    def recording_shard_map(f, **kwargs):
        specs.append(kwargs["in_specs"])
        return shard_map(f, **kwargs)

    monkeypatch.setattr(jax, "shard_map", recording_shard_map)
    overrides = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.seq_len": LENGTH,
                 "model.max_length": LENGTH, "model.d_model": 64, "model.num_heads": 4}
    results = {}
    for impl in ("xla", "splash_interpret"):
        config = tiny_config(**overrides, **{"model.attention_impl": impl, "model.remat_policy": "full"})
        mesh = sharding.make_mesh(config.mesh)
        trainer.validate_config(config, mesh, 1)
        t = trainer.Trainer(config, mesh)
        state = t.init_state(0)
        segment_ids, positions = _packed_rows(8, LENGTH, seed=2)
        tokens = np.asarray(jax.random.randint(jax.random.key(3), (8, LENGTH), 0, 64), np.int32)
        batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "positions": np.asarray(positions),
                 "segment_ids": np.asarray(segment_ids), "weights": np.asarray(segment_ids != 0, np.float32)}
        batch = sharding.global_batch_from_local(batch, mesh)
        for _ in range(2):  # the second step sees non-zero output projections
            state, metrics = t.train_step(state, batch)
        results[impl] = (float(metrics["loss"]), jax.device_get(state.params))
    # the step's kernel saw 2 rows x 2 heads per device (init's single row stays whole)
    assert (P(("data", "fsdp"), None, "tensor", None),) * 3 + (P(("data", "fsdp"), None),) in specs
    np.testing.assert_allclose(results["splash_interpret"][0], results["xla"][0], rtol=1e-5)
    for got, want in zip(*(jax.tree_util.tree_leaves(results[i][1]) for i in ("splash_interpret", "xla"))):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_impl_choices_and_errors():
    assert model_lib.flash_kernel_for("xla", "tpu") is None
    assert model_lib.flash_kernel_for("flash", "tpu") == ("splash", False)
    assert model_lib.flash_kernel_for("flash", "gpu") == ("triton", False)
    assert model_lib.flash_kernel_for("flash", "cpu") is None  # evaluation of a TPU-trained model on a CPU
    assert model_lib.flash_kernel_for("triton_interpret", "cpu") == ("triton", True)
    assert model_lib.flash_kernel_for("flash", "tpu", length=100) is None  # an evaluation row the kernels cannot tile
    assert model_lib.flash_kernel_for("flash", "tpu", length=256) == ("splash", False)
    with pytest.raises(ValueError, match="attention_impl='fast' is not one of"):
        TransformerConfig(vocab_size=8, num_layers=1, d_model=8, num_heads=2, d_ff=8, max_length=8,
                          attention_impl="fast")
    mesh = sharding.make_mesh(tiny_config().mesh)
    with pytest.raises(ValueError, match="needs a TPU or an NVIDIA GPU; this backend is cpu"):
        trainer.validate_config(tiny_config(**{"model.attention_impl": "flash"}), mesh, 1)
    with pytest.raises(ValueError, match="data.seq_len=32 is not a multiple"):
        trainer.validate_config(tiny_config(**{"model.attention_impl": "splash_interpret"}), mesh, 1)
    with pytest.raises(ValueError, match="head_dim >= 16"):
        trainer._validate_attention("flash", 128, 8, backend="gpu")
    trainer._validate_attention("flash", 256, 128, backend="tpu")  # a 7B-shaped config passes
