import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

import data_pipeline
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
    assert losses[0] > 3.5  # ~log(64) at init
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_train_writes_metrics_events_and_checkpoints(tmp_path):
    config = tiny_config(total_steps=6)
    last = trainer.train(config, str(tmp_path))
    records = _read_metrics(tmp_path)
    assert sorted(records) == [2, 4, 6]
    for key in ("loss", "z_loss", "grad_norm", "learning_rate", "tokens_per_second", "mfu", "eta_seconds"):
        assert np.isfinite(records[6][key]), key
    timed = records[4]   # rates are the step's amounts over its measured seconds; the ETA counts steps left
    assert timed["tokens_per_second"] == pytest.approx(8 * 32 / timed["step_time"])
    assert timed["eta_seconds"] == pytest.approx(2 * timed["step_time"]) and records[6]["eta_seconds"] == 0
    assert [records[s]["tokens_seen"] for s in (2, 4, 6)] == [2 * 8 * 32, 4 * 8 * 32, 6 * 8 * 32]
    assert last["loss"] == records[6]["loss"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert "6" in os.listdir(tmp_path / "checkpoints")
    # rerunning a finished run resumes at the end and trains nothing more
    trainer.train(config, str(tmp_path))
    assert sorted(_read_metrics(tmp_path)) == [2, 4, 6]


def test_step_record_rates_and_an_eta_capped_by_the_time_budget():
    timer = metrics.StepTimer()
    assert metrics.step_record({"loss": np.float32(1.5)}, timer, 2, 10, {"images_per_second": 8}) == {"loss": 1.5}
    timer.restart(0)
    time.sleep(0.02)
    record = metrics.step_record({"loss": np.float32(1.5)}, timer, 2, 1000, {"images_per_second": 8}, seconds_left=0.5)
    assert record["images_per_second"] == pytest.approx(8 / record["step_time"]) and record["step_time"] >= 0.01
    assert record["eta_seconds"] == 0.5                      # 998 steps left would take longer than the budget
    assert metrics.step_record({}, timer, 2, 1000, {}, seconds_left=-3.0)["eta_seconds"] == 0.0


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
    out = trainer.train(tiny_config(total_steps=6), str(tmp_path))
    assert not out["preempted"] and out["final_step"] == 6
