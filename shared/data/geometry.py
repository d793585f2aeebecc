"""Aspect buckets and crops: where every image (target or reference) is resized and cropped to.

A ``Placement`` says how a source image becomes the pixels that are encoded: resize to ``resize``, crop the box
at ``crop`` of size ``size``, then (references packed to an area) resize to ``final``. All sides are multiples
of 32 so that the VAE (8x) and the 2x2 patchify divide evenly, with room to spare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

MULTIPLE = 32


def _round_to(x: float, m: int = MULTIPLE) -> int:
    return max(m, int(round(x / m)) * m)


def bucket_for_area(width: int, height: int, area: int) -> tuple[int, int]:
    """The bucket (W, H) of about ``area`` pixels closest to the image's aspect ratio."""
    aspect = width / height
    return _round_to(math.sqrt(area * aspect)), _round_to(math.sqrt(area / aspect))


def bucket_for_short_side(width: int, height: int, short: int) -> tuple[int, int]:
    """resolution_type 'pixel': the shorter side becomes ``short``, the other keeps the aspect ratio."""
    scale = short / min(width, height)
    return _round_to(width * scale), _round_to(height * scale)


@dataclass(frozen=True)
class Placement:
    """Source (width, height) → resize → crop box → optional final resize. Sizes are (width, height)."""

    source: tuple[int, int]
    resize: tuple[int, int]
    crop: tuple[int, int]
    size: tuple[int, int]
    final: tuple[int, int]

    def apply(self, image: Image.Image) -> Image.Image:
        img = image if image.size == self.resize else image.resize(self.resize, Image.Resampling.LANCZOS)
        left, top = self.crop
        img = img.crop((left, top, left + self.size[0], top + self.size[1]))
        if self.final != self.size:
            img = img.resize(self.final, Image.Resampling.LANCZOS)
        return img

    def to_json(self) -> dict[str, list[int]]:
        return {k: list(getattr(self, k)) for k in ("source", "resize", "crop", "size", "final")}


def cover_crop(source: tuple[int, int], bucket: tuple[int, int]) -> Placement:
    """Resize so the image covers the bucket, then centre-crop to it."""
    w, h = source
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, math.ceil(w * scale - 1e-9)), max(bh, math.ceil(h * scale - 1e-9))
    return Placement(source, (rw, rh), ((rw - bw) // 2, (rh - bh) // 2), bucket, bucket)


def packed_size(aspect: float, area: int) -> tuple[int, int]:
    """The ~``area``-pixel size at an aspect ratio, as the Qwen edit pipelines size references (multiples of 32)."""
    w = math.sqrt(area * aspect)
    h = w / aspect
    return _round_to(w), _round_to(h)


def strict_reference(target: Placement, ref_source: tuple[int, int], final: tuple[int, int] | None = None
                     ) -> Placement:
    """reference_strict: the reference takes exactly its target's resize and crop (a reference of another size
    is first stretched to the target's resize), optionally packed to ``final`` afterwards."""
    return Placement(ref_source, target.resize, target.crop, target.size, final or target.size)
