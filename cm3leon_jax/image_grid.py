"""PNG grids people can look at: rows of equally sized uint8 images."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from cm3leon_jax import workdir_io


def make_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
    """rows[r][c] uint8 [H, W, 3] -> one uint8 image; short rows are left blank on the right."""
    if not rows or not any(len(r) for r in rows):
        raise ValueError("nothing to draw")
    first = next(img for r in rows for img in r)
    h, w = first.shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                raise ValueError(f"image [{i}][{j}] is {img.shape[:2]}, expected {(h, w)}")
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top:top + h, left:left + w] = img[..., :3]
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """Local or object-store path (workdir_io)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    workdir_io.write_bytes(path, buffer.getvalue())
    return path
