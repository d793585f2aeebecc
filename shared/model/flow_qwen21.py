"""The flow-matching step of Qwen-Image-2.1 training: the transformer's input built as ``QwenImage21Pipeline``
builds it for one denoising step (no KV cache), and the loss on the target's tokens.

Legend: B batch, C latent channels (64; 8 in the tiny model), h/w latent size (pixels/16), N image tokens, L text
(VLM) tokens after the system prefix, D text width.

x_t = (1 - s)·x0 + s·noise, the transformer predicts the velocity noise - x0 (as in ``shared.model.flow``). Unlike
the edit models, 2.1 runs one joint sequence: the VLM's prompt embeddings with each reference's latent tokens
dropped into that reference's ``<|image_pad|>`` slots (one slot per 2x2 latent tokens), and the noisy target's
tokens appended last. Latents are packed by a plain flatten (no 2x2 patchify). ``hidden_states`` is the
references' tokens in order, then the target's; ``img_shapes`` lists the references then the target;
``img_mask`` is the prompt's ``image_pad_mask`` with one slot per 2x2 target tokens appended. The transformer
reads only row 0 of ``img_shapes``/``img_mask``, so every sample of a batch shares the references' count and sizes
and the target's size (``collate_qwen21`` checks). Prompts of different lengths are right-padded with zeros and
masked, as the pipeline pads them; the padding still advances RoPE positions, so a padded sample's prediction
drifts slightly (~1e-3) from the same sample run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.errors import InvalidInput
from shared.model.flow import EditBatch

SLOT_TOKENS = 4  # one VLM image slot stands for 2x2 latent tokens


@dataclass
class Qwen21Sample:
    """One cached edit: normalised latents ((z - mean) / std, as the pipeline's ``_encode_vae_image``) and the
    prompt as ``QwenImage21Pipeline.encode_prompt`` returns it for one sample (unpadded)."""

    latents_Chw: torch.Tensor  # the target
    refs_Chw: list[torch.Tensor]  # the references, in prompt order
    prompt_embeds_LD: torch.Tensor
    image_pad_mask_L: torch.Tensor  # bool: True at the references' <|image_pad|> slots
    key: str = ""


# A Qwen-Image-2.1 batch is an ``EditBatch`` with its ``image_pad_mask_BL`` (bool, False on padding), sharing one
# layout: the target size and the references' count and sizes. Prompts are right-padded with zeros
# (``prompt_mask_BL`` 0 there, the pipeline's prompt_embeds_mask); ``text_all_valid``: no padding, so the
# transformer gets no mask, as the pipeline passes None when nothing is padded.
Qwen21Batch = EditBatch


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def collate_qwen21(samples: list[Qwen21Sample]) -> EditBatch:
    """Stack samples into a batch, padding prompts as the pipeline pads them (zeros on the right, mask 0, no image
    slot). InvalidInput when the samples do not share one layout, or a sample's slots do not fit its references."""
    if not samples:
        raise InvalidInput("Qwen-Image-2.1 batch: no samples")
    first = samples[0]
    for i, s in enumerate(samples):
        name = s.key or f"sample {i}"
        if s.prompt_embeds_LD.dim() != 2 or _shape(s.image_pad_mask_L) != _shape(s.prompt_embeds_LD)[:1]:
            raise InvalidInput(
                f"Qwen-Image-2.1 batch: {name} has prompt embeddings {_shape(s.prompt_embeds_LD)} and an "
                f"image_pad_mask {_shape(s.image_pad_mask_L)}; expected (L, D) and (L,)"
            )
        slots = int(s.image_pad_mask_L.sum())
        tokens = sum(r.shape[-2] * r.shape[-1] for r in s.refs_Chw)
        if slots * SLOT_TOKENS != tokens:
            raise InvalidInput(
                f"Qwen-Image-2.1 batch: {name}'s prompt has {slots} image slots but its "
                f"{len(s.refs_Chw)} references have {tokens} latent tokens ({SLOT_TOKENS} per slot expected)"
            )
        h, w = s.latents_Chw.shape[-2:]
        if h % 2 or w % 2:
            raise InvalidInput(
                f"Qwen-Image-2.1 batch: {name}'s target latent is {h}x{w}; it must be even (pixels a multiple of 32)"
            )
        if i == 0:
            continue
        if _shape(s.latents_Chw) != _shape(first.latents_Chw):
            raise InvalidInput(
                f"Qwen-Image-2.1 batch: {name}'s target latent {_shape(s.latents_Chw)} differs from "
                f"{_shape(first.latents_Chw)}; a batch shares the target size"
            )
        ref_shapes = [_shape(r) for r in s.refs_Chw]
        first_shapes = [_shape(r) for r in first.refs_Chw]
        if ref_shapes != first_shapes:
            raise InvalidInput(
                f"Qwen-Image-2.1 batch: {name} has references {ref_shapes} but the batch's first sample has "
                f"{first_shapes}; the transformer reads one layout per batch, so samples must share the references' "
                f"count and sizes"
            )
    longest = max(s.prompt_embeds_LD.shape[0] for s in samples)

    def pad(t: torch.Tensor, value: float | bool) -> torch.Tensor:
        extra = longest - t.shape[0]
        if not extra:
            return t
        return torch.cat([t, t.new_full((extra, *t.shape[1:]), value)], dim=0)

    image_pad_mask_BL = torch.stack([pad(s.image_pad_mask_L.bool(), False) for s in samples])
    if not bool((image_pad_mask_BL == image_pad_mask_BL[:1]).all()):
        raise InvalidInput(
            "Qwen-Image-2.1 batch: the samples' image slots sit at different prompt positions; the transformer "
            "reads one layout per batch"
        )
    lengths = [s.prompt_embeds_LD.shape[0] for s in samples]
    prompt_mask_BL = torch.stack([(torch.arange(longest) < n).to(torch.int64) for n in lengths]).to(
        first.prompt_embeds_LD.device
    )
    return EditBatch(
        latents_BChw=torch.stack([s.latents_Chw for s in samples]),
        refs_BChw=[torch.stack([s.refs_Chw[k] for s in samples]) for k in range(len(first.refs_Chw))],
        prompt_embeds_BLD=torch.stack([pad(s.prompt_embeds_LD, 0.0) for s in samples]),
        prompt_mask_BL=prompt_mask_BL,
        image_pad_mask_BL=image_pad_mask_BL,
        keys=[s.key for s in samples],
        text_all_valid=all(n == longest for n in lengths),
    )


def pack_qwen21(latents_BChw: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C): the pipeline's ``_pack_latents`` (a row-major flatten, no patchify)."""
    return latents_BChw.flatten(2).transpose(1, 2)


def unpack_qwen21(tokens_BNC: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_qwen21`` for an h x w latent."""
    B, N, C = tokens_BNC.shape
    if N != h * w:
        raise ValueError(f"{N} tokens cannot be a {h}x{w} latent")
    return tokens_BNC.transpose(1, 2).reshape(B, C, h, w)


def img_shapes_qwen21(batch: EditBatch) -> list[list[tuple[int, int, int]]]:
    """The references' (1, h, w) in order, then the target's; the same list for every sample."""
    shapes = [(1, int(r.shape[-2]), int(r.shape[-1])) for r in batch.refs_BChw]
    h, w = batch.latents_BChw.shape[-2:]
    return [[*shapes, (1, int(h), int(w))]] * batch.latents_BChw.shape[0]


def img_mask_qwen21(batch: EditBatch) -> torch.Tensor:
    """The prompt's image_pad_mask with one slot per 2x2 target tokens appended (the pipeline's
    ``append_target_slots``)."""
    h, w = batch.latents_BChw.shape[-2:]
    if batch.image_pad_mask_BL is None:
        raise ValueError("not a Qwen-Image-2.1 batch: it has no image_pad_mask")
    mask_BL = batch.image_pad_mask_BL.bool()
    return torch.cat([mask_BL, mask_BL.new_ones(mask_BL.shape[0], h * w // SLOT_TOKENS)], dim=1)


def predict_velocity_qwen21(
    transformer: torch.nn.Module,
    batch: EditBatch,
    noisy_target_BNC: torch.Tensor,
    sigma_B: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run the transformer on [reference tokens… | noisy target] in the prompt's joint sequence and return the
    target tokens' predicted velocity (B, N_target, C). ``sigma_B`` in [0, 1] is the timestep the transformer takes
    (the pipeline passes t / 1000). ``dtype``: the compute dtype of the inputs (default: the noisy target's)."""
    dtype = dtype or noisy_target_BNC.dtype
    n_target = noisy_target_BNC.shape[1]
    h, w = batch.latents_BChw.shape[-2:]
    if n_target != h * w:
        raise ValueError(f"noisy target has {n_target} tokens; the batch's {h}x{w} target latent has {h * w}")
    hidden_BNC = torch.cat([*(pack_qwen21(r) for r in batch.refs_BChw), noisy_target_BNC], dim=1).to(dtype)
    mask = None if batch.text_all_valid else batch.prompt_mask_BL
    out_BNC: torch.Tensor = transformer(
        hidden_states=hidden_BNC,
        encoder_hidden_states=batch.prompt_embeds_BLD.to(dtype),
        timestep=sigma_B.to(dtype),
        img_shapes=img_shapes_qwen21(batch),
        img_mask=img_mask_qwen21(batch),
        encoder_hidden_states_mask=mask,
        return_dict=False,
    )[0]
    return out_BNC[:, -n_target:]


def flow_matching_loss_qwen21(
    transformer: torch.nn.Module,
    batch: EditBatch,
    sigma_B: torch.Tensor,
    noise: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    reduce: bool = True,
) -> torch.Tensor:
    """MSE (fp32) on the target's tokens between the predicted velocity and noise - x0 at ``sigma_B``; per-sample
    when not ``reduce``. ``noise``: packed (B, N, C) or as the latents (B, C, h, w)."""
    x0_BNC = pack_qwen21(batch.latents_BChw).float()
    noise_BNC = (pack_qwen21(noise) if noise.dim() == 4 else noise).float()
    if noise_BNC.shape != x0_BNC.shape:
        raise ValueError(f"noise {tuple(noise.shape)} does not match the target's tokens {tuple(x0_BNC.shape)}")
    s = sigma_B.view(-1, 1, 1).float()
    noisy_BNC = (1 - s) * x0_BNC + s * noise_BNC
    pred_BNC = predict_velocity_qwen21(transformer, batch, noisy_BNC, sigma_B, dtype)
    err = F.mse_loss(pred_BNC.float(), noise_BNC - x0_BNC, reduction="none")
    return err.mean() if reduce else err.mean(dim=(1, 2))
