"""The tensor math of encoding: images to normalised VAE latents, captions (+ references) to text embeddings.

Pure functions over a loaded pipeline's parts: no storage, no datasets. Each one reproduces what diffusers' edit
pipelines compute for the same inputs (``_encode_vae_image``, ``_get_qwen_prompt_embeds``), so a model trained on
these caches sees at training time exactly what it sees at inference. The tests hold them to it.

Shape legend: B batch, C latent channels (16), H/W pixel size, h/w latent size (H/8, W/8), L tokens, D text width
(3584 for Qwen2.5-VL-7B).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from PIL import Image

from shared import errors
from shared.config.flavours import get_flavour


def _rgb(image: Image.Image) -> Image.Image:
    """The VAE image processor does not convert modes (do_convert_rgb is off): RGBA or L would break the VAE."""
    return image if image.mode == "RGB" else image.convert("RGB")


@torch.no_grad()
def encode_vae_latents(
    vae: Any, image_processor: Any, images: Sequence[Image.Image], height: int, width: int
) -> torch.Tensor:
    """Encode ``images`` at exactly (height, width) pixels to normalised latents_BChw in float32.

    The distribution's mode, not a sample: both edit pipelines encode references with ``sample_mode="argmax"``,
    and a deterministic cache is one that encoding twice does not change. ``image_processor`` is the pipeline's
    ``VaeImageProcessor`` (Lanczos resize, [-1, 1]).
    """
    pixels_B3HW = image_processor.preprocess([_rgb(im) for im in images], height, width)
    pixels_B31HW = pixels_B3HW.unsqueeze(2).to(device=vae.device, dtype=vae.dtype)  # the VAE is a video VAE
    latents_BC1hw = vae.encode(pixels_B31HW).latent_dist.mode()
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents_BC1hw.device, latents_BC1hw.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents_BC1hw.device, latents_BC1hw.dtype)
    latents_BChw: torch.Tensor = ((latents_BC1hw - mean) / std).squeeze(2).float()  # the VAE is typed loosely
    return latents_BChw


def reference_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(w, h) of a reference resized to about ``area`` pixels at its aspect ratio, multiples of 32: the rule
    (diffusers' ``calculate_dimensions``) both edit pipelines apply before the VL encoder and the VAE."""
    w, h, _ = calculate_dimensions(area, width / height)
    return int(w), int(h)


def resize_reference(image_processor: Any, image: Image.Image, area: int) -> Image.Image:
    """A reference resized as the pipelines resize it for the VL encoder (``VaeImageProcessor.resize``, Lanczos)."""
    w, h = reference_size(image.width, image.height, area)
    resized: Image.Image = image_processor.resize(_rgb(image), h, w)  # a PIL image in, a PIL image out
    return resized


def _prompt_images(pipe: Any, flavour: str, refs: Sequence[Image.Image], area: int) -> Image.Image | list[Image.Image]:
    """The ``image`` argument the flavour's pipeline passes to ``_get_qwen_prompt_embeds``.

    edit-v1's template has one image slot and gets the image itself; the Plus pipeline writes one "Picture N:"
    slot per list element, so it always gets a list (a single image would also give "Picture 1:").
    """
    resized = [resize_reference(pipe.image_processor, im, area) for im in refs]
    return resized if get_flavour(flavour).multi_reference else resized[0]


@torch.no_grad()
def encode_prompt(
    pipe: Any,
    flavour: str,
    prompts: Sequence[str],
    refs: Sequence[Sequence[Image.Image]],
    vl_ref_area: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL embeddings of each caption conditioned on its reference image(s): (prompt_embeds_BLD, mask_BL).

    Runs diffusers' own ``_get_qwen_prompt_embeds`` (template, 64-token system prefix dropped) so the template
    logic stays diffusers'. Samples are encoded one at a time and zero-padded to the longest: the Plus pipeline
    only supports batch 1, and a cached embedding must not depend on which other samples shared its batch.
    Embeddings are float32 (exact upcast of the encoder's dtype); the mask is int64, 1 on real tokens.
    """
    flav = get_flavour(flavour)
    if len(prompts) != len(refs):
        raise errors.InvalidInput(f"{len(prompts)} captions but {len(refs)} reference lists: need one list per caption")
    area = vl_ref_area or flav.vl_ref_area
    embeds_1LD: list[torch.Tensor] = []
    for i, (prompt, sample_refs) in enumerate(zip(prompts, refs, strict=True)):
        flav.check_ref_count(len(sample_refs), where=f"sample {i}")
        image = _prompt_images(pipe, flav.name, sample_refs, area)
        embeds, mask = pipe._get_qwen_prompt_embeds([prompt], image=image)
        embeds_1LD.append(embeds[:, : int(mask.sum())])  # batch of one: nothing is padding, but be exact
    L = max(e.shape[1] for e in embeds_1LD)
    prompt_embeds_BLD = torch.zeros(len(embeds_1LD), L, embeds_1LD[0].shape[2], device=embeds_1LD[0].device)
    mask_BL = torch.zeros(len(embeds_1LD), L, dtype=torch.long, device=embeds_1LD[0].device)
    for b, e in enumerate(embeds_1LD):
        prompt_embeds_BLD[b, : e.shape[1]] = e.float()
        mask_BL[b, : e.shape[1]] = 1
    return prompt_embeds_BLD, mask_BL


def encode_null_prompt(
    pipe: Any,
    flavour: str,
    refs: Sequence[Sequence[Image.Image]],
    vl_ref_area: int | None = None,
    null_caption: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption-dropout embedding: an empty instruction, still conditioned on the same references.

    The references stay because the edit model never runs without them: the pipelines' unconditional (CFG
    negative) branch also encodes the negative prompt *with* the reference images. diffusers' docs suggest " "
    as a negative prompt; "" is the dropped caption itself, and ``null_caption`` lets a caller choose.
    """
    return encode_prompt(pipe, flavour, [null_caption] * len(refs), refs, vl_ref_area)
