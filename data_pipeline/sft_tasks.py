"""Instruction-tuning (SFT) tasks: one template per task, the sequence codec, shapes-world examples.

A template is a list of prompt slots and one output slot. A slot is text (a format string over the
example's fields, e.g. "Question: " or "{question}") or an image field. An example (a dict of
fields; images as VQ code grids) becomes

    <eos> prompt slots... output slot <eos>

under the vocabulary's layout rule (`vocab.py`): a `<break>` before an image that follows text and
after every image, so each change of modality is marked; adjacent text slots are tokenized
separately and concatenated (their boundary is a token boundary, so an output text starts on a
token of its own, exactly as the decoder will write it). `output_start` is the index of the first
output token: SFT puts the loss on `tokens[output_start:]` only (the output, its closing `<break>`
and the final `<eos>`, which is the stop token of text outputs). `slots[j]` is the template slot
token j came from (-1 for the structural `<eos>`/`<break>`), so condition dropout can replace a
slot by one `<mask>` without re-tokenizing.

Templates follow the paper's (`Edit first image following the instruction <break> {image1} <break>
{instruction} <break> {image2}`, `Make high quality image from canny edge features <break> ...`),
with the image before the text in captioning and VQA: the paper writes `Describe the given
picture. {caption} <break> {image}`, but a causal model must see the image before it answers.

Segmentation output is an image: the per-pixel class map drawn in `shapes_world.CLASS_PALETTE` and
VQ-encoded like any image (no new vocabulary ids, so any pretrained vocabulary fits; the map's
accuracy is bounded by the VQ's reconstruction of flat colour regions, which is high).

Shapes-world examples (`shapes_example`) are pure functions of (task, split, index, image size,
seed) built from the renderer: true before/after renders for edits, edge maps and class maps
rendered from the scene, questions with their answers.
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from cm3leon_jax.vocab import BREAK_ID, EOS_ID, MASK_ID
from data_pipeline import mixture, shapes_world as sw

TASKS = ("text_to_image", "caption", "vqa", "edit", "control", "segment", "infill")
CONTROL_TYPES = ("edge", "segmentation")
VQA_KINDS = ("color", "shape", "count", "position")
EDIT_KINDS = ("recolor", "move", "remove")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
_DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
STRUCTURAL = -1  # slot id of the framing <eos> tokens and the <break>s


@dataclasses.dataclass(frozen=True)
class Slot:
    kind: str                 # "text" (a format string over fields) or "image" (a field name)
    spec: str
    condition: bool = False   # dropped to <mask> by condition dropout / in CFG's null streams

    @property
    def fields(self) -> tuple[str, ...]:
        if self.kind == "image":
            return (self.spec,)
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.spec) if f)


def T(spec: str, condition: bool = False) -> Slot:
    return Slot("text", spec, condition)


def I(field: str) -> Slot:  # noqa: E743 - a one-letter constructor beside T
    return Slot("image", field, True)


@dataclasses.dataclass(frozen=True)
class Template:
    task: str
    prompt: tuple[Slot, ...]
    output: Slot

    @property
    def slots(self) -> tuple[Slot, ...]:
        return self.prompt + (self.output,)

    @property
    def text_fields(self) -> tuple[str, ...]:
        return tuple(f for s in self.slots if s.kind == "text" for f in s.fields)

    @property
    def image_fields(self) -> tuple[str, ...]:
        return tuple(s.spec for s in self.slots if s.kind == "image")

    @property
    def output_field(self) -> str:
        return self.output.fields[0]

    @property
    def generates_image(self) -> bool:
        return self.output.kind == "image"

    def condition_slots(self, kind: str) -> tuple[int, ...]:
        """Prompt slot indices of the image or text conditions (what CFG's null streams drop)."""
        return tuple(i for i, s in enumerate(self.prompt) if s.condition and s.kind == kind)


TEMPLATES: dict[str, Template] = {t.task: t for t in (
    Template("text_to_image", (T("{caption}", True),), I("image")),
    Template("caption", (T("Describe the given picture."), I("image")), T("{caption}")),
    Template("vqa", (I("image"), T("Question: "), T("{question}", True), T(" Answer:")), T(" {answer}")),
    Template("edit", (T("Edit first image following the instruction"), I("source"), T("{instruction}", True)),
             I("target")),
    Template("control", (T("Make high quality image from {control_type} features"), I("control"),
                         T("{caption}", True)), I("image")),
    Template("segment", (T("Segment the given picture."), I("image")), I("segmentation")),
    Template("infill", (T("Fill in the masked region of the image"), I("masked"), T("{caption}", True)),
             I("image")),
)}
assert tuple(TEMPLATES) == TASKS


def template(task: str) -> Template:
    if task not in TEMPLATES:
        raise ValueError(f"unknown SFT task {task!r}; known: {TASKS}")
    return TEMPLATES[task]


# ----------------------------------------------------------------------------------------- codec

class SftSequence(NamedTuple):
    tokens: np.ndarray      # int32 `<eos> prompt output <eos>`
    slots: np.ndarray       # int32 per token: template slot index, -1 structural
    output_start: int       # tokens[output_start:] is the output (loss weight 1 under SFT loss)


def _encode(tmpl: Template, fields: Mapping[str, Any], vocab, *, drop: Sequence[int] = (),
            with_output: bool = True) -> SftSequence:
    tokens, slots, prev = [EOS_ID], [STRUCTURAL], None
    output_start = None
    chosen = tmpl.slots if with_output else tmpl.prompt
    for k, slot in enumerate(chosen):
        is_output = k == len(tmpl.prompt)
        if slot.kind == "image":
            if prev == "text":
                tokens.append(BREAK_ID)
                slots.append(STRUCTURAL)
            if is_output:
                output_start = len(tokens)
            if k in drop:
                ids = [MASK_ID]
            else:
                codes = np.asarray(fields[slot.spec])
                if codes.shape not in ((vocab.image_tokens_per_image,), tuple(vocab.image_grid)):
                    raise ValueError(f"{tmpl.task}: image field {slot.spec!r} has shape {codes.shape}; expected "
                                     f"{vocab.image_grid} VQ codes")
                ids = vocab.image_codes_to_ids(codes.reshape(-1)).tolist()
            tokens += ids + [BREAK_ID]
            slots += [k] * len(ids) + [STRUCTURAL]
            prev = "image"
        else:
            if is_output:
                output_start = len(tokens)
            if k in drop:
                ids = [MASK_ID]
            else:
                text = slot.spec.format(**{f: fields[f] for f in slot.fields})
                if "<break>" in text:
                    raise ValueError(f"{tmpl.task}: text of slot {k} contains '<break>'")
                ids = vocab.encode_text(text).tolist()
            if not ids:
                raise ValueError(f"{tmpl.task}: slot {k} ({slot.spec!r}) encodes to no tokens")
            tokens += ids
            slots += [k] * len(ids)
            prev = "text"
    if with_output:
        tokens.append(EOS_ID)
        slots.append(STRUCTURAL)
    else:
        if tmpl.generates_image and prev == "text":  # the cue to start an image, as in training
            tokens.append(BREAK_ID)
            slots.append(STRUCTURAL)
        output_start = len(tokens)
    return SftSequence(np.asarray(tokens, np.int32), np.asarray(slots, np.int32), int(output_start))


def encode_example(task: str, fields: Mapping[str, Any], vocab) -> SftSequence:
    """An example (text fields as str, image fields as VQ code grids) -> its training sequence."""
    tmpl = template(task)
    missing = [f for f in tmpl.text_fields + tmpl.image_fields if f not in fields]
    if missing:
        raise ValueError(f"{task}: missing fields {missing}")
    return _encode(tmpl, fields, vocab)


def prompt_tokens(task: str, fields: Mapping[str, Any], vocab, drop: Sequence[int] = ()) -> list[int]:
    """The decoder's prompt: everything before the output, with prompt slots `drop` as `<mask>`
    (the null conditions of classifier-free guidance, as seen under condition dropout)."""
    return _encode(template(task), fields, vocab, drop=tuple(drop), with_output=False).tokens.tolist()


def _text_regex(specs: Sequence[str]) -> re.Pattern:
    pattern = ""
    for spec in specs:
        for literal, field, _, _ in string.Formatter().parse(spec):
            pattern += re.escape(literal)
            if field:
                pattern += f"(?P<{field}>.+?)"
    return re.compile(pattern, re.DOTALL)


def parse_sequence(task: str, tokens, vocab) -> dict[str, Any]:
    """Inverse of `encode_example` from the tokens alone: {field: str or (h, w) code grid}.
    Raises ValueError when the tokens do not follow the task's template."""
    tmpl = template(task)
    t = np.asarray(tokens)
    if t.ndim != 1 or len(t) < 3 or t[0] != EOS_ID or t[-1] != EOS_ID:
        raise ValueError(f"{task}: an SFT sequence is `<eos> ... <eos>`")
    parts = vocab.decode_document(t[1:-1])
    groups: list[tuple[str, list[str]]] = []
    for slot in tmpl.slots:
        if slot.kind == "text" and groups and groups[-1][0] == "text":
            groups[-1][1].append(slot.spec)
        else:
            groups.append((slot.kind, [slot.spec]))
    if len(parts) != len(groups):
        raise ValueError(f"{task}: {len(parts)} parts, the template has {len(groups)}")
    fields: dict[str, Any] = {}
    for part, (kind, specs) in zip(parts, groups):
        if kind == "image":
            if isinstance(part, str):
                raise ValueError(f"{task}: expected image {specs[0]!r}, got text {part!r}")
            fields[specs[0]] = part
            continue
        if not isinstance(part, str):
            raise ValueError(f"{task}: expected text {specs}, got an image")
        m = _text_regex(specs).fullmatch(part)
        if m is None:
            raise ValueError(f"{task}: text {part!r} does not match the template {''.join(specs)!r}")
        fields.update(m.groupdict())
    return fields


def output_weights(length: int, output_start: int) -> np.ndarray:
    """SFT loss mask: weight 1 on predicting tokens[output_start:], 0 on the prompt."""
    return (np.arange(length) >= int(output_start)).astype(np.float32)


def choose_dropped(tmpl: Template, rng: np.random.Generator, rate: float) -> tuple[int, ...]:
    """InstructPix2Pix-style condition dropout for tasks that generate images: with probability
    `rate` each, drop the text conditions, the image conditions, or both (a task with only one
    kind drops it with probability `rate`). Exactly one uniform is drawn per call."""
    u = rng.random()
    if not tmpl.generates_image or rate <= 0:
        return ()
    text, image = tmpl.condition_slots("text"), tmpl.condition_slots("image")
    options = [x for x in (text, image) if x]
    if len(options) == 2:
        options.append(text + image)
    for i, option in enumerate(options):
        if u < rate * (i + 1):
            return option
    return ()


def drop_slots(seq: SftSequence, drop: Sequence[int]) -> SftSequence:
    """Each prompt slot in `drop` -> one `<mask>` token (same layout as `prompt_tokens(drop=)`)."""
    if not drop:
        return seq
    keep = ~np.isin(seq.slots, list(drop))
    first = np.zeros(len(seq.tokens), bool)
    for s in drop:
        where = np.flatnonzero(seq.slots == s)
        if where.size:
            if where[0] >= seq.output_start:
                raise ValueError(f"slot {s} is not in the prompt")
            first[where[0]] = True
    tokens = np.where(first, MASK_ID, seq.tokens)[keep | first]
    slots = seq.slots[keep | first]
    removed = int(np.sum(~(keep | first)[:seq.output_start]))
    return SftSequence(tokens.astype(np.int32), slots.astype(np.int32), seq.output_start - removed)


# ------------------------------------------------------------------------------- task mixing

def mixing_counts(sizes: Mapping[str, int], weights: Mapping[str, float] | None = None, *,
                  max_upsample: float = 3.0, min_downsample: float = 0.3) -> dict[str, int]:
    """Documents of each task per mixture epoch: the paper's task balance, a task repeated at most
    3x and keeping at least 30% of its documents an epoch (`mixture.mixing_counts`)."""
    return mixture.mixing_counts(sizes, weights, max_upsample=max_upsample, min_downsample=min_downsample)


def parse_weights(spec: str) -> dict[str, float]:
    """"edit=2,vqa=0.5" -> {"edit": 2.0, "vqa": 0.5}; "" -> {} (equal weights)."""
    return dict(mixture.parse_weights(spec, TASKS, "TASK"))


# ------------------------------------------------------------------------ shapes-world examples

def _unique_shape_objects(scene) -> list[dict]:
    shapes = [o["shape"] for o in scene["objects"]]
    return [o for o in scene["objects"] if shapes.count(o["shape"]) == 1]


def _neighbour(position: str, direction: str) -> str | None:
    row, col = divmod(sw.POSITIONS.index(position), 3)
    dr, dc = DIRECTIONS[direction]
    r, c = row + dr, col + dc
    return sw.POSITIONS[3 * r + c] if 0 <= r < 3 and 0 <= c < 3 else None


def _scene_copy(scene) -> dict:
    return {"objects": [dict(o) for o in scene["objects"]], "background": scene["background"]}


def apply_edit(scene, edit: Mapping[str, Any]) -> dict:
    """The scene after an edit {"kind", "position" (of the edited object), "color" | "to"}."""
    after = _scene_copy(scene)
    index = [o["position"] for o in after["objects"]].index(edit["position"])
    if edit["kind"] == "recolor":
        after["objects"][index]["color"] = edit["color"]
    elif edit["kind"] == "move":
        after["objects"][index]["position"] = edit["to"]
    elif edit["kind"] == "remove":
        del after["objects"][index]
    else:
        raise ValueError(f"unknown edit kind {edit['kind']!r}; known: {EDIT_KINDS}")
    return after


def _edit_for(scene, rng: np.random.Generator) -> tuple[dict, str] | None:
    candidates = _unique_shape_objects(scene)
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    occupied = {o["position"] for o in scene["objects"]}
    moves = [d for d in DIRECTIONS if (_neighbour(obj["position"], d) or obj["position"]) not in occupied]
    kinds = [k for k in EDIT_KINDS if k != "move" or moves]
    kind = kinds[int(rng.integers(len(kinds)))]
    edit = {"kind": kind, "position": obj["position"], "shape": obj["shape"]}
    if kind == "recolor":
        colors = [c for c in sw.COLORS if c != obj["color"]]
        edit["color"] = colors[int(rng.integers(len(colors)))]
        return edit, f"make the {obj['shape']} {edit['color']}"
    if kind == "move":
        direction = moves[int(rng.integers(len(moves)))]
        edit.update(direction=direction, to=_neighbour(obj["position"], direction))
        return edit, f"move the {obj['shape']} {_DIRECTION_PHRASES[direction]}"
    return edit, f"remove the {obj['shape']}"


def _vqa_for(scene, rng: np.random.Generator) -> dict | None:
    kind = VQA_KINDS[int(rng.integers(len(VQA_KINDS)))]
    objects = scene["objects"]
    if kind == "count":
        return {"kind": kind, "question": "how many shapes are there?", "answer": sw._COUNT_WORDS[len(objects)]}
    if kind == "shape":
        obj = objects[int(rng.integers(len(objects)))]
        return {"kind": kind, "question": f"what shape is at the {obj['position']}?", "answer": obj["shape"]}
    unique = _unique_shape_objects(scene)
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    if kind == "color":
        return {"kind": kind, "question": f"what color is the {obj['shape']}?", "answer": obj["color"]}
    return {"kind": kind, "question": f"where is the {obj['color']} {obj['shape']}?", "answer": obj["position"]}


def shapes_example(task: str, split: str, index: int, *, image_size: int = 64, seed: int = 0) -> dict:
    """Example `index` of a task in a shapes-world split: {"task", fields (images uint8 [S, S, 3]),
    "meta": ground truth (scenes, edit, question kind)}. Pure in its arguments."""
    tmpl = template(task)
    config = sw.ShapesWorldConfig(image_size=int(image_size), seed=int(seed))
    rng = np.random.default_rng([int(seed), sw.SPLITS[split], int(index), 1 + TASKS.index(task), 0x5F7])
    for _ in range(1000):
        scene = sw.sample_scene_in_split(rng, split, config)
        caption = sw.caption_for(scene, rng)
        image = sw.render(scene, config.image_size)
        meta: dict[str, Any] = {"scene": scene}
        ex: dict[str, Any] = {"task": task}
        if task in ("text_to_image", "caption"):
            ex.update(caption=caption, image=image)
        elif task == "vqa":
            qa = _vqa_for(scene, rng)
            if qa is None:
                continue
            ex.update(image=image, question=qa["question"], answer=qa["answer"])
            meta["kind"] = qa["kind"]
        elif task == "edit":
            made = _edit_for(scene, rng)
            if made is None:
                continue
            edit, instruction = made
            after = apply_edit(scene, edit)
            ex.update(source=image, instruction=instruction, target=sw.render(after, config.image_size))
            meta.update(edit=edit, after=after)
        elif task == "control":
            control_type = CONTROL_TYPES[int(rng.integers(len(CONTROL_TYPES)))]
            control = (sw.render_edge_map(sw.edge_map(image)) if control_type == "edge"
                       else sw.render_class_map(sw.class_map(scene, config.image_size)))
            ex.update(control_type=control_type, control=control, caption=caption, image=image)
        elif task == "segment":
            ex.update(image=image, segmentation=sw.render_class_map(sw.class_map(scene, config.image_size)))
        elif task == "infill":
            obj = scene["objects"][int(rng.integers(len(scene["objects"])))]
            ex.update(masked=sw.mask_cell(image, obj["position"]), caption=caption, image=image)
            meta["masked_position"] = obj["position"]
        ex["meta"] = meta
        assert set(tmpl.text_fields + tmpl.image_fields) <= set(ex), task
        return ex
    raise RuntimeError(f"no {task} example found for {split}:{index}")  # not reached in practice


__all__ = [
    "CONTROL_TYPES", "EDIT_KINDS", "Slot", "SftSequence", "TASKS", "TEMPLATES", "Template", "VQA_KINDS",
    "apply_edit", "choose_dropped", "drop_slots", "encode_example", "mixing_counts", "output_weights",
    "parse_sequence", "parse_weights", "prompt_tokens", "shapes_example", "template",
]
