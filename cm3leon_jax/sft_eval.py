"""Per-task evaluation of an instruction-tuned CM3Leon on held-out shapes-world examples.

    python -m cm3leon_jax.sft_eval --workdir W/sft [--baseline W/lm] [--num_examples 32] [--out DIR]

Each task's held-out examples come from `sft_tasks.shapes_example` on the validation split (scenes
whose compositions never occur in training), at the VQ tokenizer's image size. Both models are
prompted the same way (the SFT templates, `sft_generate.TaskGenerator`, default sampling per
task), and read with the shapes attribute classifier (trained or loaded from
`--classifier_workdir`, default the SFT workdir):

  text_to_image  faithfulness `overall` (shapes_metrics.text_to_image_faithfulness)
  caption        attribute accuracy `overall` (shapes_metrics.caption_accuracy; unparseable = 0)
  vqa            exact match after normalisation (per question kind too)
  edit           success: the requested change made and everything else kept (shapes_metrics.edit_success)
  control        fidelity: edge F1 (1 px tolerance) between the generated image's edges and the
                 input edge map; for class-map control, the share of the input map's object pixels
                 whose class the generated image shows (classifier shape per cell x foreground)
  segment        per-pixel accuracy of the generated map (nearest palette colour) vs the true map
  infill         the masked cell's object recovered (shape, colour and size), plus faithfulness

Writes DIR/sft_eval.json and DIR/sft_eval.md (a table: task, metric, model, baseline, and for each
task's primary metric the difference with a 95% bootstrap interval paired by example).
"""
from __future__ import annotations

import gc
import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from cm3leon_jax import attribute_classifier, shapes_metrics
from data_pipeline import sft_tasks
from data_pipeline import shapes_world as sw

PRIMARY = {"text_to_image": "faithfulness", "caption": "attribute_accuracy", "vqa": "exact_match",
           "edit": "success", "control": "fidelity", "segment": "pixel_accuracy", "infill": "masked_object"}


def heldout_examples(task: str, num: int, image_size: int, split: str = "validation", seed: int = 0) -> list[dict]:
    return [sft_tasks.shapes_example(task, split, i, image_size=image_size, seed=seed) for i in range(int(num))]


def _mean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _example_totals(values: Sequence[float]) -> np.ndarray:
    """Per-example scores as `shapes_metrics.hit_totals` [N, 1, 2] (score, 1; NaN: no trial), so the
    bootstrap's share is their mean."""
    v = np.asarray(values, np.float64)
    return np.stack([np.nan_to_num(v), (~np.isnan(v)).astype(np.float64)], axis=-1)[:, None, :]


def _scene_totals(hits: Sequence[Mapping[str, list[float]]]) -> np.ndarray:
    return shapes_metrics.hit_totals(hits, range(len(hits)), len(hits))  # share: the `overall` of the six


def score_task(task: str, examples: Sequence[Mapping[str, Any]], outputs: Sequence,
               classifier) -> tuple[dict[str, float], np.ndarray]:
    """The task's metrics for one model's outputs (images uint8 [S, S, 3] or strings), and its
    primary metric per example as `hit_totals` (for the paired bootstrap against the baseline)."""
    scenes = [ex["meta"]["scene"] for ex in examples]
    out: dict[str, float] = {}
    if task in ("caption", "vqa"):
        if task == "caption":
            acc = shapes_metrics.caption_accuracy(scenes, list(outputs))
            out.update(attribute_accuracy=acc["overall"], all_correct=acc["all_correct"],
                       unparseable=acc["unparseable"])
            return out, _scene_totals(shapes_metrics.caption_hits(scenes, list(outputs)))
        answers = [ex["answer"] for ex in examples]
        out["exact_match"] = shapes_metrics.exact_match(outputs, answers)
        for kind in sft_tasks.VQA_KINDS:
            idx = [i for i, ex in enumerate(examples) if ex["meta"]["kind"] == kind]
            if idx:
                out[f"exact_match_{kind}"] = shapes_metrics.exact_match(
                    [outputs[i] for i in idx], [examples[i]["answer"] for i in idx])
        return out, _example_totals([shapes_metrics.exact_match([o], [a]) for o, a in zip(outputs, answers)])
    images = np.stack(outputs)
    classes = attribute_classifier.predict_classes(classifier, images)
    predicted = attribute_classifier.classes_to_scenes(classes)
    if task == "text_to_image":
        hits = shapes_metrics.image_hits(scenes, predicted)
        f = shapes_metrics.summarise_hits(hits)
        out.update(faithfulness=f["overall"], all_correct=f["all_correct"])
        return out, _scene_totals(hits)
    if task == "edit":
        hits = [shapes_metrics.edit_success(ex["meta"]["after"], ex["meta"]["edit"], p)
                for ex, p in zip(examples, predicted)]
        out.update({k: _mean([h[k] for h in hits]) for k in ("success", "changed", "kept")})
        return out, _example_totals([h["success"] for h in hits])
    if task == "control":
        fidelity, edge, seg, seg_pixel = [], [], [], []
        for i, ex in enumerate(examples):
            if ex["control_type"] == "edge":
                edge.append(shapes_metrics.edge_f1(sw.edge_map(images[i]), np.asarray(ex["control"])[..., 0] > 127))
                fidelity.append(edge[-1])
            else:
                shown = shapes_metrics.class_map_from_image(images[i], classes["shape"][i])
                acc = shapes_metrics.class_map_accuracy(shown, sw.class_map_from_palette(ex["control"]))
                seg.append(acc["object_pixel_accuracy"])
                seg_pixel.append(acc["pixel_accuracy"])
                fidelity.append(seg[-1])
        out.update(fidelity=_mean(fidelity), edge_f1=_mean(edge), class_map_object_accuracy=_mean(seg),
                   class_map_pixel_accuracy=_mean(seg_pixel))
        return out, _example_totals(fidelity)
    if task == "segment":
        accs = [shapes_metrics.class_map_accuracy(sw.class_map_from_palette(img), sw.class_map_from_palette(ex["segmentation"]))
                for img, ex in zip(images, examples)]
        out.update(pixel_accuracy=_mean([a["pixel_accuracy"] for a in accs]),
                   object_pixel_accuracy=_mean([a["object_pixel_accuracy"] for a in accs]))
        return out, _example_totals([a["pixel_accuracy"] for a in accs])
    if task == "infill":
        hit = []
        for ex, p in zip(examples, predicted):
            want = next(o for o in ex["meta"]["scene"]["objects"] if o["position"] == ex["meta"]["masked_position"])
            got = shapes_metrics._objects_by_position(p["objects"]).get(want["position"])
            hit.append(float(got is not None and all(got[k] == want[k] for k in ("shape", "color", "size"))))
        f = shapes_metrics.text_to_image_faithfulness(scenes, predicted)
        out.update(masked_object=_mean(hit), faithfulness=f["overall"])
        return out, _example_totals(hit)
    raise ValueError(f"unknown task {task!r}")


def evaluate_model(gen, examples: Mapping[str, Sequence[dict]], classifier, *,
                   seed: int = 0) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Every task's metrics for one loaded `generate.Generator`, and each task's primary metric per
    example (`score_task`)."""
    from cm3leon_jax import sft_generate
    tasks = sft_generate.TaskGenerator(gen)
    results: dict[str, Any] = {"_step": gen.step}
    totals = {}
    for task, exs in examples.items():
        start = time.time()
        outputs = tasks.run(task, exs, seed=seed)
        scores, totals[task] = score_task(task, exs, outputs, classifier)
        results[task] = dict(scores, seconds=round(time.time() - start, 1))
        logging.info("step %d %s: %s", gen.step, task, results[task])
    return results, totals


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per task and metric, the task's primary metric first (marked *)."""
    has_baseline = report.get("baseline") is not None
    head = ("| task | metric | SFT | pretrained (same prompts) | SFT - pretrained [95% bootstrap interval, paired] |"
            if has_baseline else "| task | metric | model |")
    lines = [head, "|---|---|---|---|---|" if has_baseline else "|---|---|---|"]
    for task in report["tasks"]:
        primary = PRIMARY[task]
        names = [primary] + [k for k in report["model"][task] if k not in (primary, "seconds")]
        for metric in names:
            row = f"| {task} | {metric}{' *' if metric == primary else ''} | {report['model'][task][metric]:.3f} |"
            if has_baseline:
                row += f" {report['baseline'][task].get(metric, float('nan')):.3f} |"
                d = report.get("primary_difference", {}).get(task) if metric == primary else None
                row += (f" {d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] |" if d
                        else " |")
            lines.append(row)
    return "\n".join(lines) + "\n"


def evaluate(workdir: str, baseline: str | None = None, *, num_examples: int = 32,
             tasks: Sequence[str] = sft_tasks.TASKS, split: str = "validation", seed: int = 0,
             classifier_workdir: str | None = None, classifier_steps: int = attribute_classifier.DEFAULT_STEPS,
             out_dir: str | None = None) -> dict:
    """Evaluates the SFT workdir (and the baseline) on the same held-out examples; writes JSON + markdown."""
    from cm3leon_jax import generate
    for task in tasks:
        sft_tasks.template(task)
    # refused before loading anything: no task or a task twice (its rows twice in the table), an unknown split
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks={','.join(tasks)}: name each task to evaluate once, from {sft_tasks.TASKS}")
    if split not in sw.SPLITS:
        raise ValueError(f"--split={split!r}: the shapes world's splits are {tuple(sw.SPLITS)}")
    if int(num_examples) < 1:   # refused before loading anything: no example has no metric (nor a bootstrap)
        raise ValueError(f"--num_examples={num_examples}: evaluate at least 1 held-out example per task")
    gen = generate.Generator(workdir)
    size = gen.vq.image_size
    examples = {t: heldout_examples(t, num_examples, size, split, seed) for t in tasks}
    classifier = attribute_classifier.train_classifier(classifier_workdir or workdir, image_size=size,
                                                       steps=classifier_steps)
    report: dict[str, Any] = {"workdir": os.path.abspath(workdir), "baseline": None, "split": split,
                              "num_examples": int(num_examples), "image_size": size, "tasks": list(tasks),
                              "primary": PRIMARY}
    report["model"], model_totals = evaluate_model(gen, examples, classifier, seed=seed)
    vocab = gen.vocab
    del gen
    gc.collect()
    if baseline:
        base = generate.Generator(baseline)
        try:
            base.vocab.check_compatible(vocab)
        except ValueError as e:
            raise ValueError(f"--baseline {baseline} has another vocabulary than {workdir}: {e}") from None
        if base.vq.image_size != size:
            raise ValueError(f"--baseline {baseline} uses {base.vq.image_size}px images, {workdir} {size}px")
        report["baseline_workdir"] = os.path.abspath(baseline)
        report["baseline"], base_totals = evaluate_model(base, examples, classifier, seed=seed)
        # is the fine-tuned model better, or within the noise of this many examples? paired by example
        report["primary_difference"] = {
            task: shapes_metrics.bootstrap_comparison({"sft": model_totals[task], "baseline": base_totals[task]},
                                                      "baseline", seed=seed)["differences"]["sft"]
            for task in tasks}
    out_dir = out_dir or os.path.join(workdir, "sft_eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sft_eval.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report)
    with open(os.path.join(out_dir, "sft_eval.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return report


# ---------------------------------------------------------------- command line

def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "the instruction-tuned training workdir", required=True)
    flags.DEFINE_string("baseline", None, "a pretrained workdir prompted the same way (the model before SFT)")
    flags.DEFINE_integer("num_examples", 32, "held-out examples per task")
    flags.DEFINE_list("tasks", list(sft_tasks.TASKS), "tasks to evaluate")
    flags.DEFINE_string("split", "validation", "shapes-world split of the held-out examples")
    flags.DEFINE_integer("seed", 0, "examples' and sampling seed")
    flags.DEFINE_string("classifier_workdir", None, "where the attribute classifier is cached (default: --workdir)")
    flags.DEFINE_integer("classifier_steps", attribute_classifier.DEFAULT_STEPS, "classifier training steps if not cached")
    flags.DEFINE_string("out", None, "output directory (default WORKDIR/sft_eval)")


def main(argv):
    del argv
    from absl import flags
    from cm3leon_jax import metrics
    metrics.quiet_library_logs()
    f = flags.FLAGS
    evaluate(f.workdir, f.baseline, num_examples=f.num_examples, tasks=f.tasks, split=f.split, seed=f.seed,
             classifier_workdir=f.classifier_workdir, classifier_steps=f.classifier_steps, out_dir=f.out)


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
