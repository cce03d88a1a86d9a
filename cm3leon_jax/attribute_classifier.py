"""A small CNN that reads a shapes-world image back into a scene: the evaluator's eyes.

The shapes-world generator knows every attribute of every image it renders, so labels are free
and unlimited: this classifier is trained on freshly rendered scenes (train split only, so the
held-out validation/test compositions are new to it) and predicts, for each of the 9 grid cells,
whether it is empty and otherwise the object's shape, colour and size, plus the background.
`predict_scenes` turns the predictions into scenes of the same structure as
`shapes_world.sample_scene` (objects with shape/color/size/position, background), which
`shapes_metrics` scores against the requested scenes; `features` gives the penultimate layer
(the 9 cells' hidden vectors, concatenated: [N, 576]) for a Frechet distance in this
classifier's feature space.

Model: objects never leave their grid cell (shapes-world keeps every object inside its cell,
jitter included), so one small CNN (`CellCNN`, parameters only) reads each cell on its own.
Pure functions around it: `preprocess` resizes any input to 72x72 (24 px per cell) in [0, 1];
`with_foreground` appends a colour-blind foreground channel (each pixel's distance from the
background colour, estimated as the median of the border pixels), so shape detectors need not be
learned separately for each of the 8 x 4 object/background colour pairs (without it shape
learning was several times slower); `image_cells` cuts the 9 cells; the CNN (3x3 convs of
stride 1, 2, 1, 2 with ReLU, max + mean pooling, one hidden layer of 64) has four softmax
heads per cell: shape (index 0 = empty), colour, size, background. The image's background is
the mean over its cells of their background log-probabilities (`apply_images`).

Training works on cell crops: each step renders `batch_size` images and trains on
CROPS_PER_IMAGE crops per image, the occupied cells first (at most 3/4 of the crops), topped up
with empty cells, so compute goes to objects rather than to empty background. Robustness:
shapes-world already jitters object centres; training adds +-1 px shifts, a Gaussian blur
(BLUR_SIGMA, on a third of the images, mixed in with a uniform random weight: a stand-in for VQ
reconstruction blur), per-channel gain/offset jitter and grey pixel noise. One image in 16 is pure
noise (per-pixel or blocky) whose cells are labelled empty with no background loss, so garbage
generations read as empty scenes instead of objects everywhere.

Training (`train_classifier`) is deterministic in `seed`: the data at step s is rendered from
`np.random.default_rng([seed, s])` and the augmentation key is `fold_in(key(seed), s)`. The
result is cached under `workdir/attribute_classifier/` as `params.safetensors` plus
`classifier.json` (format, settings, training time and held-out accuracy); a later call loads it
instead of training again.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from cm3leon_jax import workdir_io
from data_pipeline import shapes_world as sw

CLASSIFIER_SUBDIR = "attribute_classifier"
PARAMS_FILE = "params.safetensors"
CONFIG_JSON = "classifier.json"
FORMAT = "cm3leon_jax.attribute_classifier/1"

INPUT_SIZE = 72          # internal resolution: 24 px per grid cell
NUM_CELLS = len(sw.POSITIONS)
SHAPE_CLASSES = ("empty",) + tuple(sw.SHAPES)   # index 0 = no object in the cell
COLOR_CLASSES = tuple(sw.COLORS)
SIZE_CLASSES = tuple(sw.SIZES)
BACKGROUND_CLASSES = tuple(sw.BACKGROUNDS)
HEADS = ("shape", "color", "size", "background")

DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 32   # rendered images per step; CROPS_PER_IMAGE * batch_size cell crops are trained on
CROPS_PER_IMAGE = 3
MAX_OCCUPIED_SHARE = 0.75  # at least a quarter of the crops of a step are empty (or noise) cells
NOISE_EVERY = 16          # one rendered image in NOISE_EVERY is a pure-noise image, all cells "empty"
TRAIN_MAX_OBJECTS = 4     # training scenes hold 1-4 objects (the data has 1-3)
BLUR_SIGMA = 1.6          # augmentation blur (in 72-px input pixels), mixed in with a uniform weight


# --------------------------------------------------------------------------- model


class CellCNN(nn.Module):
    """One grid cell, float [M, 24, 24, 3] in [0, 1] -> (logits per head, hidden [M, H]).

    Four 3x3 convs (stride 1, 2, 1, 2) with ReLU, max + mean pooling over the 6x6 map (so the
    jitter of an object inside its cell does not matter), one shared hidden layer, four heads.
    """

    widths: tuple[int, int, int, int] = (24, 32, 48, 64)
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = 2.0 * x - 1.0   # RGB and foreground map, [0, 1] -> [-1, 1]
        for i, (width, stride) in enumerate(zip(self.widths, (1, 2, 1, 2))):
            x = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride), padding="SAME", name=f"conv{i}")(x))
        x = jnp.concatenate([x.max(axis=(1, 2)), x.mean(axis=(1, 2))], axis=-1)
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        logits = {
            "shape": nn.Dense(len(SHAPE_CLASSES), name="shape_head")(h),
            "color": nn.Dense(len(COLOR_CLASSES), name="color_head")(h),
            "size": nn.Dense(len(SIZE_CLASSES), name="size_head")(h),
            "background": nn.Dense(len(BACKGROUND_CLASSES), name="background_head")(h),
        }
        return logits, h


CELL_SIZE = INPUT_SIZE // 3
_MODEL = CellCNN()


def init_params(seed: int = 0):
    return _MODEL.init(jax.random.key(seed), jnp.zeros((1, CELL_SIZE, CELL_SIZE, 4), jnp.float32))["params"]


def feature_dim() -> int:
    return NUM_CELLS * _MODEL.hidden


# --------------------------------------------------------------------------- pure math


def with_foreground(x: jax.Array) -> jax.Array:
    """[N, H, W, 3] -> [N, H, W, 4]: RGB plus a colour-blind foreground map, each pixel's distance
    from the image's background colour (the per-channel median of the border pixels: objects
    touch the border only in a few places), so shape detectors need not be learned for every
    object/background colour pair."""
    border = jnp.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    background = jnp.median(border, axis=1)[:, None, None, :]
    fg = jnp.sqrt(jnp.mean(jnp.square(x - background), axis=-1, keepdims=True) + 1e-6)
    return jnp.concatenate([x, 2.0 * fg], axis=-1)


def image_cells(x: jax.Array) -> jax.Array:
    """[N, 72, 72, C] -> [N * 9, 24, 24, C]: each image's grid cells, row-major."""
    n, _, _, c = x.shape
    x = x.reshape(n, 3, CELL_SIZE, 3, CELL_SIZE, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n * NUM_CELLS, CELL_SIZE, CELL_SIZE, c)


def apply_images(params, x: jax.Array):
    """Preprocessed images [N, 72, 72, 3] -> (logits, features [N, 9 * H]).

    logits: shape/color/size [N, 9, classes]; background [N, 4], the mean over the 9 cells of
    each cell's background log-probabilities (every cell shows the background)."""
    n = x.shape[0]
    logits, h = _MODEL.apply({"params": params}, image_cells(with_foreground(x)))
    logits = {k: v.reshape(n, NUM_CELLS, -1) for k, v in logits.items()}
    logits["background"] = jax.nn.log_softmax(logits["background"], axis=-1).mean(axis=1)
    return logits, h.reshape(n, -1)


def preprocess(images) -> jax.Array:
    """uint8 [N, H, W, 3] (or float in [0, 1]) -> float32 [N, 72, 72, 3] in [0, 1]."""
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]), "linear")
    return x


def _gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur with edge padding, as shifted weighted sums (cheap on CPU)."""
    r = int(np.ceil(2 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = x.shape[1:3]
    p = jnp.pad(x, [(0, 0), (r, r), (0, 0), (0, 0)], mode="edge")
    x = sum(float(k[i]) * p[:, i:i + h] for i in range(2 * r + 1))
    p = jnp.pad(x, [(0, 0), (0, 0), (r, r), (0, 0)], mode="edge")
    return sum(float(k[i]) * p[:, :, i:i + w] for i in range(2 * r + 1))


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """Gaussian blur (a third of the images, mixed in with a random weight), per-channel
    gain/offset jitter and grey pixel noise of a random strength."""
    n = x.shape[0]
    kb, km, kg, ko, kn, ks = jax.random.split(key, 6)
    blurred = _gaussian_blur(x, BLUR_SIGMA)
    mix = jax.random.uniform(km, (n, 1, 1, 1)) * (jax.random.uniform(kb, (n, 1, 1, 1)) < 1.0 / 3.0)
    x = x + mix * (blurred - x)
    x = x * (1.0 + jax.random.uniform(kg, (n, 1, 1, 3), minval=-0.06, maxval=0.06))
    x = x + jax.random.uniform(ko, (n, 1, 1, 3), minval=-0.04, maxval=0.04)
    x = x + jax.random.normal(kn, x.shape[:3] + (1,)) * jax.random.uniform(ks, (n, 1, 1, 1), maxval=0.05)
    return jnp.clip(x, 0.0, 1.0)


def _masked_ce(logits, labels, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_fn(params, crops, labels: Mapping[str, jax.Array]):
    """Sum over heads of the mean cross-entropy on cell crops [B, 24, 24, 3]; colour and size only
    on occupied cells, background only on rendered (non-noise) cells."""
    logits, _ = _MODEL.apply({"params": params}, crops)
    occupied = (labels["shape"] > 0).astype(jnp.float32)
    losses = {
        "shape": _masked_ce(logits["shape"], labels["shape"], jnp.ones_like(occupied)),
        "color": _masked_ce(logits["color"], labels["color"], occupied),
        "size": _masked_ce(logits["size"], labels["size"], occupied),
        "background": _masked_ce(logits["background"], labels["background"], labels["has_background"]),
    }
    return sum(losses.values()), losses


# --------------------------------------------------------------------------- data


def scene_labels(scenes: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-cell class indices of scenes: shape [N, 9] (0 = empty), color/size [N, 9] (0 where
    empty), background [N]."""
    n = len(scenes)
    shape = np.zeros((n, NUM_CELLS), np.int32)
    color = np.zeros((n, NUM_CELLS), np.int32)
    size = np.zeros((n, NUM_CELLS), np.int32)
    background = np.zeros((n,), np.int32)
    for i, scene in enumerate(scenes):
        for obj in scene["objects"]:
            c = sw.POSITIONS.index(obj["position"])
            shape[i, c] = SHAPE_CLASSES.index(obj["shape"])
            color[i, c] = COLOR_CLASSES.index(obj["color"])
            size[i, c] = SIZE_CLASSES.index(obj["size"])
        background[i] = BACKGROUND_CLASSES.index(scene["background"])
    return {"shape": shape, "color": color, "size": size, "background": background}


def _noise_image(rng: np.random.Generator, image_size: int) -> np.ndarray:
    if rng.random() < 0.5:
        return rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    blocks = int(rng.integers(4, 17))
    small = rng.integers(0, 256, (blocks, blocks, 3), dtype=np.uint8)
    reps = -(-image_size // blocks)
    return np.kron(small, np.ones((reps, reps, 1), np.uint8))[:image_size, :image_size]


def _shift(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    dy, dx = rng.integers(-1, 2, size=2)
    if dy == 0 and dx == 0:
        return image
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    s = image.shape[0]
    return padded[1 + dy:1 + dy + s, 1 + dx:1 + dx + s]


def training_batch(seed: int, step: int, batch_size: int, image_size: int = 64):
    """The data of training step `step`: (uint8 images [batch_size, S, S, 3], crop indices
    [CROPS_PER_IMAGE * batch_size] into the images' cells (image * 9 + cell), per-crop labels).

    Images are train-split scenes of 1-TRAIN_MAX_OBJECTS objects shifted by +-1 px, and one in
    NOISE_EVERY a noise image whose cells are labelled empty with no background. The crops are the
    occupied cells (at most MAX_OCCUPIED_SHARE of them) topped up with empty/noise cells."""
    rng = np.random.default_rng([int(seed), int(step)])
    config = sw.ShapesWorldConfig(image_size=image_size, max_objects=TRAIN_MAX_OBJECTS)
    images, scenes, noise = [], [], []
    while len(images) < batch_size:
        if rng.random() < 1.0 / NOISE_EVERY:
            images.append(_noise_image(rng, image_size))
            scenes.append({"objects": [], "background": BACKGROUND_CLASSES[0]})
            noise.append(True)
            continue
        scene = sw.sample_scene(rng, config)
        if sw.scene_split(scene) != "train":
            continue
        images.append(_shift(rng, sw.render(scene, image_size)))
        scenes.append(scene)
        noise.append(False)
    cells = scene_labels(scenes)
    n_crops = CROPS_PER_IMAGE * batch_size
    flat_shape = cells["shape"].reshape(-1)
    occupied = rng.permutation(np.flatnonzero(flat_shape > 0))[:int(MAX_OCCUPIED_SHARE * n_crops)]
    empty = rng.permutation(np.flatnonzero(flat_shape == 0))[:n_crops - len(occupied)]
    index = rng.permutation(np.concatenate([occupied, empty])).astype(np.int32)
    labels = {k: cells[k].reshape(-1)[index] for k in ("shape", "color", "size")}
    labels["background"] = np.repeat(cells["background"], NUM_CELLS)[index]
    labels["has_background"] = np.repeat(np.where(noise, 0.0, 1.0), NUM_CELLS)[index].astype(np.float32)
    return np.stack(images), index, labels


def heldout_examples(num_images: int, split: str = "validation", image_size: int = 64, seed: int = 0):
    """(uint8 images, scenes) of the first `num_images` examples of a held-out split."""
    config = sw.ShapesWorldConfig(image_size=image_size, seed=seed)
    examples = [sw.example(split, i, config) for i in range(int(num_images))]
    return (np.stack([e["image"] for e in examples]),
            [{"objects": e["objects"], "background": e["background"]} for e in examples])


# --------------------------------------------------------------------------- training


def _make_train_step(optimizer):
    @jax.jit
    def train_step(params, opt_state, key, images, crop_index, labels):
        crops = image_cells(with_foreground(augment(key, preprocess(images))))[crop_index]
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, crops, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts
    return train_step


def classifier_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CLASSIFIER_SUBDIR)


def train_classifier(workdir: str | None, image_size: int = 64, steps: int = DEFAULT_STEPS,
                     batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, *, learning_rate: float = 6e-3,
                     eval_images: int = 200, log_every: int = 250):
    """Trains (or loads the cached) attribute classifier; returns its params.

    If `workdir/attribute_classifier` (or `workdir` itself) holds trained params they are loaded and
    nothing is trained (whatever `steps` says; delete the folder to retrain). `workdir=None` trains without saving.
    After training, the accuracy on `eval_images` held-out validation renders is measured and
    stored in `classifier.json` beside the params.
    """
    # the workdir or its attribute_classifier folder (as load_classifier takes; the folder used to be retrained)
    if workdir is not None and os.path.exists(os.path.join(_resolve_dir(workdir), CONFIG_JSON)):
        logging.info("attribute classifier: loading cached params from %s", _resolve_dir(workdir))
        cached = classifier_info(workdir)
        asked = {"steps": int(steps), "batch_size": int(batch_size), "seed": int(seed), "image_size": int(image_size)}
        differ = {k: (cached.get(k), v) for k, v in asked.items() if cached.get(k) != v}
        if differ:   # scores stay comparable with earlier evaluations; retraining is the user's call
            logging.warning("attribute classifier: the cached one in %s was trained with other settings (%s); "
                            "delete that folder to retrain", _resolve_dir(workdir),
                            ", ".join(f"{k} {a} -> asked {b}" for k, (a, b) in differ.items()))
        return load_classifier(workdir)
    steps, batch_size = int(steps), int(batch_size)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    start = time.time()
    params = init_params(seed)
    # warmup < steps: optax needs decay steps after it (steps=1 failed inside optax)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(100, max(1, steps // 10), steps - 1), steps, end_value=learning_rate * 0.02)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    train_step = _make_train_step(optimizer)
    base_key = jax.random.key(seed)
    loss = None
    for step in range(steps):
        images, crop_index, labels = training_batch(seed, step, batch_size, image_size)
        params, opt_state, loss, parts = train_step(params, opt_state, jax.random.fold_in(base_key, step),
                                                    images, crop_index, labels)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            logging.info("attribute classifier step %d/%d loss %.4f (%s) %.1fs", step + 1, steps, float(loss),
                         " ".join(f"{k} {float(v):.3f}" for k, v in parts.items()), time.time() - start)
    params = jax.block_until_ready(params)
    train_seconds = time.time() - start
    info = {"format": FORMAT, "image_size": int(image_size), "steps": steps, "batch_size": batch_size,
            "seed": int(seed), "learning_rate": float(learning_rate), "train_seconds": round(train_seconds, 2),
            "final_loss": float(loss)}
    if eval_images:
        images, scenes = heldout_examples(eval_images, "validation", image_size)
        info["heldout_accuracy"] = {k: round(v, 5) for k, v in
                                    classifier_accuracy(params, images, scenes).items()}
        info["heldout_images"] = int(eval_images)
    logging.info("attribute classifier trained in %.1fs: %s", train_seconds, info.get("heldout_accuracy"))
    if workdir is not None:
        save_classifier(workdir, params, info)
    return params


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = np.asarray(v)
    return out


def _unflatten(flat: Mapping[str, np.ndarray]):
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *path, last = name.split("/")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = jnp.asarray(value)
    return tree


def save_classifier(workdir: str, params, info: Mapping[str, Any]) -> str:
    """Writes params.safetensors and classifier.json (atomically, json last) under the workdir."""
    from safetensors.numpy import save_file
    directory = classifier_dir(workdir)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, PARAMS_FILE + ".tmp")
    save_file(_flatten(jax.device_get(params)), tmp)
    os.replace(tmp, os.path.join(directory, PARAMS_FILE))
    tmp = os.path.join(directory, CONFIG_JSON + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(info), f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_JSON))
    return directory


def classifier_info(workdir: str) -> dict:
    """The classifier.json saved beside the params (settings, training time, held-out accuracy)."""
    directory = _resolve_dir(workdir)
    return workdir_io.read_format_json(os.path.join(directory, CONFIG_JSON), FORMAT, what="trained attribute classifier")


def _resolve_dir(workdir: str) -> str:
    workdir = os.path.abspath(workdir)
    if os.path.exists(os.path.join(workdir, CONFIG_JSON)):
        return workdir
    return classifier_dir(workdir)


def load_classifier(workdir: str):
    """Params saved by `train_classifier`; `workdir` is the workdir or workdir/attribute_classifier."""
    from safetensors.numpy import load_file
    directory = _resolve_dir(workdir)
    classifier_info(directory)   # checks the format before the params are read
    params = _unflatten(load_file(os.path.join(directory, PARAMS_FILE)))
    expected = jax.eval_shape(lambda: init_params(0))
    got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), expected)
    if got != want:
        raise ValueError(f"{directory}: saved params do not match CellCNN's shapes")
    return params


# --------------------------------------------------------------------------- inference


@jax.jit
def _forward(params, images):
    logits, feats = apply_images(params, preprocess(images))
    return {k: jnp.argmax(v, axis=-1) for k, v in logits.items()}, feats


def _as_batch(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] (or [H, W, 3]), got shape {images.shape}")
    if np.issubdtype(images.dtype, np.integer) and images.dtype != np.uint8:
        images = np.clip(images, 0, 255).astype(np.uint8)   # integer pixels in [0, 255]
    elif images.dtype != np.uint8:
        images = images.astype(np.float32)   # float pixels, assumed to be in [0, 1]
    return images


def _padded_rows(m: int, batch_size: int) -> int:
    """Rows a chunk of m images is padded to: a power of two (>= 8) up to batch_size, so only a
    handful of shapes is ever compiled."""
    rows = 8
    while rows < m:
        rows *= 2
    return max(m, min(rows, batch_size))


def _run(params, images, batch_size: int = 128):
    images = _as_batch(images)
    n = images.shape[0]
    classes, feats = [], []
    for i in range(0, n, batch_size):
        chunk = images[i:i + batch_size]
        m = chunk.shape[0]
        rows = batch_size if n > batch_size else _padded_rows(m, batch_size)
        if rows > m:
            chunk = np.concatenate([chunk, np.zeros((rows - m,) + chunk.shape[1:], chunk.dtype)])
        c, f = jax.device_get(_forward(params, chunk))
        classes.append({k: v[:m] for k, v in c.items()})
        feats.append(np.asarray(f[:m], np.float32))
    if not classes:
        empty = {k: np.zeros((0, NUM_CELLS), np.int32) for k in HEADS[:3]}
        empty["background"] = np.zeros((0,), np.int32)
        return empty, np.zeros((0, feature_dim()), np.float32)
    return ({k: np.concatenate([c[k] for c in classes]) for k in HEADS}, np.concatenate(feats))


def predict_classes(params, images, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Argmax class indices: shape/color/size [N, 9] (shape 0 = empty), background [N]."""
    return _run(params, images, batch_size)[0]


def classes_to_scenes(classes: Mapping[str, np.ndarray]) -> list[dict]:
    """Class indices -> shapes-world scenes (objects in row-major cell order)."""
    scenes = []
    for i in range(len(classes["background"])):
        objects = []
        for c in range(NUM_CELLS):
            s = int(classes["shape"][i, c])
            if s == 0:
                continue
            objects.append({"shape": SHAPE_CLASSES[s], "color": COLOR_CLASSES[int(classes["color"][i, c])],
                            "size": SIZE_CLASSES[int(classes["size"][i, c])], "position": sw.POSITIONS[c]})
        scenes.append({"objects": objects, "background": BACKGROUND_CLASSES[int(classes["background"][i])]})
    return scenes


def predict_scenes(params, images_uint8, batch_size: int = 128) -> list[dict]:
    """Images (uint8 [N, H, W, 3] of any size, or float in [0, 1]) -> predicted scenes, shaped
    like shapes_world's (objects in row-major cell order):
    {"objects": [{"shape", "color", "size", "position"}, ...], "background"}."""
    return classes_to_scenes(predict_classes(params, images_uint8, batch_size))


def features(params, images, batch_size: int = 128) -> np.ndarray:
    """The penultimate layer: float32 [N, 576], the 9 cells' 64-d hidden vectors in row-major order."""
    return _run(params, images, batch_size)[1]


def classifier_accuracy(params, images, scenes: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-attribute accuracy against the true scenes: occupancy (every cell), shape, color and
    size (cells that hold an object), background (images), and `all` (every cell and background
    right)."""
    pred = predict_classes(params, images)
    true = scene_labels(scenes)
    occ = true["shape"] > 0
    if not occ.any():
        raise ValueError("classifier_accuracy needs scenes with at least one object")
    cell_ok = (pred["shape"] == true["shape"]) & (~occ | ((pred["color"] == true["color"])
                                                          & (pred["size"] == true["size"])))
    return {
        "occupancy": float(np.mean((pred["shape"] > 0) == occ)),
        "shape": float(np.mean(pred["shape"][occ] == true["shape"][occ])),
        "color": float(np.mean(pred["color"][occ] == true["color"][occ])),
        "size": float(np.mean(pred["size"][occ] == true["size"][occ])),
        "background": float(np.mean(pred["background"] == true["background"])),
        "all": float(np.mean(cell_ok.all(axis=1) & (pred["background"] == true["background"]))),
    }
