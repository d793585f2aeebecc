"""Masked loss as SimpleTuner defines it: a ``conditioning_type: mask`` dataset paired by name, placed with its
target's bucket and crop, averaged over each latent cell; the loss weighted by it (``masked_loss_probability``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_training import make_run, trainer_for

from shared.config.loading import load_run_config
from shared.data.pairing import pair_datasets
from shared.encode.cache import index_key, settings_for
from shared.encode.encoder import DatasetEncoder
from shared.model.flow import EditBatch, flow_matching_loss, pack_for, predict_velocity
from shared.model.flow_qwen21 import Qwen21Sample, collate_qwen21
from shared.model.latents import pack_latents, unpack_latents
from shared.model.loading import load_transformer


def _hand_loss(pred_BChw: torch.Tensor, target_BChw: torch.Tensor, mask_Bhw: torch.Tensor) -> torch.Tensor:
    """SimpleTuner's arithmetic on the unpacked latents: (pred - target)² · mask, the mean over every element."""
    return ((pred_BChw - target_BChw) ** 2 * mask_Bhw[:, None]).mean()


def test_masked_loss_is_the_hand_computed_weighted_mse_for_both_layouts(tiny_models):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 8, 8, generator=g)
    edit = EditBatch(
        latents_BChw=torch.randn(1, 16, 8, 8, generator=g),
        refs_BChw=[torch.randn(1, 16, 8, 8, generator=g)],
        prompt_embeds_BLD=torch.randn(1, 7, 32, generator=g),
        prompt_mask_BL=torch.ones(1, 7, dtype=torch.long),
        keys=["a"],
        text_all_valid=True,
        loss_mask_Bhw=mask,
    )
    tr = load_transformer(tiny_models("edit-v2"), "edit-v2")
    noise = torch.randn(1, 16, 64, generator=g)
    sigma = torch.tensor([0.4])
    with torch.no_grad():
        loss = flow_matching_loss(tr, edit, noise, sigma, masked=True)
        plain = flow_matching_loss(tr, edit, noise, sigma)
        x0 = pack_latents(edit.latents_BChw)
        pred = predict_velocity(tr, edit, 0.6 * x0 + 0.4 * noise, sigma, torch.float32)
    expected = _hand_loss(unpack_latents(pred, 8, 8), unpack_latents(noise - x0, 8, 8), mask)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0) and not torch.allclose(loss, plain)

    # Qwen-Image-2.1's flattened tokens: the same arithmetic
    pad = torch.zeros(9, dtype=torch.bool)
    pad[2:6] = True
    joint = collate_qwen21(
        [
            Qwen21Sample(
                torch.randn(8, 4, 4, generator=g),
                [torch.randn(8, 4, 4, generator=g)],
                torch.randn(9, 16, generator=g),
                pad,
            )
        ]
    )
    joint.loss_mask_Bhw = torch.rand(1, 4, 4, generator=g)
    tr21 = load_transformer(tiny_models("v2.1"), "v2.1")
    noise21 = torch.randn(1, 16, 8, generator=g)
    with torch.no_grad():
        loss21 = flow_matching_loss(tr21, joint, noise21, sigma, masked=True)
        x0 = pack_for(joint, joint.latents_BChw)
        pred21 = predict_velocity(tr21, joint, 0.6 * x0 + 0.4 * noise21, sigma, torch.float32)
    unflat = lambda t: t.transpose(1, 2).reshape(1, 8, 4, 4)  # noqa: E731
    assert torch.allclose(loss21, _hand_loss(unflat(pred21), unflat(noise21 - x0), joint.loss_mask_Bhw), rtol=1e-6)


def _with_masks(tmp_path, tiny_models, **overrides):
    def add_mask(entries):
        entries[0]["conditioning_data"].append("demo-mask")
        entries.append(
            {
                "id": "demo-mask",
                "type": "local",
                "dataset_type": "conditioning",
                "conditioning_type": "mask",
                "instance_data_dir": str(tmp_path / "data" / "mask"),
                "cache_dir_vae": "cache/vae/demo-mask",
            }
        )

    cfg, store = make_run(tmp_path, tiny_models, refs=1, n=3, **overrides)
    (tmp_path / "data" / "mask").mkdir()
    for img in sorted((tmp_path / "data" / "images").glob("*.png")):
        w, h = Image.open(img).size
        m = Image.new("RGB", (w, h), "black")
        m.paste("white", (0, 0, w // 2, h))  # the left half is the edit region
        m.save(tmp_path / "data" / "mask" / img.name)
    data = Path(json.loads(cfg.read_text())["data_backend_config"])
    entries = json.loads(data.read_text())
    add_mask(entries)
    data.write_text(json.dumps(entries))
    run = load_run_config(cfg)
    DatasetEncoder(run, store).encode()
    return cfg, store, run


def test_masks_pair_by_name_with_the_targets_placement_and_weigh_the_training_loss(tmp_path, tiny_models):
    cfg, store, run = _with_masks(tmp_path, tiny_models)
    [ds], _ = pair_datasets(run)
    s = ds.samples[1]
    assert len(s.references) == 1 and s.mask is not None  # the mask is no reference
    assert (s.mask.placement.resize, s.mask.placement.crop, s.mask.placement.final) == (
        s.placement.resize,
        s.placement.crop,
        s.placement.size,
    )
    index = store.get_json(index_key(run, "demo-images", settings_for(run)))  # not the index before the masks
    entry = index["samples"][1]
    grid = store.get_tensors(entry["mask"])[0]["mask"]
    W, H = s.placement.size
    assert tuple(grid.shape) == (H // 8, W // 8)
    placed = s.mask.placement.apply(Image.open(tmp_path / "data" / "mask" / s.mask.image.relpath).convert("RGB"))
    pixels = torch.tensor(list(placed.getchannel(0).getdata()), dtype=torch.float32).view(1, 1, H, W) / 255
    assert torch.equal(grid, F.interpolate(pixels, size=(H // 8, W // 8), mode="area")[0, 0])
    assert 0.3 < float(grid.mean()) < 0.7  # about the left half

    masked = trainer_for(cfg, store, "output_dir=masked").train()
    off = trainer_for(cfg, store, "output_dir=off", "masked_loss_probability=0").train()
    assert masked.losses != off.losses and all(m < o for m, o in zip(masked.losses, off.losses, strict=True))
    plain_cfg, plain_store = make_run(tmp_path / "plain", tiny_models, refs=1, n=3)
    plain = trainer_for(plain_cfg, plain_store).train()
    assert off.losses == plain.losses  # probability 0: the masks change nothing, bit for bit


def test_two_mask_datasets_are_refused(tmp_path, tiny_models):
    from shared.errors import ConfigError

    cfg, _, _ = _with_masks(tmp_path, tiny_models)
    data = Path(json.loads(cfg.read_text())["data_backend_config"])
    entries = json.loads(data.read_text())
    entries.append(dict(entries[-1], id="demo-mask-2", cache_dir_vae="cache/vae/demo-mask-2"))
    entries[0]["conditioning_data"].append("demo-mask-2")
    data.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match="2 loss-mask datasets listed"):
        load_run_config(cfg)
