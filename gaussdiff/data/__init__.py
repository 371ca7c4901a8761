"""Training and evaluation data: readers of every format (`readers`: IDX, .npz, image folders,
the bundled datasets), NVlabs/edm's dataset layout (`edm`), EDM's non-leaky augmentation
(`augment`), and `load_dataset`, which takes a dataset name or path and picks the reader.
Images live in memory as uint8 NHWC arrays."""
from __future__ import annotations

import os
from typing import Optional

from ..errors import UsageError
from .edm import is_edm_dataset, load_edm
from .readers import (  # noqa: F401
    ImageDataset, read_idx, load_fashion_mnist, load_mnist5k, load_npz,
    read_image, load_image_folder, is_image_folder, area_downsample, NoLabelsError,
    to_model_range, to_uint8, BatchSampler, FASHION_MNIST_DIR, FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS, MAX_CLASSES, GREY_MODES)


def load_dataset(spec: str, split: str = "train", channels: Optional[int] = None,
                 image_size: Optional[int] = None, class_cond: bool = False,
                 skip_bad: bool = False) -> ImageDataset:
    """A dataset from a name ("fashion-mnist", "fashion-mnist:DIR", "mnist5k") or a path
    (an image folder, a `.npz`, an EDM-layout zip or folder with dataset.json, or a directory
    of Fashion-MNIST-style IDX files)."""
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        ds = load_fashion_mnist(spec.partition(":")[2] or None, split)
    elif spec == "mnist5k":
        ds = load_mnist5k()
    elif spec.endswith(".npz"):
        ds = load_npz(spec)
    elif is_edm_dataset(spec):   # NVlabs/edm's zip or folder with dataset.json
        ds = load_edm(spec, channels, image_size, skip_bad)
    elif os.path.isdir(spec):
        if is_image_folder(spec):
            ds = load_image_folder(spec, channels, image_size, class_cond, skip_bad)
        else:
            ds = load_fashion_mnist(spec, split)
    else:
        raise UsageError(f"unknown dataset {spec!r}: give fashion-mnist, mnist5k, an image folder, "
                         f"an .npz file or an EDM-layout .zip")
    if len(ds) == 0:
        raise UsageError(f"dataset {spec} holds no images")
    if ds.images.shape[1] != ds.images.shape[2]:
        raise UsageError(f"dataset {spec} has {ds.images.shape[1]}x{ds.images.shape[2]} images: "
                         f"gaussdiff trains on square images (an image folder can be centre-"
                         f"cropped with --image-size)")
    if channels is not None and ds.images.shape[-1] != channels:
        raise UsageError(f"dataset {spec} has {ds.images.shape[-1]} channels, the model expects {channels}")
    if image_size is not None and ds.images.shape[1:3] != (image_size, image_size):
        H, W = ds.images.shape[1:3]
        if H != W or H % image_size:
            raise UsageError(f"dataset {spec} has images of {H}x{W}, the model expects "
                             f"{image_size}x{image_size} (a size that divides the data's can be "
                             f"reached by area downsampling)")
        ds.images = area_downsample(ds.images, image_size)
    if class_cond and ds.labels is None:
        raise NoLabelsError(f"dataset {spec} has no labels: class-conditional training needs them")
    if not class_cond:
        ds.labels = None
    return ds


def load_images(spec: str, split: str):
    """uint8 NHWC images of an .npz, an image folder or a named dataset."""
    return load_dataset(spec, split).images


def first_images(images, num: Optional[int], what: str, flag: str):
    """The first `num` of `images` (all of them when num is None); a UsageError naming the
    option `flag` when num is not positive or `what` has fewer images."""
    if num is None:
        return images
    if num < 1:
        raise UsageError(f"{flag} must be positive")
    if num > len(images):
        raise UsageError(f"{flag} {num}: {what} has only {len(images)} images")
    return images[:num]
