"""Task prompting of an instruction-tuned CM3Leon (and of any CM3Leon, for comparison).

    python -m cm3leon_jax.generate --workdir W/sft --task edit --image in.png --prompt "make the circle blue"
    python -m cm3leon_jax.generate --workdir W/sft --task vqa --image in.png --question "what color is the star?"
    python -m cm3leon_jax.generate --workdir W/sft --task control --control_type edge --image edges.png --prompt "..."

Prompts are the SFT templates' (`data_pipeline.sft_tasks.prompt_tokens`: everything before the
output). Text outputs (caption, vqa) are written until `<eos>` from text ids only; image outputs
are exactly one image of codes. Guidance for image outputs uses the prompt's conditions:
text and image conditions (edit, control, infill) -> three streams (full, text dropped, both
dropped) with InstructPix2Pix guidance `u + s_img (img - u) + s_txt (full - img)` (paper's
editing defaults: image 1.5, text 7.5); one kind only -> two-stream CFG with that kind dropped.
Dropped conditions are one `<mask>` each, exactly as condition dropout showed them in training.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cm3leon_jax import image_grid, sampling
from cm3leon_jax import vocab as vocab_lib
from data_pipeline import sft_tasks

EDIT_SAMPLING = sampling.SamplingConfig(top_p=0.9, cfg_scale=7.5, image_cfg_scale=1.5)
DEFAULT_SAMPLING = {
    "text_to_image": sampling.SamplingConfig(top_p=0.9, cfg_scale=3.0),
    "caption": sampling.SamplingConfig(temperature=0.0),
    "vqa": sampling.SamplingConfig(temperature=0.0),
    "edit": EDIT_SAMPLING,
    "control": EDIT_SAMPLING,
    "segment": sampling.SamplingConfig(temperature=0.0),
    "infill": EDIT_SAMPLING,
}


def guidance_drops(tmpl: sft_tasks.Template, config: sampling.SamplingConfig) -> list[tuple[int, ...]]:
    """Prompt slots dropped in each guidance stream after the first (the full prompt)."""
    if config.cfg_scale == 1.0 and config.image_cfg_scale == 1.0 and config.cd_k == 0:
        return []
    text, image = tmpl.condition_slots("text"), tmpl.condition_slots("image")
    if text and image:
        return [text, text + image]
    return [text or image]


class TaskGenerator:
    """Runs SFT tasks with a loaded `generate.Generator` (params, vocabulary, VQ tokenizer)."""

    def __init__(self, generator):
        self.gen = generator
        self.vocab = generator.vocab

    def encode_fields(self, task: str, examples: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Examples with uint8 images -> fields with VQ code grids (all images in one batch)."""
        tmpl = sft_tasks.template(task)
        image_fields = [s.spec for s in tmpl.prompt if s.kind == "image"]
        out = [{f: _text_as_trained(task, f, ex[f]) for s in tmpl.prompt if s.kind == "text" for f in s.fields}
               for ex in examples]
        if image_fields:
            size = self.gen.vq.image_size
            images = np.stack([_resize(ex[f], size) for ex in examples for f in image_fields])
            codes = np.asarray(self.gen.vq.encode(images)).reshape(len(images), *self.vocab.image_grid)
            for i, fields in enumerate(out):
                for j, f in enumerate(image_fields):
                    fields[f] = codes[i * len(image_fields) + j].astype(np.int32)
        return out

    def prompts(self, task: str, fields: Sequence[Mapping[str, Any]], config: sampling.SamplingConfig
                ) -> list[list[list[int]]]:
        """One list of prompts per guidance stream (full first)."""
        tmpl = sft_tasks.template(task)
        drops = [()] + (guidance_drops(tmpl, config) if tmpl.generates_image else [])
        return [[sft_tasks.prompt_tokens(task, f, self.vocab, drop) for f in fields] for drop in drops]

    def run(self, task: str, examples: Sequence[Mapping[str, Any]], *, config: sampling.SamplingConfig | None = None,
            seed: int = 0, max_text_tokens: int = 48) -> list:
        """The task's output for each example: uint8 [S, S, 3] images or strings."""
        tmpl = sft_tasks.template(task)
        config = DEFAULT_SAMPLING[task] if config is None else config
        if not examples:
            return []
        if tmpl.generates_image:
            self.gen.vq.require_decoder()  # before any sampling (an imported Chameleon VQ has no decoder)
        streams = self.prompts(task, self.encode_fields(task, examples), config)
        if tmpl.generates_image:
            v = self.vocab
            image_range = ((v.image_offset, v.image_offset + v.num_image_codes),)
            out, _ = self.gen._decode_fixed(streams, v.image_tokens_per_image, config, image_range, seed)
            codes = (out - v.image_offset).reshape(-1, *v.image_grid).astype(np.int32)
            return list(self.gen.vq.decode(codes))
        return self._text(streams[0], config, seed, max_text_tokens)

    def _text(self, prompts, config, seed, max_tokens) -> list[str]:
        """Text ids until `<eos>` (the SFT sequences' end), through the Generator's loop."""
        v = self.vocab
        allowed = ((v.eos_id, v.eos_id + 1), *v.emittable_text_ranges())
        outputs = self.gen._decode_until(list(prompts), (v.eos_id,), max_tokens, config, allowed, seed)
        return [v.decode_text(np.asarray([t for t in ids if t != v.eos_id], np.int32)).strip() for ids in outputs]


def _text_as_trained(task: str, field: str, text) -> str:
    """A text field as ingestion stored it, so the prompt's tokens are the ones training saw."""
    return vocab_lib.prompt_text(text, f"--task {task}: its {field}")


def _resize(image, size: int) -> np.ndarray:
    """uint8 RGB [size, size, 3] through ingestion's conversion (`images.center_crop_resize`: centre
    crop, transparency onto white), not a squash to a square the tokenizer never saw in training."""
    image = np.asarray(image)
    if image.shape == (size, size, 3) and image.dtype == np.uint8:
        return image
    from data_pipeline import images as image_data
    return image_data.center_crop_resize(image, size)


def cli_example(task: str, images: Sequence[np.ndarray], prompt: str | None, control_type: str | None) -> dict:
    """The prompt fields of a task from the CLI's inputs: `--image` fills the template's image
    fields in order, `--prompt` (or `--question`) its text condition, `--control_type` the kind of
    control map."""
    tmpl = sft_tasks.template(task)
    image_fields = [s.spec for s in tmpl.prompt if s.kind == "image"]
    text_fields = [f for s in tmpl.prompt if s.kind == "text" for f in s.fields]
    if len(images) != len(image_fields):
        raise ValueError(f"--task {task} takes {len(image_fields)} --image ({', '.join(image_fields) or 'none'}), "
                         f"got {len(images)}")
    example: dict[str, Any] = dict(zip(image_fields, images))
    for field in text_fields:
        if field == "control_type":
            if control_type not in sft_tasks.CONTROL_TYPES:
                raise ValueError(f"--task control needs --control_type in {sft_tasks.CONTROL_TYPES}")
            example[field] = control_type
        elif not prompt:
            raise ValueError(f"--task {task} needs --prompt (its {field})")
        else:
            example[field] = prompt
    return example


def _check_inputs(task: str, f) -> None:
    """Refuses CLI inputs the task would drop without a word (a second --prompt, a --prompt or
    --question the template has no slot for, --control_type beside another task, --cd_fraction,
    --num_samples for a task that writes one text,
    --image_cfg_scale for a task with no text and image conditions to weigh against each other)."""
    tmpl = sft_tasks.template(task)
    takes_text = any(fld != "control_type" for s in tmpl.prompt if s.kind == "text" for fld in s.fields)
    unused = [name for name, given in (
        ("--prompt", f.prompt and (not takes_text or (task == "vqa" and f.question))),
        ("--question", f.question and task != "vqa"),
        ("--control_type", f.control_type and task != "control"),
        ("--cd_fraction", f["cd_fraction"].present),
        ("--num_samples", f["num_samples"].present and not tmpl.generates_image),   # one text is written
        # one kind of condition: two-stream CFG by --cfg_scale (`guidance_drops`), the image scale unread
        ("--image_cfg_scale", f["image_cfg_scale"].present and tmpl.generates_image
         and not (tmpl.condition_slots("text") and tmpl.condition_slots("image")))) if given]
    if len(f.prompt) > 1:
        raise ValueError(f"--task {task} prompts one example: give one --prompt, not {len(f.prompt)}")
    if unused:
        raise ValueError(f"--task {task} does not use {', '.join(unused)} (its template: "
                         f"{' | '.join(s.spec for s in tmpl.prompt)}): drop it")


def run_cli(gen, f) -> None:
    """`generate --task ...`: one example, `--num_samples` outputs, written under `--out`."""
    from absl import logging
    from PIL import Image
    task = f.task
    tmpl = sft_tasks.template(task)
    from data_pipeline import images as image_data
    images = [np.asarray(image_data.to_rgb(Image.open(p))) for p in f.image]   # alpha onto white, as ingestion
    text = f.question if task == "vqa" and f.question else (f.prompt[0] if f.prompt else None)
    example = cli_example(task, images, text, f.control_type)
    config = DEFAULT_SAMPLING[task]
    overrides = {k: getattr(f, k) for k in ("temperature", "top_k", "top_p", "cfg_scale", "image_cfg_scale", "cd_k",
                                            "cd_alpha") if f[k].present}
    guidance = sorted(k for k in overrides if k in ("cfg_scale", "image_cfg_scale", "cd_k", "cd_alpha"))
    if guidance and not tmpl.generates_image:   # text outputs are drawn from the full prompt alone
        raise ValueError(f"--task {task} writes text, which is drawn without guidance streams: drop "
                         f"{', '.join('--' + k for k in guidance)}")
    _check_inputs(task, f)
    config = dataclasses.replace(config, **overrides)
    out_dir = f.out or os.path.join(f.workdir, "generate")
    os.makedirs(out_dir, exist_ok=True)
    count = f.num_samples if tmpl.generates_image else 1
    outputs = TaskGenerator(gen).run(task, [example] * count, config=config, seed=f.seed,
                                     max_text_tokens=f.max_text_tokens)
    record = {"task": task, "inputs": {"image": list(f.image), "text": text, "control_type": f.control_type},
              "settings": dataclasses.asdict(config), "workdir": os.path.abspath(f.workdir), "step": gen.step}
    if tmpl.generates_image:
        png = image_grid.save_png(os.path.join(out_dir, f"{task}.png"),
                                  image_grid.make_grid([[_resize(i, gen.vq.image_size) for i in images] + outputs]))
        record["png"] = png
        logging.info("wrote %s", png)
        print(png)
    else:
        record["text"] = outputs[0]
        print(outputs[0])
    with open(os.path.join(out_dir, f"{task}.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
