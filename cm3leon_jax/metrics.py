"""One logger, three sinks: stdout for people, TensorBoard for curves, metrics.jsonl for scripts."""
from __future__ import annotations

import json
import logging as std_logging
import math
import os
import time

import jax
from absl import logging


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


DEFAULT_STDOUT_KEYS = ("loss", "z_loss", "grad_norm", "learning_rate")


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


class MetricsLogger:
    """Writes only on process 0 so a multi-host run produces one record per step.

    `stdout_keys` are the metrics shown on the stdout line (all go to TensorBoard and the JSONL);
    `rate` is the (metric, label) of the throughput shown there.
    """

    def __init__(self, workdir: str, enabled: bool | None = None, *, stdout_keys=DEFAULT_STDOUT_KEYS,
                 rate: tuple[str, str] = ("tokens_per_second", "tokens/s")):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._stdout_keys, self._rate = tuple(stdout_keys), rate
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float], total_steps: int | None = None) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()
        parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
        for key in self._stdout_keys:
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4g}")
        rate_key, rate_label = self._rate
        if rate_key in metrics:
            parts.append(f"{rate_label} {metrics[rate_key]:,.0f}")
        if "mfu" in metrics and math.isfinite(metrics["mfu"]):
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        if "eta_seconds" in metrics:
            parts.append(f"ETA {_format_duration(metrics['eta_seconds'])}")
        logging.info(" | ".join(parts))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class _QuietLibraries(std_logging.Filter):
    """Orbax and grain log every save step at INFO; keep their warnings, drop the chatter."""

    def filter(self, record):
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/tensorstore/"))
        return record.levelno >= std_logging.WARNING or not noisy


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
