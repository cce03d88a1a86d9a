"""PNG grids people can look at: rows of equally sized uint8 images."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from cm3leon_jax import workdir_io


def _as_uint8_rgb(image, where: str) -> np.ndarray:
    """uint8 [H, W, 3] from uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped). Any
    other dtype is refused: numpy's cast would wrap 300 to 44 and turn [0, 1] floats black."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"{where}: images must be uint8 [0, 255], got {image.dtype} (vqgan.to_uint8 converts "
                        "[-1, 1] floats)")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{where}: expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
    return np.broadcast_to(image[..., :3], (*image.shape[:2], 3))


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
    """rows[r][c] uint8 [H, W, 3] (grey [H, W] or RGBA too) -> one uint8 image; short rows are
    left blank on the right."""
    if not rows or not any(len(r) for r in rows):
        raise ValueError("nothing to draw")
    rows = [[_as_uint8_rgb(img, f"image [{i}][{j}]") for j, img in enumerate(row)] for i, row in enumerate(rows)]
    first = next(img for r in rows for img in r)
    h, w = first.shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                raise ValueError(f"image [{i}][{j}] is {img.shape[:2]}, expected {(h, w)}")
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top:top + h, left:left + w] = img
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """Local or object-store path (workdir_io)."""
    buffer = io.BytesIO()
    Image.fromarray(_as_uint8_rgb(image, path)).save(buffer, format="PNG")
    workdir_io.write_bytes(path, buffer.getvalue())
    return path
