import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import portpicker
import pytest

import data_pipeline
from data_pipeline import synthetic_tokens
from cm3leon_jax import metrics, sharding, trainer
from tests.helpers import REPO, cli_env, run_cli, tiny_config

TINY_FLAGS = ["--config.model.vocab_size=64", "--config.model.num_layers=2", "--config.model.d_model=32",
              "--config.model.num_heads=4", "--config.model.d_ff=64", "--config.model.max_length=32",
              "--config.data.seq_len=32", "--config.data.global_batch_size=8", "--config.data.max_doc_length=20",
              "--config.log_every_steps=1", "--config.optimizer.warmup_steps=2"]


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _train_args(workdir, *extra):
    return ["--config", "experiments/tiny_cpu.py", "--workdir", str(workdir), *TINY_FLAGS, *extra]


def _start_training(workdir, *extra, num_devices=8):
    """A training process left running (to be signalled, or one of several)."""
    return subprocess.Popen([sys.executable, "-m", "cm3leon_jax.train", *_train_args(workdir, *extra)], cwd=REPO,
                            env=cli_env(num_devices), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_tiny_model_memorises_a_fixed_batch():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "optimizer.peak_lr": 3e-3,
                            "optimizer.warmup_steps": 5, "total_steps": 100})
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    state = t.init_state(0)
    batch = sharding.global_batch_from_local(next(data_pipeline.make_train_iterator(config, 0, 1)), mesh)
    losses = []
    for _ in range(100):
        state, m = t.train_step(state, batch)
        losses.append(float(m["loss"]))
    # the share of positions holding a document (tokens/s counts padding too)
    local = jax.device_get(batch["segment_ids"])
    assert float(m["packed_fraction"]) == pytest.approx(float((local > 0).mean())) and 0 < (local > 0).mean() < 1
    assert losses[0] > 3.5  # ~log(64) at init
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_train_writes_metrics_events_and_checkpoints(tmp_path):
    config = tiny_config(total_steps=6, **{"data.max_doc_length": 48})   # some fit no 32-token row
    last = trainer.train(config, str(tmp_path))
    records = _read_metrics(tmp_path)
    assert sorted(records) == [2, 4, 6]
    skips = [records[s]["packer_skipped"] for s in (2, 4, 6)]   # the data lost so far, as it happens
    assert 0 < skips[0] <= skips[1] <= skips[2], skips
    for key in ("loss", "z_loss", "grad_norm", "learning_rate", "tokens_per_second", "mfu", "eta_seconds"):
        assert np.isfinite(records[6][key]), key
    timed = records[4]   # rates are the step's amounts over its measured seconds; the ETA counts steps left
    assert timed["tokens_per_second"] == pytest.approx(8 * 32 / timed["step_time"])
    assert timed["eta_seconds"] == pytest.approx(2 * timed["step_time"]) and records[6]["eta_seconds"] == 0
    assert timed["document_tokens_per_second"] == pytest.approx(timed["tokens_per_second"] * timed["packed_fraction"])
    assert [records[s]["tokens_seen"] for s in (2, 4, 6)] == [2 * 8 * 32, 4 * 8 * 32, 6 * 8 * 32]
    assert last["loss"] == records[6]["loss"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert "6" in os.listdir(tmp_path / "checkpoints")
    # rerunning a finished run resumes at the end and trains nothing more
    trainer.train(config, str(tmp_path))
    assert sorted(_read_metrics(tmp_path)) == [2, 4, 6]
    # an empty step directory (a copy cut short) is named, not restored into orbax's KeyError
    from cm3leon_jax import checkpointing
    os.makedirs(tmp_path / "checkpoints" / "9")
    for load in (lambda: trainer.train(tiny_config(total_steps=12, **{"data.max_doc_length": 48}), str(tmp_path)),
                 lambda: checkpointing.restore_params(str(tmp_path), None)):
        with pytest.raises(ValueError, match=r"checkpoints/9 holds no saved state .* resume from step 6"):
            load()


def test_held_out_batches_are_fixed_unseen_walks_split_between_processes():
    config = tiny_config(eval_batches=3)
    one = data_pipeline.make_eval_batches(config, 0, 1)
    assert len(one) == 3 and one[0]["inputs"].shape == (8, 32)
    for a, b in zip(one, data_pipeline.make_eval_batches(config, 0, 1)):   # built again: the same tokens
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    halves = [data_pipeline.make_eval_batches(config, p, 2) for p in range(2)]
    for batch, *parts in zip(one, *halves):   # each process its own rows of the same global batches
        for key in data_pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
    # a split larger than the batches need is never cycled: no held-out document is scored twice
    segments = [tuple(np.append(b["inputs"][r][b["segment_ids"][r] == s], b["targets"][r][b["segment_ids"][r] == s][-1]))
                for b in one for r in range(8) for s in set(b["segment_ids"][r].tolist()) - {0}]
    assert len(segments) == len(set(segments)) > 20
    # the held-out documents are the chain's walks past the training range, which training never reads
    n = int(config.data.num_documents)
    chain = synthetic_tokens.MarkovDocuments(64, 2 * n, 4, 20, int(config.data.source_seed))
    heldout = synthetic_tokens.documents(config.data, 64, heldout=True)
    for i in (0, 7):
        np.testing.assert_array_equal(heldout[i]["tokens"], chain[n + i]["tokens"])
    with pytest.raises(IndexError):   # a source never reads past its range (Grain's MapDataset wraps around)
        synthetic_tokens.MarkovDocuments(64, n, 4, 20, int(config.data.source_seed))[n]


def test_held_out_documents_that_fit_no_row_are_left_out_and_counted(caplog):
    long_docs = {"data.min_doc_length": 30, "data.max_doc_length": 40}   # rows of 32: lengths 30-33 fit
    with caplog.at_level(logging.WARNING):
        batches = data_pipeline.make_eval_batches(tiny_config(eval_batches=2, **long_docs), 0, 1)
    assert len(batches) == 2 and all((b["segment_ids"] > 0).any(axis=1).all() for b in batches)
    assert "fit no row of 32 tokens, left out" in caplog.text
    too_long = {"data.min_doc_length": 34, "data.max_doc_length": 40}
    with pytest.raises(ValueError, match="eval_every_steps=0 turns it off.*none of the 1000 held-out documents fits"):
        data_pipeline.make_eval_batches(tiny_config(**too_long), 0, 1)


def test_held_out_loss_is_the_exact_token_mean_in_one_pass_or_microbatches():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "eval_batches": 2})
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    state = t.init_state(0)
    batches = [sharding.global_batch_from_local(b, mesh) for b in data_pipeline.make_eval_batches(config, 0, 1)]
    got = t.evaluate(state.params, batches)
    with sharding.activate(mesh):
        sums = [jax.device_get(t.loss_fn(state.params, b)[1]) for b in batches]
    tokens = sum(float(s["num_tokens"]) for s in sums)
    assert got["eval_tokens"] == tokens == sum(float(np.sum(jax.device_get(b["weights"]))) for b in batches)
    np.testing.assert_allclose(got["eval_loss"], sum(float(s["loss"] * s["num_tokens"]) for s in sums) / tokens,
                               rtol=1e-5)
    accumulating = trainer.Trainer(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                                  "gradient_accumulation_steps": 2}), mesh)
    np.testing.assert_allclose(accumulating.evaluate(state.params, batches)["eval_loss"], got["eval_loss"], rtol=1e-5)


def test_held_out_loss_is_logged_at_its_steps_and_leaves_training_unchanged(tmp_path):
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    trainer.train(tiny_config(total_steps=6), str(plain))
    trainer.train(tiny_config(total_steps=6, eval_every_steps=3, eval_batches=2), str(evaluated))
    reference, records = _read_metrics(plain), _read_metrics(evaluated)
    assert sorted(records) == [2, 3, 4, 6]          # the log steps, and step 3 for its evaluation
    assert [s for s in records if "eval_loss" in records[s]] == [3, 6]   # and the last step
    assert records[3]["eval_tokens"] == records[6]["eval_tokens"] > 0    # the same fixed batches each time
    assert np.isfinite(records[3]["eval_loss"]) and records[6]["eval_loss"] != records[3]["eval_loss"]
    for step in (2, 4, 6):
        assert records[step]["loss"] == reference[step]["loss"], step
    # what the e2e report takes: each key's last logged value and its step
    assert metrics.last_values(metrics.read_records(str(evaluated)), ("eval_loss", "loss", "absent")) == {
        "eval_loss": {"step": 6, "value": records[6]["eval_loss"]}, "loss": {"step": 6, "value": records[6]["loss"]}}
    assert metrics.read_records(str(tmp_path / "nowhere")) == []
    assert metrics.last_values([{"step": 5, "loss": 2.0, "eval_loss": 3.0}, {"step": 7, "loss": 1.0}], ("eval_loss",)) == {
        "eval_loss": {"step": 5, "value": 3.0}}


def test_invalid_held_out_settings_are_refused_up_front():
    mesh = sharding.make_mesh(tiny_config().mesh)
    for overrides, field in (({"eval_every_steps": -1}, "eval_every_steps=-1"),
                             ({"eval_every_steps": 5, "eval_batches": 0}, "eval_batches=0")):
        with pytest.raises(ValueError, match=field):
            trainer.validate_config(tiny_config(**overrides), mesh, 1)


def test_a_data_dir_for_the_synthetic_source_is_refused():
    """--config.data.data_dir=W/data without --config.data.source=cm3 trained on Markov walks, the data unread."""
    mesh = sharding.make_mesh(tiny_config().mesh)
    with pytest.raises(ValueError, match=r"data.data_dir='/prepared'.*set --config.data.source=cm3"):
        trainer.validate_config(tiny_config(**{"data.data_dir": "/prepared"}), mesh, 1)


@pytest.mark.parametrize("field, value", [("data.num_documents", -1), ("data.source_seed", -1),
                                          ("data.min_doc_length", 1), ("data.max_doc_length", 3),
                                          ("model.init_std", float("nan")), ("model.position_init_std", float("inf")),
                                          ("model.rotary_base", float("inf"))])
def test_invalid_fields_are_refused_up_front_naming_the_field(field, value):
    """Each failed inside Grain, NumPy or the model's init, or trained on silently, without naming the field."""
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=f"{field}={value}"):
        trainer.validate_config(config, sharding.make_mesh(config.mesh), 1)
        data_pipeline.make_train_iterator(config, 0, 1).close()


def _poisoned(batch):
    """The batch with one NaN loss weight: its loss and every gradient become NaN."""
    weights = np.array(jax.device_get(batch["weights"]))
    weights[0, 0] = np.nan
    return dict(batch, weights=jax.device_put(weights, batch["weights"].sharding))


def test_a_step_with_nan_gradients_is_skipped_and_counted_and_training_goes_on_unchanged():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    batches = data_pipeline.make_train_iterator(config, 0, 1)
    a, b = (sharding.global_batch_from_local(next(batches), mesh) for _ in range(2))

    after_a, _ = t.train_step(t.init_state(0), a)
    before = jax.device_get(after_a.params)
    skipped, m = t.train_step(after_a, _poisoned(a))
    assert not np.isfinite(float(m["grad_norm"]))
    assert (int(skipped.step), float(m["nonfinite_streak"]), float(m["skipped_steps"])) == (2, 1.0, 1.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(skipped.params), before)

    resumed, m = t.train_step(skipped, b)
    assert (float(m["nonfinite_streak"]), float(m["skipped_steps"])) == (0.0, 1.0)
    # the skipped step left no trace: [a, NaN, b] gives the parameters of [a, b], at [a, b]'s learning rate
    straight, m_straight = t.train_step(t.train_step(t.init_state(0), a)[0], b)
    assert float(m["learning_rate"]) == float(m_straight["learning_rate"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(straight.params))

    # without the guard the same NaN reaches the parameters
    unguarded = trainer.Trainer(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                               "optimizer.skip_nonfinite": 0}), mesh)
    state, m = unguarded.train_step(unguarded.train_step(unguarded.init_state(0), a)[0], _poisoned(a))
    assert float(m["skipped_steps"]) == 0.0
    assert not np.isfinite(jax.device_get(state.params["token_embedding"])).all()


def test_a_diverged_run_stops_with_a_clear_error_and_finite_checkpoints(tmp_path, caplog):
    # a learning rate of 1e30 blows the parameters up at the first update: every later gradient is inf/NaN
    config = tiny_config(total_steps=40, log_every_steps=2, checkpoint_every_steps=2,
                         **{"optimizer.peak_lr": 1e30, "optimizer.warmup_steps": 0, "optimizer.skip_nonfinite": 3})
    with caplog.at_level(logging.INFO), pytest.raises(FloatingPointError, match=r"skip_nonfinite=3.*last checkpoint is step 4"):
        trainer.train(config, str(tmp_path))
    records = _read_metrics(tmp_path)
    assert max(records) == 6                       # the streak passed 3 at the log of step 6, its record written
    assert [records[s]["skipped_steps"] for s in (2, 4, 6)] == [1.0, 3.0, 5.0]
    assert "update(s) with NaN/inf gradients skipped" in caplog.text
    assert "step 6/40 | loss" in caplog.text and "| skipped 5 |" in caplog.text   # on the progress line too
    mesh = sharding.make_mesh(config.mesh)
    t = trainer.Trainer(config, mesh)
    from cm3leon_jax import checkpointing
    params, step = checkpointing.restore_params(str(tmp_path), t.abstract_state.params)
    assert step == 4 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(params)))


def test_resuming_with_the_guard_toggled_names_the_setting(tmp_path):
    trainer.train(tiny_config(total_steps=2, **{"optimizer.skip_nonfinite": 0}), str(tmp_path))
    with pytest.raises(ValueError, match="checkpoint of step 2 .* optimizer.skip_nonfinite turned on or off"):
        trainer.train(tiny_config(total_steps=4), str(tmp_path))


def test_learning_rate_schedules():
    from cm3leon_jax import optimizer
    def schedule(kind, **fields):
        config = tiny_config(total_steps=100, **{"optimizer.schedule": kind, "optimizer.warmup_steps": 10,
                                                 "optimizer.peak_lr": 1.0, "optimizer.end_lr_ratio": 0.1,
                                                 **{f"optimizer.{k}": v for k, v in fields.items()}})
        fn = optimizer.learning_rate_schedule(config.optimizer, 100)
        return {step: float(fn(step)) for step in (0, 5, 10, 55, 80, 90, 100)}
    for kind in ("cosine", "linear", "wsd", "constant"):
        got = schedule(kind)
        assert (got[0], got[5], got[10]) == pytest.approx((0.0, 0.5, 1.0)), kind   # the same warmup
    assert schedule("cosine")[55] == pytest.approx(0.55) and schedule("cosine")[100] == pytest.approx(0.1)
    assert schedule("linear")[55] == pytest.approx(0.55) and schedule("linear")[100] == pytest.approx(0.1)
    wsd = schedule("wsd")                                   # stable until the last 20%, then linear to the end
    assert (wsd[55], wsd[80], wsd[90], wsd[100]) == pytest.approx((1.0, 1.0, 0.55, 0.1))
    assert schedule("wsd", decay_fraction=0.5)[55] == pytest.approx(0.91)
    longer = optimizer.learning_rate_schedule(tiny_config(total_steps=300, **{
        "optimizer.schedule": "wsd", "optimizer.warmup_steps": 10, "optimizer.peak_lr": 1.0}).optimizer, 300)
    assert all(float(longer(step)) == value for step, value in wsd.items() if step <= 80)   # a branch point
    assert set(schedule("constant").values()) == {0.0, 0.5, 1.0}
    # the trainer runs on it: its logged learning rate is the schedule's
    t = trainer.Trainer(tiny_config(total_steps=10, **{"optimizer.schedule": "wsd", "optimizer.warmup_steps": 0}),
                        sharding.make_mesh(tiny_config().mesh))
    assert float(t.schedule(5)) == pytest.approx(1e-2) and float(t.schedule(9)) == pytest.approx(1e-2 * (1 - 0.9 / 2))
    mesh = sharding.make_mesh(tiny_config().mesh)
    for overrides, field in (({"optimizer.schedule": "step"}, "optimizer.schedule='step'"),
                             ({"optimizer.schedule": "wsd", "optimizer.decay_fraction": 0.0}, "decay_fraction=0.0")):
        with pytest.raises(ValueError, match=field):
            trainer.validate_config(tiny_config(**overrides), mesh, 1)
    # a warmup as long as the run is allowed (a smoke run of a big config) but said, with the share reached
    with mock.patch.object(optimizer.logging, "warning") as warning:
        trainer.validate_config(tiny_config(total_steps=10, **{"optimizer.warmup_steps": 9}), mesh, 1)
        assert not warning.called
        trainer.validate_config(tiny_config(total_steps=10, **{"optimizer.warmup_steps": 40}), mesh, 1)
        assert warning.call_count == 1 and "never reaches its peak" in warning.call_args[0][0]
        assert warning.call_args[0][1:] == (40, 10, 9 / 40)   # step 9, the last, is at 9/40 of the way


def test_counts_that_must_be_positive_are_refused_up_front(tmp_path):
    """log_every_steps=0 used to divide by zero after the first compiled step; keep_checkpoints=0
    trained to the end and orbax deleted every checkpoint, the last one too."""
    from cm3leon_jax import checkpointing
    mesh = sharding.make_mesh(tiny_config().mesh)
    for field, value in (("log_every_steps", 0), ("keep_checkpoints", 0), ("data.global_batch_size", 0),
                         ("data.seq_len", 0), ("optimizer.warmup_steps", -1), ("checkpoint_every_steps", 0),
                         ("z_loss_weight", -1e-4)):   # a negative z-loss weight rewards exploding logits
        with pytest.raises(ValueError, match=f"{field}={value} must be >= "):
            trainer.validate_config(tiny_config(**{field: value}), mesh, 1)
    with pytest.raises(ValueError, match="keep_checkpoints=0 must be >= 1"):   # the VQ trainer's too
        checkpointing.CheckpointManager(str(tmp_path), save_every_steps=1, keep=0)
    with pytest.raises(ValueError, match="checkpoint_every_steps=0 must be >= 1"):
        checkpointing.CheckpointManager(str(tmp_path), save_every_steps=0, keep=1)
    assert not os.listdir(tmp_path)


def test_adamw_numbers_that_break_training_are_refused_up_front():
    """eps=0 or b1/b2=1 made the parameters NaN at the first update (the guard checks gradients
    only, and its error then blamed the learning rate); a negative learning rate trained uphill."""
    mesh = sharding.make_mesh(tiny_config().mesh)
    for field, value in (("optimizer.eps", 0.0), ("optimizer.b1", 1.0), ("optimizer.b2", 1.0),
                         ("optimizer.peak_lr", -3e-4), ("optimizer.weight_decay", -0.1),
                         ("optimizer.end_lr_ratio", -1.0), ("optimizer.end_lr_ratio", 2.0)):
        with pytest.raises(ValueError, match=f"{field}={value} must be"):
            trainer.validate_config(tiny_config(**{field: value}), mesh, 1)
    trainer.validate_config(tiny_config(**{"optimizer.b1": 0.0, "optimizer.weight_decay": 0.0}), mesh, 1)


def test_checkpoints_are_saved_at_the_interval_only_not_also_at_step_1(tmp_path):
    """orbax's should_save says yes at every step while a workdir has no checkpoint (its initial-save
    policy): every run wrote an unasked full checkpoint at step 1, which also took a keep slot."""
    from cm3leon_jax import checkpointing

    class Position:
        def get_state(self):
            return b'{"position": 0}'

    ckpt = checkpointing.CheckpointManager(str(tmp_path), save_every_steps=4, keep=5, async_save=False)
    for step in range(1, 7):
        ckpt.save(step, {"w": np.zeros(2)}, Position())
    ckpt.save(6, {"w": np.zeros(2)}, Position(), force=True)   # the last step's
    ckpt.close()
    assert checkpointing.saved_steps(str(tmp_path)) == [4, 6]


def test_resuming_a_parameters_only_checkpoint_names_the_directory(tmp_path):
    """An imported or exported workdir (checkpoints/0 holds `state` only) given as a training workdir
    ended in orbax's `KeyError: 'Item "data" was not found'`, naming no directory nor what to do."""
    from cm3leon_jax import checkpointing, export
    export.save_params_checkpoint(str(tmp_path), 0, {"w": np.zeros(2, np.float32)})
    ckpt = checkpointing.CheckpointManager(str(tmp_path), save_every_steps=1, keep=1, async_save=False)
    abstract = {"params": {"w": jax.ShapeDtypeStruct((2,), np.float32)}}
    with pytest.raises(ValueError, match=r"checkpoints/0 holds no data position .*config.init_from"):
        ckpt.restore(0, abstract, None)
    ckpt.close()


def test_grad_clip_0_means_no_clipping_not_a_zero_gradient():
    """optax clips to a norm of 0 as asked: every update was weight decay alone, nothing learned."""
    import jax.numpy as jnp
    import optax
    from cm3leon_jax import optimizer
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.asarray([1.0, -2.0, 3.0])}
    fields = {"optimizer.warmup_steps": 0, "optimizer.skip_nonfinite": 0}
    tx, schedule = optimizer.make_optimizer(tiny_config(**fields, **{"optimizer.grad_clip": 0.0}).optimizer, 10)
    with pytest.raises(ValueError, match="optimizer.grad_clip=-1.0 must be >= 0"):
        trainer.validate_config(tiny_config(**{"optimizer.grad_clip": -1.0}), sharding.make_mesh(tiny_config().mesh), 1)
    opt = tiny_config().optimizer
    plain = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    got, _ = tx.update(grads, tx.init(params), params)
    want, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    clipped, _ = optimizer.make_optimizer(tiny_config(**fields).optimizer, 10)   # the same state either way: resumable
    assert jax.tree_util.tree_structure(clipped.init(params)) == jax.tree_util.tree_structure(tx.init(params))


def test_weight_decay_spares_norm_scales_and_biases():
    """Chameleon's learned QK-norm bias was decayed towards 0, against the docstring's promise."""
    import flax
    from cm3leon_jax import model as model_lib, optimizer
    cfg = model_lib.TransformerConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_length=8,
                                      qk_norm=True, qk_norm_params=True)
    params = model_lib.Transformer(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    flat = flax.traverse_util.flatten_dict(optimizer.decay_mask(flax.core.meta.unbox(params)))   # as the trainer
    assert any(path[-1] == "bias" for path in flat) and any(path[-1] == "scale" for path in flat)
    for path, decays in flat.items():
        assert decays == (path[-1] not in ("scale", "bias")), path
    assert flat[("token_embedding",)] and flat[("output_head", "kernel")]


def test_resume_survives_a_metrics_line_torn_by_a_crash(tmp_path):
    """A host lost mid-write leaves a torn last line (or NUL bytes); resuming used to die on it
    with a JSONDecodeError. A last record without its newline must not swallow the next one."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
                                            + '{"step": 4, "lo\x00\x00')
    trainer._truncate_metrics(str(tmp_path), 2)
    assert [r["step"] for r in metrics.read_records(str(tmp_path))] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}')
    trainer._truncate_metrics(str(tmp_path), 1)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 0.5}) + "\n")
    assert [r["step"] for r in metrics.read_records(str(tmp_path))] == [1, 2]


def test_a_run_killed_before_its_first_checkpoint_starts_metrics_over(tmp_path):
    """No checkpoint to resume from: the killed run's records (and the line it tore) are stale;
    appending after them duplicated steps 2 and 4 and glued the first new record onto the torn
    line, so read_records died with a JSONDecodeError."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (2, 4))
                                            + '{"step": 6, "lo')
    os.makedirs(tmp_path / "tensorboard")   # where the killed run's events are
    trainer.train(tiny_config(total_steps=2), str(tmp_path))
    records = metrics.read_records(str(tmp_path))
    assert [r["step"] for r in records] == [2] and records[0]["loss"] != 9.0
    # ... and TensorBoard hides all the killed run's points (a purge marker at step 1)
    from tensorboardX.proto import event_pb2
    starts = [e.step for e in _tensorboard_events(tmp_path)
              if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [1]


def _tensorboard_events(workdir):
    import glob
    import struct
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
        data, i = open(path, "rb").read(), 0
        while i < len(data):   # TFRecord: length, its CRC, the event, its CRC
            (n,) = struct.unpack("<Q", data[i:i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 16 + n
    return events


def test_invalid_guard_and_profile_settings_are_refused_up_front(tmp_path):
    mesh = sharding.make_mesh(tiny_config().mesh)
    with pytest.raises(ValueError, match="skip_nonfinite=-1"):
        trainer.validate_config(tiny_config(**{"optimizer.skip_nonfinite": -1}), mesh, 1)
    for overrides, field in (({"profile_first_step": -2}, "profile_first_step=-2"),
                             ({"profile_first_step": 3, "profile_steps": 0}, "profile_steps=0")):
        with pytest.raises(ValueError, match=field):
            trainer.train(tiny_config(**overrides), str(tmp_path))
        assert not os.listdir(tmp_path)                       # refused before anything is written


def test_a_profile_trace_of_the_chosen_steps_is_written_for_tensorboard(tmp_path):
    import gzip
    trainer.train(tiny_config(total_steps=5, profile_first_step=2, profile_steps=2), str(tmp_path))
    runs = os.listdir(tmp_path / "tensorboard" / "plugins" / "profile")
    assert len(runs) == 1
    files = os.listdir(tmp_path / "tensorboard" / "plugins" / "profile" / runs[0])
    assert any(f.endswith(".xplane.pb") for f in files), files
    trace_file = next(f for f in files if f.endswith(".trace.json.gz"))
    with gzip.open(tmp_path / "tensorboard" / "plugins" / "profile" / runs[0] / trace_file) as f:
        events = json.load(f)["traceEvents"]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {}))
    assert steps == [2, 3]
    assert sorted(_read_metrics(tmp_path)) == [2, 4, 5]       # training and its records are unaffected


def test_step_record_rates_and_an_eta_capped_by_the_time_budget():
    timer = metrics.StepTimer()
    assert metrics.step_record({"loss": np.float32(1.5)}, timer, 2, 10, {"images_per_second": 8}) == {"loss": 1.5}
    timer.restart(0)
    time.sleep(0.02)
    record = metrics.step_record({"loss": np.float32(1.5)}, timer, 2, 1000, {"images_per_second": 8}, seconds_left=0.5)
    assert record["images_per_second"] == pytest.approx(8 / record["step_time"]) and record["step_time"] >= 0.01
    assert record["eta_seconds"] == 0.5                      # 998 steps left would take longer than the budget
    assert metrics.step_record({}, timer, 2, 1000, {}, seconds_left=-3.0)["eta_seconds"] == 0.0


def test_mfu_peak_of_each_accelerator_by_its_device_kind():
    """A v5p reports device_kind "TPU v5" (matched nothing: MFU NaN on v5p pods) and a TPU v3 chip is
    two JAX devices (its chip figure per device doubled the peak, halving MFU)."""
    from types import SimpleNamespace
    from cm3leon_jax import flops
    for kind, per_device in (("TPU v5", 459e12), ("TPU v5 lite", 197e12), ("TPU v6 lite", 918e12), ("TPU v4", 275e12),
                             ("TPU v3", 61.5e12), ("NVIDIA H100 80GB HBM3", 989e12),
                             # an L40S or L40 took the L4's 121e12 (MFU 3x / 1.5x too high), an H100 PCIe the SXM's
                             ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
                             ("NVIDIA H100 PCIe", 756e12),
                             # the NVL cards (835e12 dense) took the SXM's 989e12: MFU 16% too low
                             ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989e12)):
        devices = [SimpleNamespace(device_kind=kind, platform="tpu" if "TPU" in kind else "gpu")] * 8
        assert flops.peak_flops(devices)[0] == pytest.approx(8 * per_device), kind


def test_an_unknown_accelerator_leaves_mfu_out_of_the_records_not_nan(tmp_path, monkeypatch):
    """Every record held `"mfu": NaN`, which no strict JSON reader (jq, JavaScript) parses."""
    from cm3leon_jax import flops
    monkeypatch.setattr(flops, "peak_flops", lambda devices=None: (float("nan"), "unknown device kind 'X'"))
    trainer.train(tiny_config(total_steps=4), str(tmp_path))

    def no_constants(name):
        raise ValueError(f"{name} in metrics.jsonl")
    records = [json.loads(line, parse_constant=no_constants)
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and "tokens_per_second" in records[-1]
    assert not any("mfu" in r for r in records)


def test_sigterm_saves_and_resume_continues_exactly(tmp_path):
    steps = "--config.total_steps=120"
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_cli("cm3leon_jax.train", *_train_args(straight, steps), num_devices=8)

    proc = _start_training(interrupted, steps, "--config.checkpoint_every_steps=1000")
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    saved = sorted(int(s) for s in os.listdir(interrupted / "checkpoints") if s.isdigit())
    stopped_at = saved[-1]
    assert 3 <= stopped_at < 120, saved

    run_cli("cm3leon_jax.train", *_train_args(interrupted, steps), num_devices=8)
    reference, resumed = _read_metrics(straight), _read_metrics(interrupted)
    assert sorted(resumed) == sorted(reference) == list(range(1, 121))
    for step in range(stopped_at + 1, 121):
        assert resumed[step]["loss"] == reference[step]["loss"], step
        assert resumed[step]["grad_norm"] == reference[step]["grad_norm"], step


def test_sigterm_goes_back_to_its_previous_handler_after_training(tmp_path):
    """e2e runs more stages in the process after a trainer: the trainer's SIGTERM handler used to
    stay installed, so a SIGTERM during a later stage only set a flag nobody read."""
    from cm3leon_jax import checkpointing
    received = []
    mine = lambda signum, frame: received.append(signum)   # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        trainer.train(tiny_config(total_steps=1), str(tmp_path))
        assert signal.getsignal(signal.SIGTERM) is mine
        # a SIGTERM that came after the loop's last check (no save-and-stop) is passed on at the end
        watcher = checkpointing.PreemptionWatcher()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert not received
        watcher.close()
        time.sleep(0.05)
        assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_failed_last_checkpoint_write_still_closes_the_logger_and_gives_sigterm_back(tmp_path, monkeypatch):
    """A failed async save raises from CheckpointManager.close in train's `finally`: the logger,
    the data iterator and the SIGTERM handler after it were left open (an object-store workdir's
    last records never uploaded; a later e2e stage not stopped by SIGTERM)."""
    from cm3leon_jax import checkpointing
    closed = []

    def failing_close(self):
        self._manager.wait_until_finished()
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.CheckpointManager, "close", failing_close)
    close_logger = metrics.MetricsLogger.close
    monkeypatch.setattr(metrics.MetricsLogger, "close", lambda self: (closed.append("logger"), close_logger(self)))
    mine = lambda signum, frame: None   # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(OSError, match="disk full"):
            trainer.train(tiny_config(total_steps=2), str(tmp_path))
        assert signal.getsignal(signal.SIGTERM) is mine and closed == ["logger"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_two_processes_match_one_process_and_resume_on_one(tmp_path):
    steps = ["--config.total_steps=8", "--config.checkpoint_every_steps=5", "--config.mesh.data=2",
             "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    single = tmp_path / "single"
    run_cli("cm3leon_jax.train", *_train_args(single, *steps), num_devices=8)

    port = portpicker.pick_unused_port()
    multi = tmp_path / "multi"
    procs = [_start_training(multi, *steps, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}", num_devices=4) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    one, two = _read_metrics(single), _read_metrics(multi)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-6)
        np.testing.assert_allclose(two[step]["grad_norm"], one[step]["grad_norm"], rtol=1e-5)
    # each process saved its own data position
    data_dir = multi / "checkpoints" / "5" / "data"
    assert sorted(os.listdir(data_dir))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]

    # elastic resume: step 5 of the two processes goes on in one process of 4 devices, on another
    # mesh; the model state is resharded and the data positions redistributed, so steps 6-8 are the
    # uninterrupted run's (to float reassociation: the reductions run over another mesh)
    shutil.rmtree(multi / "checkpoints" / "8")
    resumed = run_cli("cm3leon_jax.train", *_train_args(multi, *steps[:2], "--config.mesh.data=2",
                                                        "--config.mesh.fsdp=2", "--config.mesh.tensor=1"), num_devices=4)
    assert "data positions saved by 2 processes, resumed on 1" in resumed.stderr
    again = _read_metrics(multi)
    assert sorted(again) == list(range(1, 9))
    for step in (6, 7, 8):
        np.testing.assert_allclose(again[step]["loss"], one[step]["loss"], rtol=1e-5)
        np.testing.assert_allclose(again[step]["grad_norm"], one[step]["grad_norm"], rtol=1e-4)


def test_a_preempted_run_says_so(tmp_path, monkeypatch):
    """Callers (the e2e runner) must not take a save-and-stop for the end of training."""
    from cm3leon_jax import checkpointing
    monkeypatch.setattr(checkpointing.PreemptionWatcher, "should_stop", lambda self, step: step >= 2)
    out = trainer.train(tiny_config(total_steps=6), str(tmp_path))
    assert out["preempted"] and out["final_step"] == 2
    monkeypatch.undo()
    # a changed seed or batch size would resume the saved data position in another order: refused
    # before anything is restored, unless asked for
    for changed, name in (({"seed": 1}, "seed: 0 -> 1"), ({"data.global_batch_size": 16}, "data.global_batch_size")):
        with pytest.raises(ValueError, match=f"changes them \\({name}"):
            trainer.train(tiny_config(total_steps=6, **changed), str(tmp_path))
    trainer.check_resume_keeps_data_order(str(tmp_path), tiny_config(seed=1, allow_data_change_on_resume=True))
    trainer.check_resume_keeps_data_order(str(tmp_path), tiny_config(**{"data.data_dir": "/moved/elsewhere"}))
    out = trainer.train(tiny_config(total_steps=6), str(tmp_path))
    assert not out["preempted"] and out["final_step"] == 6
    # the resumed run's TensorBoard writer marks its first step: points a killed run logged past the
    # checkpoint (which metrics.jsonl drops on resume) are hidden instead of drawn beside the new ones
    from tensorboardX.proto import event_pb2
    starts = [e.step for e in _tensorboard_events(tmp_path)
              if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]


def test_a_resume_may_move_the_mixed_datasets_but_not_change_their_weights(tmp_path):
    """The data's location may change on resume (data_dir does), but data.mix_with was compared as
    written: a resume after moving the mixed datasets to another disk was refused."""
    mixed = {"data.data_dir": "/old/a", "data.mix_with": "/old/b=2,/old/c=1"}
    (tmp_path / "config.json").write_text(tiny_config(**mixed).to_json_best_effort())
    trainer.check_resume_keeps_data_order(str(tmp_path), tiny_config(
        **{"data.data_dir": "/new/a", "data.mix_with": "/new/b=2, /new/c=1.0"}))
    for changed in ("/old/b=3,/old/c=1", "/old/c=1,/old/b=2", "/old/b=2"):
        with pytest.raises(ValueError, match="changes them \\(data.mix_with"):
            trainer.check_resume_keeps_data_order(str(tmp_path), tiny_config(**dict(mixed, **{"data.mix_with": changed})))


def test_a_mistyped_config_override_is_named_with_the_nearest_fields(capsys, monkeypatch):
    """ml_collections raised a bare `AttributeError: "'num_layer'"` from inside its flag parser (it
    reads the overrides from sys.argv, so a CLI's argv is set here)."""
    from absl import flags
    from cm3leon_jax import config_defaults, train  # noqa: F401 - defines --config
    config = os.path.join(os.path.dirname(__file__), "..", "experiments", "tiny_cpu.py")
    flags.FLAGS.unparse_flags()
    try:
        for argv in (["train", f"--config={config}", "--config.model.num_layer=3"],
                     ["train", "--config", config, "--config.model.num_layer", "3"]):
            monkeypatch.setattr(sys, "argv", argv)
            with pytest.raises(SystemExit):
                config_defaults.parse_flags(argv)
            err = capsys.readouterr().err
            assert "--config.model.num_layer: the config has no field 'model.num_layer'" in err
            assert "did you mean model.num_layers" in err and "Traceback" not in err
            flags.FLAGS.unparse_flags()
        argv = ["train", f"--config={config}", "--config.model.num_layers=3"]
        monkeypatch.setattr(sys, "argv", argv)
        config_defaults.parse_flags(argv)
        assert flags.FLAGS.config.model.num_layers == 3
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("given", [["--process_id=1"], ["--num_processes=0", "--process_id=0"]])
def test_distributed_flags_given_in_part_are_refused(given, monkeypatch):
    """`--process_id` alone (or with `--num_processes=0`) was ignored: the process ran alone (or
    joined an auto-detected cluster) instead of saying what is missing."""
    from absl import flags
    from cm3leon_jax import distributed
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail(f"initialize({kw})"))
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train", *given])
        with pytest.raises(ValueError, match="must be given together"):
            distributed.initialize_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("address", ["10.0.0.1", ":1234", "host:port"])
def test_a_coordinator_address_without_a_port_is_refused(address, monkeypatch):
    """`--coordinator_address=10.0.0.1` (no port) ended in an IndexError inside jax.distributed."""
    from absl import flags
    from cm3leon_jax import distributed
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail(f"initialize({kw})"))
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train", f"--coordinator_address={address}", "--num_processes=2", "--process_id=0"])
        with pytest.raises(ValueError, match=r"--coordinator_address=.* must be host:port"):
            distributed.initialize_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def test_a_cluster_jax_cannot_read_says_how_to_start_the_processes(monkeypatch):
    """`salloc -n 2` then python directly (SLURM_NTASKS without srun's per-task variables), or Open
    MPI 5: JAX's auto-detection finds nothing and said only 'coordinator_address should be defined.'"""
    from absl import flags
    from cm3leon_jax import distributed
    for var in distributed._CLUSTER_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")

    def undetected(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", undetected)
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train"])
        with pytest.raises(ValueError, match=r"SLURM_NTASKS=2 says .*several processes.*srun.*--coordinator_address"):
            distributed.initialize_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
