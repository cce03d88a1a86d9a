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
    mu = state.opt_state[1][0].mu
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


def test_batch_is_split_over_data_and_fsdp():
    mesh = _mesh(2, 2, 2)
    local = {"inputs": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    batch = sharding.global_batch_from_local(local, mesh)["inputs"]
    assert batch.sharding.spec == P(("data", "fsdp"), None)
    assert batch.addressable_shards[0].data.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(batch), local["inputs"])
