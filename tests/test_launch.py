"""Tests for launch/tpu_run.sh (the Cloud TPU VM launcher).

Everything runs without gcloud: --dry_run only prints commands, and the
"real mode" tests put a fake `gcloud` shim on PATH that records its arguments.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_run.sh"
BASH = shutil.which("bash") or "/bin/bash"

REQUIRED = ["--tpu_name", "leon-test", "--zone", "us-west4-a", "--workdir", "gs://bucket/run1"]


def run_script(args, env=None, cwd=None, script=SCRIPT):
    return subprocess.run(
        [BASH, str(script), *args],
        capture_output=True,
        text=True,
        env=env if env is not None else os.environ.copy(),
        cwd=cwd,
        timeout=60,
    )


def poisoned_env(tmp_path):
    """PATH with a `gcloud` that fails loudly: proves dry runs never call it
    (gcloud may really be installed on the test machine)."""
    bin_dir = tmp_path.parent / (tmp_path.name + "_poison_bin")
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text("#!/bin/sh\necho 'gcloud must not run in dry-run mode' >&2\nexit 99\n")
    gcloud.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def dry(args, tmp_path):
    # --dry_run goes first: anything after a `--` in args is a train arg.
    res = run_script(["--dry_run", *args], env=poisoned_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return res.stdout


def cmd_lines(out):
    return [line for line in out.splitlines() if line.startswith("+ ")]


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run([BASH, "-n", str(SCRIPT)]).returncode == 0


def test_help(tmp_path):
    res = run_script(["--help"], env=poisoned_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0
    for flag in ["--tpu_name", "--zone", "--workdir", "--spot", "--dry_run", "--delete_after"]:
        assert flag in res.stdout


def test_dry_run_commands(tmp_path):
    out = dry([*REQUIRED, "--", "--config.total_steps=1000"], tmp_path)
    lines = cmd_lines(out)
    assert any("tpu-vm describe leon-test" in l for l in lines)

    create = [l for l in lines if "gcloud compute tpus tpu-vm create leon-test" in l]
    assert len(create) == 1
    assert "--zone us-west4-a" in create[0]
    assert "--accelerator-type v5litepod-8" in create[0]
    assert "--version v2-alpha-tpuv5-lite" in create[0]
    assert "--spot" not in create[0]
    assert "--project" not in create[0]

    scp = [l for l in lines if "tpu-vm scp" in l]
    assert len(scp) == 1 and "--worker=all" in scp[0]

    ssh = [l for l in lines if "tpu-vm ssh leon-test" in l]
    assert len(ssh) == 3  # untar, install, train
    assert all("--worker=all" in l and "--zone us-west4-a" in l for l in ssh)
    assert "tar -xzf" in ssh[0] and "~/cm3leon_jax" in ssh[0]
    assert "jax[tpu]" in ssh[1] and 'pip install -e ".[gcs]"' in ssh[1]  # gcsfs for the gs:// workdir

    train = ssh[2]
    assert "cd ~/cm3leon_jax && python3 -m cm3leon_jax.train" in train
    assert "--config experiments/tiny_cpu.py" in train
    assert "--workdir gs://bucket/run1" in train
    assert train.index("--workdir") < train.index("--config.total_steps=1000")
    assert "| tee -a tpu_run_leon-test_" in train and train.endswith(".log")

    # No delete without --delete_after, and dry run writes no files.
    assert not any("tpu-vm delete" in l for l in lines)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_custom_flags_both_syntaxes(tmp_path):
    out = dry(
        [
            "--tpu_name=big",
            "--zone=europe-west4-b",
            "--workdir",
            "gs://b/x",
            "--project=my-proj",
            "--accelerator_type",
            "v5litepod-16",
            "--runtime_version=v2-alpha-tpuv5",
            "--config",
            "experiments/cm3leon_350m.py",
            "--repo_dir=/opt/code",
            "--spot",
        ],
        tmp_path,
    )
    lines = cmd_lines(out)
    create = next(l for l in lines if "tpu-vm create big" in l)
    assert "--accelerator-type v5litepod-16" in create
    assert "--version v2-alpha-tpuv5" in create
    assert "--zone europe-west4-b" in create
    assert "--spot" in create
    assert "--project my-proj" in create
    # --project goes to every gcloud command.
    assert all("--project my-proj" in l for l in lines if l.startswith("+ gcloud"))
    train = [l for l in lines if "cm3leon_jax.train" in l][0]
    assert "cd /opt/code &&" in train
    assert "--config experiments/cm3leon_350m.py" in train


def test_a_mounted_workdir_installs_no_gcs_backend(tmp_path):
    out = dry(["--tpu_name", "leon-test", "--zone", "us-west4-a", "--workdir", "/mnt/bucket/run1"], tmp_path)
    install = next(l for l in cmd_lines(out) if "jax[tpu]" in l)
    assert 'pip install -e "."' in install and "[gcs]" not in install


@pytest.mark.parametrize("scheme,extra", [("s3", "[s3]"), ("az", "[az]")])
def test_other_object_store_workdirs_install_their_backend(tmp_path, scheme, extra):
    """s3:// and az:// workdirs are shared like gs://: they were warned about as per-worker local
    disks and their fsspec backend was never installed."""
    res = run_script(["--dry_run", "--tpu_name", "leon-test", "--zone", "us-west4-a", "--workdir",
                      f"{scheme}://bucket/run1"], env=poisoned_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0 and "local disk" not in res.stderr, res.stderr
    install = next(l for l in cmd_lines(res.stdout) if "jax[tpu]" in l)
    assert f'pip install -e ".{extra}"' in install
    bad = run_script(["--dry_run", "--tpu_name", "x", "--zone", "z", "--workdir", "hdfs://a/b"],
                     env=poisoned_env(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "gs://, s3://, az://" in bad.stderr


def test_dry_run_delete_after(tmp_path):
    out = dry([*REQUIRED, "--delete_after"], tmp_path)
    lines = cmd_lines(out)
    delete = [l for l in lines if "gcloud compute tpus tpu-vm delete leon-test" in l]
    assert len(delete) == 1
    assert "--zone us-west4-a" in delete[0] and "--quiet" in delete[0]
    assert lines[-1] == delete[0]  # deletion comes after the training run


def test_extra_args_are_quoted_for_the_remote_shell(tmp_path):
    out = dry([*REQUIRED, "--", "--config.name=it's a run"], tmp_path)
    train = [l for l in cmd_lines(out) if "cm3leon_jax.train" in l][0]
    # Re-parse the printed line as a shell would: the --command value must be
    # one argument, and re-parsing *that* must yield the original extra arg.
    pasted = train[2:].split(" 2>&1 | tee")[0]
    argv = subprocess.run(
        [BASH, "-c", 'for a in ' + pasted + '; do printf "%s\\0" "$a"; done'],
        capture_output=True, text=True, check=True,
    ).stdout.split("\0")[:-1]
    remote = argv[argv.index("--command") + 1]
    remote_argv = subprocess.run(
        [BASH, "-c", "set -- " + remote.split("&& ", 1)[1] + '; printf "%s\\0" "$@"'],
        capture_output=True, text=True, check=True,
    ).stdout.split("\0")[:-1]
    assert remote_argv[-1] == "--config.name=it's a run"


@pytest.mark.parametrize("missing", ["--tpu_name", "--zone", "--workdir"])
def test_missing_required_flag(tmp_path, missing):
    args = []
    for i in range(0, len(REQUIRED), 2):
        if REQUIRED[i] != missing:
            args += REQUIRED[i : i + 2]
    res = run_script(["--dry_run", *args], env=poisoned_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert missing in res.stderr
    assert res.stdout == ""


def test_a_mistyped_config_is_refused_before_any_gcloud_command(tmp_path):
    """It was found only on the workers, after the TPU was created and the code installed."""
    res = run_script(["--dry_run", *REQUIRED, "--config", "experiments/typo.py"], env=poisoned_env(tmp_path),
                     cwd=tmp_path)
    assert res.returncode == 2 and "--config experiments/typo.py: no such file" in res.stderr
    assert "gcloud" not in res.stdout
    assert "--config experiments/sft_tiny.py:gs://b/lm " in dry([*REQUIRED, "--config", "experiments/sft_tiny.py:gs://b/lm"],
                                                               tmp_path)


def test_unknown_flag(tmp_path):
    res = run_script(["--dry_run", *REQUIRED, "--bogus_flag=1"], env=poisoned_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert "--bogus_flag" in res.stderr


def test_flag_without_value(tmp_path):
    res = run_script(["--dry_run", "--tpu_name", "x", "--zone"], env=poisoned_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert "--zone" in res.stderr


def test_real_mode_without_gcloud(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin)}
    res = run_script(REQUIRED, env=env, cwd=tmp_path)
    assert res.returncode != 0
    assert "gcloud" in res.stderr


# ---------------------------------------------------------------- real mode with a fake gcloud

FAKE_GCLOUD = """#!/bin/bash
# Record each call (one arg per line, calls separated by ---), then emulate.
{ printf '%s\\n' "$@"; echo ---; } >> "$FAKE_GCLOUD_LOG"
case "$4" in
  describe) [[ -n "${FAKE_TPU_STATE:-}" ]] && { echo "$FAKE_TPU_STATE"; exit 0; }; exit 1 ;;
  ssh) for a; do last=$a; done
       if [[ "$last" == *cm3leon_jax.train* ]]; then
         echo "training output line"
         exit "${FAKE_TRAIN_RC:-0}"
       fi ;;
esac
exit 0
"""


@pytest.fixture
def fake_env(tmp_path):
    """A tiny fake repo holding a copy of the script, plus a fake gcloud on PATH."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "cm3leon_jax").mkdir()
    (repo / "cm3leon_jax" / "__init__.py").write_text("")
    (repo / "experiments").mkdir()
    (repo / "experiments" / "tiny_cpu.py").write_text("")   # the default --config, checked up front
    shutil.copy(SCRIPT, repo / "launch" / "tpu_run.sh")
    shutil.copy(SCRIPT.parent / "common.sh", repo / "launch" / "common.sh")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log = tmp_path / "gcloud_calls.txt"
    env = {
        **os.environ,
        "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_GCLOUD_LOG": str(log),
        "TMPDIR": str(tmp_path),
    }

    def go(args, **extra_env):
        res = run_script(args, env={**env, **extra_env}, cwd=cwd, script=repo / "launch" / "tpu_run.sh")
        calls = [c.strip("\n").split("\n") for c in log.read_text().split("---\n") if c.strip()] if log.exists() else []
        return res, calls, cwd

    return go


def test_real_mode_with_fake_gcloud(fake_env):
    res, calls, cwd = fake_env([*REQUIRED, "--", "--config.total_steps=5"])
    assert res.returncode == 0, res.stderr
    verbs = [c[3] for c in calls]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    # Training output is streamed and tee'd into the local log file.
    assert "training output line" in res.stdout
    logs = list(cwd.glob("tpu_run_leon-test_*.log"))
    assert len(logs) == 1 and "training output line" in logs[0].read_text()
    assert "--config.total_steps=5" in calls[-1][-1]


def test_real_mode_reuses_existing_tpu(fake_env):
    res, calls, _ = fake_env(REQUIRED, FAKE_TPU_STATE="READY")
    assert res.returncode == 0, res.stderr
    assert "create" not in [c[3] for c in calls]
    assert "reusing" in res.stdout


def test_real_mode_delete_after_on_failure(fake_env):
    res, calls, _ = fake_env([*REQUIRED, "--delete_after"], FAKE_TRAIN_RC="3")
    assert res.returncode == 3  # the training failure is propagated
    assert [c[3] for c in calls][-1] == "delete"
    assert calls[-1][4] == "leon-test"


def test_real_mode_preempted_tpu_is_an_error(fake_env):
    res, calls, _ = fake_env(REQUIRED, FAKE_TPU_STATE="PREEMPTED")
    assert res.returncode == 1
    assert "PREEMPTED" in res.stderr and "delete" in res.stderr
    assert [c[3] for c in calls] == ["describe"]
