"""Qwen-Image-2.1 previews: our own loop over a loaded ``QwenImage21Pipeline``'s components, step for step its
``__call__``.

Why not call the pipeline: ``__call__`` resizes the references itself and cannot take cached prompt embeddings
together with references (it has no ``image_pad_mask`` argument), and previews render from the cache so that
eval_svc needs no 8B text encoder. So this module takes references already placed (as training placed them) and
repeats the pipeline: the prompt embeddings with their image-pad mask (+ the negative prompt's, with the same
references, for true CFG), each reference's RGBA latents, the initial noise drawn exactly as ``prepare_latents``
draws it, the sigmas (the model's ``sample_sigmas`` or a linear grid) with the resolution shift, the denoising loop
with the prefix KV cache (text and reference tokens are computed once per render, on the first step; later steps
compute only the target's tokens) and plain true CFG (no norm rescale, unlike the edit pipelines), and the decode.
Given the references the pipeline would have made and the same generator, the output equals the pipeline's (the
tests hold it to that).

Legend: B batch (1), C latent channels (64), h/w latent size (pixels/16), N image tokens, L prompt tokens, D text
width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from shared.config.flavours import get_flavour
from shared.encode.qwen21 import MULTIPLE, VAE_SCALE_FACTOR, prompt_embeddings, vae_latents
from shared.evaluate.sampling import compute_dtype, execution_device, make_scheduler
from shared.model.flow_qwen21 import SLOT_TOKENS, pack_qwen21, unpack_qwen21

ImgShape = tuple[int, int, int]


@dataclass
class Qwen21Conditioning:
    """What the loop needs that does not depend on the noise: computed once per (prompt, references), shared by
    the base and the LoRA render."""

    prompt_embeds_BLD: torch.Tensor
    prompt_mask_BL: torch.Tensor | None  # None when every token is real, as the pipeline passes it
    image_pad_mask_BL: torch.Tensor
    negative_embeds_BLD: torch.Tensor | None  # None: no true CFG
    negative_mask_BL: torch.Tensor | None
    negative_image_pad_mask_BL: torch.Tensor | None
    ref_tokens_BNC: torch.Tensor | None  # every reference's flattened latents, in order (None: text-to-image)
    ref_shapes: list[ImgShape]

    @property
    def do_true_cfg(self) -> bool:
        return self.negative_embeds_BLD is not None


def _check_references(references: Sequence[Image.Image]) -> None:
    get_flavour("v2.1").check_ref_count(len(references))
    for ref in references:
        if ref.width % MULTIPLE or ref.height % MULTIPLE:
            raise ValueError(
                f"reference of {ref.width}x{ref.height}: both sides must be multiples of {MULTIPLE} (place references "
                "at their VAE size first)"
            )


@torch.no_grad()
def _reference_tokens(
    pipe: Any, references: Sequence[Image.Image], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, list[ImgShape]]:
    if not references:
        return None, []
    latents = vae_latents(pipe.vae, list(references), [r.size for r in references])
    tokens = torch.cat([pack_qwen21(lat[None]) for lat in latents], dim=1).to(device, dtype)
    return tokens, [(1, int(lat.shape[-2]), int(lat.shape[-1])) for lat in latents]


def _one(
    embeds_LD: torch.Tensor, mask_L: torch.Tensor, pad_L: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    mask_BL = mask_L[None].to(device)
    return embeds_LD[None].to(device, dtype), None if bool(mask_BL.all()) else mask_BL, pad_L[None].bool().to(device)


def encode_conditioning(
    pipe: Any,
    prompt: str,
    references: Sequence[Image.Image],
    *,
    true_cfg_scale: float,
    negative_prompt: str | None = None,
) -> Qwen21Conditioning:
    """The prompt (and negative prompt) embeddings with Qwen3-VL seeing ``references`` (placed: multiples of 32,
    as the VAE sees them), and the references' latents. True CFG only when ``true_cfg_scale > 1`` and there is a
    negative prompt, as in the pipeline."""
    _check_references(references)
    device, dtype = execution_device(pipe), compute_dtype(pipe)
    refs = list(references)

    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        embeds_LD, pad_L = prompt_embeddings(pipe.text_encoder, pipe.processor, text, refs)
        return _one(embeds_LD, torch.ones(embeds_LD.shape[0], dtype=torch.long), pad_L, dtype, device)

    embeds, mask, pad = encode(prompt)
    neg: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)
    if true_cfg_scale > 1 and negative_prompt is not None:
        neg = encode(negative_prompt)
    tokens, shapes = _reference_tokens(pipe, refs, dtype, device)
    return Qwen21Conditioning(embeds, mask, pad, *neg, tokens, shapes)


def cached_conditioning(
    pipe: Any, text: dict[str, torch.Tensor], references: Sequence[Image.Image], *, true_cfg_scale: float
) -> Qwen21Conditioning:
    """``encode_conditioning`` with the embeddings from a cache entry (``prompt_*`` and, for true CFG,
    ``negative_*``: embeds, mask, image_pad_mask), so the pipeline needs no text encoder."""
    _check_references(references)
    device, dtype = execution_device(pipe), compute_dtype(pipe)

    def entry(name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return _one(text[f"{name}_embeds"], text[f"{name}_mask"], text[f"{name}_image_pad_mask"], dtype, device)

    embeds, mask, pad = entry("prompt")
    neg: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)
    if true_cfg_scale > 1:
        if "negative_embeds" not in text:
            raise ValueError("true CFG needs the negative prompt's embeddings: the cache entry has none")
        neg = entry("negative")
    tokens, shapes = _reference_tokens(pipe, references, dtype, device)
    return Qwen21Conditioning(embeds, mask, pad, *neg, tokens, shapes)


def _check_size(height: int, width: int) -> None:
    if height % MULTIPLE or width % MULTIPLE or height < MULTIPLE or width < MULTIPLE:
        raise ValueError(f"output size {width}x{height}: both sides must be positive multiples of {MULTIPLE}")


@torch.no_grad()
def denoise(
    pipe: Any,
    cond: Qwen21Conditioning,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    true_cfg_scale: float,
    generator: torch.Generator | None,
    use_kv_cache: bool = True,
    scheduler_overrides: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The pipeline's denoising loop from fresh noise; returns the final latents (B, N, C), normalised."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    _check_size(height, width)
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be at least 1")
    device, dtype = execution_device(pipe), cond.prompt_embeds_BLD.dtype
    transformer = pipe.transformer
    C = transformer.config.in_channels
    h, w = 2 * (height // MULTIPLE), 2 * (width // MULTIPLE)
    noise_B1Chw = randn_tensor((1, 1, C, h, w), generator=generator, device=device, dtype=dtype)
    latents_BNC = pack_qwen21(noise_B1Chw[:, 0])
    img_shapes = [[*cond.ref_shapes, (1, h, w)]]
    sigmas = pipe.config.get("sample_sigmas") if hasattr(pipe, "config") else None
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler, timesteps = make_scheduler(
        pipe, len(sigmas), latents_BNC.shape[1], device, sigmas=sigmas, overrides=scheduler_overrides
    )

    def with_target(mask_BL: torch.Tensor) -> torch.Tensor:  # the pipeline's append_target_slots
        return torch.cat([mask_BL, mask_BL.new_ones(mask_BL.shape[0], latents_BNC.shape[1] // SLOT_TOKENS)], dim=1)

    cached = use_kv_cache and bool(transformer.config.get("causal_condition", True))
    branches = [(cond.prompt_embeds_BLD, cond.prompt_mask_BL, with_target(cond.image_pad_mask_BL))]
    if cond.do_true_cfg and true_cfg_scale > 1:
        assert cond.negative_embeds_BLD is not None and cond.negative_image_pad_mask_BL is not None
        branches.append((cond.negative_embeds_BLD, cond.negative_mask_BL, with_target(cond.negative_image_pad_mask_BL)))
    n_blocks = len(transformer.transformer_blocks)
    caches = [QwenImage21KVCache(n_blocks) if cached else None for _ in branches]
    for i, t in enumerate(timesteps):
        mode = ("extract" if i == 0 else "cached") if cached else None
        hidden_BNC = latents_BNC if cond.ref_tokens_BNC is None else torch.cat([cond.ref_tokens_BNC, latents_BNC], 1)
        timestep_B = t.expand(latents_BNC.shape[0]).to(latents_BNC.dtype)
        preds = []
        for (embeds, mask, img_mask), cache in zip(branches, caches, strict=True):
            out_BNC = transformer(
                hidden_states=hidden_BNC,
                timestep=timestep_B / 1000,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=img_shapes,
                img_mask=img_mask,
                kv_cache=cache,
                kv_cache_mode=mode,
                return_dict=False,
            )[0]
            preds.append(out_BNC[:, -latents_BNC.shape[1] :])
        v_BNC = preds[0] if len(preds) == 1 else preds[1] + true_cfg_scale * (preds[0] - preds[1])
        latents_BNC = scheduler.step(v_BNC, t, latents_BNC, return_dict=False)[0]
    return latents_BNC


@torch.no_grad()
def decode(pipe: Any, latents_BNC: torch.Tensor, height: int, width: int) -> Image.Image:
    """Unnormalise and decode as the pipeline does; the RGBA output composited over white (what a viewer shows)."""
    vae = pipe.vae
    lat_BC1hw = unpack_qwen21(latents_BNC, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)[:, :, None]
    lat_BC1hw = lat_BC1hw.to(vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(lat_BC1hw.device, lat_BC1hw.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(lat_BC1hw.device, lat_BC1hw.dtype)
    pixels_B4HW = vae.decode(lat_BC1hw * std + mean, return_dict=False)[0][:, :, 0]
    image: Image.Image = pipe.image_processor.postprocess(pixels_B4HW, output_type="pil")[0]
    if image.mode != "RGBA":
        return image.convert("RGB")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white
