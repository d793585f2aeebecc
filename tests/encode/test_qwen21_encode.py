"""shared.encode.qwen21 computes what diffusers' QwenImage21Pipeline computes for the same inputs.

The reference side is the pipeline itself, loaded with ``QwenImage21Pipeline.from_pretrained`` from the tiny model
``save_tiny_qwen21`` writes: what its ``__call__`` hands ``_get_qwen_prompt_embeds`` and ``prepare_latents`` (read by
wrapping those methods on the instance), its ``_encode_vae_image`` and its ``encode_prompt``. Both sides run the same
torch ops on the same inputs on the CPU, so everything is compared bit-exactly (``torch.equal``, pixels equal).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from shared.encode.qwen21 import encode_target, prompt_embeddings, reference_images, vae_latents
from shared.model.loading import processor_without_video
from shared.model.tiny_qwen21 import save_tiny_qwen21

RESOLUTION = 64  # output_resolution for the tests: ~64x64 references, 4 vision slots each


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

    root = save_tiny_qwen21(tmp_path_factory.mktemp("qi21-encode") / "model")
    processor_without_video()
    return QwenImage21Pipeline.from_pretrained(root)


def _images(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    """Random pixels; every other image RGB (the pipeline makes RGBA of it), the rest RGBA with a random alpha."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        pixels = (torch.rand(h, w, 4, generator=g) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(pixels, "RGBA")
        out.append(img if i % 2 else img.convert("RGB"))
    return out


def _sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(40, 300), rng.randrange(40, 300)) for _ in range(count)]


def _pipeline_run(pipe: Any, prompt: str, images: list[Image.Image]) -> dict[str, Any]:
    """One one-step edit, recording what the pipeline encodes: the resized references its prompt encoder gets, the
    VAE inputs, the prompt embeddings and image_pad_mask, and the output image."""
    seen: dict[str, Any] = {}
    get_embeds, prepare = pipe._get_qwen_prompt_embeds, pipe.prepare_latents

    def spy_embeds(prompt: Any, image: Any = None, device: Any = None) -> Any:
        seen["vl_images"] = [im.copy() for im in image]
        seen["embeds"] = get_embeds(prompt, image, device)
        return seen["embeds"]

    def spy_prepare(images: Any, *args: Any, **kwargs: Any) -> Any:
        seen["vae_images"] = [t.clone() for t in images]
        return prepare(images, *args, **kwargs)

    pipe._get_qwen_prompt_embeds, pipe.prepare_latents = spy_embeds, spy_prepare
    try:
        seen["out"] = pipe(
            prompt,
            image=images,
            num_inference_steps=1,
            output_resolution=RESOLUTION,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    finally:
        del pipe._get_qwen_prompt_embeds, pipe.prepare_latents  # the class's methods again
    return seen


@pytest.mark.parametrize("count", [1, 3])
def test_references_latents_and_embeddings_are_what_the_pipeline_encodes(pipe: Any, count: int) -> None:
    images = _images(_sizes(count, seed=count), seed=count)
    seen = _pipeline_run(pipe, "make it red", images)

    resized, sizes, target = reference_images(images, RESOLUTION)
    assert target == seen["out"].size
    assert sizes == [im.size for im in seen["vl_images"]]
    for ours, theirs in zip(resized, seen["vl_images"], strict=True):
        assert ours.mode == theirs.mode == "RGBA"
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))

    latents = vae_latents(pipe.vae, resized, sizes)
    for ours, vae_in, (w, h) in zip(latents, seen["vae_images"], sizes, strict=True):
        theirs = pipe._encode_vae_image(vae_in, None)  # (1, C, 1, h, w)
        assert ours.dtype == torch.float32 and ours.shape == (pipe.latent_channels, h // 16, w // 16)
        assert torch.equal(ours, theirs[0, :, 0])

    embeds, image_pad_mask = prompt_embeddings(pipe.text_encoder, pipe.processor, "make it red", resized)
    theirs_embeds, theirs_mask, theirs_pad = seen["embeds"]
    assert bool(theirs_mask.all())  # one prompt: nothing padded
    assert torch.equal(embeds, theirs_embeds[0]) and torch.equal(image_pad_mask, theirs_pad[0])
    assert int(image_pad_mask.sum()) == sum(w * h // 32**2 for w, h in sizes)  # one slot per 32x32 pixels


def test_vae_latents_equal_encode_vae_image_on_the_pipelines_preprocess(pipe: Any) -> None:
    images = _images([(200, 90), (64, 130)], seed=5)
    resized, sizes, _ = reference_images(images, 96)
    ours = vae_latents(pipe.vae, resized, sizes)
    from_originals = vae_latents(pipe.vae, images, sizes)  # resized here exactly as reference_images resizes
    for o, orig, image, (w, h) in zip(ours, from_originals, images, sizes, strict=True):
        pixels = pipe.image_processor.preprocess(image.convert("RGBA"), width=w, height=h).unsqueeze(2)
        assert pixels.shape == (1, 4, 1, h, w)  # all four channels reach the VAE
        theirs = pipe._encode_vae_image(pixels, None)[0, :, 0]
        assert torch.equal(o, theirs) and torch.equal(orig, theirs)


def test_a_target_is_encoded_as_rgba_and_an_rgb_one_as_opaque(pipe: Any) -> None:
    rgba = _images([(96, 64), (96, 64)], seed=7)[1]
    rgb = rgba.convert("RGB")
    opaque = rgb.copy()
    opaque.putalpha(255)
    for image in (rgba, rgb):
        pixels = pipe.image_processor.preprocess(image.convert("RGBA"), width=96, height=64).unsqueeze(2)
        theirs = pipe._encode_vae_image(pixels, None)[0, :, 0]
        assert torch.equal(encode_target(pipe.vae, image, (96, 64)), theirs)
    assert torch.equal(encode_target(pipe.vae, rgb, (96, 64)), encode_target(pipe.vae, opaque, (96, 64)))
    assert not torch.equal(encode_target(pipe.vae, rgb, (96, 64)), encode_target(pipe.vae, rgba, (96, 64)))
    # a target at another size is resized first, as the references are
    assert encode_target(pipe.vae, rgba, (64, 32)).shape == (pipe.latent_channels, 2, 4)


@pytest.mark.parametrize("count", [0, 1, 3, 10])
@pytest.mark.parametrize("prompt", ["make the sky a deep red", ""])
def test_prompt_embeddings_equal_encode_prompt(pipe: Any, count: int, prompt: str) -> None:
    resized, sizes, _ = reference_images(_images(_sizes(count, seed=10 + count), seed=count), RESOLUTION)
    embeds, image_pad_mask = prompt_embeddings(pipe.text_encoder, pipe.processor, prompt, resized)
    theirs, mask, theirs_pad = pipe.encode_prompt(prompt=prompt, image=resized if count else None)
    assert mask is None  # one prompt: nothing padded
    assert embeds.dtype == torch.float32 and image_pad_mask.dtype == torch.bool
    assert embeds.shape == theirs.shape[1:] and torch.equal(embeds, theirs[0])
    assert torch.equal(image_pad_mask, theirs_pad[0])
    assert int(image_pad_mask.sum()) == sum(w * h // 32**2 for w, h in sizes)
    if count:  # the slots come in runs, one per reference, in order
        runs = torch.diff(image_pad_mask.int(), prepend=torch.zeros(1, dtype=torch.int)).eq(1).sum()
        assert int(runs) == count


def test_the_embeddings_are_the_pre_norm_hidden_states(pipe: Any) -> None:
    """Not ``hidden_states[-1]`` as transformers 5 returns it (after the final RMSNorm)."""
    embeds, _ = prompt_embeddings(pipe.text_encoder, pipe.processor, "a cat", [])
    inputs = pipe.processor(text=[pipe.prompt_template_t2i.format("a cat")], return_tensors="pt")
    with torch.no_grad():
        post_norm = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1][0, pipe._drop_idx :]
    assert embeds.shape == post_norm.shape and not torch.allclose(embeds, post_norm)


def test_the_references_order_is_kept(pipe: Any) -> None:
    a, b, c = _images([(96, 64), (96, 64), (64, 128)], seed=3)
    resized, _, _ = reference_images([a, b, c], RESOLUTION)
    swapped = [resized[1], resized[0], resized[2]]
    embeds, pad = prompt_embeddings(pipe.text_encoder, pipe.processor, "swap", resized)
    embeds_s, pad_s = prompt_embeddings(pipe.text_encoder, pipe.processor, "swap", swapped)
    assert torch.equal(pad, pad_s)  # same sizes in the same slots
    assert not torch.allclose(embeds, embeds_s)
    theirs, _, _ = pipe.encode_prompt(prompt="swap", image=swapped)
    assert torch.equal(embeds_s, theirs[0])


def test_the_vision_encoder_sees_the_alpha_as_white(pipe: Any) -> None:
    """A transparent reference reads as composited over white, not as its colour channels with the alpha dropped."""
    (rgba,) = reference_images(_images([(64, 64), (64, 64)], seed=9)[1:], RESOLUTION)[0]
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    embeds, _ = prompt_embeddings(pipe.text_encoder, pipe.processor, "x", [rgba])
    assert torch.equal(embeds, prompt_embeddings(pipe.text_encoder, pipe.processor, "x", [white])[0])
    assert not torch.equal(embeds, prompt_embeddings(pipe.text_encoder, pipe.processor, "x", [rgba.convert("RGB")])[0])
