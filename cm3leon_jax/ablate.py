"""Runs a set of end-to-end experiment files and writes one results table.

    python -m cm3leon_jax.ablate --workdir workdirs/ablations [--set all|retrieval|dropout|decoding|size]
        [--configs experiments/a.py,experiments/b.py]

Every config is a full `e2e` config (experiments/ablation_*.py). All runs share
WORKDIR/cache: a stage whose settings (and upstream stages) match another run's is computed once,
so the ablations share one text tokenizer, VQ tokenizer, dataset and retrieval index, and the
decoding-strategy table reuses the base model. Each run's evaluation lands in WORKDIR/NAME/;
WORKDIR/results.md and results.json gather the figures side by side.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Sequence

from absl import logging

from cm3leon_jax import e2e, workdir_io

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
SETS = {
    "retrieval": ("ablation_retrieval_k2", "ablation_retrieval_k0"),
    "dropout": ("ablation_retrieval_k2", "ablation_no_condition_dropout"),
    "decoding": ("ablation_decoding",),
    "size": ("ablation_retrieval_k2", "ablation_model_small"),
}
SETS["all"] = tuple(dict.fromkeys(name for names in SETS.values() for name in names))


def load_config(path: str):
    """A config file's `get_config()` (the same files `--config` takes)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no experiment config at {path}")
    spec = importlib.util.spec_from_file_location(f"ablation_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_paths(set_name: str | None, configs: Sequence[str]) -> list[str]:
    if configs:
        return list(configs)
    if set_name not in SETS:
        raise ValueError(f"unknown ablation set {set_name!r}; sets: {sorted(SETS)}")
    return [os.path.join(EXPERIMENTS, f"{name}.py") for name in SETS[set_name]]


def summarise(name: str, config, report: dict) -> dict:
    ev = report["evaluation"]
    row = {"run": name, "num_neighbours": int(config.lm.data.num_neighbours),
           "condition_dropout": float(config.lm.data.condition_dropout_rate),
           "model": f"{config.lm.model.num_layers}x{config.lm.model.d_model}", "lm_steps": int(config.lm.total_steps),
           "validation_loss": {k: round(v["loss"], 4) for k, v in ev.get("validation_loss", {}).items()},
           "text_to_image_requested": {k: round(v["requested"], 4) for k, v in ev.get("text_to_image", {}).items()},
           "text_to_image_interval": {k: [round(x, 4) for x in v["interval"]] for k, v in
                                      ev.get("text_to_image_bootstrap", {}).get("shares", {}).items()},
           "text_to_image_frechet": {k: round(v["frechet_distance_classifier_features"], 3)
                                     for k, v in ev.get("text_to_image", {}).items()},
           "image_to_text_overall": round(ev["image_to_text"]["overall"], 4) if "image_to_text" in ev else None,
           "lm_seconds": report["stages"].get("lm", {}).get("seconds")}
    return row


def _share_cell(row: dict, strategy: str) -> str:
    if strategy not in row["text_to_image_requested"]:
        return ""
    cell = f"{100 * row['text_to_image_requested'][strategy]:.1f}%"
    interval = row.get("text_to_image_interval", {}).get(strategy)
    return cell + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def markdown(rows: Sequence[dict]) -> str:
    ks = sorted({k for r in rows for k in r["validation_loss"]})
    strategies = list(dict.fromkeys(s for r in rows for s in r["text_to_image_requested"]))
    head = (["run", "k (train)", "cond. dropout", "model"] + [f"val loss k={k}" for k in ks]
            + [f"t2i {s}" for s in strategies] + ["i2t"])
    lines = ["# Ablations (shapes world, tiny configs)", "",
             "t2i: share of requested attributes (shape, colour, position, count) in generated images; "
             "i2t: share of attributes named correctly in generated captions. [lo, hi]: 95% bootstrap "
             "interval over the prompts (evaluate's text_to_image_bootstrap).", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["run"], str(r["num_neighbours"]), f"{r['condition_dropout']:g}", r["model"]]
        cells += [f"{r['validation_loss'][k]:.4f}" if k in r["validation_loss"] else "" for k in ks]
        cells += [_share_cell(r, s) for s in strategies]
        cells.append("" if r["image_to_text_overall"] is None else f"{100 * r['image_to_text_overall']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(workdir: str, paths: Sequence[str]) -> list[dict]:
    workdir = workdir_io.require_local(workdir, "the ablation workdir")
    if not paths:
        raise ValueError("no experiment configs to run")
    # every config is loaded before the first run starts: a mistyped or broken last file must not
    # wait for hours of runs before it; each run's directory is named after its file, so names must differ
    names = [os.path.basename(path)[:-3] for path in paths]
    bad = [path for path in paths if not path.endswith(".py")]
    if bad:
        raise ValueError(f"experiment configs must be .py files (their get_config()), got {bad}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"two configs share the file name {repeated}: each run lives in WORKDIR/NAME, rename one")
    configs = [load_config(path) for path in paths]
    for config in configs:
        config.cache_dir = os.path.join(workdir, "cache")
    # ... and checked (the pipeline's up-front checks of its fields), not only when its turn comes
    pipelines = [e2e.Pipeline(config, os.path.join(workdir, name)) for name, config in zip(names, configs)]
    rows = []
    for path, name, config, pipeline in zip(paths, names, configs, pipelines):
        logging.info("=== %s (%s)", name, path)
        pipeline.run()
        if pipeline.stopped:   # preempted (SIGTERM): its report.json is missing or an older run's; stop here
            logging.warning("%s stopped in stage %s (preempted): rerun the command to resume; the table holds "
                            "the %d runs finished before it", name, pipeline.stopped, len(rows))
            break
        with open(os.path.join(workdir, name, "report.json"), encoding="utf-8") as f:
            rows.append(summarise(name, config, json.load(f)))
        with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
        with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
            f.write(markdown(rows))
    return rows


def main(argv):
    del argv
    from absl import flags
    from cm3leon_jax import metrics
    metrics.quiet_library_logs()
    f = flags.FLAGS
    rows = run(f.workdir, config_paths(f.set, f.configs))
    print(markdown(rows))


def _define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", "workdirs/ablations", "runs, their shared stage cache and the results table")
    flags.DEFINE_enum("set", "all", sorted(SETS), "a predefined set of experiments/ablation_*.py")
    flags.DEFINE_list("configs", [], "explicit config files instead of --set")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
