"""SimpleTuner's dataset rules as EditTuner applies them: inferred dataset types, null captions on references,
top-level defaults, size filters (counted by check, named with --verbose), downsampling before a crop, crop
styles and aspects, text_embeds entries, disabled entries, and run length from epochs."""

from __future__ import annotations

import json
import math

import pytest

from shared.cli.main import main
from shared.config.loading import load_run_config_text
from shared.data.pairing import size_rule, target_placement
from shared.data.synthetic import write_configs, write_dataset
from shared.errors import ConfigError
from shared.train.trainer import total_steps

CONFIG = {"model_flavour": "edit-v2"}
IMAGES = {
    "id": "img",
    "type": "local",
    "instance_data_dir": "/d/img",
    "caption_strategy": "textfile",
    "conditioning_data": ["ref"],
}
REF = {"id": "ref", "type": "local", "instance_data_dir": "/d/ref", "conditioning_type": "reference_strict"}


def load(images: dict | None = None, ref: dict | None = None, extra: list[dict] = (), **config):
    data = [{**IMAGES, **(images or {})}, {**REF, **(ref or {})}, *extra]
    return load_run_config_text(json.dumps({**CONFIG, **config}), json.dumps(data))


def problems(*args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load(*args, **kw)
    return str(e.value)


# ------------------------------------------------------------------------------------------ entries
def test_a_reference_entry_needs_no_dataset_type_nor_caption_strategy():
    run = load(ref={"caption_strategy": None})  # FLUX_KONTEXT.md's snippet: conditioning_type, no dataset_type
    assert run.data.get("ref").dataset_type == "conditioning" and run.data.get("img").dataset_type == "image"
    data = [IMAGES, {k: v for k, v in REF.items() if k != "conditioning_type"}]
    named_only = load_run_config_text(json.dumps(CONFIG), json.dumps(data))  # named in conditioning_data: enough
    assert named_only.data.get("ref").dataset_type == "conditioning"
    assert "caption_strategy (id 'img'): is null, but the edit images need their" in problems(
        images={"caption_strategy": None}
    )


def test_config_level_sizes_are_every_image_datasets_defaults():
    run = load(resolution=128, resolution_type="pixel", minimum_image_size=64)
    assert (run.data.get("img").resolution, run.data.get("img").resolution_type) == (128, "pixel")
    run = load(images={"resolution": 512}, resolution=128, resolution_type="pixel", minimum_image_size=64)
    img = run.data.get("img")
    assert (img.resolution, img.resolution_type, img.minimum_image_size) == (512, "pixel", 64)  # its own wins
    assert run.data.get("ref").resolution is None  # references are placed by the pipeline's rule, not resolution


def test_a_disabled_entry_is_left_out_before_any_check():
    run = load(
        extra=[{"id": "old", "type": "local", "dataset_type": "image", "instance_data_dir": "", "disabled": True}]
    )
    assert [d.id for d in run.data.datasets] == ["img", "ref"]


def test_text_embeds_entries_set_where_caption_embeddings_go():
    te = {"id": "te", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "cache/te"}
    run = load(extra=[te])
    assert run.data.text_cache_prefix(run.data.get("img"), "edit-v2") == "cache/te/img"
    other = {**te, "id": "te2", "cache_dir": "cache/te2", "default": False}
    run = load(images={"text_embeds": "te2"}, extra=[te, other])
    assert run.data.text_cache_prefix(run.data.get("img"), "edit-v2") == "cache/te2/img"
    assert "only one text_embeds entry can be the default" in problems(extra=[te, {**other, "default": True}])
    assert "'nope' names no text_embeds entry" in problems(images={"text_embeds": "nope"}, extra=[te])


# ------------------------------------------------------------------------------------------ sizes
def test_size_rules_by_resolution_type():
    pixel = load(images={"resolution": 64, "resolution_type": "pixel", "minimum_image_size": 80}).data.get("img")
    assert size_rule(pixel, (96, 64)) == "96x64 has a side under minimum_image_size 80"
    assert size_rule(pixel, (96, 96)) is None
    area = load(images={"resolution": 64, "minimum_image_size": 80}).data.get("img")  # pixel_area: an edge
    assert size_rule(area, (96, 64)) == "96x64 is under minimum_image_size 80 (0.01 MP)"
    assert size_rule(area, (96, 72)) is None  # 6912 px >= 80²
    mp = load(images={"resolution": 0.25, "resolution_type": "area", "minimum_image_size": 0.5}).data.get("img")
    assert size_rule(mp, (600, 600)) is not None and size_rule(mp, (800, 700)) is None
    aspect = load(images={"minimum_aspect_ratio": 0.8, "maximum_aspect_ratio": 1.2}).data.get("img")
    assert size_rule(aspect, (96, 64)) == "96x64 is wider than maximum_aspect_ratio 1.2"
    assert size_rule(aspect, (64, 96)) == "64x96 is narrower than minimum_aspect_ratio 0.8"
    assert "go together" in problems(images={"maximum_image_size": 512})


def test_maximum_image_size_downsamples_to_target_downsample_size_before_the_crop():
    ds = load(
        images={
            "resolution": 64,
            "resolution_type": "pixel",
            "crop": True,
            "crop_aspect": "square",
            "maximum_image_size": 256,
            "target_downsample_size": 128,
        }
    ).data.get("img")
    p = target_placement(ds, (400, 300), "a")
    assert p.resize == (math.ceil(400 * 128 / 300), 128) and p.final == (64, 64)  # shorter side to 128, then 64²
    plain = load(images={"resolution": 64, "resolution_type": "pixel", "crop": True, "crop_aspect": "square"}).data.get(
        "img"
    )
    assert target_placement(plain, (400, 300), "a").resize == (86, 64)  # without: straight to cover 64²


def test_crop_styles_and_aspects():
    def ds(**kw):
        return load(images={"resolution": 64, "resolution_type": "pixel", "crop": True, **kw}).data.get("img")

    square = ds(crop_aspect="square")
    centre = target_placement(square, (200, 100), "a")
    assert centre.final == (64, 64) and centre.resize == (128, 64) and centre.crop == (32, 0)
    assert target_placement(ds(crop_aspect="square", crop_style="corner"), (200, 100), "a").crop == (0, 0)
    rnd = ds(crop_aspect="square", crop_style="random")
    crops = {target_placement(rnd, (200, 100), f"k{i}").crop for i in range(12)}
    assert len(crops) > 3 and all(0 <= x <= 64 and y == 0 for x, y in crops)  # drawn per image ...
    assert target_placement(rnd, (200, 100), "k1") == target_placement(rnd, (200, 100), "k1")  # ... and stable
    closest = ds(crop_aspect="closest", crop_aspect_buckets=[1.0, 1.5])
    w, h = target_placement(closest, (300, 200), "a").final
    assert h == 64 and abs(w / h - 1.5) < 0.1
    preserve = ds(crop_aspect="preserve")
    w, h = target_placement(preserve, (300, 200), "a").final
    assert h == 64 and w == 96
    assert "crop_aspect_buckets (id 'img'): is required with crop_aspect 'closest'" in problems(
        images={"crop": True, "crop_aspect": "closest"}
    )
    assert "face crops need a face detector" in problems(images={"crop": True, "crop_style": "face"})


def test_check_counts_what_size_rules_leave_out_and_verbose_names_them(tmp_path, tiny_models, capsys):
    root = write_dataset(tmp_path / "data", n=4, references=1)  # 64x64 and 96x64 targets, alternating
    cfg, data = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1)
    entries = json.loads(data.read_text())
    entries[0]["maximum_aspect_ratio"] = 1.2
    data.write_text(json.dumps(entries))
    args = ["check", "--config", str(cfg), "--data", str(data), "--store", str(tmp_path / "store")]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "2 samples" in out.out and "2 left out by size rules" in out.out and "left out:" not in out.out
    assert "2 image(s) left out by its size rules" in out.err
    assert main([*args, "--verbose"]) == 0
    listed = [line.strip() for line in capsys.readouterr().out.splitlines() if "left out:" in line]
    assert listed == [
        "left out: 0001.png: 96x64 is wider than maximum_aspect_ratio 1.2",
        "left out: 0003.png: 96x64 is wider than maximum_aspect_ratio 1.2",
    ]


# ------------------------------------------------------------------------------------------ length
def test_epochs_count_when_max_train_steps_is_zero_or_absent():
    run = load(num_train_epochs=3, gradient_accumulation_steps=2)
    assert (run.train.max_train_steps, run.train.num_train_epochs) == (0, 3)
    assert total_steps(run.train, 5) == 3 * 3  # 5 batches per epoch, 2 per step: 3 steps an epoch
    assert total_steps(load(max_train_steps=0, num_train_epochs=1).train, 4) == 4
    assert total_steps(load(max_train_steps=7).train, 4) == 7
    assert "both max_train_steps (7) and num_train_epochs (2) are set" in problems(
        max_train_steps=7, num_train_epochs=2
    )
    assert "give the run a length" in problems(max_train_steps=0)
