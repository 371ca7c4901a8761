"""Datasets in NVlabs/edm's layout: a zip archive or a folder of PNGs with dataset.json labels.

    dataset.json: {"labels": [["00000/img00000000.png", 6], ...]}   (or {"labels": null})

This is what EDM's dataset_tool.py writes (and StyleGAN2-ADA's before it): images named
`{i // 1000:05d}/img{i:08d}.png`, stored uncompressed in the zip. `write_edm` writes the same
(atomically; greyscale images as 8-bit "L" PNGs, colour as RGB), plus "class_names" when the
classes have names, a key EDM ignores. `gaussdiff dataset` converts any dataset gaussdiff reads
(an image folder, an .npz, IDX files, Fashion-MNIST) into it.

Archive entries are never extracted: each image is decoded from memory, and an archive with an
absolute path or a `..` component in any entry name is rejected as a whole.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..errors import UsageError
from ..fileio import atomic_write_bytes
from .readers import IMAGE_EXTENSIONS, MAX_CLASSES, ImageDataset, read_image

LABELS_NAME = "dataset.json"
MAX_ENTRY_BYTES = 256 << 20   # one image file; larger zip entries are refused unread


def is_edm_dataset(path: str) -> bool:
    """A .zip archive, or a folder holding dataset.json."""
    return path.lower().endswith(".zip") or (os.path.isdir(path) and
                                             os.path.isfile(os.path.join(path, LABELS_NAME)))


def check_entry_name(archive: str, name: str):
    """Reject archive entries that would point outside the archive if extracted."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UsageError(f"{archive}: unsafe entry name {name!r} (absolute path or '..'): "
                         f"refusing to read this archive")


class _Source:
    """The files of a zip archive or a folder, by relative '/'-separated name."""

    def __init__(self, path: str):
        self.path = path
        self.zip = None
        if os.path.isdir(path):
            names = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                rel = os.path.relpath(dirpath, path)
                names += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in filenames]
            self.names = names
        else:
            try:
                self.zip = zipfile.ZipFile(path)
                infos = self.zip.infolist()
            except FileNotFoundError:
                raise UsageError(f"{path}: file not found") from None
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise UsageError(f"{path}: not a readable zip archive ({e})") from None
            for info in infos:
                check_entry_name(path, info.filename)
            self.sizes = {i.filename: i.file_size for i in infos if not i.is_dir()}
            self.names = list(self.sizes)

    def read(self, name: str) -> bytes:
        where = f"{self.path}: {name}"
        try:
            if self.zip is None:
                with open(os.path.join(self.path, *name.split("/")), "rb") as f:
                    return f.read()
            if self.sizes[name] > MAX_ENTRY_BYTES:
                raise UsageError(f"{where}: entry of {self.sizes[name]} bytes is too large")
            return self.zip.read(name)
        except UsageError:
            raise
        except Exception as e:   # BadZipFile (CRC), zlib.error, OSError, NotImplementedError ...
            raise UsageError(f"{where}: cannot read ({str(e) or type(e).__name__})") from None

    def close(self):
        if self.zip is not None:
            self.zip.close()


def _parse_labels(raw: bytes, where: str) -> Tuple[Optional[Dict[str, int]], Optional[list]]:
    """(file name -> label, class names) of a dataset.json; (None, None) when unlabelled."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise UsageError(f"{where}: expected an object with a \"labels\" list (or null)")
    labels = meta["labels"]
    if labels is None:
        return None, None
    if not isinstance(labels, list):
        raise UsageError(f"{where}: \"labels\" must be a list of [file name, label] pairs or null")
    table = {}
    for entry in labels:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise UsageError(f"{where}: bad \"labels\" entry {str(entry)[:60]}: expected "
                             f"[file name, integer label]")
        label = entry[1]
        if isinstance(label, list):
            raise UsageError(f"{where}: label vectors (as for {entry[0]}) are not supported; "
                             f"gaussdiff needs one integer class per image")
        if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < MAX_CLASSES):
            raise UsageError(f"{where}: label of {entry[0]} must be an integer in "
                             f"[0, {MAX_CLASSES}), got {str(label)[:40]}")
        table[entry[0].replace("\\", "/")] = label
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UsageError(f"{where}: \"class_names\" must be a list of strings")
    return table, names


def load_edm(path: str, channels: Optional[int] = None, size: Optional[int] = None,
             skip_bad: bool = False) -> ImageDataset:
    """Read an EDM-layout dataset (zip or folder). channels None: 1 if every image is
    greyscale, else 3. size: centre-crop and resize every image to size x size. skip_bad:
    skip unreadable images (their count is `.skipped`, their names `.skipped_files`)."""
    src = _Source(path)
    try:
        files = sorted(n for n in src.names if n.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        table = names = None
        if LABELS_NAME in src.names:
            table, names = _parse_labels(src.read(LABELS_NAME), f"{path}: {LABELS_NAME}")
        images, kept, skipped = [], [], []
        for name in files:
            try:
                images.append(read_image(io.BytesIO(src.read(name)), channels, size,
                                         name=f"{path}: {name}"))
                kept.append(name)
            except UsageError:
                if not skip_bad:
                    raise
                skipped.append(name)
    finally:
        src.close()
    if not images:
        raise UsageError(f"{path}: every image was unreadable")
    if channels is None and len({im.shape[-1] for im in images}) > 1:   # grey + colour: RGB
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    shapes = sorted({im.shape[:2] for im in images})
    if len(shapes) > 1:
        raise UsageError(f"{path}: images have mixed sizes {shapes[:3]}: pass --image-size to resize")
    labels = None
    if table is not None:
        missing = [n for n in kept if n not in table]
        if missing:
            raise UsageError(f"{path}: {LABELS_NAME} has no label for {missing[0]} "
                             f"({len(missing)} images unlabelled)")
        labels = np.array([table[n] for n in kept], dtype=np.int64)
        if names is not None and labels.max() >= len(names):
            raise UsageError(f"{path}: label {labels.max()} has no entry in \"class_names\"")
    ds = ImageDataset(np.stack(images), labels, names, os.path.basename(os.path.normpath(path)))
    ds.skipped, ds.skipped_files = len(skipped), skipped
    return ds


# ------------------------------------------------------------------------------ writing
def edm_names(n: int) -> List[str]:
    """EDM dataset_tool's file names of n images."""
    return [f"{i // 1000:05d}/img{i:08d}.png" for i in range(n)]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _labels_json(ds: ImageDataset, names: List[str]) -> bytes:
    meta = {"labels": None if ds.labels is None else
            [[n, int(label)] for n, label in zip(names, ds.labels)]}
    if ds.labels is not None and ds.class_names:
        meta["class_names"] = list(ds.class_names)
    return json.dumps(meta).encode()


def write_edm(ds: ImageDataset, dest: str) -> str:
    """Write `ds` (uint8 NHWC, 1 or 3 channels) in EDM's layout: a zip when dest ends in .zip,
    else a new folder. Atomic: a temporary file or folder next to dest, renamed at the end;
    an existing dest is never overwritten."""
    if os.path.exists(dest):
        raise UsageError(f"{dest} already exists: choose a new --out")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise UsageError(f"{dest}: directory {parent} does not exist")
    names = edm_names(len(ds))
    base = os.path.basename(os.path.normpath(dest))
    try:
        if dest.lower().endswith(".zip"):
            buf = io.BytesIO()   # PNGs are smaller than the arrays already in memory
            with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, image in zip(names, ds.images):
                    zf.writestr(name, _png(image))
                zf.writestr(LABELS_NAME, _labels_json(ds, names))
            atomic_write_bytes(dest, buf.getvalue())
        else:
            tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.", suffix=".tmp")
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes 0700
                for name, image in zip(names, ds.images):
                    os.makedirs(os.path.join(tmp, os.path.dirname(name)), exist_ok=True)
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(_png(image))
                with open(os.path.join(tmp, LABELS_NAME), "wb") as f:
                    f.write(_labels_json(ds, names))
                os.rename(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        raise UsageError(f"cannot write {dest}: {e.strerror or e}") from None
    return dest
