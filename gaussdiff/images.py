"""Image grids and ADM-compatible sample archives."""
from __future__ import annotations

import io
import math
from typing import Optional

import numpy as np
from PIL import Image

from .modeldir import atomic_write_bytes


def make_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [H', W', C] grid image, `scale`x nearest upsampling."""
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) as a PNG file's bytes."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str, image: np.ndarray):
    """Write uint8 [H, W, C] (C = 1 or 3) as PNG, atomically."""
    atomic_write_bytes(path, png_bytes(image))


def save_grid(path: str, images: np.ndarray, ncols: Optional[int] = None, scale: int = 2):
    save_png(path, make_grid(images, ncols, scale=scale))


def npz_bytes(images: np.ndarray, labels: Optional[np.ndarray] = None) -> bytes:
    """ADM evaluator layout: uint8 NHWC under arr_0, labels under arr_1."""
    buf = io.BytesIO()
    if labels is None:
        np.savez(buf, images)
    else:
        np.savez(buf, images, labels)
    return buf.getvalue()


def save_npz(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None):
    """ADM evaluator layout (npz_bytes), written atomically; ".npz" appended when missing."""
    if not path.endswith(".npz"):
        path += ".npz"
    atomic_write_bytes(path, npz_bytes(images, labels))
    return path
