"""LoRA adapters: a fresh adapter changes nothing, merging is exact, training touches adapters only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import data_pipeline
from cm3leon_jax import flops, lora, model as model_lib, optimizer, quantization, sharding, trainer
from tests.helpers import tiny_config

BASE = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=48, max_length=32)


def _model(**fields):
    return model_lib.Transformer(model_lib.TransformerConfig(**dict(BASE, **fields)))


def _tokens():
    return jax.random.randint(jax.random.key(1), (2, 16), 0, BASE["vocab_size"])


def _randomise_adapters(params, seed=2):
    """Non-zero B (a fresh one is zero) so the adapters change the outputs."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, path in zip(keys, sorted(flat)):
        if path[-1] == "lora_b":
            flat[path] = 0.05 * jax.random.normal(key, flat[path].shape)
    return traverse_util.unflatten_dict(flat)


ARCHITECTURES = [dict(), dict(mlp="swiglu", scan_layers=False, positions="rotary", norm="rmsnorm", norm_placement="swin")]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fresh_adapters_leave_the_model_exactly_as_it_was_and_merging_is_exact(arch):
    tokens = _tokens()
    adapted = _model(lora_rank=4, lora_alpha=8.0, **arch)
    plain = _model(**arch)
    params = nn.meta.unbox(adapted.init(jax.random.key(0), tokens)["params"])
    adapters, base = lora.split(params)
    targets = {p[-2] for p in traverse_util.flatten_dict(adapters)}
    assert targets == ({"query", "key", "value", "out", "up", "down"} | ({"gate"} if arch else set()))
    assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(
        nn.meta.unbox(plain.init(jax.random.key(0), tokens)["params"]))
    # B = 0: exactly the plain model's logits with the same base weights
    np.testing.assert_array_equal(adapted.apply({"params": params}, tokens), plain.apply({"params": base}, tokens))
    # trained adapters change the logits; merged into the kernels (a reshape-and-matmul, not the
    # model's einsums) they give the plain model the same logits
    trained = _randomise_adapters(params)
    logits = adapted.apply({"params": trained}, tokens)
    assert float(jnp.max(jnp.abs(logits - plain.apply({"params": base}, tokens)))) > 1e-3
    merged = lora.merge_params(trained, rank=4, alpha=8.0)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    np.testing.assert_allclose(plain.apply({"params": merged}, tokens), logits, rtol=1e-4, atol=1e-5)
    # a lone adapter of rank 1 on `out`: merge by hand, W + (alpha / r) a b
    one = _model(lora_rank=1, lora_alpha=3.0, lora_targets="out", **arch)
    p1 = _randomise_adapters(nn.meta.unbox(one.init(jax.random.key(0), tokens)["params"]))
    path = ("layers", "layer", "attention", "out") if arch == {} else ("layer_1", "layer", "attention", "out")
    flat = traverse_util.flatten_dict(p1)
    a, b, w = (np.asarray(flat[path + (n,)]) for n in ("lora_a", "lora_b", "kernel"))
    by_hand = w + 3.0 * np.einsum("...hkr,...rd->...hkd", a, b)
    np.testing.assert_allclose(traverse_util.flatten_dict(lora.merge_params(p1, 1, 3.0))[path + ("kernel",)], by_hand,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(plain.apply({"params": lora.merge_params(p1, 1, 3.0)}, tokens),
                               one.apply({"params": p1}, tokens), rtol=1e-4, atol=1e-5)


def test_adapter_equations():
    assert lora.adapter_equations("bld,dhk->blhk") == ("bld,dr->blr", "blr,rhk->blhk", 1)
    assert lora.adapter_equations("blhk,hkd->bld") == ("blhk,hkr->blr", "blr,rd->bld", 2)
    assert lora.adapter_equations("blf,fd->bld") == ("blf,fr->blr", "blr,rd->bld", 1)


@pytest.mark.parametrize("fields, match", [
    (dict(lora_rank=-1), "lora_rank=-1"),
    (dict(lora_rank=4, lora_targets="query,embedding"), r"\['embedding'\]"),
    (dict(lora_rank=4, lora_targets=""), "at least one projection"),
    (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha=0.0"),
    # an infinite scale (alpha / rank in float32) made a fresh adapter's B = 0 give 0 * inf = NaN outputs
    (dict(lora_rank=4, lora_alpha=float("inf")), "lora_alpha=inf must be > 0 and finite"),
    (dict(lora_rank=2, lora_alpha=1e39), r"lora_alpha=1e\+39 must be > 0 and finite"),
    (dict(lora_rank=4, lora_alpha=float("nan")), "lora_alpha=nan"),
    (dict(lora_rank=4, lora_targets="gate"), "only 'gate'"),
])
def test_invalid_adapter_settings_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        model_lib.TransformerConfig(**dict(BASE, **fields))


def test_model_flops_count_no_weight_gradients_for_frozen_matmuls():
    full = model_lib.TransformerConfig(**BASE)
    adapted = model_lib.TransformerConfig(**dict(BASE, lora_rank=2, lora_targets="query,down"))
    d, f, layers, t = BASE["d_model"], BASE["d_ff"], BASE["num_layers"], 16
    matmuls = layers * (4 * d * d + 2 * d * f) + d * BASE["vocab_size"]
    attention = 6 * layers * t * d
    assert flops.flops_per_token(full, t) == 6 * matmuls + attention
    adapter = layers * 2 * ((d + d) + (f + d))   # rank x (in + out) per adapted projection
    assert flops.flops_per_token(adapted, t) == 4 * matmuls + 6 * adapter + attention


def test_a_repeated_target_adapts_and_counts_its_projection_once():
    assert lora.parse_targets(" query,value,query ,") == ("query", "value")
    c = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=32, lora_rank=4)
    once = model_lib.TransformerConfig(**c, lora_targets="query,value")
    twice = model_lib.TransformerConfig(**c, lora_targets="query,value,query")
    assert flops.flops_per_token(twice, 32) == flops.flops_per_token(once, 32)


@pytest.mark.parametrize("int8_base", [False, True])
def test_lora_training_on_a_mesh_updates_the_adapters_only(int8_base):
    # init_std 0.2: with the default 0.006 a frozen random output head gives logits too small for
    # adapters alone to move (fine-tuning starts from a trained model: tests/test_sft.py)
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "optimizer.peak_lr": 1e-2,
                            "optimizer.warmup_steps": 2, "total_steps": 40, "model.lora_rank": 4,
                            "model.lora_alpha": 8.0, "model.init_std": 0.2, "model.lora_base_int8": int8_base})
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    state = t.init_state(0)
    adapters, base = lora.split(jax.device_get(state.params))
    n_adapters, n_all = lora.count(state.params)
    assert 0 < n_adapters < n_all // 5
    # Adam's moments cover the adapters and nothing else
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_adapters
    # the adapters' parameters are laid out over the mesh by the logical rules (A's d_model over fsdp)
    a_query = state.params["layers"]["layer"]["attention"]["query"]["lora_a"]
    assert a_query.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    kernel = state.params["layers"]["layer"]["attention"]["query"]["kernel"]   # [layers, d, heads, head_dim]
    if int8_base:   # int8 values laid out like the kernel; the per-output-channel scale has no d_model axis
        assert kernel.values.dtype == jnp.int8 and kernel.scale.shape == (2, 1, 4, 8)
        assert kernel.values.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        assert kernel.scale.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    else:
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    batch = sharding.global_batch_from_local(next(data_pipeline.make_train_iterator(config, 0, 1)), mesh)
    losses = []
    for _ in range(40):
        state, m = t.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses[::5]
    trained_adapters, trained_base = lora.split(jax.device_get(state.params))
    for (path, x), (_, y) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (base, trained_base))):
        np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))   # frozen, bit for bit
    assert all(np.abs(np.asarray(x)).max() > 0 for p, x in traverse_util.flatten_dict(trained_adapters).items()
               if p[-1] == "lora_b")
    assert int(optimizer.skipped_updates(state.opt_state)[1]) == 0


def _saved_layer_residuals(capsys, rank, policy):
    """Shapes of what the scanned layers keep for the backward pass (print_saved_residuals' lines)."""
    from jax.ad_checkpoint import print_saved_residuals
    m = _model(lora_rank=rank, remat_policy=policy)
    tokens = _tokens()
    params = nn.meta.unbox(m.init(jax.random.key(0), tokens)["params"])
    trained, frozen = lora.split(params) if rank else (params, {})
    capsys.readouterr()
    print_saved_residuals(lambda t: m.apply({"params": lora.join(t, frozen) if rank else t}, tokens).sum(), trained)
    return sorted(line.split()[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line)


@pytest.mark.parametrize("policy", ["dots_no_batch", "dots"])
def test_remat_with_adapters_keeps_what_it_keeps_of_the_plain_model(capsys, policy):
    # a projection with an adapter is two dots summed: a dot policy would keep both (twice the memory)
    plain = _saved_layer_residuals(capsys, 0, policy)
    assert plain and _saved_layer_residuals(capsys, 4, policy) == plain


def test_lora_sft_config_takes_a_pretrained_model_that_predates_the_adapter_fields(tmp_path):
    import json
    from experiments import sft_lora_tiny
    model = dict(BASE, max_length=128)   # an older run's config.json: no lora_* fields
    (tmp_path / "config.json").write_text(json.dumps({"model": model, "data": {"seq_len": 128}}))
    config = sft_lora_tiny.get_config(str(tmp_path))
    assert config.init_from == str(tmp_path) and config.data.seq_len == 128
    from experiments import sft_qlora_tiny   # the same recipe on an int8 frozen base
    qlora = sft_qlora_tiny.get_config(str(tmp_path))
    assert qlora.model.lora_base_int8 and not config.model.lora_base_int8
    assert qlora.model.to_dict() == dict(config.model.to_dict(), lora_base_int8=True)
    model_lib.TransformerConfig.from_config(qlora.model)
    assert config.model.lora_rank == 16 and config.optimizer.weight_decay == 0.0
    cfg = model_lib.TransformerConfig.from_config(config.model)
    assert (cfg.d_model, cfg.max_length, cfg.lora_alpha) == (BASE["d_model"], 128, 16.0)


# (bfloat16, no int8) is left out for the suite's time: checkpointing and resuming do not depend on
# the frozen weights' dtype, which the two kept runs already vary (float32 / int8), and
# test_every_parameter_is_used_in_the_compute_dtype... covers frozen weights stored in bfloat16
@pytest.mark.parametrize("dtype,int8_base", [("float32", False), ("bfloat16", True)])
def test_a_lora_run_checkpoints_its_adapters_only_and_resumes_exactly(tmp_path, dtype, int8_base):
    import json
    import shutil
    from cm3leon_jax import checkpointing
    pretrained = str(tmp_path / "pretrained")
    trainer.train(tiny_config(total_steps=4), pretrained)
    config = tiny_config(**{"total_steps": 6, "checkpoint_every_steps": 2, "keep_checkpoints": 5,
                            "async_checkpointing": False, "model.lora_rank": 2, "optimizer.peak_lr": 3e-2,
                            "model.dtype": dtype, "model.lora_base_int8": int8_base})
    config.init_from = pretrained
    run = str(tmp_path / "lora")
    trainer.train(config, run)
    assert json.load(open(tmp_path / "lora" / trainer.INIT_FROM_FILE))["step"] == 4
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    first, step = trainer.restore_run_params(run, config, mesh)
    assert step == 6
    adapters, frozen = lora.split(first)
    # the frozen weights are kept in the compute dtype (bfloat16 halves them), the adapters in float32
    assert {x.dtype for x in jax.tree_util.tree_leaves(frozen)} == {jnp.dtype(dtype)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(adapters)} == {jnp.dtype("float32")}
    base, _ = checkpointing.restore_params(pretrained, jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), t.frozen_float_abstract))
    base = jax.tree_util.tree_map(lambda x: x.astype(dtype), base)
    if int8_base:   # what the adapters trained on: the int8 kernels, dequantized in the compute dtype
        base = quantization.dequantize_params(quantization.quantize_params(base), dtype)
        held = lora.split(t.init_state(0).params)[1]["layers"]["layer"]["mlp"]["up"]["kernel"]
        assert held.values.dtype == jnp.int8
    for path, x in traverse_util.flatten_dict(frozen).items():   # the pretrained weights, re-read
        np.testing.assert_array_equal(x, traverse_util.flatten_dict(base)[path], err_msg=str(path))
    records = [json.loads(line) for line in open(tmp_path / "lora" / "metrics.jsonl")]
    # lose the last checkpoint: the rerun resumes at step 4 (adapters, Adam state, data position) on
    # the re-read frozen weights and ends where the first run did, bit for bit
    shutil.rmtree(tmp_path / "lora" / "checkpoints" / "6")
    trainer.train(config, run)
    again, _ = trainer.restore_run_params(run, config, mesh)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(first)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed = [json.loads(line) for line in open(tmp_path / "lora" / "metrics.jsonl")]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]
    # the frozen weights must stay readable: a LoRA run whose init_from lost that step says so
    shutil.rmtree(tmp_path / "pretrained" / "checkpoints" / "4")
    with pytest.raises(FileNotFoundError, match=r"LoRA run: its checkpoints hold the adapters only.*step 4"):
        trainer.restore_run_params(run, config, mesh)


@pytest.mark.parametrize("arch", ARCHITECTURES + [dict(qk_norm=True, qk_norm_params=True, tie_embeddings=True)])
def test_every_parameter_is_used_in_the_compute_dtype_so_storing_frozen_ones_in_it_changes_nothing(arch):
    # why a LoRA run may keep its frozen weights in bfloat16 when it computes in bfloat16
    m = _model(dtype="bfloat16", **arch)
    tokens = _tokens()
    params = nn.meta.unbox(m.init(jax.random.key(0), tokens)["params"])
    leaves, tree = jax.tree_util.tree_flatten(params)   # off their inits (norm scales of 1 are exact in bfloat16)
    params = tree.unflatten([x + 0.01 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
    narrow = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    np.testing.assert_array_equal(m.apply({"params": narrow}, tokens), m.apply({"params": params}, tokens))


def test_resuming_with_another_adapter_rank_names_the_setting(tmp_path):
    trainer.train(tiny_config(**{"total_steps": 2, "model.lora_rank": 2}), str(tmp_path))
    with pytest.raises(ValueError, match=r"another shape than this run's.*model.lora_rank"):
        trainer.train(tiny_config(**{"total_steps": 4, "model.lora_rank": 4}), str(tmp_path))


@pytest.mark.parametrize("field,value", [("model.lora_alpha", 64.0), ("model.lora_base_int8", True)])
def test_resuming_with_another_adapter_scale_or_base_names_the_setting(tmp_path, field, value):
    """Same adapter shapes, so orbax restored them: resumed, they silently computed another model."""
    trainer.train(tiny_config(**{"total_steps": 2, "model.lora_rank": 2}), str(tmp_path))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        trainer.train(tiny_config(**{"total_steps": 4, "model.lora_rank": 2, field: value}), str(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_int8_base_is_a_quarter_of_the_memory_and_computes_what_its_dequantized_weights_do(dtype):
    config = tiny_config(**{"model.lora_rank": 2, "model.lora_base_int8": True, "model.dtype": dtype,
                            "model.init_std": 0.2})
    plain = tiny_config(**{"model.lora_rank": 2, "model.dtype": dtype, "model.init_std": 0.2})
    mesh = sharding.make_mesh(config.mesh)
    t, t_plain = trainer.Trainer(config, mesh), trainer.Trainer(plain, mesh)
    kernels = lambda tree: {p: x for p, x in traverse_util.flatten_dict(lora.split(tree)[1]).items() if p[-1] == "kernel"}
    # a byte per weight plus a float32 scale per output channel (the kernel over its contracted axes)
    expected = sum(x.size + 4 * x.size // int(np.prod([x.shape[a] for a in quantization.CONTRACTED_AXES[p[-2]]]))
                   for p, x in kernels(t_plain.abstract_state.params).items())
    assert quantization.weight_bytes(list(kernels(t.abstract_state.params).values())) == expected
    assert expected < 0.6 * quantization.weight_bytes(list(kernels(t_plain.abstract_state.params).values())) / (
        2 if dtype == "float32" else 1)
    params = t.init_state(0).params
    adapters, frozen = lora.split(params)
    tokens = _tokens()
    held = t.model.apply({"params": params}, tokens)
    # the float weights generation and export merge the adapters into are exactly what training computed with
    dequantized = t.model.apply({"params": lora.join(adapters, t.float_frozen(frozen))}, tokens)
    np.testing.assert_array_equal(np.asarray(held), np.asarray(dequantized))
    # ... and the quantization did happen: the plain run's weights (same seed) give other logits
    unquantized = t_plain.model.apply({"params": t_plain.init_state(0).params}, tokens)
    assert 0 < float(jnp.max(jnp.abs(held.astype(jnp.float32) - unquantized.astype(jnp.float32))))


@pytest.mark.parametrize("dtype,param_dtype", [("float32", "bfloat16"), ("float16", "bfloat16")])
def test_an_int8_base_is_dequantized_as_the_model_does_when_param_and_compute_dtypes_differ(dtype, param_dtype):
    """float_frozen dequantized in the frozen float dtype (bfloat16 here), the model in the compute
    dtype: the weights generation/export merge into were not the ones the adapters trained on."""
    config = tiny_config(**{"model.lora_rank": 2, "model.lora_base_int8": True, "model.dtype": dtype,
                            "model.param_dtype": param_dtype, "model.init_std": 0.2})
    t = trainer.Trainer(config, sharding.make_mesh(config.mesh))
    params = t.init_state(0).params
    adapters, frozen = lora.split(params)
    held = t.model.apply({"params": params}, _tokens())
    dequantized = t.model.apply({"params": lora.join(adapters, t.float_frozen(frozen))}, _tokens())
    np.testing.assert_array_equal(np.asarray(held), np.asarray(dequantized))


def test_init_from_a_run_whose_config_predates_a_model_field_reads_it_as_its_default(tmp_path):
    """A pretrained config.json without a later field (here qk_norm_params) is restored with that
    field's default; init_from used to refuse it ("model.qk_norm_params=False vs None"), even through
    the config argument (sft_tiny.py:DIR) that its error message recommends."""
    import json
    from cm3leon_jax import checkpointing
    pretrained, saved = str(tmp_path / "pretrained"), tiny_config()   # a pretrained run's step 0, saved as training does
    state = trainer.Trainer(saved, sharding.make_mesh(saved.mesh)).init_state(3)
    ckpt = checkpointing.CheckpointManager(pretrained, save_every_steps=1, keep=1, async_save=False)
    ckpt.save(0, state, data_pipeline.make_train_iterator(saved, 0, 1), force=True)
    ckpt.close()
    saved = json.loads(saved.to_json_best_effort())
    del saved["model"]["qk_norm_params"]
    (tmp_path / "pretrained" / "config.json").write_text(json.dumps(saved))
    config = tiny_config()
    config.init_from = pretrained
    t = trainer.Trainer(config, sharding.make_mesh(config.mesh))
    params = trainer.init_from_pretrained(config, t, str(tmp_path / "ft"))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # the pretrained weights, exactly
    config.model.update(qk_norm=True, qk_norm_params=True)   # a real difference is still refused, naming the default
    with pytest.raises(ValueError, match=r"model.qk_norm=True vs False; model.qk_norm_params=True vs False"):
        trainer.init_from_pretrained(config, t, str(tmp_path / "ft"))
