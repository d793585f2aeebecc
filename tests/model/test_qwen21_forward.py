"""The Qwen-Image-2.1 training forward (``shared.model.flow_qwen21``) against the real pipeline, on the tiny model.

1. The transformer call the training forward makes is the pipeline's call for one denoising step (KV cache off):
   the same hidden_states, encoder_hidden_states, img_shapes, img_mask, timestep, and a bit-identical prediction,
   with the references' latents and the prompt recomputed by the pipeline's own methods.
2. Every reference reaches the model: changing any one changes the prediction, and the transformer sees
   references + 1 image blocks.
3. The loss is the hand-computed MSE on the target's tokens; gradients reach a peft LoRA, and gradient
   checkpointing changes neither the loss nor the gradients.
4. A batch of two equals the two samples run alone (exactly for prompts of equal length; a padded prompt drifts,
   since RoPE positions advance over padding), and a batch of different reference layouts is refused by name.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from PIL import Image

from shared.data.geometry import qwen21_sizes
from shared.errors import InvalidInput
from shared.model.flow_qwen21 import (
    Qwen21Batch,
    Qwen21Sample,
    collate_qwen21,
    flow_matching_loss_qwen21,
    pack_qwen21,
    predict_velocity_qwen21,
    unpack_qwen21,
)
from shared.model.loading import processor_without_video
from shared.model.tiny_qwen21 import save_tiny_qwen21

PROMPT = "make it red"
RESOLUTION = 96
REF_PIXELS = [(96, 64), (64, 64), (64, 128)]  # placed at 128x64, 96x96, 64x128 (three sizes); target 64x128


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

    root = save_tiny_qwen21(tmp_path_factory.mktemp("qi21fwd") / "model")
    processor_without_video()
    return QwenImage21Pipeline.from_pretrained(root)


def _images(seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for w, h in REF_PIXELS:
        pixels = (torch.rand(h, w, 4, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels, "RGBA"))
    return out


class Capture:
    """The kwargs and output of every transformer call while installed."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.handle = transformer.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        kept = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.calls.append((kept, output[0].detach().clone()))

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def pipeline_step(pipe: Any) -> dict[str, Any]:
    """One denoising step of the pipeline (its transformer call), and the inputs recomputed with its methods."""
    images = _images(seed=3)
    sizes, target = qwen21_sizes([im.size for im in images], RESOLUTION)
    assert len(set(sizes)) == 3
    with Capture(pipe.transformer) as cap, torch.no_grad():
        pipe(
            PROMPT,
            image=images,
            num_inference_steps=1,
            output_resolution=RESOLUTION,
            generator=torch.Generator().manual_seed(0),
            use_kv_cache=False,
            output_type="latent",
        )
    assert len(cap.calls) == 1
    kwargs, out = cap.calls[0]
    with torch.no_grad():  # the pipeline's own preprocessing, step by step (P:657-672, 429-450)
        resized = [pipe.image_processor.resize(im, width=w, height=h) for im, (w, h) in zip(images, sizes, strict=True)]
        embeds, embeds_mask, image_pad_mask = pipe.encode_prompt(PROMPT, image=resized)
        refs = []
        for im, (w, h) in zip(images, sizes, strict=True):
            pixels = pipe.image_processor.preprocess(im, width=w, height=h).unsqueeze(2)
            refs.append(pipe._encode_vae_image(pixels, None)[0, :, 0])  # (C, h, w), normalised
    assert embeds_mask is None  # one prompt: nothing padded
    th, tw = target[1] // 16, target[0] // 16
    return {
        "kwargs": kwargs,
        "noise_pred": out[:, -th * tw :],
        "sample": Qwen21Sample(
            latents_Chw=torch.randn(refs[0].shape[0], th, tw, generator=torch.Generator().manual_seed(1)),
            refs_Chw=refs,
            prompt_embeds_LD=embeds[0],
            image_pad_mask_L=image_pad_mask[0],
            key="a",
        ),
    }


def _with_noisy(step: dict[str, Any]) -> tuple[Qwen21Batch, torch.Tensor, torch.Tensor]:
    """The sample as a batch of one, the pipeline's noisy target tokens and its timestep."""
    kwargs = step["kwargs"]
    n = step["noise_pred"].shape[1]
    return collate_qwen21([step["sample"]]), kwargs["hidden_states"][:, -n:], kwargs["timestep"]


def test_the_training_forward_is_the_pipelines_transformer_call(pipe: Any, pipeline_step: dict[str, Any]) -> None:
    kwargs = pipeline_step["kwargs"]
    sample: Qwen21Sample = pipeline_step["sample"]
    n_refs = sum(r.shape[1] * r.shape[2] for r in sample.refs_Chw)
    # the recomputed inputs are the ones the pipeline handed its transformer
    assert torch.equal(kwargs["encoder_hidden_states"][0], sample.prompt_embeds_LD)
    assert kwargs["encoder_hidden_states_mask"] is None
    assert torch.equal(kwargs["img_mask"][0, : sample.image_pad_mask_L.shape[0]], sample.image_pad_mask_L)
    refs_tokens = torch.cat([pack_qwen21(r[None]) for r in sample.refs_Chw], dim=1)
    assert torch.equal(kwargs["hidden_states"][:, :n_refs], refs_tokens)
    assert kwargs.get("kv_cache") is None and kwargs.get("kv_cache_mode") is None

    batch, noisy, timestep = _with_noisy(pipeline_step)
    with Capture(pipe.transformer) as cap, torch.no_grad():
        pred = predict_velocity_qwen21(pipe.transformer, batch, noisy, timestep)
    ours = cap.calls[0][0]
    for name in ("hidden_states", "encoder_hidden_states", "img_mask", "timestep"):
        assert ours[name].dtype == kwargs[name].dtype and torch.equal(ours[name], kwargs[name]), name
    assert ours["img_shapes"] == kwargs["img_shapes"]
    assert ours["encoder_hidden_states_mask"] is None
    assert pred.shape == pipeline_step["noise_pred"].shape
    assert torch.equal(pred, pipeline_step["noise_pred"])  # bit-identical to the pipeline's noise_pred

    # the pipeline's default first step (KV cache on, "extract" mode: a full prefill) predicts the same, bit for bit
    with Capture(pipe.transformer) as cap, torch.no_grad():
        pipe(
            PROMPT,
            image=_images(seed=3),
            num_inference_steps=1,
            output_resolution=RESOLUTION,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    cached_kwargs, cached_out = cap.calls[0]
    assert cached_kwargs["kv_cache_mode"] == "extract"
    assert torch.equal(cached_out[:, -pred.shape[1] :], pred)


def test_every_reference_reaches_the_model(
    pipe: Any, pipeline_step: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, noisy, sigma = _with_noisy(pipeline_step)
    blocks: list[int] = []
    original = pipe.transformer.build_token_metadata

    def counting(image_pad_mask: torch.Tensor, img_shapes: Any) -> Any:
        image_ids, target = original(image_pad_mask, img_shapes)
        blocks.append(int(image_ids.max()) + 1)  # block ids 0..n-1 of the tokens the transformer placed
        return image_ids, target

    monkeypatch.setattr(pipe.transformer, "build_token_metadata", counting)
    with torch.no_grad():
        base = predict_velocity_qwen21(pipe.transformer, batch, noisy, sigma)
        assert blocks == [len(batch.refs_BChw) + 1] == [4]
        g = torch.Generator().manual_seed(7)
        for k in range(len(batch.refs_BChw)):
            refs = list(batch.refs_BChw)
            refs[k] = refs[k] + torch.randn(refs[k].shape, generator=g)
            changed = Qwen21Batch(**{**batch.__dict__, "refs_BChw": refs})
            diff = (predict_velocity_qwen21(pipe.transformer, changed, noisy, sigma) - base).abs().max()
            assert diff > 1e-4, (k, diff)


def test_the_loss_is_the_mse_on_the_target_and_trains_a_lora_with_checkpointing(
    pipe: Any, pipeline_step: dict[str, Any]
) -> None:
    from peft import LoraConfig

    batch = collate_qwen21([pipeline_step["sample"]])
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(batch.latents_BChw.shape, generator=g)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        loss = flow_matching_loss_qwen21(pipe.transformer, batch, sigma, noise)
        x0 = batch.latents_BChw.flatten(2).transpose(1, 2)
        eps = noise.flatten(2).transpose(1, 2)
        pred = predict_velocity_qwen21(pipe.transformer, batch, 0.3 * x0 + 0.7 * eps, sigma)
        assert pred.shape == x0.shape  # only the target's tokens
        by_hand = ((pred - (eps - x0)) ** 2).mean()
        assert torch.allclose(loss, by_hand, rtol=1e-6, atol=0)  # 1 - 0.7 vs 0.3 differ in the last bit
        packed = flow_matching_loss_qwen21(pipe.transformer, batch, sigma, pack_qwen21(noise))
        assert torch.equal(loss, packed)  # packed noise or latent-shaped noise: the same loss
    assert torch.equal(unpack_qwen21(pack_qwen21(noise), *noise.shape[-2:]), noise)

    transformer = copy.deepcopy(pipe.transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    transformer.train()
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 4 * len(transformer.transformer_blocks)
    with torch.no_grad():  # lora_B starts at zero; give it weights so lora_A gets gradients too
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(hash(n) % 1000))

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        transformer.zero_grad(set_to_none=True)
        value = flow_matching_loss_qwen21(transformer, batch, sigma, noise)
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in lora.items() if p.grad is not None}

    plain, plain_grads = loss_and_grads()
    transformer.enable_gradient_checkpointing()
    assert transformer.gradient_checkpointing
    checkpointed, ckpt_grads = loss_and_grads()
    assert loss.dtype == plain.dtype == torch.float32 and plain.dim() == 0
    assert torch.equal(plain, checkpointed)
    assert plain_grads.keys() == ckpt_grads.keys() == lora.keys()  # every LoRA weight gets a gradient
    assert all(g.abs().max() > 0 for g in plain_grads.values())
    for n in lora:
        assert torch.allclose(plain_grads[n], ckpt_grads[n], rtol=1e-5, atol=1e-7), n


def _other(sample: Qwen21Sample, seed: int, extra_text: int = 0) -> Qwen21Sample:
    """Another sample with the same layout: new latents and prompt values; ``extra_text`` more prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    embeds = sample.prompt_embeds_LD + torch.randn(sample.prompt_embeds_LD.shape, generator=g)
    mask = sample.image_pad_mask_L
    if extra_text:
        embeds = torch.cat([embeds, torch.randn(extra_text, embeds.shape[1], generator=g)])
        mask = torch.cat([mask, mask.new_zeros(extra_text)])
    return Qwen21Sample(
        latents_Chw=torch.randn(sample.latents_Chw.shape, generator=g),
        refs_Chw=[torch.randn(r.shape, generator=g) for r in sample.refs_Chw],
        prompt_embeds_LD=embeds,
        image_pad_mask_L=mask,
        key=f"s{seed}",
    )


def _alone_and_batched(pipe: Any, samples: list[Qwen21Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    batch = collate_qwen21(samples)
    noisy = torch.randn(pack_qwen21(batch.latents_BChw).shape, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        together = predict_velocity_qwen21(pipe.transformer, batch, noisy, sigma)
        alone = torch.cat(
            [
                predict_velocity_qwen21(pipe.transformer, collate_qwen21([s]), noisy[i : i + 1], sigma[i : i + 1])
                for i, s in enumerate(samples)
            ]
        )
    return together, alone


def test_a_batch_equals_its_samples_alone_and_layouts_must_match(pipe: Any, pipeline_step: dict[str, Any]) -> None:
    first: Qwen21Sample = pipeline_step["sample"]
    # equal prompt lengths: no padding, no mask, the batch is the two samples exactly
    together, alone = _alone_and_batched(pipe, [first, _other(first, 1)])
    assert torch.equal(together, alone), (together - alone).abs().max()

    # prompts of different lengths: the short one is right-padded and masked as the pipeline pads it; masked keys
    # drop out of attention, but RoPE positions still advance over the padding, so the padded sample's target sits
    # 3 positions later than alone (the longer sample is exact)
    longer = _other(first, 2, extra_text=3)
    batch = collate_qwen21([first, longer])
    assert batch.text_all_valid is False and batch.prompt_mask_BL.dtype == torch.int64
    assert batch.prompt_mask_BL.sum(1).tolist() == [first.prompt_embeds_LD.shape[0], longer.prompt_embeds_LD.shape[0]]
    assert torch.equal(batch.prompt_embeds_BLD[0, -3:], torch.zeros_like(batch.prompt_embeds_BLD[0, -3:]))
    together, alone = _alone_and_batched(pipe, [first, longer])
    assert torch.equal(together[1], alone[1])
    drift = (together[0] - alone[0]).abs().max().item()
    assert 0 < drift < 0.05 * alone[0].abs().max().item(), drift  # RoPE drift, not a different prediction

    moved = _other(first, 3)
    moved.refs_Chw[1] = torch.randn(moved.refs_Chw[1].shape[0], 4, 8)  # 96x96 reference replaced by a 128x64
    moved.refs_Chw[2] = torch.randn(moved.refs_Chw[2].shape[0], 6, 6)  # same slot count, other sizes
    with pytest.raises(InvalidInput, match=r"s3 has references .* share the references' count and sizes"):
        collate_qwen21([first, moved])
    fewer = _other(first, 4)
    fewer.refs_Chw = fewer.refs_Chw[:1] + [torch.randn(fewer.refs_Chw[0].shape[0], 2, 34)]  # two refs, same slots
    with pytest.raises(InvalidInput, match=r"s4 has references"):
        collate_qwen21([first, fewer])
    with pytest.raises(InvalidInput, match=r"image slots but its"):
        collate_qwen21(
            [Qwen21Sample(first.latents_Chw, first.refs_Chw[:2], first.prompt_embeds_LD, first.image_pad_mask_L)]
        )
