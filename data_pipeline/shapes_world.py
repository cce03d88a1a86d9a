"""Shapes world: the built-in captioned-image dataset that needs no download.

Every command falls back to this when no data is given, so the whole pipeline (VQ tokenizer,
BPE, CM3Leon LM, retrieval, scoring) can run offline and be tested end to end. Each example is
a rendered RGB image of 1-3 coloured shapes on a 3x3 grid plus a caption that names every
object's shape, colour, size and position and the background, so generated captions can be
scored with `parse_caption` and generated images against the ground-truth attributes.

Determinism: an example is a pure function of (seed, split, index): its random stream is
`np.random.default_rng([seed, split_id, index])`. Splits are disjoint by content, not just by
stream: a scene's split is a hash of its attributes (shapes, colours, sizes, positions,
background), and each split rejects scenes that hash to another split. So validation/test
compositions never appear in training (a compositional hold-out), and all splits are unlimited.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")

# Saturated hues far apart in RGB so a decoder/scorer can tell them apart at 64x64.
COLORS = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 25),
    "green": (40, 180, 60),
    "cyan": (0, 210, 220),
    "blue": (30, 80, 230),
    "purple": (140, 50, 200),
    "pink": (255, 120, 200),
}

# Neutral greys only, so no background can be confused with an object colour.
BACKGROUNDS = {
    "black": (0, 0, 0),
    "dark gray": (64, 64, 64),
    "light gray": (192, 192, 192),
    "white": (255, 255, 255),
}

# Object diameter as a fraction of a grid cell (a third of the image side).
SIZES = {"small": 0.5, "large": 0.9}

# Row-major 3x3 grid; POSITIONS[3 * row + col].
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

ATTRIBUTES = ("shape", "color", "size", "position")

SPLITS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SPLIT_SIZES = {"train": 1_000_000, "validation": 1000, "test": 1000}
# Share of the scene space (per mille of attribute hashes) owned by each split.
_SPLIT_PER_MILLE = (("train", 900), ("validation", 950), ("test", 1000))

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: cheap anti-aliasing with exact interiors.
_JITTER = 0.8  # share of the free room in a cell an object centre may move by.

_POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "near the top"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class ShapesWorldConfig:
    """What varies between shapes-world datasets; everything else is fixed by the code."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    seed: int = 0

    def __post_init__(self):
        if int(self.image_size) < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if int(self.seed) < 0:   # NumPy's generators take no negative seed (it failed inside a Grain worker)
            raise ValueError(f"the shapes world's seed must be >= 0, got {self.seed}")
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(
                "need 1 <= min_objects <= max_objects <= 9 (one object per grid cell), got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}")


# ----------------------------------------------------------------------------- scenes


def sample_scene(rng: np.random.Generator, config: ShapesWorldConfig = ShapesWorldConfig()) -> dict:
    """Draws objects in distinct grid cells so they never overlap and all stay visible."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    objects = []
    for cell in cells:
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        room = (1.0 - SIZES[size]) / 2 * _JITTER
        dx, dy = rng.uniform(-room, room, size=2)
        objects.append({
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "color": list(COLORS)[int(rng.integers(len(COLORS)))],
            "size": size,
            "position": POSITIONS[int(cell)],
            "offset": (float(dx), float(dy)),  # cell fractions; not in captions
        })
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return {"objects": objects, "background": background}


def scene_signature(scene: Mapping[str, Any]) -> str:
    """Order-free text key of a scene's captioned content (jitter excluded)."""
    objs = sorted("|".join(o[k] for k in ("position",) + ATTRIBUTES[:3]) for o in scene["objects"])
    return scene["background"] + "||" + ";".join(objs)


def scene_split(scene: Mapping[str, Any]) -> str:
    """The one split a scene's content belongs to; keeps splits disjoint by content."""
    h = int.from_bytes(hashlib.sha256(scene_signature(scene).encode()).digest()[:8], "big") % 1000
    for name, bound in _SPLIT_PER_MILLE:
        if h < bound:
            return name
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- rendering


def _polygon(cx, cy, radius, n, start_deg=-90.0, inner=None):
    pts = []
    step = 360.0 / n
    for i in range(n):
        a = math.radians(start_deg + i * step)
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        if inner is not None:
            b = math.radians(start_deg + (i + 0.5) * step)
            pts.append((cx + inner * math.cos(b), cy + inner * math.sin(b)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.8 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, inner=0.45 * r), fill=fill)
    elif shape == "cross":
        a = 0.33 * r
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, start_deg=0.0), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def object_center(obj: Mapping[str, Any], image_size: int) -> tuple[float, float]:
    """Centre (x, y) of an object in pixel units, so scorers can look where it was drawn."""
    idx = POSITIONS.index(obj["position"])
    row, col = divmod(idx, 3)
    dx, dy = obj.get("offset", (0.0, 0.0))
    cell = image_size / 3.0
    return (col + 0.5 + dx) * cell, (row + 0.5 + dy) * cell


def render(scene: Mapping[str, Any], image_size: int = 64) -> np.ndarray:
    """Renders a scene as a uint8 (S, S, 3) image with clean, lightly anti-aliased edges."""
    image_size = int(image_size)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    bg = scene["background"]
    if bg not in BACKGROUNDS:
        raise ValueError(f"unknown background {bg!r}; known: {tuple(BACKGROUNDS)}")
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    cell = big / 3.0
    for obj in scene["objects"]:
        if obj["color"] not in COLORS:
            raise ValueError(f"unknown color {obj['color']!r}; known: {tuple(COLORS)}")
        if obj["size"] not in SIZES:
            raise ValueError(f"unknown size {obj['size']!r}; known: {tuple(SIZES)}")
        cx, cy = object_center(obj, big)
        _draw_shape(draw, obj["shape"], cx, cy, SIZES[obj["size"]] * cell / 2, COLORS[obj["color"]])
    img = img.resize((image_size, image_size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- maps (instruction tuning)

# Per-pixel classes: 0 = background, 1 + i = SHAPES[i]. A class map is shown as an image in this
# palette (black background, object colours the VQ tokenizer already reproduces) so segmentation
# maps and segmentation-controlled generation go through the ordinary image tokens.
CLASS_NAMES = ("background",) + SHAPES
CLASS_PALETTE = np.asarray([(0, 0, 0)] + [COLORS[c] for c in
                                          ("red", "green", "blue", "yellow", "cyan", "purple", "orange")], np.uint8)
EDGE_THRESHOLD = 48   # max per-channel step between neighbouring pixels that counts as an edge
MASK_GREY = (128, 128, 128)  # infilling mask colour: no background or object colour is this grey


def class_map(scene: Mapping[str, Any], image_size: int = 64) -> np.ndarray:
    """uint8 [S, S] per-pixel classes of a scene (0 background, 1 + shape index), drawn with the
    same geometry as `render` and sampled without blending (nearest) so every pixel has one class."""
    big = int(image_size) * _SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    cell = big / 3.0
    for obj in scene["objects"]:
        cx, cy = object_center(obj, big)
        _draw_shape(draw, obj["shape"], cx, cy, SIZES[obj["size"]] * cell / 2, 1 + SHAPES.index(obj["shape"]))
    return np.asarray(img.resize((int(image_size),) * 2, Image.NEAREST), np.uint8).copy()


def render_class_map(classes: np.ndarray) -> np.ndarray:
    """uint8 [S, S] classes -> uint8 [S, S, 3] image in CLASS_PALETTE."""
    return CLASS_PALETTE[np.asarray(classes)]


def class_map_from_palette(image: np.ndarray) -> np.ndarray:
    """An image in CLASS_PALETTE (e.g. a decoded segmentation) -> uint8 [S, S] nearest classes."""
    x = np.asarray(image, np.int32)[..., None, :]
    return np.argmin(np.square(x - CLASS_PALETTE.astype(np.int32)).sum(-1), axis=-1).astype(np.uint8)


def edge_map(image: np.ndarray, threshold: int = EDGE_THRESHOLD) -> np.ndarray:
    """bool [S, S]: pixels whose colour jumps by more than `threshold` (any channel) to the next
    pixel right or below: one-pixel object outlines of a render (or of a generated image)."""
    x = np.asarray(image, np.int32)
    edges = np.zeros(x.shape[:2], bool)
    edges[:, :-1] |= np.abs(x[:, 1:] - x[:, :-1]).max(-1) > threshold
    edges[:-1, :] |= np.abs(x[1:, :] - x[:-1, :]).max(-1) > threshold
    return edges


def render_edge_map(edges: np.ndarray) -> np.ndarray:
    """bool [S, S] -> uint8 [S, S, 3]: white outlines on black (a canny-style control image)."""
    return np.repeat(np.where(np.asarray(edges, bool), 255, 0).astype(np.uint8)[..., None], 3, axis=-1)


def cell_bounds(position: str, image_size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of a grid cell."""
    row, col = divmod(POSITIONS.index(position), 3)
    edges = [round(i * image_size / 3) for i in range(4)]
    return edges[row], edges[row + 1], edges[col], edges[col + 1]


def mask_cell(image: np.ndarray, position: str) -> np.ndarray:
    """A copy of the image with one grid cell painted MASK_GREY (the infilling task's input)."""
    out = np.array(image, np.uint8, copy=True)
    top, bottom, left, right = cell_bounds(position, out.shape[0])
    out[top:bottom, left:right] = MASK_GREY
    return out


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj, form: int, rng: np.random.Generator) -> str:
    size = _SIZE_WORDS[obj["size"]][int(rng.integers(len(_SIZE_WORDS[obj["size"]])))]
    pos = _POSITION_PHRASES[obj["position"]]
    pos = pos[int(rng.integers(len(pos)))]
    if form == 0:
        return f"{_article(size)} {size} {obj['color']} {obj['shape']} {pos}"
    if form == 1:
        return f"{_article(size)} {size} {obj['shape']} in {obj['color']} {pos}"
    # form 2: position first, then the object.
    return f"{pos} there is {_article(size)} {size} {obj['color']} {obj['shape']}"


def _join_and(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _count(n: int, noun: str) -> str:
    return f"{_COUNT_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def caption_for(scene: Mapping[str, Any], rng: np.random.Generator) -> str:
    """Writes a caption from a random template; every template names all attributes.

    Object phrases never interleave (each object's four attribute words are contiguous) and
    filler words never collide with attribute words; `parse_caption` relies on both.
    """
    objs = list(scene["objects"])
    bg = scene["background"]
    n = len(objs)
    form = int(rng.integers(2))
    phrases = [_object_phrase(o, form, rng) for o in objs]
    t = int(rng.integers(6))
    if t == 0:
        return f"{_join_and(phrases)} on {_article(bg)} {bg} background"
    if t == 1:
        return f"{_count(n, 'shape')} on {bg}: " + "; ".join(phrases)
    if t == 2:
        return f"{_article(bg)} {bg} background with {_join_and(phrases)}"
    if t == 3:
        return f"an image of {_join_and(phrases)}, on {bg}"
    if t == 4:
        verb = "is" if n == 1 else "are"
        sentences = [_object_phrase(o, 2, rng) for o in objs]
        sentences = [s[0].upper() + s[1:] + "." for s in sentences]
        return f"There {verb} {_count(n, 'object')} on {_article(bg)} {bg} background. " + " ".join(sentences)
    return ", ".join(phrases) + f"; background: {bg}"


def _alternation(words: Sequence[str]) -> str:
    # Longest first so "top left" wins over "top" and "light gray" over "gray".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_KEYWORDS: dict[str, tuple[str, str]] = {}
for _s in SHAPES:
    _KEYWORDS[_s] = ("shape", _s)
for _c in COLORS:
    _KEYWORDS[_c] = ("color", _c)
for _z, _ws in _SIZE_WORDS.items():
    for _w in _ws:
        _KEYWORDS[_w] = ("size", _z)
for _p in POSITIONS:
    _KEYWORDS[_p] = ("position", _p)
_KEYWORDS.update({
    "upper left": ("position", "top left"), "upper right": ("position", "top right"),
    "lower left": ("position", "bottom left"), "lower right": ("position", "bottom right"),
    "middle": ("position", "center"),
})
_KEYWORD_RE = re.compile(r"\b(" + _alternation(list(_KEYWORDS)) + r")\b")
_BACKGROUND_RE = re.compile(r"\b(" + _alternation(list(BACKGROUNDS)) + r")\b")


def parse_caption(caption: str) -> list[dict]:
    """Recovers each object's attributes from a caption of any template.

    Raises ValueError when the attribute words do not form whole objects (one shape, colour,
    size and position each, contiguous), e.g. for a malformed generated caption.
    """
    found = [_KEYWORDS[m.group(1)] for m in _KEYWORD_RE.finditer(caption.lower())]
    if not found or len(found) % 4:
        raise ValueError(f"caption has {len(found)} attribute words, not a multiple of 4: {caption!r}")
    objects = []
    for i in range(0, len(found), 4):
        obj = dict(found[i:i + 4])
        if len(obj) != 4:
            raise ValueError(f"object {i // 4} does not name one of each {ATTRIBUTES}: {caption!r}")
        objects.append({k: obj[k] for k in ATTRIBUTES})
    return objects


_COUNT_RE = re.compile(r"\b(" + _alternation(_COUNT_WORDS) + r") (?:shape|object)s?\b")


def parse_count(caption: str) -> int | None:
    """The number of objects a caption states ("two shapes", "three objects"), or None if it states none."""
    m = _COUNT_RE.search(caption.lower())
    return _COUNT_WORDS.index(m.group(1)) if m else None


def parse_background(caption: str) -> str | None:
    """The background named in a caption, or None if it names none."""
    m = _BACKGROUND_RE.search(caption.lower())
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- examples


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLITS)}")
    return SPLITS[split]


def scene_and_caption(split: str, index: int, config: ShapesWorldConfig = ShapesWorldConfig()):
    """(scene, caption) of an example without rendering; cheap for building text corpora."""
    index = int(index)
    if index < 0:
        raise IndexError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([int(config.seed), _split_id(split), index])
    scene = sample_scene_in_split(rng, split, config)
    return scene, caption_for(scene, rng)


def sample_scene_in_split(rng: np.random.Generator, split: str, config: ShapesWorldConfig = ShapesWorldConfig()):
    """Draws scenes from `rng` until one belongs to `split` (rejection keeps splits disjoint)."""
    _split_id(split)
    for _ in range(100_000):
        scene = sample_scene(rng, config)
        if scene_split(scene) == split:
            return scene
    raise RuntimeError(f"no scene of split {split!r} found for config {config}")  # not reached in practice


def example(split: str, index: int, config: ShapesWorldConfig = ShapesWorldConfig()) -> dict:
    """The example at (config.seed, split, index); identical on every call and machine."""
    scene, caption = scene_and_caption(split, index, config)
    return {
        "image": render(scene, config.image_size),
        "caption": caption,
        "objects": scene["objects"],
        "background": scene["background"],
        "index": int(index),
    }


class ShapesWorld:
    """Random-access source (len + getitem) so it plugs into grain.MapDataset.source."""

    def __init__(self, config: ShapesWorldConfig = ShapesWorldConfig(), split: str = "train",
                 size: int | None = None):
        _split_id(split)
        self.config = config
        self.split = split
        self._size = DEFAULT_SPLIT_SIZES[split] if size is None else int(size)
        if self._size < 0:
            raise ValueError(f"size must be >= 0, got {size}")

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index) -> dict:
        index = int(index)
        if index < 0:
            index += self._size
        if not 0 <= index < self._size:
            raise IndexError(f"index {index} out of range for {self!r}")
        return example(self.split, index, self.config)

    def __repr__(self) -> str:
        return f"ShapesWorld(split={self.split!r}, size={self._size}, config={self.config})"
