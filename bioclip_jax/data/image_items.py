"""Images to embed, as the embedders take them: a key, how to open the image, and a label.

Shared by the evaluation sources and the command-line tools, which list image files the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Callable, Iterator, Sequence

import fsspec
from PIL import Image

from bioclip_jax.paths import is_remote

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageItem:
    """One image to embed: a key for reports, how to open it, and an optional label.

    `open()` returns a PIL image, or an (image, label) pair for sources that read the
    label in the same record as the image (the pair's label replaces `label`).
    """

    key: str
    open: Callable[[], Any]
    label: Any = None


def file_item(path: str, label: Any = None) -> ImageItem:
    return ImageItem(path, functools.partial(Image.open, path), label)


def _image_from_bytes(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def bytes_item(key: str, data: bytes, label: Any = None) -> ImageItem:
    """An encoded image held in memory; picklable, so decoding processes can take it."""
    return ImageItem(key, functools.partial(_image_from_bytes, data), label)


def walk_image_files(folder: str) -> Iterator[str]:
    """Image files under a local or gs:// folder, yielded while walking it (a huge tree is never listed whole).

    The order is fixed: a directory's own files sorted by name, then its subdirectories in name order.
    """
    if is_remote(folder):
        top = folder.rstrip("/")
        filesystem, bare_top = fsspec.core.url_to_fs(top)  # fsspec walks without the gs:// that keys keep
        walk = ((top + root[len(bare_top):], dirs, names) for root, dirs, names in filesystem.walk(bare_top))
    else:
        walk = os.walk(folder)
    for root, dirs, names in walk:
        dirs.sort()  # in place: the walk descends in this order
        yield from (os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))


def list_image_files(paths: Sequence[str]) -> list[str]:
    """Files as given plus image files found (recursively, sorted) under directories."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += walk_image_files(path)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"image path not found: {path}")
    return files
