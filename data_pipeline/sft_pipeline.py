"""The instruction-tuning training source (`data.source="sft"`): SFT documents mixed by task.

Documents from `python -m data_pipeline.sft_prepare` -> a mixture view (`MixedTaskDocuments`, a
`mixture.MixedDocuments`: each mixture epoch draws `sft_tasks.mixing_counts` documents per task,
cycling through a task's documents across epochs) -> per-process streams, seeded shuffle and packing (packing.py) -> per
document, with Grain's per-element generator (`SftTransform`): condition dropout, then the loss
mask: weight 1 on the output only (`data.sft_loss="output"`, Chameleon's choice) or the full CM3
objective over the whole sequence (`"cm3"`: all tokens weighted, CM3 spans, sentinels 0).

Packing keeps examples whole: an example is one document, the packer places whole documents in
rows and skips (and counts, `document_longer_than_seq_len`) any longer than a row.
"""
from __future__ import annotations

import grain
import numpy as np
from absl import logging

from data_pipeline import cm3, cm3_pipeline, mixture, sft_prepare, sft_tasks

LOSSES = ("output", "cm3")


class MixedTaskDocuments(mixture.MixedDocuments):
    """The task mixture as one view: task t's documents are ids task_ranges[t] of `source`, drawn
    `counts[t]` times a mixture epoch (`mixture.MixedDocuments`: arithmetic on the index)."""

    def __init__(self, source, task_ranges: dict[str, tuple[int, int]], counts: dict[str, int]):
        tasks = [t for t in sft_tasks.TASKS if counts.get(t, 0) > 0]
        super().__init__([mixture.Part(source, task_ranges[t][0], task_ranges[t][1] - task_ranges[t][0])
                          for t in tasks], [counts[t] for t in tasks])
        self.tasks = tasks


class SftTransform:
    """document, rng -> {"tokens", "weights"}; a plain class so Grain workers can pickle it.
    Random draws, in order: condition dropout, then (CM3 loss only) span count and placement."""

    def __init__(self, loss: str, condition_dropout: float, cm3_config: cm3.CM3Config | None = None):
        if loss not in LOSSES:
            raise ValueError(f"data.sft_loss={loss!r}; choose one of {LOSSES}")
        if not 0.0 <= condition_dropout <= 1.0 / 3.0:
            raise ValueError(f"data.sft_condition_dropout={condition_dropout} must be in [0, 1/3] (three cases)")
        self.loss, self.condition_dropout, self.cm3_config = loss, condition_dropout, cm3_config

    def __call__(self, document, rng: np.random.Generator) -> dict[str, np.ndarray]:
        task = document["task"]
        task = task.decode() if isinstance(task, bytes) else str(task)
        seq = sft_tasks.SftSequence(np.asarray(document["tokens"], np.int32), np.asarray(document["slots"], np.int32),
                                    int(document["output_start"]))
        seq = sft_tasks.drop_slots(seq, sft_tasks.choose_dropped(sft_tasks.template(task), rng, self.condition_dropout))
        if self.loss == "output":
            return {"tokens": seq.tokens, "weights": sft_tasks.output_weights(len(seq.tokens), seq.output_start)}
        c = self.cm3_config
        tokens, weights = cm3.cm3_mask(seq.tokens, rng, sentinels=c.sentinels, break_id=c.break_id, eoss_id=c.eoss_id,
                                       max_spans=c.max_spans, min_spans=c.min_spans, lam=c.cm3_lambda,
                                       protect=c.protect)
        return {"tokens": tokens, "weights": weights}


def task_mixture(data_config, data_dir: str, split: str = "train"):
    """(MixedTaskDocuments, counts per task) from the data's report and the config's weights."""
    report = sft_prepare.load_report(data_dir)
    ranges = report["splits"][split].get("tasks")
    if ranges is None:
        raise ValueError(f"{data_dir} is not SFT data (its report has no task ranges); make it with "
                         "`python -m data_pipeline.sft_prepare`")
    sizes = {t: ranges[t][1] - ranges[t][0] if t in ranges else 0 for t in sft_tasks.TASKS}
    weights = sft_tasks.parse_weights(data_config.sft_task_weights)
    unnamed = [t for t in sft_tasks.TASKS if sizes[t] and weights and t not in weights]
    if unnamed:   # "edit=2" reads like "up-weight edit", but it trains on edit alone
        logging.warning("data.sft_task_weights=%r names no weight for %s: those tasks' documents are left out of "
                        "training (weight 0); name them too (e.g. %s=1) to keep them", data_config.sft_task_weights,
                        ", ".join(unnamed), unnamed[0])
    absent = [t for t in weights if weights[t] > 0 and not sizes[t]]
    if absent:   # else "segment=3" would be dropped without a word (the data holds no segment document)
        logging.warning("data.sft_task_weights=%r weighs %s, but %s holds no %s documents: %s not trained on",
                        data_config.sft_task_weights, ", ".join(absent), data_dir, split, ", ".join(absent))
    counts = sft_tasks.mixing_counts(sizes, weights, max_upsample=float(data_config.sft_max_upsample),
                                     min_downsample=float(data_config.sft_min_downsample))
    source = sft_prepare.load_sft_documents(data_dir, split)
    return MixedTaskDocuments(source, ranges, counts), counts


def _transform(config, vocab, condition_dropout: float) -> SftTransform:
    cm3_config = cm3.CM3Config.from_vocab(vocab, retrieval=False, condition_dropout_rate=0.0,
                                          cm3_lambda=float(config.data.cm3_lambda))
    return SftTransform(str(config.data.sft_loss), condition_dropout, cm3_config)


def training_source(config):
    """(documents MapDataset, per-document transform, vocabulary) for the trainer: the train split,
    mixed by the task weights."""
    vocab = cm3_pipeline.data_vocabulary(config, "data_pipeline.sft_prepare")
    docs, _ = task_mixture(config.data, config.data.data_dir, "train")
    return docs, _transform(config, vocab, float(config.data.sft_condition_dropout)), vocab


def heldout_source(config):
    """(documents, transform) for the trainer's periodic held-out loss: the validation split as
    prepared (no task mixing) under the training loss, without condition dropout."""
    vocab = cm3_pipeline.data_vocabulary(config, "data_pipeline.sft_prepare")
    docs = sft_prepare.load_sft_documents(config.data.data_dir, "validation")
    return grain.MapDataset.source(docs), _transform(config, vocab, 0.0)
