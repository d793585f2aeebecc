"""Qwen-Image-2.1 previews (``shared.evaluate.sampling_qwen21``) against ``QwenImage21Pipeline`` itself on the
tiny model of the real classes: the same latents from the same references, prompt, negative prompt, true CFG and
generator, with the prefix KV cache; the same from cached embeddings as from the text encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from shared.encode.qwen21 import prompt_tensors, reference_images
from shared.evaluate import sampling_qwen21 as s21
from shared.model.loading import load_pipeline

OUTPUT_RESOLUTION = 64


@pytest.fixture(scope="module")
def pipe(tiny_models: Any) -> Any:
    torch.manual_seed(0)
    return load_pipeline(tiny_models("v2.1"), "v2.1")


def _references(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(n)
    sizes = [(96, 64), (64, 80), (48, 48), (120, 72), (64, 64)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        out.append(Image.fromarray(pixels, "RGB"))
    return out


def _pipeline_latents(pipe: Any, refs: list[Image.Image], scale: float, negative: str | None) -> torch.Tensor:
    out = pipe(
        "make the shapes red",
        image=refs,
        negative_prompt=negative,
        true_cfg_scale=scale,
        num_inference_steps=3,
        output_resolution=OUTPUT_RESOLUTION,
        output_type="latent",
        generator=torch.Generator().manual_seed(11),
    ).images
    assert isinstance(out, torch.Tensor)
    return out


@pytest.mark.parametrize(("n_refs", "scale", "negative"), [(1, 1.0, None), (3, 4.0, "blurry"), (5, 2.5, " ")])
def test_the_preview_loop_equals_the_pipeline(pipe: Any, n_refs: int, scale: float, negative: str | None) -> None:
    refs = _references(n_refs)
    placed, sizes, (W, H) = reference_images(refs, OUTPUT_RESOLUTION)
    expected = _pipeline_latents(pipe, refs, scale, negative)
    cond = s21.encode_conditioning(pipe, "make the shapes red", placed, true_cfg_scale=scale, negative_prompt=negative)
    assert cond.do_true_cfg == (negative is not None and scale > 1)
    assert [(w, h) for (_, h, w) in [(s[0], s[1] * 16, s[2] * 16) for s in cond.ref_shapes]] == sizes
    ours = s21.denoise(
        pipe,
        cond,
        height=H,
        width=W,
        num_inference_steps=3,
        true_cfg_scale=scale,
        generator=torch.Generator().manual_seed(11),
    )
    diff = (ours - expected).abs().max().item()
    assert ours.shape == expected.shape and diff <= 1e-5, diff
    # the KV cache changes the computation's order, not its result
    uncached = s21.denoise(
        pipe,
        cond,
        height=H,
        width=W,
        num_inference_steps=3,
        true_cfg_scale=scale,
        generator=torch.Generator().manual_seed(11),
        use_kv_cache=False,
    )
    assert (uncached - ours).abs().max().item() <= 1e-4


def test_cached_embeddings_give_the_same_render_and_the_image_is_the_pipelines(pipe: Any) -> None:
    refs = _references(3)
    placed, _, (W, H) = reference_images(refs, OUTPUT_RESOLUTION)
    text = prompt_tensors(pipe.text_encoder, pipe.processor, "prompt", "make the shapes red", placed, torch.float32)
    text |= prompt_tensors(pipe.text_encoder, pipe.processor, "negative", "blurry", placed, torch.float32)
    live = s21.encode_conditioning(pipe, "make the shapes red", placed, true_cfg_scale=3.0, negative_prompt="blurry")
    cached = s21.cached_conditioning(pipe, text, placed, true_cfg_scale=3.0)
    assert torch.equal(live.prompt_embeds_BLD, cached.prompt_embeds_BLD)
    assert torch.equal(live.image_pad_mask_BL, cached.image_pad_mask_BL)
    assert cached.negative_embeds_BLD is not None and live.negative_embeds_BLD is not None
    assert torch.equal(live.negative_embeds_BLD, cached.negative_embeds_BLD)
    kwargs: dict[str, Any] = dict(height=H, width=W, num_inference_steps=3, true_cfg_scale=3.0)
    a = s21.denoise(pipe, live, generator=torch.Generator().manual_seed(5), **kwargs)
    b = s21.denoise(pipe, cached, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a, b)
    image = s21.decode(pipe, a, H, W)
    rgba = pipe(
        "make the shapes red",
        image=refs,
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        num_inference_steps=3,
        output_resolution=OUTPUT_RESOLUTION,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    assert rgba.mode == "RGBA" and image.mode == "RGB" and image.size == rgba.size == (W, H)
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    assert list(image.getdata()) == list(white.getdata())
    with pytest.raises(ValueError, match="negative prompt"):
        s21.cached_conditioning(pipe, {k: v for k, v in text.items() if "negative" not in k}, placed, true_cfg_scale=3)


def test_text_to_image_and_references_off_the_grid(pipe: Any, tmp_path: Path) -> None:
    cond = s21.encode_conditioning(pipe, "a red square", [], true_cfg_scale=1.0)
    assert cond.ref_tokens_BNC is None and not bool(cond.image_pad_mask_BL.any())
    expected = pipe(
        "a red square",
        num_inference_steps=2,
        height=64,
        width=96,
        output_type="latent",
        generator=torch.Generator().manual_seed(2),
    ).images
    ours = s21.denoise(
        pipe,
        cond,
        height=64,
        width=96,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(2),
    )
    assert (ours - expected).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="multiples of 32"):
        s21.encode_conditioning(pipe, "x", [Image.new("RGB", (48, 64))], true_cfg_scale=1.0)
