"""Paired datasets: discovery, captions, pairing by name, bad files, buckets and reference placement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.config.loading import load_run_config
from shared.data.geometry import bucket_for_area, bucket_for_short_side, cover_crop, pipeline_size
from shared.data.pairing import load_sample_images, pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.errors import ConfigError, DatasetError


def make_run(tmp_path: Path, flavour: str = "edit-v2", refs: int = 2, n: int = 6, data_edit=None, **overrides):
    root = write_dataset(tmp_path / "data", n=n, references=refs)
    cfg, data = write_configs(tmp_path / "cfg", root, tmp_path / "model", flavour, refs, **overrides)
    if data_edit is not None:
        entries = json.loads(data.read_text())
        data_edit(entries)
        data.write_text(json.dumps(entries))
    return root, lambda *o: load_run_config(cfg, overrides=list(o))


def test_pairs_by_name_with_captions_and_references_in_order(tmp_path):
    root, run = make_run(tmp_path)
    [ds], warnings = pair_datasets(run())
    assert warnings == [] and ds.role == "train"
    assert [s.key for s in ds.samples] == [f"{i:04d}" for i in range(6)]
    s = ds.samples[2]
    assert s.caption == (root / "images" / "0002.txt").read_text().strip()
    assert [r.dataset_id for r in s.references] == ["demo-reference-a", "demo-reference-b"]
    assert [r.image.relpath for r in s.references] == ["0002.png", "0002.png"]


def test_extension_may_differ_and_subfolders_pair_by_relative_path(tmp_path):
    root, run = make_run(tmp_path, refs=1, n=3)
    Image.open(root / "reference_a" / "0001.png").save(root / "reference_a" / "0001.jpg")
    (root / "reference_a" / "0001.png").unlink()
    for d in ("images", "reference_a"):
        (root / d / "sub").mkdir()
        Image.new("RGB", (64, 64), "red").save(root / d / "sub" / "x.png")
    (root / "images" / "sub" / "x.txt").write_text("make it blue")
    [ds], _ = pair_datasets(run())
    assert [s.key for s in ds.samples] == ["0000", "0001", "0002", "sub/x"]
    assert ds.samples[1].references[0].image.relpath == "0001.jpg"
    assert ds.samples[3].caption == "make it blue"


def test_missing_reference_names_dataset_and_files_before_any_work(tmp_path):
    root, run = make_run(tmp_path, n=5)
    (root / "reference_b" / "0001.png").unlink()
    (root / "reference_b" / "0003.png").unlink()
    with pytest.raises(DatasetError) as e:
        pair_datasets(run())
    [p] = e.value.problems
    assert "'demo-reference-b'" in p.where
    assert "2 of 5 images of 'demo-images': 0001.png, 0003.png" in p.message
    assert "Control tensor list length does not match batch size" in p.message
    assert str(root / "reference_b") in p.message


def test_empty_reference_folder(tmp_path):
    root, run = make_run(tmp_path, refs=1, n=3)
    for f in (root / "reference_a").iterdir():
        f.unlink()
    with pytest.raises(DatasetError) as e:
        pair_datasets(run())
    msgs = [str(p) for p in e.value.problems]
    assert any("'demo-reference-a'" in m and "contains no images" in m for m in msgs)
    assert any("no reference for 3 of 3 images" in m for m in msgs)


def test_missing_folder_is_named(tmp_path):
    root, run = make_run(tmp_path, refs=1, n=2)
    (root / "reference_a").rename(root / "elsewhere")
    with pytest.raises(DatasetError) as e:
        pair_datasets(run())
    [p] = e.value.problems
    assert "'demo-reference-a'" in p.where and str(root / "reference_a") in p.message and "not a folder" in p.message


def test_orphan_references_are_a_warning(tmp_path):
    root, run = make_run(tmp_path, refs=1, n=3)
    Image.new("RGB", (64, 64)).save(root / "reference_a" / "9999.png")
    [ds], warnings = pair_datasets(run())
    assert len(ds.samples) == 3
    [w] = warnings
    assert "'demo-reference-a'" in w and "9999.png" in w and "unused" in w


def test_missing_caption_file(tmp_path):
    root, run = make_run(tmp_path, refs=1, n=3)
    (root / "images" / "0002.txt").unlink()
    with pytest.raises(DatasetError) as e:
        pair_datasets(run())
    [p] = e.value.problems
    assert "'demo-images'" in p.where and "0002.png" in p.message and "textfile" in p.message


def test_filename_and_instanceprompt_captions(tmp_path):
    def rename(entries):
        entries[0]["caption_strategy"] = "filename"

    root, run = make_run(tmp_path, refs=1, n=1, data_edit=rename)
    (root / "images" / "0000.png").rename(root / "images" / "make_it_blue.png")
    (root / "reference_a" / "0000.png").rename(root / "reference_a" / "make_it_blue.png")
    [ds], _ = pair_datasets(run())
    assert ds.samples[0].caption == "make it blue"

    def instance(entries):
        entries[0].update(caption_strategy="instanceprompt", instance_prompt="turn it into a watercolor")

    _, run2 = make_run(tmp_path / "b", refs=1, n=2, data_edit=instance)
    [ds], _ = pair_datasets(run2())
    assert {s.caption for s in ds.samples} == {"turn it into a watercolor"}


def write_bad_files(root: Path) -> None:
    (root / "images" / "0001.png").write_bytes(b"this is not an image")
    good = root / "images" / "0002.png"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated: the header parses, the pixels do not


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_corrupt_and_truncated_files(tmp_path, policy):
    root, run = make_run(tmp_path, refs=1, n=4)
    write_bad_files(root)
    if policy == "fail":
        with pytest.raises(DatasetError) as e:
            pair_datasets(run())
        text = str(e.value)
        assert "0001.png: not a readable image" in text
        assert "0002.png: image is corrupt or truncated" in text
        assert "bad_image_policy" in text
    else:
        [ds], warnings = pair_datasets(run("bad_image_policy=skip"))
        assert [s.key for s in ds.samples] == ["0000", "0003"] and ds.skipped == ["0001", "0002"]
        assert len(warnings) == 2 and all("skipping sample" in w for w in warnings)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    root, run = make_run(tmp_path, refs=1, n=2)
    Image.new("RGB", (3000, 2000), "white").save(root / "reference_a" / "0001.png")
    with pytest.raises(DatasetError) as e:
        pair_datasets(run("max_image_pixels=1000000"))
    assert "0001.png: 3000x2000 = 6000000 pixels is over the limit of 1000000" in str(e.value)


def test_duplicate_stems_are_ambiguous(tmp_path):
    root, run = make_run(tmp_path, refs=1, n=2)
    Image.new("RGB", (64, 64)).save(root / "images" / "0001.jpg")
    with pytest.raises(DatasetError) as e:
        pair_datasets(run())
    assert "0001.jpg, 0001.png share the stem '0001'" in str(e.value)


# --------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "size,area", [((1024, 1024), 1024**2), ((1920, 1080), 1024**2), ((600, 1400), 768**2), ((97, 61), 80**2)]
)
def test_buckets_are_multiples_of_32_near_the_area_and_aspect(size, area):
    w, h = bucket_for_area(*size, area)
    assert w % 32 == 0 and h % 32 == 0
    assert abs(w * h - area) / area < 0.25
    assert abs(np.log((w / h) / (size[0] / size[1]))) < 0.25


def test_pixel_resolution_type_sets_the_short_side():
    assert bucket_for_short_side(1920, 1080, 512) == (896, 512)


def test_cover_crop_is_centred_and_covers():
    p = cover_crop((1920, 1080), (1024, 576))
    assert p.resize == (1024, 576) and p.crop == (0, 0)
    p = cover_crop((1000, 1000), (1024, 576))
    assert p.resize == (1024, 1024) and p.crop == (0, 224) and p.size == (1024, 576)
    img = p.apply(Image.new("RGB", (1000, 1000)))
    assert img.size == (1024, 576)


def _placements(tmp_path, flavour, conditioning_type, *overrides, ref_size=(96, 64), target_size=None):
    def edit(entries):
        entries[1]["conditioning_type"] = conditioning_type

    root, run = make_run(tmp_path, flavour=flavour, refs=1, n=2, data_edit=edit)
    Image.new("RGB", ref_size, "blue").save(root / "reference_a" / "0000.png")
    if target_size:
        Image.new("RGB", target_size, "red").save(root / "images" / "0000.png")
    # the pipelines' 1 MP (the generated configs use the target's area, to keep other tests small)
    [ds], _ = pair_datasets(run("model_kwargs.reference_area=1048576", *overrides))
    return ds, ds.samples[0]


def test_reference_strict_is_cropped_like_its_target_then_sized_to_a_megapixel(tmp_path):
    # a 200x64 target's bucket (128x32) crops its height; its reference (twice the size) loses the same fraction
    ds, s = _placements(tmp_path, "edit-v1", "reference_strict", ref_size=(400, 128), target_size=(200, 64))
    t, r = s.placement, s.references[0].placement
    assert t.size == (128, 32) and t.crop[1] > 0
    assert r.crop[0] == 0 and abs(r.crop[1] / 128 - t.crop[1] / t.resize[1]) < 0.01  # same fraction cut
    assert abs(r.size[0] / r.size[1] - 128 / 32) < 0.05 and r.crop[1] + r.size[1] <= 128
    assert r.final == pipeline_size(1024 * 1024, r.size[0] / r.size[1])  # ~1 MP at the crop's own aspect
    target, [ref] = load_sample_images(ds, s, 10**8)
    assert target.size == (128, 32) and ref.size == r.final


def test_reference_loose_is_the_whole_image_at_its_own_aspect(tmp_path):
    ds, s = _placements(tmp_path, "edit-v1", "reference_loose")
    r = s.references[0].placement
    assert s.bucket == (64, 64) and (r.crop, r.size) == ((0, 0), (96, 64))
    assert r.final == pipeline_size(1024 * 1024, 96 / 64) == (1248, 832)


def test_edit_v2_references_at_one_megapixel_of_their_aspect_by_default(tmp_path):
    ds, s = _placements(tmp_path, "edit-v2", "reference_loose", "model_kwargs.match_target_res=false")
    assert s.references[0].placement.final == (1248, 832)
    ds, s = _placements(tmp_path / "b", "edit-v2", "reference_strict", "model_kwargs.match_target_res=false")
    # its 64x64 target is not cropped, so neither is it: its own aspect, not stretched to the target's
    assert s.references[0].placement.size == (96, 64) and s.references[0].placement.final == (1248, 832)
    ds, s = _placements(
        tmp_path / "c",
        "edit-v2",
        "reference_loose",
        "model_kwargs.match_target_res=false",
        "model_kwargs.reference_area=262144",
    )  # a smaller area for small GPUs
    assert s.references[0].placement.final == pipeline_size(512 * 512, 1.5) == (640, 416)


def test_a_strict_reference_of_another_aspect_is_named_in_a_warning(tmp_path):
    def edit(entries):
        entries[1]["conditioning_type"] = "reference_strict"

    root, run = make_run(tmp_path, flavour="edit-v2", refs=1, n=2, data_edit=edit)
    Image.new("RGB", (96, 64), "blue").save(root / "reference_a" / "0000.png")  # its target is 64x64
    [ds], warnings = pair_datasets(run("model_kwargs.match_target_res=false", "model_kwargs.reference_area=1048576"))
    [w] = [w for w in warnings if "reference_strict" in w]
    assert "0000.png 64x64 / 0000.png 96x64" in w and "1 reference_strict pair" in w and "0001" not in w
    assert ds.samples[0].references[0].placement.final == (1248, 832)  # kept at 3:2, not stretched to 1:1


def test_match_target_res_gives_references_the_target_resolution(tmp_path):
    ds, s = _placements(tmp_path, "edit-v2", "reference_strict", "model_kwargs.match_target_res=true")
    assert s.references[0].placement.final == s.bucket
    ds, s = _placements(
        tmp_path / "b", "edit-v2", "reference_loose", "model_kwargs.match_target_res=true", ref_size=(128, 64)
    )
    # the target's area (64x64) at the reference's own 2:1 aspect
    assert s.bucket == (64, 64) and s.references[0].placement.final == bucket_for_area(128, 64, 64 * 64) == (96, 32)


def test_eval_dataset_is_not_a_training_dataset(tmp_path):
    root = write_dataset(tmp_path / "val", n=2, references=2, seed=3)

    def add_val(entries):
        entries.append(
            dict(
                entries[0],
                id="demo-val",
                instance_data_dir=str(root / "images"),
                conditioning_data=["demo-val-ref-a", "demo-val-ref-b"],
                cache_dir_vae="cache/vae/val",
            )
        )
        for c in "ab":
            entries.append(
                dict(
                    entries[1],
                    id=f"demo-val-ref-{c}",
                    instance_data_dir=str(root / f"reference_{c}"),
                    cache_dir_vae=f"cache/vae/val-ref-{c}",
                )
            )

    _, run = make_run(tmp_path, data_edit=add_val)
    paired, _ = pair_datasets(run("eval_dataset_id=demo-val"))
    assert [(d.config.id, d.role, len(d.samples)) for d in paired] == [
        ("demo-images", "train", 6),
        ("demo-val", "eval", 2),
    ]


def test_qwen21_ten_references_are_placed_where_its_pipeline_puts_them_an_eleventh_is_refused(tmp_path):
    """Qwen-Image-2.1: each reference at the output area (reference_area = output_resolution²) of its own aspect,
    as QwenImage21Pipeline sizes it (qwen21_sizes), whatever match_target_res says; eleven reference datasets are
    refused by name before any work; a missing reference file is the "Control tensor list length" problem."""
    from shared.data.geometry import qwen21_sizes

    root, run = make_run(tmp_path / "ten", flavour="v2.1", refs=10, n=2)
    [ds], _ = pair_datasets(run())
    for s in ds.samples:
        sources = [Image.open(root / f"reference_{chr(ord('a') + i)}" / f"{s.key}.png").size for i in range(10)]
        expected, _ = qwen21_sizes(sources, 80)  # write_configs sets reference_area to 80²
        assert [r.placement.final for r in s.references] == expected
    assert len({r.placement.final for s in ds.samples for r in s.references}) > 1  # each at its own aspect
    (root / "reference_j" / "0001.png").unlink()
    with pytest.raises(DatasetError) as e:
        pair_datasets(run())
    [p] = e.value.problems
    assert "'demo-reference-j'" in p.where and "Control tensor list length does not match batch size" in p.message

    def eleven(entries):
        entries.append(dict(entries[1], id="demo-reference-k", cache_dir_vae="cache/vae/demo-reference-k"))
        entries[0]["conditioning_data"].append("demo-reference-k")

    _, run11 = make_run(tmp_path / "eleven", flavour="v2.1", refs=10, n=2, data_edit=eleven)
    with pytest.raises(ConfigError) as c:
        run11()
    assert (
        "conditioning_data" in str(c.value) and "at most 10" in str(c.value) and "11 reference datasets" in str(c.value)
    )


def test_qwen21_without_references_is_text_to_image(tmp_path):
    root, run = make_run(tmp_path, flavour="v2.1", refs=0, n=3)
    [ds], warnings = pair_datasets(run())
    assert [len(s.references) for s in ds.samples] == [0, 0, 0] and warnings == []
    with pytest.raises(ConfigError, match="trains on pairs"):
        make_run(tmp_path / "v2", flavour="edit-v2", refs=0, n=1)[1]()


def test_qwen21_says_which_edit_model_options_it_ignores(tmp_path):
    _, run = make_run(tmp_path, flavour="v2.1", refs=2, n=1)
    assert run().warnings == ()
    warned = run("model_kwargs.match_target_res=true", "model_kwargs.vl_reference_area=4096").warnings
    assert [w.split(": ")[1] for w in warned] == ["$.model_kwargs.vl_reference_area", "$.model_kwargs.match_target_res"]
    assert all("ignored for v2.1" in w and "reference_area" in w for w in warned)
