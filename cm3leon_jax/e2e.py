"""From nothing to generated images, captions and an evaluation report, in one command.

    python -m cm3leon_jax.e2e --config experiments/e2e_tiny.py --workdir workdirs/e2e [--config.lm.total_steps=N]

Stages, in the data's one-way order, each run through the library's own entry points:
  text_tokenizer  SentencePiece BPE on the shapes world's captions          -> DIR/text_tokenizer/spm.model
  vq              the VQ-GAN image tokenizer (train_vq.train)                -> DIR/vq/
  data            ingestion to ArrayRecord documents (data_pipeline.prepare) -> DIR/data/
  retrieval       retriever, ScaNN index, neighbour sidecar (data_pipeline.index), inside DIR/data/
  lm              the CM3Leon LM with retrieval, CM3 masking, condition dropout (trainer.train) -> DIR/lm/
  evaluate        generation + scores (cm3leon_jax.evaluate)                 -> DIR/eval/
  report          DIR/report.md + DIR/report.json: stage times, settings and every score

Caching: a finished stage writes DIR/stages/NAME.json with a fingerprint of its settings and of
every stage before it; a rerun skips it, an interrupted stage starts again (the VQ and LM trainers
resume from their last checkpoint, so an interrupted one is resumed only with the settings it started
with: `stages/NAME.partial.json`). Changing a stage's settings in the same workdir is refused
(the outputs on disk would no longer match the config): use a new workdir, or `cache_dir`.
With `cache_dir` set (the ablation runner does), every stage's output lives in
`cache_dir/NAME-FINGERPRINT/`, so runs that share settings share stages (e.g. every ablation
reuses one tokenizer, VQ and dataset; the decoding-strategy table reuses the base LM). The data
directory, into which the retrieval stage writes, is one per retrieval setting.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import ml_collections
from absl import logging

from cm3leon_jax import config_defaults, metrics, workdir_io

STAGES = ("text_tokenizer", "vq", "data", "retrieval", "lm", "evaluate", "report")
# What the report takes from each training stage's metrics.jsonl: eval_loss is the LM's held-out loss
# (validation split, no neighbours), val_psnr the tokenizer's on held-out images.
TRAINING_SUMMARY = {"vq": ("loss", "val_psnr", "codebook_usage"),
                    "lm": ("loss", "eval_loss", "tokens_per_second")}


SPEED_ONLY_DATA_FIELDS = ("decode_threads",)   # ingestion settings that never change the documents
# stages whose trainer resumes from the checkpoints an interrupted run left in the stage's directory
# (the others start again from nothing: the data stage deletes its directory first)
RESUMING_STAGES = ("vq", "lm")
# the `evaluate` section's fields the evaluate stage passes on (with evaluate.SAMPLING_KNOBS); any other
# (say `int8`, a keyword of evaluate.evaluate) would be ignored without a word, so it is refused
EVALUATE_FIELDS = ("strategies", "num_prompts", "num_samples", "num_captions", "num_val_documents", "neighbour_counts",
                   "num_vq_images", "classifier_steps", "image_neighbours", "caption_neighbours")


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _write_marker(path: str, record: dict) -> None:
    """A stage marker, written whole or not at all (`workdir_io.write_text`: a temporary file renamed
    over it): a run killed mid-write must not leave a torn JSON that every rerun then fails to read."""
    workdir_io.write_text(path, json.dumps(record, indent=2, default=str))


def fingerprint(settings: Any, upstream: str = "") -> str:
    blob = json.dumps({"settings": _plain(settings), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def lm_config_for(lm, data_dir: str) -> ml_collections.ConfigDict:
    """An e2e config's LM section with what the upstream stages decided: the data dir and the
    vocabulary size (also `experiments/e2e_tiny_lm.py`, to train the LM alone on prepared data)."""
    from cm3leon_jax import vocab as vocab_lib
    from data_pipeline import prepare
    config = ml_collections.ConfigDict(lm.to_dict())
    vocab = vocab_lib.Vocabulary.load(os.path.join(data_dir, prepare.VOCAB_DIR))
    config.data.update(source="cm3", data_dir=data_dir)
    config.model.vocab_size = vocab.padded_size()
    return config


TEXT_TOKENIZER_FIELDS = ("num_captions", "seed", "vocab_size")   # the text_tokenizer stage's, likewise


def _check_section_fields(name: str, section, fields: Sequence[str], hint: str = "") -> None:
    unknown = sorted(set(_plain(section)) - set(fields))
    if unknown:
        raise ValueError(f"{name}.{unknown[0]}: the e2e {name} stage does not read {unknown}; it reads "
                         f"{', '.join(fields)}{hint}")


# fields the pipeline fills in from its own stages (`Pipeline.data`, `lm_config_for`): a value given
# for one was replaced without a word (a user's SentencePiece model, a larger vocab_size), so only
# the defaults an experiment file inherits pass
STAGE_SET_FIELDS = {"data.spm_model": ("",), "data.vq_workdir": ("",), "lm.data.data_dir": ("",),
                    "lm.data.source": ("synthetic", "cm3"),
                    "lm.model.vocab_size": (config_defaults.base_config().model.vocab_size,)}


def _check_stage_fields(config) -> None:
    from cm3leon_jax import evaluate
    missing = [name for name in STAGES[:-1] if name not in config]   # a trainer's config: AttributeError "'evaluate'"
    if missing:
        raise ValueError(f"the config has no {', '.join(missing)} section: an e2e run takes an e2e config "
                         "(experiments/e2e_*.py, experiments/ablation_*.py) with one section per stage")
    for name, accepted in STAGE_SET_FIELDS.items():
        try:
            value = config_defaults.get_field(config, name)
        except KeyError:   # a config without the field: nothing to ignore
            continue
        if value not in accepted:
            raise ValueError(f"{name}={value!r}: the e2e pipeline sets {name} from its own stages (the text "
                             "tokenizer, VQ and data it builds) and would ignore this value; leave it unset")
    _check_section_fields("evaluate", config.evaluate, EVALUATE_FIELDS + tuple(evaluate.SAMPLING_KNOBS),
                          " (for other settings run `python -m cm3leon_jax.evaluate` on the LM stage's directory)")
    _check_section_fields("text_tokenizer", config.text_tokenizer, TEXT_TOKENIZER_FIELDS)


class Pipeline:
    """The stages of one run, their directories and their cache markers."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir_io.require_local(workdir, "the e2e workdir")
        self.cache_dir = os.path.abspath(config.cache_dir) if config.get("cache_dir") else ""
        self.marker_dir = os.path.join(self.workdir, "stages")
        self.fingerprints: dict[str, str] = {}
        self.dirs: dict[str, str] = {}
        self.timings: dict[str, dict[str, Any]] = {}
        self.stopped: str | None = None  # the stage a preemption stopped, if any
        _check_stage_fields(config)
        upstream = ""
        for name in STAGES:
            upstream = fingerprint(self.stage_settings(name), upstream)
            self.fingerprints[name] = upstream
        for name in STAGES:
            self.dirs[name] = self._stage_dir(name)

    def stage_settings(self, name: str) -> Any:
        """What a stage's output depends on (its fingerprint's input): settings that change only its
        speed are left out, so adding or retuning one reuses finished stages."""
        c = self.config
        data = {k: v for k, v in _plain(c.data).items() if k not in SPEED_ONLY_DATA_FIELDS}
        # the top-level seed draws the evaluation's samples (the classifier has its own seed, 0): a
        # changed seed must redo the evaluation, not serve the old seed's scores
        evaluation = {"evaluate": c.evaluate, "seed": c.get("seed", 0)}
        return {"text_tokenizer": c.text_tokenizer, "vq": c.vq, "data": data, "retrieval": c.retrieval,
                "lm": c.lm, "evaluate": evaluation, "report": {}}[name]

    def _stage_dir(self, name: str) -> str:
        if name == "retrieval":  # writes the index and neighbours into the data directory
            return self.dirs["data"]
        if name in ("evaluate", "report"):  # per run, never shared
            return os.path.join(self.workdir, "eval" if name == "evaluate" else "")
        if self.cache_dir:
            return os.path.join(self.cache_dir, f"{name}-{self._cache_key(name)}")
        return os.path.join(self.workdir, name)

    def _cache_key(self, name: str) -> str:
        """A cached stage's directory and marker name. The data directory also receives the retrieval
        stage's index and neighbours, so it is one per retrieval setting: shared by runs whose data
        settings alone agree, a later run's retrieval overwrote the neighbours that an earlier run's
        cached retrieval marker still vouched for (its next LM trained on the other retriever's)."""
        return self.fingerprints["retrieval" if name == "data" else name]

    def _marker_path(self, name: str) -> str:
        if self.cache_dir and name not in ("evaluate", "report"):
            return os.path.join(self.cache_dir, "stages", f"{name}-{self._cache_key(name)}.json")
        return os.path.join(self.marker_dir, f"{name}.json")

    def _marker(self, name: str) -> dict | None:
        path = self._marker_path(name)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _stale(self, name: str) -> bool:
        marker = self._marker(name)
        return marker is not None and marker["fingerprint"] != self.fingerprints[name]

    def _redo_paths(self, name: str) -> list[str]:
        """What to delete to redo `name`: its output and marker, and those of every later stage run
        with other settings (their fingerprints chain from it: left behind, they were refused in turn
        only after this stage had been redone, e.g. after hours of LM training)."""
        paths = []
        for n in STAGES[STAGES.index(name):]:
            if n != "report" and self._stale(n):
                if n != "retrieval":   # retrieval writes into the data directory: its marker suffices
                    paths.append(self.dirs[n])
                paths.append(self._marker_path(n))
        return paths

    def check(self, name: str) -> dict | None:
        """The stage's marker (None when it has not finished); refused when it was run with other settings."""
        marker = self._marker(name)
        if marker is not None and marker["fingerprint"] != self.fingerprints[name]:
            raise ValueError(
                f"stage {name!r} in {self.workdir} was run with other settings (or after other upstream "
                f"stages) than this config: its outputs do not match. Use a new --workdir, or delete "
                f"{' and '.join(self._redo_paths(name))} to redo it from there.")
        return marker

    def done(self, name: str) -> bool:
        marker = self.check(name)
        if marker is None:
            return False
        self.timings[name] = {"seconds": marker["seconds"], "runs": marker.get("runs", 1), "cached": True}
        return True

    def _partial_path(self, name: str) -> str:
        """Where a preempted stage's seconds and runs wait for its resumption."""
        return self._marker_path(name)[:-len(".json")] + ".partial.json"

    def _earlier_runs(self, name: str) -> tuple[float, int]:
        """(seconds, runs) a stage spent before it was preempted, so a resumed stage reports its
        whole time, not only the last run's; another config's stopped run does not count."""
        path = self._partial_path(name)
        if not os.path.exists(path):
            return 0.0, 0
        with open(path, encoding="utf-8") as f:
            partial = json.load(f)
        if partial["fingerprint"] != self.fingerprints[name]:
            return 0.0, 0
        return float(partial["seconds"]), int(partial["runs"])

    def begin(self, name: str) -> None:
        """Records that a stage started, with its fingerprint (the partial marker, 0 s and 0 runs when
        new), so that an interrupted run (preempted, crashed or killed) is never resumed under other
        settings: the VQ and LM trainers would go on from the other settings' checkpoints and the
        stage would be marked done with these."""
        path = self._partial_path(name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                partial = json.load(f)
            if (partial["fingerprint"] != self.fingerprints[name] and name in RESUMING_STAGES
                    and os.path.exists(self.dirs[name])):
                raise ValueError(
                    f"stage {name!r} in {self.workdir} was interrupted while it ran with other settings (or after "
                    f"other upstream stages) than this config: resuming it would go on from their checkpoints. "
                    f"Use a new --workdir, rerun with the settings it started with, or delete {self.dirs[name]} "
                    f"and {path} to start it again.")
            if partial["fingerprint"] == self.fingerprints[name]:
                return
        _write_marker(path, {"stage": name, "fingerprint": self.fingerprints[name], "seconds": 0.0, "runs": 0})

    def mark_stopped(self, name: str, seconds: float) -> None:
        earlier_seconds, earlier_runs = self._earlier_runs(name)
        path = self._partial_path(name)
        _write_marker(path, {"stage": name, "fingerprint": self.fingerprints[name],
                             "seconds": round(earlier_seconds + seconds, 1), "runs": earlier_runs + 1})

    def mark_done(self, name: str, seconds: float, result: Any) -> None:
        path = self._marker_path(name)
        earlier_seconds, earlier_runs = self._earlier_runs(name)
        seconds, runs = earlier_seconds + seconds, earlier_runs + 1
        _write_marker(path, {"stage": name, "fingerprint": self.fingerprints[name], "seconds": round(seconds, 1),
                             "runs": runs, "dir": self.dirs[name], "result": result})
        if os.path.exists(self._partial_path(name)):
            os.remove(self._partial_path(name))
        self.timings[name] = {"seconds": round(seconds, 1), "runs": runs, "cached": False}

    # ------------------------------------------------------------------ stages

    def text_tokenizer(self) -> dict:
        from cm3leon_jax import text_tokenizer
        c = self.config.text_tokenizer
        prefix = os.path.join(self.dirs["text_tokenizer"], "spm")
        path = text_tokenizer.train_sentencepiece(text_tokenizer.shapes_captions(int(c.num_captions), int(c.seed)),
                                                  prefix, int(c.vocab_size))
        return {"spm_model": path}

    def vq(self) -> dict:
        from cm3leon_jax import train_vq
        return train_vq.train(self.config.vq, self.dirs["vq"])

    def data(self) -> dict:
        from data_pipeline import prepare
        out = self.dirs["data"]
        if os.path.exists(out):  # an interrupted ingestion: start it again
            shutil.rmtree(out)
        cfg = ml_collections.ConfigDict(self.config.data.to_dict())
        cfg.spm_model = os.path.join(self.dirs["text_tokenizer"], "spm.model")
        cfg.vq_workdir = self.dirs["vq"]
        vocab, encode = prepare.load_vocab_and_encoder(cfg)
        return prepare.prepare(cfg, out, vocab, encode)

    def retrieval(self) -> dict:
        from data_pipeline import index
        c = self.config.retrieval.to_dict()
        return index.build(self.dirs["data"], seed=int(c.pop("seed", 0)), **c)

    def lm_config(self) -> ml_collections.ConfigDict:
        return lm_config_for(self.config.lm, self.dirs["data"])

    def lm(self) -> dict:
        from cm3leon_jax import trainer
        return trainer.train(self.lm_config(), self.dirs["lm"])

    def evaluate(self) -> dict:
        from cm3leon_jax import evaluate
        c = self.config.evaluate
        classifier_dir = self.cache_dir or self.workdir  # one classifier for every run that shares a cache
        report = evaluate.evaluate(
            self.dirs["lm"], out_dir=self.dirs["evaluate"], strategies=list(c.strategies),
            num_prompts=int(c.num_prompts), num_samples=int(c.num_samples), num_captions=int(c.num_captions),
            num_val_documents=int(c.num_val_documents), neighbour_counts=list(c.neighbour_counts),
            num_vq_images=int(c.num_vq_images), classifier_dir=classifier_dir,
            classifier_steps=int(c.classifier_steps), seed=int(self.config.seed),
            image_neighbours=int(c.get("image_neighbours", 0)),
            caption_neighbours=int(c.get("caption_neighbours", 0)),
            **{knob: c.get(knob) for knob in evaluate.SAMPLING_KNOBS})
        return {"report": os.path.join(self.dirs["evaluate"], "report.json"), "seconds": report["seconds"]}

    def report(self) -> dict:
        with open(os.path.join(self.dirs["evaluate"], "report.json"), encoding="utf-8") as f:
            evaluation = json.load(f)
        with open(os.path.join(self.dirs["evaluate"], "report.md"), encoding="utf-8") as f:
            evaluation_md = f.read()
        total = sum(t["seconds"] for name, t in self.timings.items())
        training = {stage: metrics.last_values(metrics.read_records(self.dirs[stage]), keys)
                    for stage, keys in TRAINING_SUMMARY.items()}
        report = {"workdir": self.workdir, "config": self.config.to_dict(), "stages": self.timings,
                  "stage_dirs": self.dirs, "total_seconds": round(total, 1), "training": training,
                  "evaluation": evaluation}
        with open(os.path.join(self.workdir, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
        lines = [f"# End-to-end run: {self.workdir}", "", "| stage | seconds | |", "|---|---|---|"]
        notes = lambda t: ", ".join(([f"{t['runs']} runs (resumed)"] if t.get("runs", 1) > 1 else [])  # noqa: E731
                                    + (["cached"] if t["cached"] else []))
        lines += [f"| {n} | {t['seconds']:.0f} | {notes(t)} |" for n, t in self.timings.items()]
        lines += [f"| total | {total:.0f} | |", "", "## Training (last logged values)", "",
                  "| stage | metric | value | at step |", "|---|---|---|---|"]
        lines += [f"| {stage} | {key} | {v['value']:.4g} | {v['step']} |"
                  for stage, found in training.items() for key, v in found.items()]
        lines += ["", evaluation_md]
        with open(os.path.join(self.workdir, "report.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        return {"report": os.path.join(self.workdir, "report.md")}

    # ------------------------------------------------------------------ driver

    def run(self, until: str = "report") -> dict[str, dict[str, Any]]:
        if until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; stages: {STAGES}")
        stages = STAGES[:STAGES.index(until) + 1]
        for name in stages:   # refused before anything runs, and before e2e_config.json is replaced
            if name != "report":
                self.check(name)
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, "e2e_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config.to_dict(), f, indent=2, default=str)
        start = time.time()
        for i, name in enumerate(stages, 1):
            if name != "report" and self.done(name):
                logging.info("[%d/%d] %s: done already (%s), skipped", i, len(stages), name, self.dirs[name])
                continue
            logging.info("[%d/%d] %s -> %s (%.0fs elapsed)", i, len(stages), name, self.dirs[name],
                         time.time() - start)
            if name != "report":
                self.begin(name)
            t0 = time.time()
            fn: Callable[[], Any] = getattr(self, name)
            result = fn()
            if isinstance(result, dict) and result.get("preempted"):  # SIGTERM: saved, not finished
                logging.warning("[%d/%d] %s stopped at step %s (preempted); rerun the command to resume", i,
                                len(stages), name, result.get("final_step"))
                self.mark_stopped(name, time.time() - t0)
                self.stopped = name
                return self.timings
            if name != "report":
                self.mark_done(name, time.time() - t0, result)
            logging.info("[%d/%d] %s finished in %.0fs", i, len(stages), name, time.time() - t0)
        logging.info("all stages done in %.0fs this run", time.time() - start)
        return self.timings


def main(argv):
    del argv
    from absl import app, flags
    from cm3leon_jax import metrics
    metrics.quiet_library_logs()
    f = flags.FLAGS
    if f.config is None or f.workdir is None:
        raise app.UsageError("--config (experiments/e2e_*.py) and --workdir are required")
    pipeline = Pipeline(f.config, f.workdir)
    pipeline.run(until=f.until)
    report = finished_report(pipeline, f.until)
    if report is not None:
        print(report)


def finished_report(pipeline: Pipeline, until: str) -> str | None:
    """The report.md this run wrote, to print; None when it did not reach the report stage: a
    stopped (preempted) run leaves an older run's report.md, if any, that must not pass for this one's."""
    report = os.path.join(pipeline.workdir, "report.md")
    if until != "report" or pipeline.stopped or not os.path.exists(report):
        return None
    with open(report, encoding="utf-8") as f:
        return f.read()


def _define_flags():
    from absl import flags
    import importlib
    importlib.import_module("cm3leon_jax.train")  # defines --config and --workdir, shared with the trainers run
    flags.DEFINE_enum("until", "report", STAGES, "stop after this stage")


if __name__ == "__main__":
    from absl import app
    from cm3leon_jax import config_defaults
    _define_flags()
    app.run(main, flags_parser=config_defaults.parse_flags)
