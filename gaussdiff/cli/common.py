"""Argument helpers shared by the command modules (cli, cli.tools, cli.metrics, sweep, ...):
parsing and reading what several commands take alike."""
from __future__ import annotations

import argparse

from ..data import load_dataset
from ..errors import UsageError


def _bool(text: str) -> bool:
    t = str(text).lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _load_images(spec: str, split: str):
    """uint8 NHWC images of an .npz, an image folder or a named dataset."""
    return load_dataset(spec, split).images


def _first(images, num, what, flag):
    if num is None:
        return images
    if num < 1:
        raise UsageError(f"{flag} must be positive")
    if num > len(images):
        raise UsageError(f"{flag} {num}: {what} has only {len(images)} images")
    return images[:num]
