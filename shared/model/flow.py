"""The flow-matching step of edit training, as plain functions over tensors (callable on CPU, no services).

Legend: B batch, C latent channels (16), h/w latent size, L tokens, D text width.

x_t = (1 - s)·x0 + s·noise, the transformer predicts the velocity noise - x0. The input sequence is the noisy
target's tokens followed by every reference's clean tokens; ``img_shapes`` lists the target then each reference,
so RoPE positions and (edit-v3) the zero_cond_t modulation see every image. The prediction is sliced back to the
target's tokens and the loss is an MSE in fp32.

A batch with an ``image_pad_mask_BL`` is Qwen-Image-2.1's joint sequence (``shared.model.flow_qwen21``): latents
flattened without patchify, the references inside the prompt's sequence and the target last. ``pack_for`` and
``predict_velocity`` follow the batch, so the trainer, scheduled sampling and previews run either layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from shared.model.latents import latent_img_shape, pack_latents


@dataclass
class EditBatch:
    """One batch from the cache: every sample shares the target bucket and the reference sizes."""

    latents_BChw: torch.Tensor
    refs_BChw: list[torch.Tensor]  # one tensor per reference slot
    prompt_embeds_BLD: torch.Tensor
    prompt_mask_BL: torch.Tensor
    keys: list[str]
    # Every caption token of the batch is real (decided on the host, where the loader built the mask): the
    # transformer then gets no mask and SDPA may use its fused kernels. None: not known, pass the mask.
    text_all_valid: bool | None = None
    # Qwen-Image-2.1 (joint sequence): bool, True at the prompt rows of the references' <|image_pad|> slots
    image_pad_mask_BL: torch.Tensor | None = None
    # masked loss: the loss's weight at each latent position of the target (conditioning_type mask), in [0, 1]
    loss_mask_Bhw: torch.Tensor | None = None

    @property
    def joint(self) -> bool:
        """Qwen-Image-2.1's layout (references inside the prompt's sequence), not the edit models'."""
        return self.image_pad_mask_BL is not None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], keys: list[str] | None = None) -> EditBatch:
        return EditBatch(
            fn(self.latents_BChw),
            [fn(r) for r in self.refs_BChw],
            fn(self.prompt_embeds_BLD),
            fn(self.prompt_mask_BL),
            self.keys if keys is None else keys,
            self.text_all_valid,
            None if self.image_pad_mask_BL is None else fn(self.image_pad_mask_BL),
            None if self.loss_mask_Bhw is None else fn(self.loss_mask_Bhw),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EditBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def take(self, rows: list[int]) -> EditBatch:
        """The samples ``rows`` of the batch, in that order."""
        idx = torch.tensor(rows, device=self.latents_BChw.device)
        return self._map(lambda t: t.index_select(0, idx), [self.keys[i] for i in rows])

    def pin_memory(self) -> EditBatch:
        return self._map(lambda t: t.pin_memory())

    def token_shape(self) -> tuple[int, int]:
        """(tokens, channels) of the target as the transformer reads it: 2x2-packed for the edit models, flattened
        for Qwen-Image-2.1."""
        _, C, h, w = self.latents_BChw.shape
        return (h * w, C) if self.joint else ((h // 2) * (w // 2), C * 4)


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The static timestep shift of SD3/Flux-style flow models: s' = shift·s / (1 + (shift - 1)·s)."""
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(
    batch: int,
    shift: float,
    generator: torch.Generator,
    *,
    image_seq_len: int | None = None,
    scheduler: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Logit-normal sigmas (sigmoid of a standard normal), shifted by ``flow_schedule_shift``; or, given the
    scheduler's config and the batch's ``image_seq_len``, shifted by resolution (``flow_schedule_auto_shift``)."""
    s = torch.sigmoid(torch.randn(batch, generator=generator))
    if scheduler is not None and image_seq_len is not None:
        return auto_shift_sigmas(s, image_seq_len, scheduler)
    return shift_sigmas(s, shift)


def resolution_mu(image_seq_len: int, scheduler: dict[str, Any]) -> float:
    """The shift parameter mu the Qwen pipelines use for ``image_seq_len`` target tokens: diffusers'
    ``calculate_shift`` with the scheduler config's base/max sequence lengths and shifts."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    mu: float = calculate_shift(  # diffusers does not annotate its return
        image_seq_len,
        scheduler.get("base_image_seq_len", 256),
        scheduler.get("max_image_seq_len", 4096),
        scheduler.get("base_shift", 0.5),
        scheduler.get("max_shift", 1.15),
    )
    return mu


def auto_shift_sigmas(s: torch.Tensor, image_seq_len: int, scheduler: dict[str, Any]) -> torch.Tensor:
    """Sigmas shifted as the scheduler shifts its inference sigmas for this resolution (its ``time_shift``:
    exponential, exp(mu) / (exp(mu) + 1/s - 1), for Qwen-Image; linear, mu / (mu + 1/s - 1), otherwise). The
    terminal stretch (``shift_terminal``) is an inference schedule's end point, not a training noise level."""
    mu = resolution_mu(image_seq_len, scheduler)
    if scheduler.get("time_shift_type", "exponential") == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return mu / (mu + (1 / s - 1))


def img_shapes_for(batch: EditBatch) -> list[list[tuple[int, int, int]]]:
    shapes = [latent_img_shape(*batch.latents_BChw.shape[-2:])]
    shapes += [latent_img_shape(*r.shape[-2:]) for r in batch.refs_BChw]
    return [shapes] * batch.latents_BChw.shape[0]


def pack_for(batch: EditBatch, latents_BChw: torch.Tensor) -> torch.Tensor:
    """Latents as the batch's transformer reads them: (B, tokens, channels)."""
    if batch.joint:
        from shared.model.flow_qwen21 import pack_qwen21

        return pack_qwen21(latents_BChw)
    return pack_latents(latents_BChw)


def predict_velocity(
    transformer: torch.nn.Module, batch: EditBatch, noisy_BLC: torch.Tensor, sigmas_B: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Run the transformer on [noisy target | reference tokens…] and return the target tokens' prediction (Qwen-Image
    2.1: on [prompt with the references' tokens | noisy target])."""
    if batch.joint:
        from shared.model.flow_qwen21 import predict_velocity_qwen21

        return predict_velocity_qwen21(transformer, batch, noisy_BLC, sigmas_B, dtype)
    ref_tokens = [pack_latents(r) for r in batch.refs_BChw]
    hidden_BLC = torch.cat([noisy_BLC, *ref_tokens], dim=1).to(dtype)
    out_BLC: torch.Tensor = transformer(
        hidden_states=hidden_BLC,
        timestep=sigmas_B.to(dtype),
        encoder_hidden_states=batch.prompt_embeds_BLD.to(dtype),
        encoder_hidden_states_mask=None if batch.text_all_valid else batch.prompt_mask_BL,
        img_shapes=img_shapes_for(batch),
        return_dict=False,
    )[0]
    return out_BLC[:, : noisy_BLC.shape[1]]


def flow_matching_loss(
    transformer: torch.nn.Module,
    batch: EditBatch,
    noise_BLC: torch.Tensor,
    sigmas_B: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    reduce: bool = True,
    noisy_BLC: torch.Tensor | None = None,
    masked: bool = False,
) -> torch.Tensor:
    """MSE (fp32) between the predicted and the true velocity at ``sigmas_B``; per-sample when not ``reduce``.
    ``noisy_BLC``: the transformer's input instead of the exact interpolation (scheduled sampling's rollout).
    ``masked``: each element weighted by the batch's loss mask at its latent position, then the plain mean, as
    SimpleTuner weights it (the untouched pixels count 0, the mean still over every element)."""
    x0_BLC = pack_for(batch, batch.latents_BChw).float()
    if noisy_BLC is None:
        s = sigmas_B.view(-1, 1, 1).float()
        noisy_BLC = (1 - s) * x0_BLC + s * noise_BLC.float()
    pred_BLC = predict_velocity(transformer, batch, noisy_BLC, sigmas_B, dtype)
    err = F.mse_loss(pred_BLC.float(), noise_BLC.float() - x0_BLC, reduction="none")
    if masked and batch.loss_mask_Bhw is not None:
        err = err * loss_weights(batch, batch.loss_mask_Bhw.to(err.device))
    return err.mean() if reduce else err.mean(dim=(1, 2))


def loss_weights(batch: EditBatch, mask_Bhw: torch.Tensor) -> torch.Tensor:
    """The mask as the loss's elements are laid out: every latent channel of a position gets its weight, packed
    as the batch's latents are (B, tokens, channels)."""
    B, C, h, w = batch.latents_BChw.shape
    if tuple(mask_Bhw.shape) != (B, h, w):
        raise ValueError(f"loss mask {tuple(mask_Bhw.shape)} does not match the target's latent grid {(B, h, w)}")
    return pack_for(batch, mask_Bhw.float()[:, None].expand(B, C, h, w))


def step_generator(seed: int, step: int, micro: int = 0, device: str = "cpu") -> torch.Generator:
    """The generator of one micro-step's noise and sigmas: a function of (seed, step, micro) alone, so a resumed
    run draws exactly what an uninterrupted one drew."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63))
