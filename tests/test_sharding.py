import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cm3leon_jax import sharding, trainer
from tests.helpers import tiny_config

# The logical axes each parameter must carry (leading "layers" for scanned parameters).
EXPECTED_LOGICAL = {
    "token_embedding": ("vocab", "embed"),
    "position_embedding": ("position", "embed"),
    "output_head/kernel": ("embed", "vocab"),
    "query/kernel": ("layers", "embed", "heads", "kv"),
    "key/kernel": ("layers", "embed", "heads", "kv"),
    "value/kernel": ("layers", "embed", "heads", "kv"),
    "out/kernel": ("layers", "heads", "kv", "embed"),
    "up/kernel": ("layers", "embed", "mlp"),
    "down/kernel": ("layers", "mlp", "embed"),
}


def _mesh(data, fsdp, tensor):
    return sharding.make_mesh(tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}).mesh)


def _path(keypath):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def test_parameters_and_optimizer_state_follow_the_rules():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    state = t.init_state(0)
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    seen = 0
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        path = _path(keypath)
        logical = next(v for k, v in EXPECTED_LOGICAL.items() if path.endswith(k))
        expected = P(*[rules[a] for a in logical])
        assert leaf.sharding.spec == expected, (path, leaf.sharding.spec, expected)
        # created sharded: each device holds only its slice
        shard = leaf.addressable_shards[0].data.shape
        assert shard == leaf.sharding.shard_shape(leaf.shape)
        seen += 1
    assert seen == len(EXPECTED_LOGICAL)
    # Adam moments are sharded exactly like their parameters
    mu = state.opt_state.inner_state[1][0].mu    # inside the non-finite guard, AdamW after the clip
    for (kp, p), (_, m) in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree_util.tree_leaves_with_path(mu)):
        assert m.sharding.spec == p.sharding.spec, _path(kp)
    assert state.params["token_embedding"].sharding.spec == P("tensor", "fsdp")


def test_mesh_resolution_and_errors():
    assert sharding.resolve_mesh_shape(tiny_config(**{"mesh.data": -1, "mesh.tensor": 2}).mesh, 8) == (4, 1, 2)
    with pytest.raises(ValueError, match="needs 12 devices but 8 are available"):
        _mesh(2, 2, 3)
    with pytest.raises(ValueError, match="cannot be filled"):
        _mesh(-1, 3, 1)
    with pytest.raises(ValueError, match="at most one mesh axis"):
        _mesh(-1, -1, 1)


def test_invalid_configs_fail_up_front():
    mesh = _mesh(4, 2, 1)
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by the data-parallel size"):
        trainer.validate_config(tiny_config(**{"data.global_batch_size": 6}), mesh, 1)
    mesh = _mesh(1, 1, 8)
    with pytest.raises(ValueError, match="model.num_heads=4 is not divisible"):
        trainer.validate_config(tiny_config(), mesh, 1)
    with pytest.raises(ValueError, match="seq_len=64 exceeds model.max_length=32"):
        trainer.validate_config(tiny_config(**{"data.seq_len": 64}), _mesh(-1, 1, 1), 1)
    for steps in (0, 3):   # 8 rows cannot make 3 microbatches; with 4 of 2 rows, 2 rows cannot cover 4 data shards
        with pytest.raises(ValueError, match=f"gradient_accumulation_steps={steps} must be >= 1 and split"):
            trainer.validate_config(tiny_config(gradient_accumulation_steps=steps), _mesh(-1, 1, 1), 1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 .* data-parallel size mesh.data.mesh.fsdp=8"):
        trainer.validate_config(tiny_config(gradient_accumulation_steps=4), _mesh(4, 2, 1), 1)
    # 2 processes over a tensor-only mesh: each would need the whole batch but loads only its half
    # (JAX's "Invalid host data" at the first batch, after start-up)
    with pytest.raises(ValueError, match="mesh.data.mesh.fsdp=1 is not a multiple of the 2 processes"):
        trainer.validate_config(tiny_config(**{"model.num_heads": 8}), _mesh(1, 1, 8), 2)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        trainer.validate_config(tiny_config(seed=-1), _mesh(-1, 1, 1), 1)


def test_batch_is_split_over_data_and_fsdp():
    mesh = _mesh(2, 2, 2)
    local = {"inputs": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    batch = sharding.global_batch_from_local(local, mesh)["inputs"]
    assert batch.sharding.spec == P(("data", "fsdp"), None)
    assert batch.addressable_shards[0].data.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(batch), local["inputs"])


def test_microbatches_take_strided_rows_so_each_device_keeps_its_own():
    rows = np.arange(8 * 3).reshape(8, 3)
    micro = np.asarray(trainer.split_microbatches(rows, 4))
    assert micro.shape == (4, 2, 3)
    np.testing.assert_array_equal(micro[1], rows[[1, 5]])
    # with 2 data shards of 4 rows each, every microbatch takes one row from each shard
    assert all(sorted(r // 4 for r in micro[j][:, 0] // 3) == [0, 1] for j in range(4))


@pytest.mark.parametrize("lora_rank", [0, 4])   # 4: LoRA adapters, the only parameters differentiated
def test_gradient_accumulation_is_the_same_update_in_less_memory(lora_rank):
    import data_pipeline

    def run(steps):
        config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.global_batch_size": 16,
                                "gradient_accumulation_steps": steps, "z_loss_weight": 1e-2,
                                "model.lora_rank": lora_rank, "model.init_std": 0.02 if lora_rank else 0.006})
        mesh = sharding.make_mesh(config.mesh)
        trainer.validate_config(config, mesh, 1)
        t = trainer.Trainer(config, mesh)
        state, data = t.init_state(0), data_pipeline.make_train_iterator(config, 0, 1)
        history = []
        for _ in range(2):
            state, step_metrics = t.train_step(state, sharding.global_batch_from_local(next(data), mesh))
            history.append(jax.device_get(step_metrics))
        temp_bytes = t.lower_train_step().compile().memory_analysis().temp_size_in_bytes
        return history, jax.device_get(state.params), temp_bytes

    whole, whole_params, whole_bytes = run(1)
    micro, micro_params, micro_bytes = run(4)
    for a, b in zip(whole, micro):   # loss, z-loss, token count and gradient norm of the whole batch
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=key)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-6), whole_params, micro_params)
    assert micro_bytes < 0.6 * whole_bytes     # one microbatch's activations live at a time
