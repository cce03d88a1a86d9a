"""Images for the VQ tokenizer: the built-in shapes world or a folder of PNG/JPEG files.

`ImageBatchIterator` yields this process's rows of each global batch (uint8 [rows, S, S, 3]) from
a Grain `MapDataset`: seeded shuffle (reshuffled every epoch), per-process slice, batch. The
global batch at step s is elements [s*G, (s+1)*G) of one shuffled stream and process p reads only
rows [p*G/P, (p+1)*G/P) of it, so the batches are the same for any process count. Like
`packing.PackedBatchIterator` it has `get_state() -> bytes` / `set_state(bytes)` /
`start_prefetch()`, so orbax saves its position beside the model.

A folder of images is scanned once (sorted paths, recursive); files that cannot be opened are
skipped and counted with a warning, never a crash, and so are files that open but fail to decode
later (the next readable image of the folder stands in for them, deterministically).
"""
from __future__ import annotations

import collections
import json
import os
import threading
from typing import Any, Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image, ImageOps

from data_pipeline import packing, shapes_world

# Formats PIL decodes that image folders and manifests hold (ingestion and VQ training alike).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # premultiplied-alpha modes -> their plain-alpha modes


def to_rgb(image: Any) -> Image.Image:
    """Any PIL image or array -> an 8-bit RGB PIL image, the one conversion every image path uses.
    Grey and palette images are expanded; transparent pixels composite onto white rather than
    whatever colour they hide; 16-bit images ([H, W, 1] or uint16 arrays too, as TFDS gives grey
    images) scale by 1/257 instead of saturating; float arrays in [0, 1] scale by 255. A file's EXIF
    orientation is applied (`_upright`), so a phone photo stored sideways comes out as it is shown."""
    if isinstance(image, Image.Image):
        image = _upright(image)
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype == np.uint16:
            array = np.round(array / 257.0).astype(np.uint8)
        elif array.dtype != np.uint8:
            scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
            array = np.clip(np.round(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode in _SIXTEEN_BIT_MODES:
        grey, key = np.asarray(image, np.float64), image.info.get("transparency")
        image = Image.fromarray(np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8))
        if isinstance(key, int):   # a 16-bit PNG's colour key (tRNS) is a 16-bit value: keep it as alpha
            image.putalpha(Image.fromarray(np.where(grey == key, 0, 255).astype(np.uint8)))
    elif image.mode == "F":
        return to_rgb(np.asarray(image))
    if image.mode in _PREMULTIPLIED:   # PIL converts these to RGB only through their plain-alpha mode
        image = image.convert(_PREMULTIPLIED[image.mode])
    # "transparency" is a palette's alpha or a PNG's colour key (tRNS), in P, L and RGB images alike.
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


_MAX_ASPECT = 8  # longer strips are cut to their centre before resizing (center_crop_resize)


_ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and/or rotated


def _upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: cameras store pixels as sensed plus an EXIF orientation tag,
    which PIL does not apply when decoding. Unreadable EXIF leaves the pixels as they are."""
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- a malformed EXIF block must not cost the image
        return image
    return ImageOps.exif_transpose(image) if orientation not in (None, 1) else image


def center_crop_resize(image: Any, size: int) -> np.ndarray:
    """Any PIL image or array -> uint8 RGB [size, size, 3] (`to_rgb`): the short side is resized to
    `size` (bicubic on PIL's anti-aliased path), then the centre is cropped.

    A strip longer than `_MAX_ASPECT` times its width is first cut to its centred 2:1 window (what
    the crop and the filter's reach need): resizing the whole strip cost long/short times the
    memory and time of the crop, 2.8 GB and 35 s for one 2 x 20,000 banner at 256 px."""
    image = to_rgb(image)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long > _MAX_ASPECT * short:
        keep = 2 * short + (long - 2 * short) % 2  # same parity as `long`: exactly centred
        start = (long - keep) // 2
        image = image.crop((start, 0, start + keep, height) if width > height else (0, start, width, start + keep))
        width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8).copy()


def load_image(path: str, size: int) -> np.ndarray:
    """An image file -> uint8 RGB [size, size, 3] as VQ training and ingestion see it
    (`center_crop_resize`): commands that take a user's image (generate --image, --task) read it
    this way too, so the tokenizer is never handed a squashed or black-backed picture."""
    with Image.open(path) as image:
        image.load()
        return center_crop_resize(image, size)


def walk(directory: str):
    """os.walk in sorted order, into symlinked subfolders too (os.walk skips them by default: a
    dataset linked into the folder was left out without a count), each real directory once (a
    link back up the tree cannot loop)."""
    seen = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield root, dirs, files


def list_image_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image directory {directory!r} does not exist")
    paths = []
    for root, dirs, files in walk(directory):
        paths.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    return paths


class ImageFolder:
    """Random-access source of a folder's images, resized/center-cropped to `image_size`.

    Construction opens every file's header (cheap) and drops those PIL cannot identify;
    `skipped` counts them by reason. A file that opens but fails to decode on read is skipped
    then, and the next readable file takes its place.
    """

    def __init__(self, directory: str, image_size: int, paths: Sequence[str] | None = None):
        self.directory = directory
        self.image_size = int(image_size)
        self.skipped: collections.Counter = collections.Counter()
        self._bad: set[str] = set()
        self._lock = threading.Lock()
        candidates = list_image_files(directory) if paths is None else list(paths)
        self.paths = []
        for path in candidates:
            try:
                with Image.open(path) as image:
                    image.verify()
                self.paths.append(path)
            except Exception as e:  # noqa: BLE001 -- any unreadable file is skipped, whatever PIL raises
                self._skip(path, e)
        if not self.paths:
            raise ValueError(f"no readable PNG/JPEG images in {directory!r} "
                             f"({sum(self.skipped.values())} unreadable files skipped)")

    def _skip(self, path: str, error: Exception) -> None:
        with self._lock:
            if path in self._bad:
                return
            self._bad.add(path)
            self.skipped["unreadable_image"] += 1
        logging.warning("skipping unreadable image %s: %s: %s", path, type(error).__name__, error)

    def load(self, path: str) -> np.ndarray:
        return load_image(path, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> np.ndarray:
        index = int(index) % len(self.paths)
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            if path in self._bad:
                continue
            try:
                return self.load(path)
            except Exception as e:  # noqa: BLE001
                self._skip(path, e)
        raise ValueError(f"none of the {len(self.paths)} images in {self.directory!r} can be decoded")


class ShapesImages:
    """The shapes world's images only (uint8 [S, S, 3]), as a random-access source."""

    def __init__(self, split: str, image_size: int, seed: int = 0, size: int | None = None,
                 min_objects: int = 1, max_objects: int = 3):
        config = shapes_world.ShapesWorldConfig(image_size=int(image_size), seed=int(seed),
                                                min_objects=int(min_objects), max_objects=int(max_objects))
        self.world = shapes_world.ShapesWorld(config, split=split, size=size)
        self.skipped: collections.Counter = collections.Counter()

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index) -> np.ndarray:
        return self.world[index]["image"]


class ImageBatchIterator:
    """This process's rows of every global batch, uint8 [global_batch / processes, S, S, 3]."""

    def __init__(self, source, *, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, num_threads: int = 2, prefetch: int = 4):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by the {process_count} processes")
        if len(source) == 0:
            raise ValueError("the image source is empty")
        self.source = source
        self.rows = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=packing.grain_seed(int(seed) * 1_000_003 + 7))  # a new order every epoch
        ds = ds.repeat(None).batch(self.rows, batch_fn=np.stack)[process_index::process_count]
        options = grain.ReadOptions(num_threads=max(int(num_threads), 1), prefetch_buffer_size=max(int(prefetch), 1))
        self._iterator = iter(ds.to_iter_dataset(options))

    @property
    def skipped(self) -> collections.Counter:
        return getattr(self.source, "skipped", collections.Counter())

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {"image": np.asarray(next(self._iterator), np.uint8)}

    def get_state(self) -> bytes:
        return json.dumps({"process": [self.process_index, self.process_count],
                           "state": self._iterator.get_state()}).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        if state["process"] != [self.process_index, self.process_count]:
            raise ValueError(f"data state is for process {state['process']}, this is "
                             f"{[self.process_index, self.process_count]}; resume with the same process count")
        self._iterator.set_state(state["state"])

    def set_state_from_processes(self, states) -> None:
        """Resumes from the positions saved by a run with another process count: step t's global
        batch is images [t B, (t + 1) B) of the shuffled stream whatever the process count, so
        every process's position is the number of steps taken."""
        positions = {json.dumps(json.loads(raw)["state"], sort_keys=True) for raw in states}
        if len(positions) != 1:
            raise ValueError(f"the saved processes stopped at different positions: {sorted(positions)}")
        self._iterator.set_state(json.loads(positions.pop()))

    def start_prefetch(self) -> None:
        """Part of grain's checkpoint interface; grain's reader threads start on demand."""


def _data_config(config):
    data, vq = config.data, config.vq
    return data, int(vq.image_size)


def make_train_source(config):
    data, size = _data_config(config)
    if data.image_dir:
        folder = ImageFolder(data.image_dir, size)
        held_out = int(config.num_sample_images)
        if not data.val_image_dir and held_out > 0 and len(folder.paths) > 4 * held_out:
            # the last files of the sorted folder are held out for the fixed sample grid
            folder.paths = folder.paths[:-held_out]
        return folder
    return ShapesImages("train", size, seed=int(data.shapes_seed), min_objects=int(data.min_objects),
                        max_objects=int(data.max_objects))


def make_train_iterator(config, process_index: int, process_count: int) -> ImageBatchIterator:
    """The VQ trainer's entry point into the data (`data.image_dir` or the shapes world)."""
    return ImageBatchIterator(make_train_source(config), global_batch_size=int(config.data.global_batch_size),
                              seed=int(config.seed), process_index=process_index, process_count=process_count,
                              num_threads=int(config.data.num_threads))


def validation_images(config, count: int) -> np.ndarray:
    """Fixed held-out images, uint8 [count, S, S, 3]: the shapes world's validation split, or
    `data.val_image_dir`, or the last files of `data.image_dir` (held out from training when the
    folder has more than 4x as many). `count` 0 gives none ([0, S, S, 3]: no sample grids)."""
    data, size = _data_config(config)
    if count <= 0:   # (paths[-0:] would be the whole folder)
        return np.zeros((0, size, size, 3), np.uint8)
    if data.val_image_dir or data.image_dir:
        if data.val_image_dir:
            folder = ImageFolder(data.val_image_dir, size)
            paths = folder.paths[:count]
        else:
            folder = ImageFolder(data.image_dir, size)
            paths = folder.paths[-count:]
        images = []
        for path in paths:
            try:
                images.append(folder.load(path))
            except Exception as e:  # noqa: BLE001
                folder._skip(path, e)
        if not images:
            raise ValueError("no readable validation images")
        return np.stack(images)
    source = ShapesImages("validation", size, seed=int(data.shapes_seed), min_objects=int(data.min_objects),
                          max_objects=int(data.max_objects))
    return np.stack([source[i] for i in range(count)])
