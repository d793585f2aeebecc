"""Encoding into the store: equal to diffusers' own computation, idempotent, re-encodes exactly what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.config.loading import load_run_config
from shared.data.pairing import load_sample, load_sample_images, pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.encode.ops import resize_reference
from shared.model.fingerprint import model_fingerprint
from shared.model.latents import pack_latents
from shared.model.loading import load_encoder_pipeline
from shared.store.local import LocalStore


@pytest.fixture(scope="module")
def pipes(tiny_models):
    cache = {}

    def get(flavour):
        if flavour not in cache:
            cache[flavour] = load_encoder_pipeline(tiny_models(flavour), flavour)
        return cache[flavour]

    return get


def setup(tmp_path: Path, tiny_models, flavour="edit-v2", refs=2, n=4, **overrides):
    root = write_dataset(tmp_path / "data", n=n, references=refs)
    cfg, _ = write_configs(tmp_path / "cfg", root, tiny_models(flavour), flavour, refs, **overrides)
    return root, cfg, LocalStore(tmp_path / "store")


def encode(cfg, store, pipe, *overrides):
    run = load_run_config(cfg, overrides=list(overrides))
    return DatasetEncoder(run, store, pipe=pipe).encode(), run


def test_cached_tensors_equal_diffusers_pipeline_computation(tmp_path, tiny_models, pipes):
    root, cfg, store = setup(tmp_path, tiny_models)
    pipe = pipes("edit-v2")
    stats, run = encode(cfg, store, pipe)
    assert (stats.encoded, stats.cached, stats.failed) == (16, 0, 0)  # 4 targets + 8 references + 4 captions
    [ds], _ = pair_datasets(run)
    s = ds.samples[1]
    target, refs = load_sample_images(ds, s, 10**8)
    # diffusers' VAE path: preprocess → _encode_vae_image (normalised, argmax) → _pack_latents
    w, h = s.bucket
    x = pipe.image_processor.preprocess(target, h, w).unsqueeze(2)
    expected = pipe._encode_vae_image(x, generator=None)
    expected_tokens = pipe._pack_latents(expected, 1, 16, h // 8, w // 8)
    cached, meta = store.get_tensors(f"cache/vae/demo-images/{s.key}.safetensors")
    assert cached["latents"].shape == (16, h // 8, w // 8)
    torch.testing.assert_close(pack_latents(cached["latents"][None]), expected_tokens, atol=1e-5, rtol=1e-5)
    # diffusers' prompt path: the Plus pipeline's encode_prompt with the references resized for the VL encoder
    vl = [resize_reference(pipe.image_processor, r, 64 * 64) for r in refs]
    pe, mask = pipe.encode_prompt(prompt=[s.caption], image=vl, device="cpu")
    text, _ = store.get_tensors(f"cache/text/demo-images/{s.key}.safetensors")
    assert text["prompt_embeds"].shape == pe[0].shape and int(text["prompt_mask"].sum()) == pe.shape[1]
    torch.testing.assert_close(text["prompt_embeds"], pe[0], atol=1e-5, rtol=1e-5)


def test_second_encode_encodes_nothing_and_a_changed_caption_exactly_one(tmp_path, tiny_models, pipes):
    root, cfg, store = setup(tmp_path, tiny_models)
    pipe = pipes("edit-v2")
    encode(cfg, store, pipe)
    before = {k: store.stat(k).sha256 for k in store.list("cache")}
    stats, _ = encode(cfg, store, pipe)
    assert (stats.encoded, stats.cached) == (0, 16)
    (root / "images" / "0002.txt").write_text("make everything green")
    stats, _ = encode(cfg, store, pipe)
    assert (stats.encoded, stats.cached) == (1, 15)
    after = {k: store.stat(k).sha256 for k in store.list("cache")}
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed[1:] == ["cache/text/demo-images/0002.safetensors", "cache/text/demo-images/manifest.json"]
    assert changed[0].startswith("cache/index/demo-images/")  # the training index carries the new caption
    index = store.get_json(changed[0])
    assert [s["caption"] for s in index["samples"]][2] == "make everything green"
    assert index["samples"][2]["references"] == [
        "cache/vae/demo-reference-a/0002.safetensors",
        "cache/vae/demo-reference-b/0002.safetensors",
    ]


def test_changed_reference_image_re_encodes_its_latent_and_the_caption_embedding(tmp_path, tiny_models, pipes):
    root, cfg, store = setup(tmp_path, tiny_models)
    pipe = pipes("edit-v2")
    encode(cfg, store, pipe)
    Image.new("RGB", (64, 64), "black").save(root / "reference_b" / "0001.png")
    stats, _ = encode(cfg, store, pipe)
    assert (stats.encoded, stats.cached) == (2, 14)
    manifest = store.get_json("cache/vae/demo-reference-b/manifest.json")
    assert set(manifest["entries"]) == {"0000", "0001", "0002", "0003"}


def test_changed_resolution_and_model_re_encode(tmp_path, tiny_models, pipes):
    root, cfg, store = setup(tmp_path, tiny_models, n=3)
    pipe = pipes("edit-v2")
    encode(cfg, store, pipe)
    data = cfg.parent / "multidatabackend.json"
    entries = json.loads(data.read_text())
    entries[0]["resolution"] = 128
    data.write_text(json.dumps(entries))
    stats, _ = encode(cfg, store, pipe)
    # every entry: strict references follow their target's bucket, and captions see their references
    assert (stats.encoded, stats.cached) == (12, 0)
    stats, _ = encode(cfg, store, pipe)
    assert (stats.encoded, stats.cached) == (0, 12)
    # another model: every entry
    other = tiny_models("edit-v2", seed=1)
    assert model_fingerprint(str(other), ["vae"]) != model_fingerprint(str(tiny_models("edit-v2")), ["vae"])
    stats, _ = encode(cfg, store, load_encoder_pipeline(other, "edit-v2"), f"pretrained_model_name_or_path={other}")
    assert (stats.encoded, stats.cached) == (12, 0)


def test_manifest_records_shapes_dtypes_sources_and_model(tmp_path, tiny_models, pipes):
    root, cfg, store = setup(tmp_path, tiny_models, n=2)
    encode(cfg, store, pipes("edit-v2"))
    m = store.get_json("cache/vae/demo-images/manifest.json")
    e = m["entries"]["0001"]
    assert e["object"] == "cache/vae/demo-images/0001.safetensors" and e["dataset"] == "demo-images"
    assert e["shapes"] == {"latents": [16, e["bucket"][1] // 8, e["bucket"][0] // 8]}
    assert e["dtypes"] == {"latents": "float32"} and e["model"] == str(tiny_models("edit-v2"))
    import hashlib

    assert e["sources"] == {"0001.png": hashlib.sha256((root / "images" / "0001.png").read_bytes()).hexdigest()}


def test_edit_v1_embeds_go_to_the_conditioning_image_embeds_cache(tmp_path, tiny_models, pipes):
    root, cfg, store = setup(
        tmp_path,
        tiny_models,
        flavour="edit-v1",
        refs=1,
        n=2,
        model_kwargs={"match_target_res": True, "vl_reference_area": 64 * 64},
    )
    pipe = pipes("edit-v1")
    stats, run = encode(cfg, store, pipe)
    assert stats.encoded == 6
    keys = store.list("cache/conditioning_image_embeds/demo")
    assert keys == [
        "cache/conditioning_image_embeds/demo/0000.safetensors",
        "cache/conditioning_image_embeds/demo/0001.safetensors",
        "cache/conditioning_image_embeds/demo/manifest.json",
    ]
    [ds], _ = pair_datasets(run)
    s = ds.samples[0]
    _, _, [region] = load_sample(ds, s, 10**8)  # the reference as a user would hand it to the pipeline
    pe, _ = pipe.encode_prompt(
        prompt=[s.caption], image=resize_reference(pipe.image_processor, region, 64 * 64), device="cpu"
    )
    text, _ = store.get_tensors(keys[0])
    torch.testing.assert_close(text["prompt_embeds"], pe[0], atol=1e-5, rtol=1e-5)


def test_random_sampling_and_caption_dropout_cache_one_embedding_per_choice_and_null(tmp_path, tiny_models, pipes):
    root, cfg, store = setup(tmp_path, tiny_models, n=2)
    stats, _ = encode(
        cfg, store, pipes("edit-v2"), "conditioning_multidataset_sampling=random", "caption_dropout_probability=0.1"
    )
    assert stats.encoded == 2 + 4 + 4
    keys = [k for k in store.list("cache/text/demo-images") if not k.endswith("manifest.json")]
    assert keys == [
        f"cache/text/demo-images/{s}/demo-reference-{c}.safetensors" for s in ("0000", "0001") for c in "ab"
    ]
    a, _ = store.get_tensors(keys[0])
    b, _ = store.get_tensors(keys[1])
    assert set(a) == {"prompt_embeds", "prompt_mask", "null_embeds", "null_mask"}
    assert not torch.equal(a["prompt_embeds"], b["prompt_embeds"])  # each conditioned on its own reference
    assert not torch.equal(a["prompt_embeds"], a["null_embeds"])


def test_a_reference_dataset_shared_by_two_image_datasets_keeps_both_placements(tmp_path, tiny_models, pipes):
    """Two image datasets at different resolutions share one reference folder: each gets its own reference
    latents, both indexes are complete, and a second encode encodes nothing."""
    root, cfg, store = setup(tmp_path, tiny_models, refs=1, n=3)
    data = cfg.parent / "multidatabackend.json"
    entries = json.loads(data.read_text())
    entries.insert(1, dict(entries[0], id="demo-images-small", resolution=48, cache_dir_vae="cache/vae/small"))
    data.write_text(json.dumps(entries))
    pipe = pipes("edit-v2")
    first, run = encode(cfg, store, pipe)
    second, _ = encode(cfg, store, pipe)
    assert second.encoded == 0 and second.cached == first.encoded
    indexes = [store.get_json(k) for k in store.list("cache/index")]
    assert sorted(len(i["samples"]) for i in indexes) == [3, 3]
    refs = {i["dataset"]: i["samples"][0]["references"][0] for i in indexes}
    assert refs == {
        "demo-images": "cache/vae/demo-reference-a/demo-images/0000.safetensors",
        "demo-images-small": "cache/vae/demo-reference-a/demo-images-small/0000.safetensors",
    }
