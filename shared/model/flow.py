"""The flow-matching step of edit training, as plain functions over tensors (callable on CPU, no services).

Legend: B batch, C latent channels (16), h/w latent size, L tokens, D text width.

x_t = (1 - s)·x0 + s·noise, the transformer predicts the velocity noise - x0. The input sequence is the noisy
target's tokens followed by every reference's clean tokens; ``img_shapes`` lists the target then each reference,
so RoPE positions and (edit-v3) the zero_cond_t modulation see every image. The prediction is sliced back to the
target's tokens and the loss is an MSE in fp32.
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

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EditBatch:
        mv: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return EditBatch(
            mv(self.latents_BChw),
            [mv(r) for r in self.refs_BChw],
            mv(self.prompt_embeds_BLD),
            mv(self.prompt_mask_BL),
            self.keys,
            self.text_all_valid,
        )

    def take(self, rows: list[int]) -> EditBatch:
        """The samples ``rows`` of the batch, in that order."""
        idx = torch.tensor(rows, device=self.latents_BChw.device)
        pick: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.index_select(0, idx)  # noqa: E731
        return EditBatch(
            pick(self.latents_BChw),
            [pick(r) for r in self.refs_BChw],
            pick(self.prompt_embeds_BLD),
            pick(self.prompt_mask_BL),
            [self.keys[i] for i in rows],
            self.text_all_valid,
        )

    def pin_memory(self) -> EditBatch:
        return EditBatch(
            self.latents_BChw.pin_memory(),
            [r.pin_memory() for r in self.refs_BChw],
            self.prompt_embeds_BLD.pin_memory(),
            self.prompt_mask_BL.pin_memory(),
            self.keys,
            self.text_all_valid,
        )


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


def predict_velocity(
    transformer: torch.nn.Module, batch: EditBatch, noisy_BLC: torch.Tensor, sigmas_B: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Run the transformer on [noisy target | reference tokens…] and return the target tokens' prediction."""
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
) -> torch.Tensor:
    """MSE (fp32) between the predicted and the true velocity at ``sigmas_B``; per-sample when not ``reduce``.
    ``noisy_BLC``: the transformer's input instead of the exact interpolation (scheduled sampling's rollout)."""
    x0_BLC = pack_latents(batch.latents_BChw).float()
    if noisy_BLC is None:
        s = sigmas_B.view(-1, 1, 1).float()
        noisy_BLC = (1 - s) * x0_BLC + s * noise_BLC.float()
    pred_BLC = predict_velocity(transformer, batch, noisy_BLC, sigmas_B, dtype)
    err = F.mse_loss(pred_BLC.float(), noise_BLC.float() - x0_BLC, reduction="none")
    return err.mean() if reduce else err.mean(dim=(1, 2))


def step_generator(seed: int, step: int, micro: int = 0, device: str = "cpu") -> torch.Generator:
    """The generator of one micro-step's noise and sigmas: a function of (seed, step, micro) alone, so a resumed
    run draws exactly what an uninterrupted one drew."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63))
