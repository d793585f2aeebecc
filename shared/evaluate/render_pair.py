"""One preview cell pair: the base's and the LoRA's edit of a sample from the same noise, with the settings a
validation renders with (``RenderSettings``: the run's profile, or an adapter run's, ``shared.evaluate.adapter_runs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.evaluate.sampling import cached_conditioning, decode, denoise, encode_conditioning
from shared.model.adapters import has_adapter, preview_adapters, trained_adapters, using_adapters


@dataclass(frozen=True)
class RenderSettings:
    flavour: str
    size: tuple[int, int]  # (W, H)
    steps: int
    guidance: float
    guidance_rescale: float
    negative_prompt: str
    seed: int
    vl_ref_area: int | None
    extra_adapters: dict[str, float] = field(default_factory=dict)  # frozen adapters in every cell, base included
    scheduler: dict[str, Any] = field(default_factory=dict)  # scheduler config values a profile overrides

    @classmethod
    def of(cls, run: RunConfig) -> RenderSettings:
        t = run.train
        return cls(
            t.model_flavour,
            t.validation_size,
            t.validation_num_inference_steps,
            t.validation_guidance,
            t.validation_guidance_rescale,
            t.validation_negative_prompt,
            t.validation_seed if t.validation_seed is not None else t.seed,
            t.model_kwargs.vl_reference_area,
            preview_adapters(t),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.size[0],
            "height": self.size[1],
            "steps": self.steps,
            "guidance": self.guidance,
            "guidance_rescale": self.guidance_rescale,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "vl_reference_area": self.vl_ref_area,
        }


def render_pair(
    pipe: Any,
    cfg: RenderSettings,
    caption: str,
    refs: list[Image.Image],
    seed: int,
    size: tuple[int, int],
    vl_refs: list[Image.Image] | None = None,
    text: dict[str, torch.Tensor] | None = None,
) -> tuple[Image.Image, Image.Image]:
    """(base, LoRA) edits of one sample from the same noise, ``size`` (W, H); inputs are encoded once for both,
    the caption from its cached embeddings ``text`` when given, else with the pipeline's text encoder."""
    if get_flavour(cfg.flavour).joint_sequence:
        return render_pair_qwen21(pipe, cfg, caption, refs, seed, size, text)
    if text is not None:
        cond = cached_conditioning(pipe, text, refs, true_cfg_scale=cfg.guidance)
    else:
        cond = encode_conditioning(
            pipe,
            cfg.flavour,
            caption,
            refs,
            true_cfg_scale=cfg.guidance,
            negative_prompt=cfg.negative_prompt,
            vl_ref_area=cfg.vl_ref_area,
            vl_references=vl_refs,
        )
    W, H = size

    def render() -> Image.Image:
        latents_BLC = denoise(
            pipe,
            cond,
            height=H,
            width=W,
            num_inference_steps=cfg.steps,
            true_cfg_scale=cfg.guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            guidance_rescale=cfg.guidance_rescale,
            scheduler_overrides=cfg.scheduler,
        )
        return decode(pipe, latents_BLC, H, W, "pil")

    if not has_adapter(pipe.transformer):  # nothing to switch off: the base render is the same computation
        lora = render()
        return lora, lora
    with using_adapters(pipe.transformer, {**trained_adapters(pipe.transformer), **cfg.extra_adapters}):
        lora = render()
    with using_adapters(pipe.transformer, cfg.extra_adapters):
        base = render()
    return base, lora


def render_pair_qwen21(
    pipe: Any,
    cfg: RenderSettings,
    caption: str,
    refs: list[Image.Image],
    seed: int,
    size: tuple[int, int],
    text: dict[str, torch.Tensor] | None,
) -> tuple[Image.Image, Image.Image]:
    """``_render_pair`` for Qwen-Image-2.1: its pipeline's loop (prefix KV cache, plain true CFG), the vision
    encoder seeing the references as placed for the VAE."""
    from shared.evaluate import sampling_qwen21 as s21

    if text is not None:
        cond = s21.cached_conditioning(pipe, text, refs, true_cfg_scale=cfg.guidance)
    else:
        cond = s21.encode_conditioning(
            pipe, caption, refs, true_cfg_scale=cfg.guidance, negative_prompt=cfg.negative_prompt
        )
    W, H = size

    def render() -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(seed)
        latents_BNC = s21.denoise(
            pipe,
            cond,
            height=H,
            width=W,
            num_inference_steps=cfg.steps,
            true_cfg_scale=cfg.guidance,
            generator=generator,
            scheduler_overrides=cfg.scheduler,
        )
        return s21.decode(pipe, latents_BNC, H, W)

    if not has_adapter(pipe.transformer):  # nothing to switch off: the base render is the same computation
        lora = render()
        return lora, lora
    with using_adapters(pipe.transformer, {**trained_adapters(pipe.transformer), **cfg.extra_adapters}):
        lora = render()
    with using_adapters(pipe.transformer, cfg.extra_adapters):
        base = render()
    return base, lora
