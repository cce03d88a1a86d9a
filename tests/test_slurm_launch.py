"""launch/slurm_run.sh: the sbatch script it writes, and that script run for real on this machine.

No Slurm here: a fake `sbatch` records what is submitted, a fake `srun` runs the task command
itself (one node: one process), and a fake `scontrol` records requeues. The batch script then
trains a tiny model, and on Slurm's time-limit signal (USR1 to the batch shell) checkpoints,
requeues, and the rerun (what Slurm's requeue does) resumes and finishes.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, cli_env
from tests.test_train import TINY_FLAGS

SCRIPT = Path(REPO) / "launch" / "slurm_run.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _fake_bin(tmp_path) -> Path:
    """sbatch/scontrol that record their arguments; srun that drops its options and runs the task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("sbatch", "scontrol"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _env(tmp_path, **extra):
    env = cli_env(1, **extra)
    env["PATH"] = f"{_fake_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    return env


def _run_launcher(script, args, env, cwd):
    return subprocess.run([BASH, str(script), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60)


def _launch(args, env, cwd):
    return _run_launcher(SCRIPT, args, env, cwd)


def test_dry_run_prints_the_batch_script_and_submits_nothing(tmp_path):
    env = _env(tmp_path)
    res = _launch(["--nodes", "4", "--gpus_per_node=8", "--partition", "gpu", "--time", "12:00:00", "--setup",
                   "source /opt/venv/bin/activate", "--workdir", "/shared/run", "--config", "experiments/tiny_cpu.py",
                   "--dry_run", "--", "--config.total_steps=1000", "--config.model.lora_targets=query, value"],
                  env, tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", f"cd {REPO}", "source /opt/venv/bin/activate"):
        assert line in out.splitlines(), line
    # one process per node running the train CLI, its arguments quoted for the shell
    assert ("srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m cm3leon_jax.train --config "
            "experiments/tiny_cpu.py --workdir /shared/run --config.total_steps=1000 "
            "'--config.model.lora_targets=query, value' &") in out
    assert not (tmp_path / "calls.log").exists() and not list(tmp_path.glob("*.sbatch"))
    plain = _launch(["--workdir", "/shared/run", "--no_requeue", "--dry_run"], env, tmp_path).stdout
    assert "--requeue" not in plain and "USR1" not in plain and "scontrol" not in plain


def test_bad_flags_are_refused_before_anything_is_written(tmp_path):
    env = _env(tmp_path)
    for args, message in [([], "missing required flag --workdir"),
                          (["--workdir", "runs/x"], "must be absolute"),
                          (["--workdir", "/r", "--nodes", "two"], "--nodes must be a positive integer"),
                          (["--workdir", "/r", "--gpus_per_node", "0"], "--gpus_per_node must be a positive integer"),
                          (["--workdir", "/r", "--bogus", "1"], "unknown flag: --bogus"),
                          (["--workdir", "/r", "--config", "experiments/nope.py"], "no such file"),
                          (["--workdir", "/r", "--job_name", "a b"], "--job_name may hold"),
                          # a time-limit signal due before the job starts came at once: checkpoint and requeue
                          # again and again (Slurm's "5" is minutes)
                          (["--workdir", "/r", "--time", "5"], "--signal_seconds=300 is not below --time 5 (300 s)"),
                          (["--workdir", "/r", "--time", "0-0:10", "--signal_seconds", "900"], "(600 s)")]:
        res = _launch(args, env, tmp_path)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
    assert not (tmp_path / "calls.log").exists() and not list(tmp_path.glob("*.sbatch"))
    for args in (["--time", "6"], ["--time", "1-0"], ["--time", "UNLIMITED"], ["--time", "5", "--no_requeue"]):
        assert _launch(["--workdir", "/r", "--dry_run", *args], env, tmp_path).returncode == 0, args


def _metrics_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_the_submitted_script_trains_checkpoints_at_the_time_limit_requeues_and_resumes(tmp_path):
    env = _env(tmp_path, SLURM_JOB_ID="7")
    workdir = tmp_path / "run"
    steps = 60
    res = _launch(["--workdir", workdir, "--python", sys.executable, "--signal_seconds", "120", "--", *TINY_FLAGS,
                   f"--config.total_steps={steps}", "--config.checkpoint_every_steps=1000"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    (batch,) = tmp_path.glob("slurm_cm3leon_*.sbatch")
    assert (tmp_path / "calls.log").read_text() == f"sbatch {batch.name}\n"

    # the job starts; Slurm's time-limit warning (USR1 to the batch shell) arrives mid-run
    job = subprocess.Popen([BASH, str(batch)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(_metrics_steps(workdir)) < 3:
        assert job.poll() is None and time.time() < deadline, "training ended before the signal"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err.decode()[-3000:]
    assert "time limit in 120s: checkpointing, then requeueing job 7" in out.decode()
    assert (tmp_path / "calls.log").read_text().splitlines()[-1] == "scontrol requeue 7"
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved and 3 <= saved[-1] < steps, saved   # the tasks checkpointed where they stopped

    # the requeued job runs the same script: it resumes from that checkpoint and finishes
    again = subprocess.run([BASH, str(batch)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step" in again.stderr
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())[-1] == steps
    logged = _metrics_steps(workdir)
    assert sorted(set(logged)) == list(range(1, steps + 1))


INGEST = Path(REPO) / "launch" / "slurm_ingest.sh"


def _fake_sbatch_bin(tmp_path) -> Path:
    """An sbatch that records its arguments and, like `sbatch --parsable`, prints a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "sbatch $*" >> {tmp_path / "calls.log"}\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


def _ingest(args, env, cwd):
    return _run_launcher(INGEST, args, env, cwd)


def test_ingest_dry_run_prints_the_array_and_merge_scripts(tmp_path):
    env = cli_env(1)
    env["PATH"] = f"{_fake_sbatch_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    res = _ingest(["--parts", "64", "--max_running=16", "--gpus_per_task", "1", "--partition", "gpu",
                   "--out", "/shared/data", "--config", "experiments/data_shapes.py", "--remove_parts",
                   "--merge_workers", "8", "--dry_run", "--", "--config.source=jsonl",
                   "--config.jsonl=/shared/my manifest.jsonl"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for line in ("#SBATCH --array=0-63%16", "#SBATCH --gpus-per-task=1", "#SBATCH --partition=gpu",
                 "#SBATCH --job-name=cm3leon_ingest", "#SBATCH --job-name=cm3leon_ingest_merge", f"cd {REPO}",
                 "python -m data_pipeline.prepare --config experiments/data_shapes.py --out /shared/data --num_shards 64 "
                 "--config.source=jsonl '--config.jsonl=/shared/my manifest.jsonl' --shard_index \"$SLURM_ARRAY_TASK_ID\"",
                 "python -m data_pipeline.prepare --out /shared/data --merge --remove_parts --merge_workers 8"):
        assert line in lines, line
    assert not (tmp_path / "calls.log").exists() and not list(tmp_path.glob("*.sbatch"))
    for args, message in [(["--out", "/d", "--config", "experiments/data_shapes.py"], "missing required flag --parts"),
                          (["--parts", "1", "--out", "/d", "--config", "experiments/data_shapes.py"], "at least 2"),
                          (["--parts", "4", "--out", "d", "--config", "experiments/data_shapes.py"], "must be absolute"),
                          (["--parts", "4", "--out", "/d", "--config", "experiments/nope.py"], "no such file"),
                          (["--parts", "4", "--out", "/d", "--config", "experiments/data_shapes.py", "--module", "x"],
                           "--module must be"),
                          (["--parts", "4", "--out", "/d", "--config", "experiments/data_shapes.py", "--max_running",
                            "0"], "--max_running must be a positive integer")]:
        res = _ingest(args, env, tmp_path)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


INDEX = Path(REPO) / "launch" / "slurm_index.sh"


def test_ingest_passes_an_overwrite_after_the_separator_to_the_merge_too(tmp_path):
    """`-- --overwrite` redid the parts, but the merge job ran without it, found the old dataset,
    logged that it already holds documents and exited 0: the rebuild was never merged."""
    env = cli_env(1)
    env["PATH"] = f"{_fake_sbatch_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    res = _ingest(["--parts", "2", "--out", "/shared/data", "--config", "experiments/data_shapes.py", "--dry_run", "--",
                   "--overwrite"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "python -m data_pipeline.prepare --out /shared/data --merge --overwrite" in res.stdout.splitlines()


def _index(args, env, cwd):
    return _run_launcher(INDEX, args, env, cwd)


def test_index_dry_run_prints_a_chain_of_stage_scripts(tmp_path):
    env = cli_env(1)
    env["PATH"] = f"{_fake_sbatch_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    res = _index(["--hosts", "4", "--data", "/shared/data", "--num_shards=8", "--candidates", "64", "--steps", "500",
                  "--gpus_per_task", "1", "--max_running", "2", "--remove_parts", "--dry_run"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    host = ' --num_hosts 4 --host_index "$SLURM_ARRAY_TASK_ID"'
    for line in ("python -m data_pipeline.index --data /shared/data --stage train --steps 500",
                 "python -m data_pipeline.index --data /shared/data --stage embed" + host,
                 "python -m data_pipeline.index --data /shared/data --stage search --num_shards 8 --candidates 64" + host,
                 "python -m data_pipeline.index --data /shared/data --stage select" + host,
                 "python -m data_pipeline.index --data /shared/data --stage finish --remove_parts",
                 "#SBATCH --array=0-3%2", f"cd {REPO}"):
        assert line in lines, line
    submits = [line for line in lines if line.startswith("+ sbatch")]
    assert [s.split()[-1].split(".")[-2] for s in submits] == ["train", "embed", "search", "select", "finish"]
    assert [s.split("afterok:")[1].split()[0] if "afterok" in s else None for s in submits] == [
        None, "TRAIN_JOB_ID", "EMBED_JOB_ID", "SEARCH_JOB_ID", "SELECT_JOB_ID"]
    # GPUs go to the jobs that run an encoder
    scripts = res.stdout.split("# dry run: the ")[1:]
    assert [("--gpus-per-task=1" in s) for s in scripts] == [True, True, False, False, False]
    assert not (tmp_path / "calls.log").exists() and not list(tmp_path.glob("*.sbatch"))
    for args, message in [(["--data", "/d"], "missing required flag --hosts"),
                          (["--hosts", "1", "--data", "/d"], "at least 2"),
                          (["--hosts", "4", "--data", "d"], "must be absolute"),
                          (["--hosts", "4", "--data", "/d", "--num_shards", "3"], "at least --hosts"),
                          (["--hosts", "4", "--data", "/d", "--embeddings", "/e.npy", "--clip_model", "/c"], "not both"),
                          (["--hosts", "4", "--data", "/d", "--candidates", "0"], "--candidates must be a positive"),
                          (["--hosts", "4", "--data", "/d", "--", "--x"], "no arguments after"),
                          (["--hosts", "4", "--data", "/d", "--bogus"], "unknown flag: --bogus")]:
        res = _index(args, env, tmp_path)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


def test_an_absolute_config_path_is_taken_and_checked_where_it_is(tmp_path):
    """`--config /abs/cfg.py` was looked for at REPO_DIR//abs/cfg.py and refused as missing."""
    env = _env(tmp_path)
    config = tmp_path / "my configs" / "run.py"
    config.parent.mkdir()
    shutil.copy(Path(REPO) / "experiments" / "tiny_cpu.py", config)
    res = _launch(["--workdir", "/r", "--config", config, "--dry_run"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"--config '{config}' --workdir /r &" in res.stdout
    res = _ingest(["--parts", "2", "--out", "/d", "--config", config, "--dry_run"], env, tmp_path)
    assert res.returncode == 0 and f"--config '{config}' --out /d" in res.stdout, res.stderr
    for res in (_launch(["--workdir", "/r", "--config", tmp_path / "nope.py"], env, tmp_path),
                _ingest(["--parts", "2", "--out", "/d", "--config", tmp_path / "nope.py"], env, tmp_path)):
        assert res.returncode == 2 and f"--config {tmp_path / 'nope.py'}: no such file" in res.stderr, res.stderr


def test_every_launcher_the_readme_names_is_executable():
    """The README runs them as `launch/X.sh ...`: a launcher without its executable bit fails with
    "Permission denied" (slurm_ingest.sh was committed 0644; the tests run it through bash)."""
    for name in ("slurm_run.sh", "slurm_ingest.sh", "slurm_index.sh", "tpu_run.sh"):
        assert os.access(Path(REPO) / "launch" / name, os.X_OK), name
