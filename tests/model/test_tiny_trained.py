"""The trained tiny model (``shared.train.tiny``): deterministic from its seed, and the shipped weights work.

The shipped weights are what ``python -m shared.train.tiny`` wrote; these tests hold them to what the demo needs:
the VAE reconstructs generated scenes it never saw, and the transformer, run by the real pipeline, copies its
reference (the identity edit a LoRA then changes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.evaluate.preview import psnr
from shared.evaluate.sampling import sample_edit
from shared.model.loading import load_pipeline
from shared.model.tiny_model import (
    TRAINED_VAE_BASE_DIM,
    build_tiny_components,
    load_trained_weights,
    save_tiny_model,
    tiny_weights_dir,
)
from shared.train.tiny import Recipe, reconstruction_psnr, scenes, train_tiny_model

# Generated scenes never used in training (the training images come from seed 0, these from seed 4242).
HELD_OUT_SEED = 4242
VAE_PSNR_BOUND_DB = 22.0  # the shipped VAE's round trip of held-out 64x64 scenes, pixels in [0, 255] (23.3 measured)
IDENTITY_PSNR_BOUND_DB = 20.0  # the base's edit of a held-out reference, scored against that reference (21.5-25.3)


def test_same_seed_same_weights_and_another_seed_other_weights():
    small = dict(images=16, vae_steps=3, vae_batch=2, transformer_samples=8, transformer_steps=3, transformer_batch=4)
    first, fig1 = train_tiny_model("edit-v2", Recipe(seed=0, **small))
    again, fig2 = train_tiny_model("edit-v2", Recipe(seed=0, **small))
    other, _ = train_tiny_model("edit-v2", Recipe(seed=1, **small))
    for name in ("vae", "transformer"):
        a, b, c = (m[name].state_dict() for m in (first, again, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: same seed, different weights"
        assert not all(torch.equal(a[k], c[k]) for k in a), f"{name}: another seed gave the same weights"
    assert first["vae"].config.latents_mean == again["vae"].config.latents_mean
    assert fig1["vae_reconstruction_psnr_db"] == fig2["vae_reconstruction_psnr_db"]


def test_the_shipped_vae_reconstructs_scenes_it_never_saw():
    comps = load_trained_weights(build_tiny_components("edit-v2", vae_base_dim=TRAINED_VAE_BASE_DIM))
    held_out = scenes(HELD_OUT_SEED, 32)
    psnr = reconstruction_psnr(comps["vae"], held_out)
    assert psnr >= VAE_PSNR_BOUND_DB, f"held-out reconstruction {psnr:.1f} dB"
    untrained = build_tiny_components("edit-v2", vae_base_dim=TRAINED_VAE_BASE_DIM)["vae"]
    assert reconstruction_psnr(untrained, held_out) < 15  # what training bought
    recipe = json.loads((tiny_weights_dir() / "recipe.json").read_text())
    # the figure recipe.json records (float32 weights, seed-1000 scenes) holds for the shipped float16 weights
    assert abs(recipe["figures"]["vae_reconstruction_psnr_db"] - psnr) < 2.0
    assert list(comps["vae"].config.latents_std) == recipe["vae_config"]["latents_std"]


def test_the_shipped_model_loads_in_the_real_layout_and_its_base_copies_the_reference(tmp_path):
    from shared.data.synthetic import DEMO_CAPTION, recolor_scene

    model = save_tiny_model(tmp_path / "model", "edit-v2", trained=True)
    pipe = load_pipeline(model, "edit-v2", dtype=torch.float32)
    assert pipe.vae.config.base_dim == TRAINED_VAE_BASE_DIM
    rng = np.random.default_rng(HELD_OUT_SEED)
    scores, changed = [], []
    for i in range(3):
        ref, target = recolor_scene(rng, (64, 64))
        # the pipeline's own steps with the reference at the target's size (the pipelines would make it 1 MP)
        out = sample_edit(
            pipe,
            "edit-v2",
            DEMO_CAPTION,
            [ref],
            height=64,
            width=64,
            num_inference_steps=12,
            true_cfg_scale=1.0,
            generator=torch.Generator().manual_seed(i),
            vl_ref_area=64 * 64,
        )
        scores.append(psnr(out, ref))
        changed.append(psnr(ref, target))
    assert min(scores) >= IDENTITY_PSNR_BOUND_DB, f"base vs its reference: {scores}"
    # the identity is far from the edit's target: a LoRA that learns the edit has room to show it
    assert max(changed) < min(scores) - 6, (changed, scores)


def test_edit_v3_has_no_trained_model(tmp_path):
    with pytest.raises(ValueError, match="edit-v1 and edit-v2"):
        save_tiny_model(tmp_path / "m", "edit-v3", trained=True)
