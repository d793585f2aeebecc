"""Cached latents and embeddings equal what diffusers' own edit pipelines compute for the same image and prompt.

Tolerance: both sides run the same torch ops on the same inputs in the same order on the CPU, so they are
compared bit-exactly (atol=rtol=0) wherever the batch composition is the same. The one place where it is not (a
batched two-prompt pipeline encode against our one-sample-at-a-time encode) uses atol=1e-5, rtol=1e-5.
Our side always runs on a pipeline loaded *without* the transformer, as the encoder service does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from PIL import Image

from shared import errors
from shared.config.flavours import get_flavour
from shared.encode.ops import encode_null_prompt, encode_prompt, encode_vae_latents, reference_size
from shared.model.latents import latent_img_shape, pack_latents, unpack_latents
from shared.model.loading import load_encoder_pipeline, load_pipeline
from shared.model.tiny_model import get_tiny_model

EXACT = dict(atol=0.0, rtol=0.0)
BATCHED = dict(atol=1e-5, rtol=1e-5)
SMALL_AREA = 96 * 96  # reference area for the tests' own calls: a 1 MP tiny-VAE encode costs ~2.7 s on a CPU


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny-models"


@pytest.fixture(scope="session")
def full(tiny_root: Path) -> dict[str, Any]:
    """Complete pipelines: the reference implementation."""
    return {f: load_pipeline(get_tiny_model(f, tiny_root), f) for f in ("edit-v1", "edit-v2")}


@pytest.fixture(scope="session")
def enc(tiny_root: Path) -> dict[str, Any]:
    """Transformer-less pipelines: what the code under test gets."""
    return {f: load_encoder_pipeline(get_tiny_model(f, tiny_root), f) for f in ("edit-v1", "edit-v2")}


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def _pipeline_image_arg(pipe: Any, flavour: str, refs: list[Image.Image], area: int) -> Any:
    """The prompt images exactly as the pipelines' __call__ prepares them, written out independently here."""
    sized = []
    for r in refs:
        w, h = reference_size(r.width, r.height, area)
        sized.append(pipe.image_processor.resize(r, h, w))
    return sized[0] if flavour == "edit-v1" else sized


def _spy_on_call(pipe: Any, monkeypatch: pytest.MonkeyPatch, **call: Any) -> dict[str, Any]:
    """Run the pipeline and record what its own encode paths saw and produced: prompt embeddings, the pixels
    handed to the VAE, the packed reference latents."""
    seen: dict[str, Any] = {"vae_pixels": []}
    encode_prompt, prepare_latents, encode_vae = pipe.encode_prompt, pipe.prepare_latents, pipe._encode_vae_image

    def spy_encode_prompt(*args: Any, **kwargs: Any) -> Any:
        out = encode_prompt(*args, **kwargs)
        seen["prompt_embeds"] = out[0]
        return out

    def spy_prepare_latents(*args: Any, **kwargs: Any) -> Any:
        out = prepare_latents(*args, **kwargs)
        seen["image_latents"] = out[1]
        return out

    def spy_encode_vae(image: torch.Tensor, generator: Any) -> torch.Tensor:
        seen["vae_pixels"].append(image)
        return encode_vae(image=image, generator=generator)

    monkeypatch.setattr(pipe, "encode_prompt", spy_encode_prompt)
    monkeypatch.setattr(pipe, "_encode_vae_image", spy_encode_vae)
    monkeypatch.setattr(pipe, "prepare_latents", spy_prepare_latents)
    pipe(
        num_inference_steps=2,
        true_cfg_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **call,
    )
    return seen


def _our_reference_tokens(pipe: Any, refs: list[Image.Image], area: int) -> torch.Tensor:
    tokens = []
    for r in refs:
        w, h = reference_size(r.width, r.height, area)
        tokens.append(pack_latents(encode_vae_latents(pipe.vae, pipe.image_processor, [r], h, w)))
    return torch.cat(tokens, dim=1)


# --- against the pipelines' full __call__: proves the sizing rules as well as the math -------------------------


def test_v1_matches_the_pipeline_call(full: dict, enc: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """edit-v1 hard-codes 1024*1024 for its reference (VL encoder and VAE alike): the flavour's defaults.

    The VAE side is checked on its input pixels (size and preprocessing): re-encoding 1 MP here would double the
    test's cost, and the VAE math itself is compared exactly in test_vae_latents_match_pipeline_encode_vae_image.
    """
    ref = noise(120, 80, seed=1)
    seen = _spy_on_call(full["edit-v1"], monkeypatch, image=ref, prompt="make the sky blue", height=64, width=64)
    flav = get_flavour("edit-v1")
    embeds, _ = encode_prompt(enc["edit-v1"], "edit-v1", ["make the sky blue"], [[ref]])
    torch.testing.assert_close(embeds, seen["prompt_embeds"], **EXACT)
    w, h = reference_size(ref.width, ref.height, flav.vae_ref_area)
    [pixels] = seen["vae_pixels"]
    assert pixels.shape == (1, 3, 1, h, w) == (1, 3, 1, 832, 1248)
    torch.testing.assert_close(pixels, enc["edit-v1"].image_processor.preprocess(ref, h, w).unsqueeze(2), **EXACT)


def test_v2_matches_the_pipeline_call(full: dict, enc: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Plus pipeline sizes the VL view (CONDITION_IMAGE_SIZE) and the VAE view (VAE_IMAGE_SIZE) of each
    reference separately, from the original image. VAE_IMAGE_SIZE is shrunk here only to keep the test fast."""
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", SMALL_AREA)
    refs = [noise(120, 80, seed=1), noise(64, 96, seed=2), noise(80, 80, seed=3)]
    seen = _spy_on_call(full["edit-v2"], monkeypatch, image=refs, prompt="add a red hat", height=64, width=64)
    embeds, _ = encode_prompt(enc["edit-v2"], "edit-v2", ["add a red hat"], [refs])  # default: 384*384
    torch.testing.assert_close(embeds, seen["prompt_embeds"], **EXACT)
    torch.testing.assert_close(_our_reference_tokens(enc["edit-v2"], refs, SMALL_AREA), seen["image_latents"], **EXACT)
    assert len(seen["vae_pixels"]) == 3  # one VAE encode per reference, each at its own size


# --- against the pipelines' encode methods --------------------------------------------------------------------


@pytest.mark.parametrize(("flavour", "n_refs"), [("edit-v1", 1), ("edit-v2", 1), ("edit-v2", 2), ("edit-v2", 3)])
def test_prompt_embeds_match_pipeline_encode_prompt(full: dict, enc: dict, flavour: str, n_refs: int) -> None:
    refs = [noise(100 + 20 * i, 70, seed=10 + i) for i in range(n_refs)]
    pipe = full[flavour]
    with torch.no_grad():
        want, want_mask = pipe.encode_prompt(
            "turn it into a watercolor painting", image=_pipeline_image_arg(pipe, flavour, refs, SMALL_AREA)
        )
    embeds, mask = encode_prompt(
        enc[flavour], flavour, ["turn it into a watercolor painting"], [refs], vl_ref_area=SMALL_AREA
    )
    torch.testing.assert_close(embeds, want, **EXACT)
    assert want_mask is None  # the pipeline drops an all-ones mask; ours is explicit
    assert mask.dtype == torch.long and bool(mask.all())
    assert embeds.shape == (1, mask.shape[1], 32) and embeds.dtype == torch.float32


def test_batched_prompts_are_padded_per_sample(full: dict, enc: dict) -> None:
    """One sample at a time, zero-padded: each row is that sample's own encoding, whatever else is in the batch."""
    prompts = ["remove the dog", "make the sky blue, add a red hat, turn it into a watercolor painting"]
    refs = [[noise(96, 64, seed=20)], [noise(64, 96, seed=21)]]
    embeds, mask = encode_prompt(enc["edit-v1"], "edit-v1", prompts, refs, vl_ref_area=SMALL_AREA)
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == embeds.shape[1]
    assert bool((embeds[0, lengths[0] :] == 0).all())
    for b in range(2):
        alone, _ = encode_prompt(enc["edit-v1"], "edit-v1", prompts[b : b + 1], refs[b : b + 1], vl_ref_area=SMALL_AREA)
        torch.testing.assert_close(embeds[b : b + 1, : lengths[b]], alone, **EXACT)
    # diffusers' v1 pipeline encodes the same batch in one padded forward pass: equal up to matmul shape effects
    pipe = full["edit-v1"]
    images = [_pipeline_image_arg(pipe, "edit-v1", r, SMALL_AREA) for r in refs]
    with torch.no_grad():
        want, want_mask = pipe.encode_prompt(prompts, image=images)
    torch.testing.assert_close(embeds, want, **BATCHED)
    torch.testing.assert_close(mask, want_mask, **EXACT)


def test_vae_latents_match_pipeline_encode_vae_image(full: dict, enc: dict) -> None:
    images = [noise(80, 48, seed=30), noise(64, 64, seed=31)]  # resized to 64x96 (H x W) like the pipeline does
    pipe = full["edit-v2"]
    with torch.no_grad():
        want_BC1hw = pipe._encode_vae_image(
            pipe.image_processor.preprocess(images, 64, 96).unsqueeze(2), generator=None
        )
    latents = encode_vae_latents(enc["edit-v2"].vae, enc["edit-v2"].image_processor, images, 64, 96)
    assert latents.shape == (2, 16, 8, 12) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, want_BC1hw.squeeze(2), **EXACT)


def test_vae_latents_are_the_mode_not_a_sample(enc: dict) -> None:
    pipe = enc["edit-v1"]
    img = noise(64, 64, seed=32)
    a = encode_vae_latents(pipe.vae, pipe.image_processor, [img], 64, 64)
    torch.manual_seed(123)
    b = encode_vae_latents(pipe.vae, pipe.image_processor, [img], 64, 64)
    torch.testing.assert_close(a, b, **EXACT)


def test_non_rgb_images_are_converted(enc: dict) -> None:
    pipe = enc["edit-v1"]
    rgb = noise(64, 64, seed=33)
    rgba = rgb.convert("RGBA")
    torch.testing.assert_close(
        encode_vae_latents(pipe.vae, pipe.image_processor, [rgba], 64, 64),
        encode_vae_latents(pipe.vae, pipe.image_processor, [rgb], 64, 64),
        **EXACT,
    )


# --- every reference reaches the text encoder -------------------------------------------------------------------


def test_all_references_reach_the_text_encoder(enc: dict) -> None:
    a, b, c, c2 = (noise(80, 80, seed=s) for s in (40, 41, 42, 43))
    pipe = enc["edit-v2"]
    two, _ = encode_prompt(pipe, "edit-v2", ["add a red hat"], [[a, b]], vl_ref_area=SMALL_AREA)
    three, _ = encode_prompt(pipe, "edit-v2", ["add a red hat"], [[a, b, c]], vl_ref_area=SMALL_AREA)
    three_other, _ = encode_prompt(pipe, "edit-v2", ["add a red hat"], [[a, b, c2]], vl_ref_area=SMALL_AREA)
    assert three.shape[1] > two.shape[1]  # a third "Picture 3:" slot and its image tokens
    assert three.shape == three_other.shape
    assert not torch.allclose(three, three_other)  # the third image's pixels change the embedding
    swapped, _ = encode_prompt(pipe, "edit-v2", ["add a red hat"], [[b, a]], vl_ref_area=SMALL_AREA)
    assert not torch.allclose(two, swapped)  # and so does their order


def test_null_prompt_keeps_the_references(enc: dict) -> None:
    refs = [[noise(80, 80, seed=50), noise(96, 64, seed=51)]]
    pipe = enc["edit-v2"]
    null, null_mask = encode_null_prompt(pipe, "edit-v2", refs, vl_ref_area=SMALL_AREA)
    empty, _ = encode_prompt(pipe, "edit-v2", [""], refs, vl_ref_area=SMALL_AREA)
    captioned, _ = encode_prompt(pipe, "edit-v2", ["add a red hat"], refs, vl_ref_area=SMALL_AREA)
    torch.testing.assert_close(null, empty, **EXACT)
    assert null.shape[1] < captioned.shape[1]
    assert bool(null_mask.all())


# --- wrong reference counts are the user's error ----------------------------------------------------------------


@pytest.mark.parametrize(("flavour", "n_refs"), [("edit-v1", 0), ("edit-v1", 2), ("edit-v2", 0), ("edit-v2", 4)])
def test_wrong_number_of_references_is_invalid_input(enc: dict, flavour: str, n_refs: int) -> None:
    refs = [noise(64, 64, seed=60 + i) for i in range(n_refs)]
    with pytest.raises(errors.InvalidInput, match=f"{flavour} takes .* got {n_refs}"):
        encode_prompt(enc[flavour], flavour, ["x"], [refs], vl_ref_area=SMALL_AREA)


def test_caption_and_reference_counts_must_agree(enc: dict) -> None:
    with pytest.raises(errors.InvalidInput, match="2 captions but 1 reference lists"):
        encode_prompt(enc["edit-v1"], "edit-v1", ["a", "b"], [[noise(64, 64, seed=70)]])


# --- packing and sizes ----------------------------------------------------------------------------------------


def test_pack_latents_matches_diffusers() -> None:
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    latents_BChw = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(latents_BChw)
    assert tokens.shape == (2, 15, 64)
    for cls in (QwenImageEditPipeline, QwenImageEditPlusPipeline):
        want = cls._pack_latents(latents_BChw.unsqueeze(2), 2, 16, 6, 10)  # the pipelines keep a frame axis
        torch.testing.assert_close(tokens, want, **EXACT)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), latents_BChw, **EXACT)
    want_unpacked = QwenImageEditPipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), want_unpacked.squeeze(2), **EXACT)
    assert latent_img_shape(6, 10) == (1, 3, 5)


def test_pack_latents_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


@pytest.mark.parametrize(
    ("size", "area", "expected"),
    [
        ((1024, 1024), 1024 * 1024, (1024, 1024)),
        ((120, 80), 1024 * 1024, (1248, 832)),
        ((64, 96), 384 * 384, (320, 480)),
        ((80, 80), 96 * 96, (96, 96)),
    ],
)
def test_reference_size_follows_calculate_dimensions(
    size: tuple[int, int], area: int, expected: tuple[int, int]
) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    w, h = reference_size(*size, area)
    assert (w, h) == expected == tuple(calculate_dimensions(area, size[0] / size[1]))
    assert w % 32 == 0 and h % 32 == 0
