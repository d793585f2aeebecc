"""The encoding Qwen-Image-2.1 training needs: references resized, RGBA latents of the 16x VAE, joint VL embeddings.

Pure functions over a loaded pipeline's parts, written from our own code paths but computing exactly what diffusers'
``QwenImage21Pipeline`` computes for the same inputs (its ``__call__`` reference resize, ``_encode_vae_image`` and
``_get_qwen_prompt_embeds``), so a model trained on these caches sees at training time what it sees at inference. The
tests hold each function to the pipeline's own computation.

What differs from the edit models (``shared.encode.ops``): the VAE reads RGBA (4 channels, 64 latent channels at 1/16
size); the vision encoder sees the *same* resized image as the VAE, composited over white; the references' vision
tokens sit inside the prompt (``<imageN>`` placeholders after ``user\\n``, before the instruction), and which rows
hold them (``image_pad_mask``) travels with the embeddings; the system prefix dropped is counted with the
processor's chat template, not fixed.

Shape legend: C latent channels (64; the tiny model's 8), h/w latent size (pixels/16), L tokens, D text width (4096).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from shared.data.geometry import qwen21_sizes

VAE_SCALE_FACTOR = 16  # the pipeline's, hard-coded there too: one latent token per 16x16 pixels
MULTIPLE = 2 * VAE_SCALE_FACTOR  # sides are multiples of 32: one vision slot per 2x2 latent tokens
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
IMAGE_PAD = "<|image_pad|>"
# The pipeline builds the prompt as a raw string (not through apply_chat_template: the two tokenize differently).
_HEAD = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def _image_processor() -> VaeImageProcessor:
    """The pipeline's ``image_processor``: Lanczos, [-1, 1], no RGB conversion (RGBA stays RGBA).
    ``vae_latent_channels`` does not enter resize or preprocess of PIL images, so the default serves."""
    processor: VaeImageProcessor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR)
    return processor


def _rgba(image: Image.Image) -> Image.Image:
    """The pipeline converts every reference that is not RGBA (a RGB one gets alpha 255)."""
    return image if image.mode == "RGBA" else image.convert("RGBA")


def reference_images(
    images: list[Image.Image], output_resolution: int = 1024
) -> tuple[list[Image.Image], list[tuple[int, int]], tuple[int, int]]:
    """Each reference as RGBA resized where the pipeline puts it, its (width, height), and the output's (w, h).

    The same resized image feeds the vision encoder (``prompt_embeddings``) and the VAE (``vae_latents``). Sizes
    are ``qwen21_sizes``' (InvalidInput past ten references); no references is text-to-image, whose output is
    ``output_resolution`` square floored to a multiple of 32.
    """
    if not images:
        side = output_resolution // MULTIPLE * MULTIPLE
        return [], [], (side, side)
    sizes, target = qwen21_sizes([im.size for im in images], output_resolution)
    processor = _image_processor()
    resized: list[Image.Image] = []
    for image, (w, h) in zip(images, sizes, strict=True):
        out = processor.resize(_rgba(image), height=h, width=w)  # PIL in, PIL out (Lanczos, alpha premultiplied)
        assert isinstance(out, Image.Image)
        resized.append(out)
    return resized, sizes, target


def _normalised_latents(vae: AutoencoderKLQwenImage21, pixels_14HW: torch.Tensor) -> torch.Tensor:
    """(C, h, w) float32: the posterior's mode, ``(z - latents_mean) / latents_std`` per channel."""
    pixels_141HW = pixels_14HW.unsqueeze(2).to(device=vae.device, dtype=vae.dtype)  # the VAE is a video VAE
    latents_1C1hw = vae.encode(pixels_141HW).latent_dist.mode()
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config["latents_mean"]).view(shape).to(latents_1C1hw.device, latents_1C1hw.dtype)
    std = torch.tensor(vae.config["latents_std"]).view(shape).to(latents_1C1hw.device, latents_1C1hw.dtype)
    latents_Chw: torch.Tensor = ((latents_1C1hw - mean) / std)[0, :, 0].float()
    return latents_Chw


@torch.no_grad()
def vae_latents(
    vae: AutoencoderKLQwenImage21, images_rgba: list[Image.Image], sizes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """Normalised latents (C, h, w) in float32 of each reference at its (width, height), one encode per image as
    the pipeline does (references differ in size). ``images_rgba`` are ``reference_images``' (already at their
    sizes, so the processor's resize is a copy) or the originals (then resized here exactly as there)."""
    processor = _image_processor()
    out = []
    for image, (w, h) in zip(images_rgba, sizes, strict=True):
        out.append(_normalised_latents(vae, processor.preprocess(_rgba(image), height=h, width=w)))
    return out


@torch.no_grad()
def encode_target(vae: AutoencoderKLQwenImage21, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A training target's normalised latents (C, h, w) float32 at ``size`` = (width, height): RGBA (a RGB target
    gets alpha 255, which the VAE decodes as opaque), resized and normalised as the references are."""
    w, h = size
    return _normalised_latents(vae, _image_processor().preprocess(_rgba(image), height=h, width=w))


def prompt_text(prompt: str, n_references: int) -> str:
    """The pipeline's template: ``<imageN>`` placeholders in order after ``user\\n``, space-separated, then the
    instruction; without references the text-to-image template. An empty prompt becomes " " (Qwen has no BOS)."""
    slots = " ".join(f"<image{i}><|vision_start|>{IMAGE_PAD}<|vision_end|>" for i in range(1, n_references + 1))
    return f"{_HEAD}{slots}{prompt or ' '}{_TAIL}"


def _vision_copy(image: Image.Image) -> Image.Image:
    """What the vision encoder sees: an RGBA reference composited over white (the VAE keeps the alpha)."""
    if image.mode != "RGBA":
        return image
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def system_prefix_length(processor: Qwen3VLProcessor) -> int:
    """Tokens of the system message, as the processor's chat template renders it: the rows the pipeline drops."""
    message: list[dict[str, Any]] = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    tokens = processor.apply_chat_template(message, tokenize=True, return_dict=False)
    return len(tokens[0])


@torch.no_grad()
def prompt_embeddings(
    text_encoder: Qwen3VLForConditionalGeneration,
    processor: Qwen3VLProcessor,
    prompt: str,
    references_rgba: list[Image.Image],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL embeddings of one prompt with its references: (embeds_LD float32, image_pad_mask_L bool).

    ``references_rgba`` are ``reference_images``' (resized), in placeholder order. The rows are the last decoder
    layer's output *before* the final RMSNorm (the pipeline's forward hook; transformers 5's ``hidden_states[-1]``
    is post-norm), without the system prefix. ``image_pad_mask`` marks the rows of the references' vision slots,
    where the transformer puts their latents. Float32 is an exact upcast of the encoder's dtype.
    """
    kwargs: dict[str, object] = {
        "text": [prompt_text(prompt, len(references_rgba))],
        "padding": True,  # the pipeline's call: one prompt pads nothing
        "padding_side": "left",
        "return_tensors": "pt",
    }
    if references_rgba:
        kwargs["images"] = [_vision_copy(im) for im in references_rgba]
    inputs = processor(**kwargs).to(text_encoder.device)
    forward: dict[str, object] = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):  # mm_token_type_ids: M-RoPE's positions
        if key in inputs:
            forward[key] = inputs[key]

    captured: list[torch.Tensor] = []

    def pre_norm(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(args[0])

    model = text_encoder.model  # the decoder without lm_head: its logits are not needed
    text_model = getattr(model, "language_model", model)
    handle = text_model.norm.register_forward_hook(pre_norm)
    try:
        model(**forward)
    finally:
        handle.remove()
    (hidden_1LD,) = captured
    valid_L = inputs["attention_mask"][0].bool()  # one prompt: no padding, but be exact
    drop = system_prefix_length(processor)
    pad_id = processor.tokenizer.encode(IMAGE_PAD)[0]
    embeds_LD = hidden_1LD[0][valid_L][drop:].float()
    image_pad_mask_L = (inputs["input_ids"][0][valid_L] == pad_id)[drop:]
    return embeds_LD, image_pad_mask_L


def prompt_tensors(
    text_encoder: Qwen3VLForConditionalGeneration,
    processor: Qwen3VLProcessor,
    name: str,
    prompt: str,
    references_rgba: list[Image.Image],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """A cache entry's tensors of one prompt: ``<name>_embeds`` (L, D) in ``dtype``, ``<name>_mask`` (L,) int64
    ones (one prompt is never padded) and ``<name>_image_pad_mask`` (L,) bool, on the CPU."""
    embeds_LD, pad_L = prompt_embeddings(text_encoder, processor, prompt, references_rgba)
    return {
        f"{name}_embeds": embeds_LD.to(dtype).cpu(),
        f"{name}_mask": torch.ones(embeds_LD.shape[0], dtype=torch.long),
        f"{name}_image_pad_mask": pad_L.cpu(),
    }
