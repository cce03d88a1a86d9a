import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax import attention, losses
from cm3leon_jax.model import Transformer, TransformerConfig

BASE = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=32)


def _init(cfg, tokens):
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    from flax import linen as nn
    return model, nn.meta.unbox(params)


def _random_params(params, seed=1):
    """Non-zero output projections, so every layer actually affects the logits."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_every_model_option_has_a_default_the_command_line_can_override():
    """Configs are locked on the command line: a field base_config lacks cannot be set there."""
    import dataclasses
    from cm3leon_jax.config_defaults import base_config
    defaults = base_config().model
    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    assert set(defaults) == set(fields)
    assert all(defaults[k] == v for k, v in fields.items() if v is not dataclasses.MISSING)
    # an unknown field is a KeyError naming the whole dotted name (was KeyError 'modle' / a TypeError)
    from cm3leon_jax.config_defaults import get_field, set_field
    for dotted in ("modle.num_layers", "seed.x", "model.num_layerz"):
        with pytest.raises(KeyError, match=f"config has no field '{dotted}'"):
            get_field(base_config(), dotted)
        with pytest.raises(KeyError, match=f"config has no field '{dotted}'"):
            set_field(base_config(), dotted, 1)


def test_shapes_and_cm3leon_init():
    cfg = TransformerConfig(**BASE)
    tokens = jnp.zeros((2, 16), jnp.int32)
    model, params = _init(cfg, tokens)
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    layer = params["layers"]["layer"]
    # stacked along a leading layers axis (one compiled layer)
    assert layer["attention"]["query"]["kernel"].shape == (2, 32, 4, 8)
    # output projections start at zero; no biases and no norm parameters anywhere
    assert not np.any(layer["attention"]["out"]["kernel"]) and not np.any(layer["mlp"]["down"]["kernel"])
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert not any("bias" in n or "scale" in n for n in names), names
    q = np.asarray(layer["attention"]["query"]["kernel"])
    assert abs(q.std() - 0.006) < 0.001 and np.abs(q).max() <= 3 * 0.006 + 1e-7
    pos = np.asarray(params["position_embedding"])
    assert abs(pos.std() - 0.0002) < 0.00005


@pytest.mark.parametrize("options", [
    dict(positions="rotary", qk_norm=True),
    dict(norm="rmsnorm", norm_placement="swin", mlp="swiglu", positions="rotary", qk_norm=True),
    dict(dtype="bfloat16", remat_policy="full"),
    dict(tie_embeddings=True, mlp="gelu", attention_block_size=8),
])
def test_options_run_and_are_finite(options):
    cfg = TransformerConfig(**BASE, **options)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    model, params = _init(cfg, tokens)
    params = _random_params(params)
    grads = jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    if options.get("norm") == "rmsnorm":
        assert "scale" in params["layers"]["layer"]["attention_norm"]
    if options.get("dtype") == "bfloat16":
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_scan_remat_and_blockwise_attention_match_plain_model():
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    ref_cfg = TransformerConfig(**BASE)
    model, params = _init(ref_cfg, tokens)
    params = _random_params(params)
    ref = model.apply({"params": params}, tokens)
    for opts in (dict(remat_policy="full"), dict(remat_policy="dots"), dict(attention_block_size=4)):
        other = Transformer(TransformerConfig(**BASE, **opts)).apply({"params": params}, tokens)
        np.testing.assert_allclose(other, ref, atol=1e-5)
    # unscanned layers hold the same computation with per-layer params
    unscanned = Transformer(TransformerConfig(**BASE, scan_layers=False))
    per_layer = {k: v for k, v in params.items() if k != "layers"}
    for i in range(2):
        per_layer[f"layer_{i}"] = jax.tree_util.tree_map(lambda x: x[i], params["layers"])
    np.testing.assert_allclose(unscanned.apply({"params": per_layer}, tokens), ref, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_packed_documents_do_not_attend_to_each_other(positions):
    cfg = TransformerConfig(**BASE, positions=positions)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (1, 16)).astype(np.int32)
    segment_ids = np.array([[1] * 6 + [2] * 7 + [0] * 3], np.int32)
    positions_ = np.array([list(range(6)) + list(range(7)) + [0] * 3], np.int32)
    model, params = _init(cfg, jnp.asarray(tokens))
    params = _random_params(params)
    apply = jax.jit(lambda t: model.apply({"params": params}, t, positions_, segment_ids))
    base = apply(tokens)
    changed = tokens.copy()
    changed[0, :6] = (changed[0, :6] + 7) % 64  # rewrite the first document entirely
    after = apply(changed)
    np.testing.assert_allclose(after[0, 6:13], base[0, 6:13], atol=1e-6)  # second document unchanged
    assert not np.allclose(after[0, :6], base[0, :6])
    # the second document packed alone at the row start gives the same logits (positions restart)
    alone = np.zeros_like(tokens)
    alone[0, :7] = tokens[0, 6:13]
    seg_alone = np.array([[1] * 7 + [0] * 9], np.int32)
    pos_alone = np.array([list(range(7)) + [0] * 9], np.int32)
    solo = model.apply({"params": params}, alone, pos_alone, seg_alone)
    np.testing.assert_allclose(solo[0, :7], base[0, 6:13], atol=1e-5)


def test_blockwise_attention_skips_the_upper_triangle_at_lengths_the_block_does_not_divide():
    """10 tokens in blocks of 4 (4, 4, 2): was silently the dense [10, 10] scores."""
    q, k, v = (jax.random.normal(key, (2, 10, 2, 8)) for key in jax.random.split(jax.random.key(0), 3))
    seg = jnp.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2])
    pos = jnp.array([list(range(6)) + list(range(4)), list(range(8)) + [0] * 2])
    blockwise = lambda q, k, v: attention.blockwise_causal_attention(q, k, v, seg, seg, pos, pos, 4)
    dense = attention.dot_product_attention(q, k, v, attention.attention_mask(seg, seg, pos, pos))
    np.testing.assert_allclose(blockwise(q, k, v), dense, atol=1e-6)
    scores = [e.outvars[0].aval.shape[-2:] for e in jax.make_jaxpr(blockwise)(q, k, v).eqns
              if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim == 4 and e.outvars[0].aval.shape[1] == 2]
    assert scores and (10, 10) not in scores, scores


def test_attention_mask_is_causal_within_documents():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 0, 1, 0]])
    mask = np.asarray(attention.attention_mask(seg, seg, pos, pos))[0, 0]
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_weighted_cross_entropy_and_z_loss():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    targets = jnp.array([[0, 1, 2]])
    weights = jnp.array([[1.0, 1.0, 0.0]])  # the last token (e.g. a sentinel) carries no loss
    total, aux = losses.weighted_cross_entropy(logits * 1.0, targets, weights, z_loss_weight=0.0)
    np.testing.assert_allclose(aux["loss"], (-np.log(0.5) - np.log(0.8)) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["num_tokens"], 2.0)
    shifted = logits + 2.0  # log Z = 2 for every token
    total, aux = losses.weighted_cross_entropy(shifted, targets, weights, z_loss_weight=1e-2)
    np.testing.assert_allclose(aux["z_loss"], 4.0, rtol=1e-5)
    np.testing.assert_allclose(total, aux["loss"] + 1e-2 * 4.0, rtol=1e-6)


def test_invalid_model_config_is_rejected():
    with pytest.raises(ValueError, match="norm_placement"):
        TransformerConfig(**BASE, norm_placement="post")
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(**dict(BASE, d_model=30))
    # sizes of 0 or below: a ZeroDivisionError, a negative shape or an empty take deep inside JAX before
    for name, value, bound in (("num_heads", 0, 1), ("d_model", 0, 1), ("vocab_size", 0, 1), ("num_layers", -1, 1),
                               ("head_dim", -4, 0), ("attention_block_size", -8, 0)):
        with pytest.raises(ValueError, match=f"model.{name}={value} must be >= {bound}"):
            TransformerConfig(**dict(BASE, **{name: value}))
    # a compute dtype of "int8" ran the model in integers (all-zero logits); "bf16" was a TypeError naming no field
    for name, value in (("dtype", "int8"), ("dtype", "bf16"), ("param_dtype", "int32")):
        with pytest.raises(ValueError, match=f"model.{name}='{value}' is not a floating dtype"):
            TransformerConfig(**dict(BASE, **{name: value}))
    TransformerConfig(**dict(BASE, dtype="float16", param_dtype="bfloat16"))
    for base in (1.0, 0.0, -10.0):   # 1: every rotation angle 0; below: NaN positions
        with pytest.raises(ValueError, match=f"model.rotary_base={base} must be > 1"):
            TransformerConfig(**dict(BASE, rotary_base=base))


def test_rows_longer_than_the_learned_position_table_are_refused():
    """Default positions past max_length looked up outside the table: all-NaN logits, no error."""
    cfg = TransformerConfig(**dict(BASE, max_length=8))
    model, params = _init(cfg, jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="rows of 12 tokens exceed model.max_length=8"):
        model.apply({"params": params}, jnp.zeros((1, 12), jnp.int32))
    # explicit positions that restart per document stay within the table: allowed
    positions = jnp.asarray([list(range(6)) * 2])
    assert np.isfinite(model.apply({"params": params}, jnp.zeros((1, 12), jnp.int32), positions)).all()
    rotary = TransformerConfig(**dict(BASE, max_length=8, positions="rotary"))
    model, params = _init(rotary, jnp.zeros((1, 8), jnp.int32))
    assert np.isfinite(model.apply({"params": params}, jnp.zeros((1, 12), jnp.int32))).all()
