"""Training sees what inference sees: reference sizes as diffusers' own pipelines compute them (random target and
reference sizes, every flavour), previews of held-out samples with the exported weights, the resolution-dependent
timestep shift of the Qwen scheduler, edit-v3's zero_cond_t, and the mask-free fast path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift
from PIL import Image

from shared.config.loading import load_run_config
from shared.data.pairing import load_sample, pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.cache import HELD_OUT, TRAINING_SAMPLES, settings_for
from shared.encode.encoder import DatasetEncoder
from shared.encode.ops import reference_size
from shared.evaluate.preview import eval_set
from shared.model.flow import auto_shift_sigmas, flow_matching_loss, img_shapes_for, resolution_mu
from shared.model.loading import apply_flavour, load_pipeline, scheduler_config
from shared.store.local import LocalStore
from shared.train.loader import TrainLoader, load_items
from shared.train.trainer import Trainer

REFS = {"edit-v1": 1, "edit-v2": 3, "edit-v3": 2}


class _Stop(Exception):
    pass


def pipeline_sizes(
    pipe: Any, monkeypatch: pytest.MonkeyPatch, images: list[Image.Image], flavour: str
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(sizes the VL encoder gets, sizes the VAE gets) of each reference, from the pipeline's own __call__; the
    models are not run (the spies answer in their place and stop before denoising)."""
    vl, vae = [], []

    def spy_prompt(prompt=None, image=None, **kw):
        vl.extend(im.size for im in (image if isinstance(image, list) else [image]))
        d = pipe.text_encoder.config.text_config.hidden_size
        return torch.zeros(1, 4, d), torch.ones(1, 4, dtype=torch.long)

    def spy_vae(image, generator):
        vae.append((image.shape[-1], image.shape[-2]))
        return torch.zeros(1, 16, 1, image.shape[-2] // 8, image.shape[-1] // 8)

    prepare = pipe.prepare_latents

    def spy_prepare(*args, **kwargs):
        prepare(*args, **kwargs)
        raise _Stop

    monkeypatch.setattr(pipe, "encode_prompt", spy_prompt)
    monkeypatch.setattr(pipe, "_encode_vae_image", spy_vae)
    monkeypatch.setattr(pipe, "prepare_latents", spy_prepare)
    with pytest.raises(_Stop):
        pipe(
            image=images if flavour != "edit-v1" else images[0],
            prompt="x",
            height=64,
            width=64,
            num_inference_steps=2,
            true_cfg_scale=1.0,
        )
    return vl, vae


def random_pairs(tmp: Path, flavour: str, seed: int) -> tuple[Path, list[tuple[int, int]]]:
    """A dataset whose sample 0000 has a target and references of random sizes (aspects from 1:3 to 3:1)."""
    rng = np.random.default_rng(seed)
    root = write_dataset(tmp / "data", n=2, references=REFS[flavour], seed=seed)
    sizes = [(int(rng.integers(40, 300)), int(rng.integers(40, 300))) for _ in range(1 + REFS[flavour])]
    Image.new("RGB", sizes[0], "red").save(root / "images" / "0000.png")
    for i, size in enumerate(sizes[1:]):
        Image.new("RGB", size, "blue").save(root / f"reference_{chr(ord('a') + i)}" / "0000.png")
    return root, sizes


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("conditioning", ["reference_loose", "reference_strict"])
@pytest.mark.parametrize("flavour", ["edit-v1", "edit-v2", "edit-v3"])
def test_reference_sizes_are_the_pipelines(tmp_path, tiny_models, monkeypatch, flavour, conditioning, seed):
    root, sizes = random_pairs(tmp_path, flavour, seed)
    cfg, data = write_configs(tmp_path / "cfg", root, tiny_models(flavour), flavour, REFS[flavour])
    import json

    entries = json.loads(data.read_text())
    for e in entries[1 : 1 + REFS[flavour]]:
        e["conditioning_type"] = conditioning
    data.write_text(json.dumps(entries))
    run = load_run_config(
        cfg,
        overrides=[
            "model_kwargs.match_target_res=false",
            "model_kwargs.reference_area=1048576",
            "model_kwargs.vl_reference_area=null",
        ],
    )
    [ds], _ = pair_datasets(run)
    sample = next(s for s in ds.samples if s.key == "0000")
    _, refs, regions = load_sample(ds, sample, 10**8)
    ours_vae = [r.size for r in refs]
    vl_area = 1024 * 1024 if flavour == "edit-v1" else 384 * 384
    ours_vl = [reference_size(*region.size, vl_area) for region in regions]
    pipe = load_pipeline(
        tiny_models(flavour),
        flavour,
        components=("vae", "text_encoder", "tokenizer", "processor", "scheduler", "transformer"),
    )
    their_vl, their_vae = pipeline_sizes(pipe, monkeypatch, regions, flavour)
    assert ours_vae == their_vae, (sizes, conditioning)
    assert ours_vl == their_vl, (sizes, conditioning)
    if conditioning == "reference_loose":  # the whole image at ~1 MP of its own aspect
        assert all(abs(w * h - 1024**2) < 0.12 * 1024**2 for w, h in ours_vae)
        assert [r.size for r in regions] == sizes[1:]


def test_the_cache_and_the_transformer_get_the_pipelines_reference_latents(tmp_path, tiny_models, monkeypatch):
    """The sizes the encoder caches and the loader hands the transformer (img_shapes), at a small area (on this CPU
    a 1 MP encode of three references costs seconds), with the Plus pipeline's constant set to the same area."""
    area = 128 * 128
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", area)
    root, _ = random_pairs(tmp_path, "edit-v2", 7)
    cfg, _ = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 3)
    run = load_run_config(cfg, overrides=["model_kwargs.match_target_res=false", f"model_kwargs.reference_area={area}"])
    store = LocalStore(tmp_path / "store")
    DatasetEncoder(run, store).encode()
    [ds], _ = pair_datasets(run)
    sample = next(s for s in ds.samples if s.key == "0000")
    _, _, regions = load_sample(ds, sample, 10**8)
    pipe = load_pipeline(tiny_models("edit-v2"), "edit-v2")
    _, their_vae = pipeline_sizes(pipe, monkeypatch, regions, "edit-v2")
    items, _, _ = load_items(store, run, settings_for(run))
    loader = TrainLoader(items, store, batch_size=1, seed=0, prefetch=0)
    index = [i for i, it in enumerate(items) if it.key == "0000"][0]
    position = next(p for p, b in enumerate(loader.batches_of(0)) if b == [index])
    batch = loader.load(0, position)
    cached = [tuple(r.shape[-2:]) for r in batch.refs_BChw]
    assert cached == [(h // 8, w // 8) for w, h in their_vae]
    assert img_shapes_for(batch)[0][1:] == [(1, h // 16, w // 16) for w, h in their_vae]


# ------------------------------------------------------------------------------------------- evaluation
def make(tmp: Path, tiny_models: Any, n: int, **overrides: Any):
    root = write_dataset(tmp / "data", n=n, references=1)
    base = dict(
        max_train_steps=4,
        checkpoint_step_interval=100,
        validation_step_interval=100,
        num_eval_images=2,
        learning_rate=1e-2,
        lora_rank=4,
        output_dir=str(tmp / "out"),
    )
    cfg, _ = write_configs(tmp / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1, **(base | overrides))
    run = load_run_config(cfg)
    store = LocalStore(tmp / "store")
    _, keys = DatasetEncoder(run, store).encode_with_index()
    return run, store, keys


def test_preview_samples_are_held_out_of_training(tmp_path, tiny_models):
    run, store, keys = make(tmp_path, tiny_models, n=6)
    items, _, label = load_items(store, run, settings_for(run))
    assert label == HELD_OUT and sorted({i.key for i in items}) == ["0002", "0003", "0004", "0005"]
    paired, _ = pair_datasets(run)
    ev = eval_set(run, paired, store, keys)
    assert [s.key for _, s in ev.samples] == ["0000", "0001"] and ev.label == HELD_OUT
    assert [e["key"] for e in ev.entries] == ["0000", "0001"]
    off = load_run_config(run.config_source, overrides=["holdout_eval_images=false"])
    assert load_items(store, off, settings_for(off))[2] == TRAINING_SAMPLES


def test_on_a_tiny_dataset_the_metrics_say_training_samples(tmp_path, tiny_models, caplog):
    run, store, keys = make(tmp_path, tiny_models, n=3)
    trainer = Trainer(run, store)
    with caplog.at_level("WARNING"):
        trainer.setup()
    trainer.loader.close()
    assert trainer.eval_label == TRAINING_SAMPLES and "only 3 training samples" in caplog.text
    paired, _ = pair_datasets(run)
    assert eval_set(run, paired, store, keys).label == TRAINING_SAMPLES


def test_previews_render_the_exported_weights_the_ema(tmp_path, tiny_models):
    run, store, _ = make(tmp_path, tiny_models, n=4, use_ema=True, ema_decay=0.5)
    trainer = Trainer(run, store)
    trainer.setup()
    for _ in range(3):
        trainer.train_step()
    trainer.loader.close()
    live = {n: p.detach().clone() for n, p in trainer._named_params()}
    ema = trainer.ema.state()
    assert any(not torch.equal(live[n], ema[n]) for n in live)
    with trainer.exported_weights():
        inside = {n: p.detach().clone() for n, p in trainer._named_params()}
    assert all(torch.equal(inside[n], ema[n]) for n in live)  # what the exported file holds
    assert all(torch.equal(p, live[n]) for n, p in trainer._named_params())  # and training goes on from these
    exported = trainer.lora_state(ema=True)
    assert any(torch.equal(exported[k], ema[n]) for k in exported for n in ema if n.replace(".default", "") == k)


def test_the_batched_ema_update_is_the_per_tensor_formula(tmp_path, tiny_models):
    run, store, _ = make(tmp_path, tiny_models, n=4, use_ema=True, ema_decay=0.9)
    trainer = Trainer(run, store)
    trainer.setup()
    before = {n: v.clone() for n, v in trainer.ema.state().items()}
    trainer.train_step()
    trainer.loader.close()
    for n, p in trainer._named_params():
        expected = before[n].mul(0.9).add(p.detach().float().cpu(), alpha=1 - 0.9)
        assert torch.equal(trainer.ema.state()[n], expected), n


# ----------------------------------------------------------------------------------------------- timesteps
def test_auto_shift_is_the_schedulers_shift_for_the_sequence_length(tiny_models):
    cfg = scheduler_config(tiny_models("edit-v2"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    s = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    for seq_len in (256, 1024, 4096, 8192):  # 256x256 to ~1.4 MP
        mu = resolution_mu(seq_len, cfg)
        assert mu == calculate_shift(
            seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
        )
        torch.testing.assert_close(auto_shift_sigmas(s, seq_len, cfg), scheduler.time_shift(mu, 1.0, s))
    assert resolution_mu(4096, cfg) == pytest.approx(0.5 + (0.9 - 0.5) * (4096 - 256) / (8192 - 256))
    median = float(auto_shift_sigmas(torch.tensor([0.5]), 4096, cfg))
    assert median == pytest.approx(math.exp(resolution_mu(4096, cfg)) / (math.exp(resolution_mu(4096, cfg)) + 1))
    assert float(auto_shift_sigmas(torch.tensor([0.5]), 256, cfg)) < median  # fewer tokens, less noise


def test_training_with_auto_shift_draws_the_shifted_sigmas(tmp_path, tiny_models, monkeypatch):
    run, store, _ = make(tmp_path, tiny_models, n=4, flow_schedule_auto_shift=True)
    trainer = Trainer(run, store)
    trainer.setup()
    seen = []
    import shared.train.trainer as trainer_module

    real = trainer_module.flow_matching_loss
    monkeypatch.setattr(
        trainer_module,
        "flow_matching_loss",
        lambda tr, b, n, s, d, **kw: seen.append((b, s)) or real(tr, b, n, s, d, **kw),
    )
    trainer.train_step()
    trainer.loader.close()
    [(batch, sigmas)] = seen
    h, w = batch.latents_BChw.shape[-2:]
    from shared.model.flow import step_generator

    g = step_generator(run.train.seed, 1, 0)
    torch.randn(1, (h // 2) * (w // 2), 64, generator=g)  # the noise is drawn first
    expected = auto_shift_sigmas(torch.sigmoid(torch.randn(1, generator=g)), (h // 2) * (w // 2), trainer.shift_config)
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- model
def test_edit_v3_always_runs_with_zero_cond_t_and_the_others_never(tiny_models):
    v2 = load_pipeline(tiny_models("edit-v2"), "edit-v2", components=("transformer",)).transformer
    assert not v2.zero_cond_t
    apply_flavour(v2, "edit-v3")  # weights whose config lacks the flag, trained as edit-v3
    assert v2.zero_cond_t and all(b.zero_cond_t for b in v2.transformer_blocks) and v2.config.zero_cond_t
    apply_flavour(v2, "edit-v1")
    assert not v2.zero_cond_t and not any(b.zero_cond_t for b in v2.transformer_blocks)


def test_no_text_mask_when_every_caption_token_is_real_gives_the_same_loss(tmp_path, tiny_models):
    run, store, _ = make(tmp_path, tiny_models, n=4)
    trainer = Trainer(run, store)
    trainer.setup()
    batch = trainer.loader.next_batch()
    trainer.loader.close()
    assert batch.text_all_valid  # one caption per batch: nothing is padding
    noise = torch.randn(
        1,
        batch.latents_BChw.shape[-2] * batch.latents_BChw.shape[-1] // 4,
        64,
        generator=torch.Generator().manual_seed(0),
    )
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        fast = flow_matching_loss(trainer.transformer, batch, noise, sigma)
        batch.text_all_valid = False
        masked = flow_matching_loss(trainer.transformer, batch, noise, sigma)
    torch.testing.assert_close(fast, masked, rtol=1e-6, atol=1e-7)
