"""Trains a CM3Leon language model.

    python -m cm3leon_jax.train --config experiments/tiny_cpu.py --workdir /tmp/run \
        [--config.total_steps=100] [--coordinator_address=host:port --num_processes=N --process_id=i]

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from cm3leon_jax import config_defaults, distributed, metrics, trainer, workdir_io

config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl and TensorBoard events: a local "
                    "path or a gs:// (s3://, az://) URL all hosts share")


def run(train_fn) -> None:
    """The start-up every training CLI shares (LM and VQ): logs, processes, flags, workdir."""
    metrics.quiet_library_logs()
    distributed.initialize_from_flags()
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    workdir = workdir_io.resolve(flags.FLAGS.workdir)
    workdir_io.check_backend(workdir)
    workdir_io.makedirs(workdir)
    train_fn(flags.FLAGS.config, workdir)


def main(argv):
    del argv
    run(trainer.train)


if __name__ == "__main__":
    app.run(main, flags_parser=config_defaults.parse_flags)
