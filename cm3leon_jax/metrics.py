"""One logger, three sinks: stdout for people, TensorBoard for curves, metrics.jsonl for scripts."""
from __future__ import annotations

import json
import logging as std_logging
import math
import time

import jax
from absl import logging

from cm3leon_jax import workdir_io


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


DEFAULT_STDOUT_KEYS = ("loss", "eval_loss", "z_loss", "grad_norm", "learning_rate")


class StepTimer:
    """Seconds per step between restarts; the first step a process runs (it compiles) is never
    timed. Restart only after blocking on a step's outputs, so the interval holds whole steps."""

    def __init__(self):
        self._start, self._step = None, 0

    @property
    def started(self) -> bool:
        return self._start is not None

    def restart(self, step: int) -> None:
        self._start, self._step = time.perf_counter(), step

    def step_time(self, step: int) -> float | None:
        if self._start is None or step <= self._step:
            return None
        return (time.perf_counter() - self._start) / (step - self._step)


def step_record(step_metrics, timer: StepTimer, step: int, total_steps: int, per_step: dict[str, float],
                seconds_left: float | None = None) -> dict[str, float]:
    """What a logged step writes: its metrics as floats and, once steps have been timed, the seconds
    per step, each per-step amount as a rate (tokens or images per second; FLOPs / peak is MFU) and
    the ETA, capped by `seconds_left` of a time budget."""
    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    step_time = timer.step_time(step)
    if step_time is not None:
        eta = (total_steps - step) * step_time
        record.update(step_time=step_time, **{k: amount / step_time for k, amount in per_step.items()},
                      eta_seconds=eta if seconds_left is None else min(eta, max(seconds_left, 0.0)))
    return record


class TraceWindow:
    """A profiler trace of steps `first` .. `first + count - 1` (numbered as logged, from 1) for
    TensorBoard's profile plugin or XProf: `log_dir/plugins/profile/<time>/<host>.xplane.pb`, one
    file a process. first=0: off; a run resumed past `first` takes none. Step 1 compiles: trace later."""

    def __init__(self, log_dir: str, first: int, count: int):
        if first < 0 or (first and count < 1):
            raise ValueError(f"profile_first_step={first} must be >= 0 (0: no trace) and profile_steps={count} "
                             ">= 1 when it is on")
        self.log_dir, self.first, self.last = log_dir, first, first + count - 1
        self._tracing = False

    @classmethod
    def from_config(cls, config, log_dir: str) -> "TraceWindow":
        return cls(log_dir, int(config.get("profile_first_step", 0)), int(config.get("profile_steps", 1)))

    def run(self, step: int, train_step, state, batch):
        """`train_step(state, batch)` run as step `step` (1-based) and named so in the trace (the
        profile's step view); the trace starts before the window's first step and stops once its
        last has finished on the device."""
        if self.first and step == self.first:
            jax.profiler.start_trace(self.log_dir)
            self._tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            outputs = train_step(state, batch)
        if self._tracing and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()
            logging.info("profile of steps %d-%d written under %s/plugins/profile", self.first, self.last, self.log_dir)
        return outputs

    def close(self) -> None:
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False


class MetricsLogger:
    """Writes only on process 0 so a multi-host run produces one record per step.

    `stdout_keys` are the metrics shown on the stdout line (all go to TensorBoard and the JSONL);
    `rate` is the (metric, label) of the throughput shown there; `resumed_step`: the checkpoint a
    resumed run starts from (TensorBoard then hides events past it). A remote workdir's files are
    uploaded whole (workdir_io.AppendableFile), at most every `remote_flush_seconds` and at `flush()`.
    """

    def __init__(self, workdir: str, enabled: bool | None = None, *, stdout_keys=DEFAULT_STDOUT_KEYS,
                 rate: tuple[str, str] = ("tokens_per_second", "tokens/s"),
                 remote_flush_seconds: float = workdir_io.REMOTE_FLUSH_SECONDS, resumed_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._stdout_keys, self._rate = tuple(stdout_keys), rate
        self._jsonl = None
        self._tb = None
        self._flush_every = float(remote_flush_seconds) if workdir_io.is_remote(workdir) else 0.0
        self._flushed_at = time.monotonic()
        if self.enabled:
            workdir_io.makedirs(workdir)
            self._jsonl = workdir_io.AppendableFile(workdir_io.join(workdir, "metrics.jsonl"))
            # a resumed run hides the events a killed run logged past its checkpoint (TensorBoard's purge
            # marker), as restore_or_init drops them from metrics.jsonl: the curves read as one run. A
            # restart from scratch over a killed run's events (no checkpoint yet) hides them all.
            logdir = workdir_io.join(workdir, "tensorboard")
            earlier = bool(resumed_step) or workdir_io.exists(logdir)
            self._tb = workdir_io.tensorboard_writer(logdir, purge_step=int(resumed_step) + 1 if earlier else None)

    def write(self, step: int, metrics: dict[str, float], total_steps: int | None = None) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), **metrics}
        self._jsonl.write((json.dumps(record) + "\n").encode("utf-8"))
        for key, value in metrics.items():
            if math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        if time.monotonic() - self._flushed_at >= self._flush_every:
            self.flush()
        parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
        for key in self._stdout_keys:
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4g}")
        rate_key, rate_label = self._rate
        if rate_key in metrics:
            parts.append(f"{rate_label} {metrics[rate_key]:,.0f}")
        if "packed_fraction" in metrics and rate_key in metrics:   # how much of that rate is padding
            parts.append(f"packed {100 * metrics['packed_fraction']:.0f}%")
        if "mfu" in metrics and math.isfinite(metrics["mfu"]):
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        if metrics.get("skipped_steps", 0) > 0:   # the NaN/inf guard's skips: shown once there are any
            parts.append(f"skipped {int(metrics['skipped_steps'])}")
        if metrics.get("packer_skipped", 0) > 0:   # documents that fit no row: data loss, shown once there is any
            parts.append(f"docs skipped {int(metrics['packer_skipped'])}")
        if metrics.get("neighbours_cut", 0) > 0:   # retrieval lost to data.seq_len: shown once there is any
            parts.append(f"neighbours cut {int(metrics['neighbours_cut'])}")
        if "eta_seconds" in metrics:
            parts.append(f"ETA {_format_duration(metrics['eta_seconds'])}")
        logging.info(" | ".join(parts))

    def flush(self) -> None:
        """Everything written so far reaches the workdir (the trainers call it after each
        checkpoint save, so a resumed run finds every record up to its checkpoint)."""
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()
            self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_records(workdir: str) -> list[dict]:
    """A workdir's metrics.jsonl as its records, in order ([] when it has none)."""
    path = workdir_io.join(workdir, "metrics.jsonl")
    if not workdir_io.exists(path):
        return []
    return [json.loads(line) for line in workdir_io.read_text(path).splitlines() if line.strip()]


def last_values(records: list[dict], keys) -> dict[str, dict[str, float]]:
    """For each key, the step and value of the last record holding it (keys no record holds are left
    out): a run's final loss beside its last held-out loss, which is logged less often."""
    found = {}
    for record in records:
        for key in keys:
            if key in record:
                found[key] = {"step": int(record["step"]), "value": float(record[key])}
    return found


class _QuietLibraries(std_logging.Filter):
    """Orbax and grain log every save step at INFO; keep their warnings, drop the chatter."""

    def filter(self, record):
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/tensorstore/"))
        return record.levelno >= std_logging.WARNING or not noisy


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
