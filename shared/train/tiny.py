"""The trained tiny model: the tiny model of the real classes, taught to work at toy scale, for the demo.

A random-weight tiny model proves that the code runs, not that training teaches anything: its VAE decodes noise
and its transformer ignores its reference. This module trains the two parts that matter, on CPU, deterministically
from a seed, with the project's own code:

1. the VAE (``AutoencoderKLQwenImage``, base_dim 8) to reconstruct the generated scenes (random 32x32 crops of
   64x64 images; a convolutional VAE reconstructs any size after that), then sets ``latents_mean``/``latents_std``
   in its config to the statistics of its own latents, as the real model's config carries the real VAE's;
2. the transformer (every weight, not a LoRA) to reproduce its reference, an identity edit, by the flow-matching
   loss of ``shared.model.flow`` on latents from ``shared.encode.ops.encode_vae_latents`` and caption embeddings
   from ``encode_prompt`` with many different captions, so that it copies whatever the instruction says.

The text encoder stays random, as in the tiny model. A LoRA trained on an edit (the demo's "make the shapes red")
then has something to change: the base copies the reference, the LoRA applies the edit.

``python -m shared.train.tiny`` trains it and writes the weights that ship in ``shared/model/tiny_weights/``
(float16, with ``recipe.json``: the seed, the steps and the figures measured at the end). ``save_tiny_model(...,
trained=True)`` builds the tiny model with those weights in place, in the real layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data.synthetic import make_pair, recolor_scene
from shared.model.flow import EditBatch, flow_matching_loss
from shared.model.tiny_model import TRAINED_VAE_BASE_DIM, build_tiny_components, tiny_weights_dir

log = logging.getLogger(__name__)

IDENTITY_CAPTIONS = (
    "make the shapes red",
    "make the sky blue",
    "add a red hat",
    "remove the dog",
    "invert the colors",
    "turn it into a watercolor painting",
    "mirror the image horizontally",
    "",
    " ",
)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    images: int = 256  # generated 64x64 scenes, half of them demo pairs (reference and red target)
    vae_steps: int = 5000
    vae_batch: int = 8
    vae_crop: int = 32
    vae_lr: float = 2e-3
    transformer_samples: int = 256
    transformer_steps: int = 4000
    transformer_batch: int = 16
    transformer_lr: float = 1e-3


def scenes(seed: int, n: int, size: tuple[int, int] = (64, 64)) -> list[Any]:
    """``n`` generated images: references and red targets of the demo edit, and the other generated edits'."""
    rng = np.random.default_rng(seed)
    out: list[Any] = []
    while len(out) < n:
        out += list(recolor_scene(rng, size))
        out += list(make_pair(rng, size)[:2])
    return out[:n]


def _pixels(images: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).float().permute(0, 3, 1, 2).div(127.5).sub(1)  # B 3 H W in [-1, 1]


def _warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    import math

    warm = max(1, int(steps * warmup))

    def factor(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae: Any, images: list[Any], r: Recipe) -> list[float]:
    """Reconstruction (MSE on the distribution's mode, as the encoder caches the mode), Adam, warm-up then cosine."""
    pixels = _pixels(images)
    rng = np.random.default_rng(r.seed + 1)
    torch.manual_seed(r.seed + 1)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=r.vae_lr)
    sched = _warmup_cosine(opt, r.vae_steps, 0.1)
    size = pixels.shape[-1]
    losses = []
    for _ in range(r.vae_steps):
        idx = rng.integers(0, len(pixels), r.vae_batch)
        ys, xs = rng.integers(0, size - r.vae_crop + 1, (2, r.vae_batch))
        x = torch.stack(
            [pixels[i, :, y : y + r.vae_crop, x0 : x0 + r.vae_crop] for i, y, x0 in zip(idx, ys, xs, strict=True)]
        )
        x = x.unsqueeze(2)  # a video VAE: one frame
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = torch.nn.functional.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def set_latent_statistics(vae: Any, images: list[Any]) -> None:
    """Per-channel mean and std of the VAE's latents of ``images``, written to its config (what the pipelines and
    the encoder normalise with)."""
    z = vae.encode(_pixels(images).unsqueeze(2)).latent_dist.mode()  # B C 1 h w
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(
        latents_mean=[round(float(v), 5) for v in mean], latents_std=[round(float(v), 5) for v in std]
    )


@torch.no_grad()
def reconstruction_psnr(vae: Any, images: list[Any]) -> float:
    """PSNR (dB, pixels in [0, 255]) of the VAE's round trip of ``images``, as the pipelines decode (clamped)."""
    x = _pixels(images).unsqueeze(2)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = torch.mean(((rec - x) * 127.5) ** 2).item()
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def identity_batches(
    pipe: Any, flavour: str, images: list[Any], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents of each image (target and reference alike) and a caption embedding conditioned on it."""
    from shared.encode.ops import encode_prompt, encode_vae_latents

    rng = np.random.default_rng(seed + 2)
    h, w = images[0].height, images[0].width
    latents = encode_vae_latents(pipe.vae, pipe.image_processor, images, h, w)
    captions = [IDENTITY_CAPTIONS[int(rng.integers(len(IDENTITY_CAPTIONS)))] for _ in images]
    embeds, mask = encode_prompt(pipe, flavour, captions, [[im] for im in images], vl_ref_area=64 * 64)
    return latents, embeds, mask


def train_identity(
    transformer: Any, latents: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, r: Recipe
) -> list[float]:
    """Flow matching towards the reference itself: the target's latents are the reference's."""
    gen = torch.Generator().manual_seed(r.seed + 3)
    transformer.train()
    for p in transformer.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=r.transformer_lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, r.transformer_steps, 0.05)
    losses = []
    for _ in range(r.transformer_steps):
        idx = torch.randint(0, latents.shape[0], (r.transformer_batch,), generator=gen)
        lat = latents[idx]
        batch = EditBatch(
            latents_BChw=lat,
            refs_BChw=[lat],
            prompt_embeds_BLD=embeds[idx],
            prompt_mask_BL=mask[idx],
            keys=[str(int(i)) for i in idx],
        )
        noise = torch.randn(lat.shape[0], (lat.shape[2] // 2) * (lat.shape[3] // 2), lat.shape[1] * 4, generator=gen)
        sigmas = torch.rand(lat.shape[0], generator=gen).clamp(0.02, 0.98)
        loss = flow_matching_loss(transformer, batch, noise, sigmas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    transformer.eval()
    for p in transformer.parameters():
        p.requires_grad_(False)
    return losses


def train_tiny_model(
    flavour: str = "edit-v2", recipe: Recipe = Recipe(), progress: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tiny model's components with the VAE and the transformer trained; and the figures of the training."""
    from shared.model.loading import pipeline_class

    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    comps = build_tiny_components(flavour, recipe.seed, vae_base_dim=TRAINED_VAE_BASE_DIM)
    images = scenes(recipe.seed, recipe.images)
    held_out = scenes(recipe.seed + 1000, 32)
    vae_losses = train_vae(comps["vae"], images, recipe)
    set_latent_statistics(comps["vae"], images)
    psnr = reconstruction_psnr(comps["vae"], held_out)
    vae_seconds = time.perf_counter() - started
    if progress:
        print(f"[tiny] VAE: {recipe.vae_steps} steps in {vae_seconds:.0f}s, held-out reconstruction {psnr:.1f} dB")
    pipe = pipeline_class(flavour)(**comps)
    latents, embeds, mask = identity_batches(pipe, flavour, images[: recipe.transformer_samples], recipe.seed)
    t_losses = train_identity(comps["transformer"], latents, embeds, mask, recipe)
    figures = {
        "vae_reconstruction_psnr_db": round(psnr, 2),
        "vae_final_loss": round(float(np.mean(vae_losses[-50:])), 5),
        "transformer_final_loss": round(float(np.mean(t_losses[-50:])), 5),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if progress:
        print(
            f"[tiny] transformer: {recipe.transformer_steps} steps, loss {t_losses[0]:.3f} -> "
            f"{figures['transformer_final_loss']:.3f}; {figures['seconds']:.0f}s in all"
        )
    return comps, figures


def write_weights(out: Path, comps: dict[str, Any], recipe: Recipe, figures: dict[str, Any]) -> None:
    """The two trained state dicts in float16 (safetensors) and ``recipe.json``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "transformer"):
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in comps[name].state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
    doc = {
        "recipe": asdict(recipe),
        "figures": figures,
        "vae_config": {
            "latents_mean": list(comps["vae"].config.latents_mean),
            "latents_std": list(comps["vae"].config.latents_std),
        },
        "torch": torch.__version__,
        "made_by": "python -m shared.train.tiny",
    }
    (out / "recipe.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.train.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(tiny_weights_dir()), help="where the weights go (default: the package's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    recipe = Recipe(seed=args.seed)
    comps, figures = train_tiny_model("edit-v2", recipe, progress=True)
    write_weights(Path(args.out), comps, recipe, figures)
    print(f"[tiny] wrote {args.out}: {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
