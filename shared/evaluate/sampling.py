"""Our own edit sampler over a loaded pipeline's components.

Why not call the pipeline: diffusers' edit pipelines choose the reference sizes themselves (edit-v1 resizes its
reference to ~1 MP for the VAE and the VL encoder; the Plus pipeline uses its module constants, 1024² for the VAE
and 384² for the VL encoder). A preview must show what the LoRA does with the reference sizes it was *trained*
with (``model_kwargs.match_target_res``, ``vl_reference_area``), and a 1 MP reference encode costs seconds per
call on a CPU. So this module takes references already at the size the VAE should see them and otherwise repeats
the pipelines' ``__call__`` step by step: prompt embeddings (+ negative ones for true CFG), the packed reference
latents, the initial noise drawn exactly as ``prepare_latents`` draws it, the dynamically shifted timesteps, the
denoising loop with the pipelines' norm-preserving true CFG, and the decode. Given the references the pipeline
would itself have made and the same generator, the output equals the pipeline's (the tests hold it to that).

Legend: B batch (always 1 here: the Plus pipeline supports no more), C latent channels (16), h/w latent size
(H/8, W/8), L tokens ((h/2)*(w/2) image tokens of 64 channels, or text tokens), D text width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from shared.config.flavours import get_flavour
from shared.encode.ops import encode_prompt, encode_vae_latents
from shared.model.flow import resolution_mu
from shared.model.latents import latent_img_shape, pack_latents, unpack_latents

VAE_SCALE = 8  # the Qwen-Image VAE's spatial compression
PIXEL_MULTIPLE = VAE_SCALE * 2  # 8x VAE times the 2x2 patchify

ImgShape = tuple[int, int, int]


@dataclass
class EditConditioning:
    """Everything the denoising loop needs that does not depend on the noise: computed once per (prompt,
    references), so that rendering the same sample with and without a LoRA encodes its inputs once."""

    prompt_embeds_BLD: torch.Tensor
    prompt_mask_BL: torch.Tensor | None  # None when every token is real, exactly as the pipelines pass it
    negative_embeds_BLD: torch.Tensor | None  # None: no true CFG
    negative_mask_BL: torch.Tensor | None
    ref_tokens_BLC: torch.Tensor  # every reference's packed latents, in order, along L
    ref_shapes: list[ImgShape]

    @property
    def do_true_cfg(self) -> bool:
        return self.negative_embeds_BLD is not None


def execution_device(pipe: Any) -> torch.device:
    """Where the pipeline runs its models (honours diffusers' CPU-offload hooks like the pipelines do)."""
    return torch.device(pipe._execution_device)


def compute_dtype(pipe: Any) -> torch.dtype:
    """The dtype of latents and embeddings in the loop: the pipelines use the prompt embeddings' dtype, which is
    the text encoder's; without a text encoder (precomputed embeddings) the transformer's."""
    encoder = getattr(pipe, "text_encoder", None)
    dtype: torch.dtype = encoder.dtype if encoder is not None else pipe.transformer.dtype
    return dtype


def _check_size(height: int, width: int) -> None:
    """The pipelines silently round the output size down to a multiple of 16; asking for another size is a bug
    in the caller's config handling, so say so instead of returning an image of a different size."""
    if height % PIXEL_MULTIPLE or width % PIXEL_MULTIPLE or height < PIXEL_MULTIPLE or width < PIXEL_MULTIPLE:
        raise ValueError(f"output size {width}x{height}: both sides must be positive multiples of {PIXEL_MULTIPLE}")


def _mask_or_none(mask_BL: torch.Tensor) -> torch.Tensor | None:
    """The pipelines' ``encode_prompt`` drops an all-ones mask; the transformer then takes its unmasked attention
    path, which is what we must run to get the same numbers."""
    return None if bool(mask_BL.all()) else mask_BL


def _prompt(
    pipe: Any,
    flavour: str,
    prompt: str,
    vl_refs: Sequence[Image.Image],
    vl_ref_area: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    embeds_BLD, mask_BL = encode_prompt(pipe, flavour, [prompt], [list(vl_refs)], vl_ref_area)
    return embeds_BLD.to(device, dtype), _mask_or_none(mask_BL.to(device))


@torch.no_grad()
def encode_references(
    pipe: Any, references: Sequence[Image.Image], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, list[ImgShape]]:
    """Each reference's normalised latents at its own pixel size, packed and concatenated along L."""
    tokens: list[torch.Tensor] = []
    shapes: list[ImgShape] = []
    for ref in references:
        if ref.width % PIXEL_MULTIPLE or ref.height % PIXEL_MULTIPLE:
            raise ValueError(
                f"reference of {ref.width}x{ref.height}: both sides must be multiples of "
                f"{PIXEL_MULTIPLE} (resize references to their VAE size first)"
            )
        latents_BChw = encode_vae_latents(pipe.vae, pipe.image_processor, [ref], ref.height, ref.width)
        tokens.append(pack_latents(latents_BChw).to(device, dtype))
        shapes.append(latent_img_shape(*latents_BChw.shape[-2:]))
    return torch.cat(tokens, dim=1), shapes


def encode_conditioning(
    pipe: Any,
    flavour: str,
    prompt: str,
    references: Sequence[Image.Image],
    *,
    true_cfg_scale: float,
    negative_prompt: str | None = " ",
    vl_ref_area: int | None = None,
    vl_references: Sequence[Image.Image] | None = None,
) -> EditConditioning:
    """Prompt (and negative prompt) embeddings conditioned on the references, and the references' latents.

    ``references`` are at the pixel size the VAE encodes them at. The VL encoder sees ``vl_references`` (default:
    the same images) resized to ``vl_ref_area`` (default: the flavour's pipeline area). Pass the caller's
    original images as ``vl_references`` to resize from them, as the pipelines do, instead of from the VAE-size
    copies. As in the pipelines, true CFG runs only when ``true_cfg_scale > 1`` and there is a negative prompt.
    """
    flav = get_flavour(flavour)
    flav.check_ref_count(len(references))
    vl_refs = list(vl_references) if vl_references is not None else list(references)
    if len(vl_refs) != len(references):
        raise ValueError(f"{len(references)} references but {len(vl_refs)} vl_references: need one per reference")
    device, dtype = execution_device(pipe), compute_dtype(pipe)
    embeds, mask = _prompt(pipe, flav.name, prompt, vl_refs, vl_ref_area, dtype, device)
    neg_embeds = neg_mask = None
    if true_cfg_scale > 1 and negative_prompt is not None:
        neg_embeds, neg_mask = _prompt(pipe, flav.name, negative_prompt, vl_refs, vl_ref_area, dtype, device)
    ref_tokens, ref_shapes = encode_references(pipe, references, dtype, device)
    return EditConditioning(embeds, mask, neg_embeds, neg_mask, ref_tokens, ref_shapes)


def cached_conditioning(
    pipe: Any, text: dict[str, torch.Tensor], references: Sequence[Image.Image], *, true_cfg_scale: float
) -> EditConditioning:
    """``encode_conditioning`` with the caption embeddings taken from a cache entry (``shared.encode.cache``:
    ``prompt_embeds`` / ``prompt_mask`` and, for true CFG, ``negative_embeds`` / ``negative_mask``) instead of the
    text encoder, which the pipeline may then lack. The encoder computed those with the same template, references
    and area, so the conditioning is the one ``encode_conditioning`` would build; only the references' latents
    are encoded here."""
    device = execution_device(pipe)
    dtype = compute_dtype(pipe)

    def one(embeds_LD: torch.Tensor, mask_L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return embeds_LD[None].to(device, dtype), _mask_or_none(mask_L[None].to(device))

    embeds, mask = one(text["prompt_embeds"], text["prompt_mask"])
    neg_embeds = neg_mask = None
    if true_cfg_scale > 1:
        if "negative_embeds" not in text:
            raise ValueError("true CFG needs the negative prompt's embeddings: the cache entry has none")
        neg_embeds, neg_mask = one(text["negative_embeds"], text["negative_mask"])
    ref_tokens, ref_shapes = encode_references(pipe, references, dtype, device)
    return EditConditioning(embeds, mask, neg_embeds, neg_mask, ref_tokens, ref_shapes)


def initial_noise(
    pipe: Any, height: int, width: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``prepare_latents``' noise: one ``randn_tensor`` draw of shape (1, 1, C, h, w), packed (noise_BLC)."""
    C = pipe.transformer.config.in_channels // 4
    h, w = 2 * (height // PIXEL_MULTIPLE), 2 * (width // PIXEL_MULTIPLE)
    noise_B1Chw = randn_tensor((1, 1, C, h, w), generator=generator, device=device, dtype=dtype)
    return pack_latents(noise_B1Chw[:, 0])


def make_scheduler(
    pipe: Any,
    num_inference_steps: int,
    image_seq_len: int,
    device: torch.device,
    sigmas: Sequence[float] | np.ndarray | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Any, torch.Tensor]:
    """A fresh scheduler (the pipeline's config) with the pipelines' sigmas (default a linear grid from 1 to 1/N)
    and resolution-dependent shift.

    A copy, not ``pipe.scheduler``: the scheduler carries a step index, and a preview running beside other users
    of the pipeline must not move theirs. ``overrides``: scheduler config values a preview profile sets (a
    few-step LoRA's shift).
    """
    scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, **(overrides or {})})
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = resolution_mu(image_seq_len, scheduler.config)
    # diffusers annotates sigmas as a list; it hands them to the scheduler's set_timesteps, which takes an array
    timesteps, _ = retrieve_timesteps(
        scheduler,
        num_inference_steps,
        device,
        sigmas=sigmas,  # type: ignore[arg-type]
        mu=mu,
    )
    scheduler.set_begin_index(0)
    return scheduler, timesteps


def _velocity(
    transformer: Any,
    latents_BLC: torch.Tensor,
    cond: EditConditioning,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    timestep_B: torch.Tensor,
    img_shapes: list[list[ImgShape]],
) -> torch.Tensor:
    hidden_BLC = torch.cat([latents_BLC, cond.ref_tokens_BLC], dim=1)
    out_BLC: torch.Tensor = transformer(
        hidden_states=hidden_BLC,
        timestep=timestep_B / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=embeds,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    return out_BLC[:, : latents_BLC.shape[1]]


def guided_velocity(cond_BLC: torch.Tensor, uncond_BLC: torch.Tensor, scale: float) -> torch.Tensor:
    """The pipelines' true CFG: extrapolate from the negative prediction, then rescale every token back to the
    conditional prediction's norm (keeps high guidance from blowing up the latents)."""
    comb_BLC = uncond_BLC + scale * (cond_BLC - uncond_BLC)
    cond_norm: torch.Tensor = torch.norm(cond_BLC, dim=-1, keepdim=True)  # torch.norm is unannotated
    comb_norm: torch.Tensor = torch.norm(comb_BLC, dim=-1, keepdim=True)
    return comb_BLC * (cond_norm / comb_norm)


@torch.no_grad()
def denoise(
    pipe: Any,
    cond: EditConditioning,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    true_cfg_scale: float,
    generator: torch.Generator | None,
    guidance_rescale: float = 0.0,
    scheduler_overrides: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Run the flow-matching Euler loop from fresh noise; returns the final latents_BLC (packed, normalised).
    ``guidance_rescale`` (SimpleTuner's ``validation_guidance_rescale``): blend the guided prediction with itself
    rescaled to the conditional prediction's standard deviation — diffusers' ``rescale_noise_cfg`` (Lin et al.,
    2023) on top of the pipelines' true CFG; 0 leaves the pipelines' arithmetic unchanged."""
    _check_size(height, width)
    if num_inference_steps < 2:
        raise ValueError("num_inference_steps must be at least 2 (one step gives NaN sigmas with the Qwen scheduler)")
    device, dtype = execution_device(pipe), cond.prompt_embeds_BLD.dtype
    latents_BLC = initial_noise(pipe, height, width, generator, dtype, device)
    img_shapes = [[latent_img_shape(2 * (height // PIXEL_MULTIPLE), 2 * (width // PIXEL_MULTIPLE)), *cond.ref_shapes]]
    scheduler, timesteps = make_scheduler(
        pipe, num_inference_steps, latents_BLC.shape[1], device, overrides=scheduler_overrides
    )
    transformer = pipe.transformer
    for t in timesteps:
        timestep_B = t.expand(latents_BLC.shape[0]).to(latents_BLC.dtype)
        v_BLC = _velocity(
            transformer, latents_BLC, cond, cond.prompt_embeds_BLD, cond.prompt_mask_BL, timestep_B, img_shapes
        )
        if cond.do_true_cfg and true_cfg_scale > 1:
            assert cond.negative_embeds_BLD is not None  # what do_true_cfg says
            v_neg_BLC = _velocity(
                transformer, latents_BLC, cond, cond.negative_embeds_BLD, cond.negative_mask_BL, timestep_B, img_shapes
            )
            guided_BLC = guided_velocity(v_BLC, v_neg_BLC, true_cfg_scale)
            if guidance_rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                guided_BLC = rescale_noise_cfg(guided_BLC, v_BLC, guidance_rescale)
            v_BLC = guided_BLC
        latents_BLC = scheduler.step(v_BLC, t, latents_BLC, return_dict=False)[0]
    return latents_BLC


@overload
def decode(
    pipe: Any, latents_BLC: torch.Tensor, height: int, width: int, output: Literal["pil"] = "pil"
) -> Image.Image: ...
@overload
def decode(pipe: Any, latents_BLC: torch.Tensor, height: int, width: int, output: Literal["np"]) -> np.ndarray: ...
@overload
def decode(
    pipe: Any, latents_BLC: torch.Tensor, height: int, width: int, output: Literal["pil", "np"]
) -> Image.Image | np.ndarray: ...
@torch.no_grad()
def decode(
    pipe: Any, latents_BLC: torch.Tensor, height: int, width: int, output: Literal["pil", "np"] = "pil"
) -> Image.Image | np.ndarray:
    """Unnormalise with the VAE's latents_mean/std and decode the one frame; arithmetic as in the pipelines."""
    vae = pipe.vae
    latents_BC1hw = unpack_latents(latents_BLC, height // VAE_SCALE, width // VAE_SCALE)[:, :, None].to(vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents_BC1hw.device, latents_BC1hw.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents_BC1hw.device, latents_BC1hw.dtype)
    pixels_B3HW = vae.decode(latents_BC1hw / inv_std + mean, return_dict=False)[0][:, :, 0]
    image: Image.Image | np.ndarray = pipe.image_processor.postprocess(pixels_B3HW, output_type=output)[0]
    return image


def sample_edit(
    pipe: Any,
    flavour: str,
    prompt: str,
    references: Sequence[Image.Image],
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    true_cfg_scale: float,
    negative_prompt: str | None = " ",
    generator: torch.Generator | None,
    vl_ref_area: int | None = None,
    vl_references: Sequence[Image.Image] | None = None,
    output: Literal["pil", "np"] = "pil",
    guidance_rescale: float = 0.0,
) -> Image.Image | np.ndarray:
    """Edit ``references`` per ``prompt`` into one width x height image (PIL, or an H x W x 3 float array in
    [0, 1] for ``output="np"``), as the flavour's pipeline would with the references at these sizes.

    ``references`` must already be at the pixel size the VAE should see (multiples of 16); see
    ``encode_conditioning`` for the VL encoder's view of them.
    """
    cond = encode_conditioning(
        pipe,
        flavour,
        prompt,
        references,
        true_cfg_scale=true_cfg_scale,
        negative_prompt=negative_prompt,
        vl_ref_area=vl_ref_area,
        vl_references=vl_references,
    )
    latents_BLC = denoise(
        pipe,
        cond,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        true_cfg_scale=true_cfg_scale,
        generator=generator,
        guidance_rescale=guidance_rescale,
    )
    return decode(pipe, latents_BLC, height, width, output)
