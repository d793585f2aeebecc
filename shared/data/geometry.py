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
        img = self.region(image)
        if self.final != self.size:
            img = img.resize(self.final, Image.Resampling.LANCZOS)
        return img

    def region(self, image: Image.Image) -> Image.Image:
        """The resized, cropped image before the final resize: the reference as a user would pass it to the
        pipeline, which sizes it for the VL encoder from its own aspect."""
        img = image if image.size == self.resize else image.resize(self.resize, Image.Resampling.LANCZOS)
        left, top = self.crop
        return img.crop((left, top, left + self.size[0], top + self.size[1]))

    def to_json(self) -> dict[str, list[int]]:
        return {k: list(getattr(self, k)) for k in ("source", "resize", "crop", "size", "final")}


def cover_crop(
    source: tuple[int, int],
    bucket: tuple[int, int],
    *,
    scale: float | None = None,
    at: tuple[float, float] = (0.5, 0.5),
) -> Placement:
    """Resize so the image covers the bucket (by ``scale`` when that is larger: SimpleTuner's downsample before a
    crop), then crop the bucket out of it at ``at``: the fraction of the spare width and height left of and above
    the box ((0.5, 0.5) centre, (0, 0) the top-left corner)."""
    w, h = source
    bw, bh = bucket
    scale = max(bw / w, bh / h, scale or 0.0)
    rw, rh = max(bw, math.ceil(w * scale - 1e-9)), max(bh, math.ceil(h * scale - 1e-9))
    left, top = int((rw - bw) * at[0]), int((rh - bh) * at[1])
    return Placement(source, (rw, rh), (left, top), bucket, bucket)


def pipeline_size(area: int, aspect: float) -> tuple[int, int]:
    """(w, h) of about ``area`` pixels at ``aspect``, multiples of 32: diffusers' ``calculate_dimensions``, the rule
    both edit pipelines size references with (the VAE at 1 MP, the Plus pipeline's VL encoder at 384²) and the
    output by default. Taken from diffusers itself so that training and inference cannot drift apart."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    w, h = calculate_dimensions(area, aspect)
    return max(MULTIPLE, int(w)), max(MULTIPLE, int(h))


def whole_image(source: tuple[int, int], final: tuple[int, int]) -> Placement:
    """The whole image resized to ``final`` (no crop), as the pipelines resize a reference."""
    return Placement(source, source, (0, 0), source, final)


def strict_reference(target: Placement, ref_source: tuple[int, int], final: tuple[int, int] | None = None) -> Placement:
    """reference_strict at the target's size (``match_target_res``): the reference takes exactly its target's
    resize and crop (a reference of another size is first stretched to the target's resize)."""
    return Placement(ref_source, target.resize, target.crop, target.size, final or target.size)


def strict_crop(target: Placement, ref_source: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (left, top, width, height) of the reference, in its own pixels, that shows what the target's crop
    shows: the same fraction of the image on each side. Equal aspects give the same region without any stretch."""
    rw, rh = target.resize
    left, top = target.crop
    bw, bh = target.size
    W, H = ref_source
    x0, y0 = round(left / rw * W), round(top / rh * H)
    x1, y1 = round((left + bw) / rw * W), round((top + bh) / rh * H)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def strict_reference_at_area(target: Placement, ref_source: tuple[int, int], area: int) -> Placement:
    """reference_strict at the pipelines' reference size: cropped like its target (``strict_crop``), then sized to
    ~``area`` pixels at the crop's own aspect."""
    x, y, w, h = strict_crop(target, ref_source)
    return Placement(ref_source, ref_source, (x, y), (w, h), pipeline_size(area, w / h))


def aspect_mismatch(a: tuple[int, int], b: tuple[int, int]) -> float:
    """How far two sizes' aspect ratios are apart, as a fraction (0.1 = 10%)."""
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1])))


# ------------------------------------------------------------------------------------------ Qwen-Image-2.1
QWEN21_MAX_REFERENCES = 10  # ordered reference images a Qwen-Image-2.1 edit takes


def qwen21_sizes(
    references: list[tuple[int, int]], output_resolution: int = 1024, where: str = "references"
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Where ``QwenImage21Pipeline`` puts an edit's references and its output, from the references' (width, height)
    in order: each reference at ~``output_resolution``² pixels of its own aspect (its sides rounded to multiples of
    32: one vision slot per 32x32 pixels, 2x2 tokens of the 16x VAE; the vision encoder sees the same size as the
    VAE), and the output at that area and the last reference's aspect, floored to multiples of 32. InvalidInput
    naming ``where`` for no references, more than ten, or one so narrow that a side rounds to nothing."""
    from shared.errors import InvalidInput

    if not 1 <= len(references) <= QWEN21_MAX_REFERENCES:
        raise InvalidInput(
            f"{where}: Qwen-Image-2.1 takes 1 to {QWEN21_MAX_REFERENCES} reference images per edit, got "
            f"{len(references)}"
        )
    area = output_resolution * output_resolution
    placed = []
    for i, (w, h) in enumerate(references):
        width = math.sqrt(area * w / h)
        size = (int(round(width / MULTIPLE)) * MULTIPLE, int(round(width / (w / h) / MULTIPLE)) * MULTIPLE)
        if min(size) == 0:
            raise InvalidInput(
                f"{where}[{i}]: a {w}x{h} reference at ~{output_resolution}x{output_resolution} pixels has a side "
                f"under 16 pixels ({size[0]}x{size[1]} after rounding to 32); crop it or raise the resolution"
            )
        placed.append(size)
    last_w, last_h = placed[-1]
    return placed, (last_w // MULTIPLE * MULTIPLE, last_h // MULTIPLE * MULTIPLE)
