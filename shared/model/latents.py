"""The transformer's token layout of VAE latents: 2x2 patches packed into 64-channel tokens, and ``img_shapes``.

The order is diffusers' ``_pack_latents``. Legend: B batch, C latent channels (16), h/w latent size, L tokens.
"""

from __future__ import annotations

import torch


def pack_latents(latents_BChw: torch.Tensor) -> torch.Tensor:
    """2x2-patchify latents into transformer tokens, in the order of diffusers' ``_pack_latents``."""
    B, C, h, w = latents_BChw.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to pack 2x2 (pixel size a multiple of 16)")
    patches_Bh2w2C22 = latents_BChw.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches_Bh2w2C22.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens_BLC: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for an h x w latent; returns latents_BChw (no frame axis)."""
    B, L, C4 = tokens_BLC.shape
    if L != (h // 2) * (w // 2):
        raise ValueError(f"{L} tokens cannot be a {h}x{w} latent ({(h // 2) * (w // 2)} tokens)")
    patches_BC_h2_2_w2_2 = tokens_BLC.reshape(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches_BC_h2_2_w2_2.reshape(B, C4 // 4, h, w)


def latent_img_shape(h: int, w: int) -> tuple[int, int, int]:
    """The transformer's ``img_shapes`` entry (frames, token rows, token columns) for an h x w latent."""
    return (1, h // 2, w // 2)
