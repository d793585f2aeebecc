"""Validation previews: grids in the store, PSNRs that are what they claim, a deterministic held-out loss that
sees the LoRA, eval-sample selection, and a LoRA loaded from an exported file."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image

from shared.config.loading import load_run_config
from shared.data.geometry import cover_crop
from shared.data.pairing import load_sample_images, pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.evaluate.grid import LABEL_HEIGHT
from shared.evaluate.preview import (
    eval_set,
    heldout_loss,
    index_entries,
    output_size,
    render_validation,
    select_eval_samples,
)
from shared.model.adapters import adapters_disabled
from shared.model.loading import load_pipeline
from shared.store.local import LocalStore

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PREFIX = "runs/r1/validation"


def attach_lora(transformer: torch.nn.Module, seed: int = 0) -> None:
    """A LoRA whose update is clearly non-zero (B is zero-initialised by peft unless perturbed)."""
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def independent_psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    return 20 * math.log10(255) - 10 * math.log10(np.mean((x - y) ** 2))


def _add_eval_dataset(data_json: Path, root: Path) -> None:
    """An eval image dataset with its own references and caches (same file names as the training set)."""
    entries = json.loads(data_json.read_text())
    refs = [e for e in entries if e.get("dataset_type") == "conditioning"]
    entries.append(
        dict(
            entries[0],
            id="eval-images",
            instance_data_dir=str(root / "images"),
            cache_dir_vae="cache/vae/eval-images",
            conditioning_data=[f"eval-ref-{i}" for i in range(len(refs))],
        )
    )
    for i, r in enumerate(refs):
        entries.append(
            dict(
                r,
                id=f"eval-ref-{i}",
                cache_dir_vae=f"cache/vae/eval-ref-{i}",
                instance_data_dir=str(root / f"reference_{chr(ord('a') + i)}"),
            )
        )
    data_json.write_text(json.dumps(entries))


class Setup:
    def __init__(self, tmp: Path, tiny_models: Any, flavour: str, refs: int, eval_set: bool):
        data = write_dataset(tmp / "data", n=4, references=refs)
        # 80x80: an area whose 3:2 size rounds to 96x64 (at 64x64 both aspects would round to a square)
        self.cfg, data_json = write_configs(
            tmp / "cfg", data, tiny_models(flavour), flavour, refs, num_eval_images=2, validation_resolution="80x80"
        )
        if eval_set:
            _add_eval_dataset(data_json, write_dataset(tmp / "eval", n=3, references=refs, seed=5))
        self.overrides = ["eval_dataset_id=eval-images"] if eval_set else []
        self.run = load_run_config(self.cfg, overrides=self.overrides)
        self.pipe = load_pipeline(tiny_models(flavour), flavour)
        self.store = LocalStore(tmp / "store")
        _, self.index_keys = DatasetEncoder(self.run, self.store, pipe=self.pipe).encode_with_index()
        self.paired, _ = pair_datasets(self.run)


@pytest.fixture(scope="module")
def v2(tmp_path_factory, tiny_models) -> Setup:
    s = Setup(tmp_path_factory.mktemp("preview-v2"), tiny_models, "edit-v2", refs=2, eval_set=True)
    attach_lora(s.pipe.transformer)
    return s


@pytest.fixture(scope="module")
def v2_result(v2):
    ev = eval_set(v2.run, v2.paired, v2.store, v2.index_keys)
    return (
        ev.samples,
        ev.entries,
        render_validation(
            v2.pipe,
            v2.run,
            ev.samples,
            step=10,
            store=v2.store,
            prefix=PREFIX,
            loss_index=ev.entries,
            eval_label=ev.label,
        ),
    )


def test_eval_dataset_id_picks_the_eval_datasets_first_samples(v2, v2_result):
    samples, entries, _ = v2_result
    assert [(ds.config.id, s.key) for ds, s in samples] == [("eval-images", "0000"), ("eval-images", "0001")]
    assert [e["key"] for e in entries] == ["0000", "0001"]
    assert all(e["target"].startswith("cache/vae/eval-images/") for e in entries)


def test_without_eval_dataset_the_first_training_samples(v2):
    run = load_run_config(v2.cfg, overrides=["num_eval_images=3"])
    paired, _ = pair_datasets(run)
    assert [(ds.config.id, s.key) for ds, s in select_eval_samples(run, paired)] == [
        ("demo-images", "0000"),
        ("demo-images", "0001"),
        ("demo-images", "0002"),
    ]


def test_grids_are_pngs_of_references_base_lora_target_at_each_samples_aspect(v2, v2_result):
    samples, _, result = v2_result
    assert result.keys == [f"{PREFIX}/step-10/0000.png", f"{PREFIX}/step-10/0001.png", f"{PREFIX}/step-10/metrics.json"]
    sizes = set()
    for (_, sample), preview in zip(samples, result.samples, strict=True):
        W, H = output_size(v2.run.train.validation_size, sample.bucket)
        assert W / H == pytest.approx(sample.bucket[0] / sample.bucket[1], rel=0.05)  # not square when it is not
        sizes.add((W, H))
        grid = Image.open(io.BytesIO(v2.store.get_bytes(preview.grid_key)))
        # title strips (the title wraps to the grid's width) + labels
        assert grid.format == "PNG" and grid.width == (2 + 3) * W and grid.height >= H + 2 * LABEL_HEIGHT
        assert (grid.height - H) % LABEL_HEIGHT == 0
        # the LoRA cell (4th) holds exactly the rendered LoRA image: outputs are already at the cell size
        lora_cell = grid.convert("RGB").crop((3 * W, grid.height - H, 4 * W, grid.height))
        assert np.array_equal(np.asarray(lora_cell), np.asarray(preview.lora))
        assert preview.lora.size == preview.base.size == preview.target.size == (W, H)
        assert not np.array_equal(np.asarray(preview.lora), np.asarray(preview.base))
    assert len(sizes) == 2  # the eval samples have two different aspects, and so do their previews


def test_metrics_json_psnrs_match_an_independent_computation(v2, v2_result):
    samples, _, result = v2_result
    W, H = v2.run.train.validation_size
    metrics = v2.store.get_json(result.metrics_key)
    assert metrics["step"] == 10 and metrics["seconds"] > 0
    assert metrics["settings"] == {
        "width": W,
        "height": H,
        "steps": 2,
        "guidance": 4.0,
        "guidance_rescale": 0.0,
        "negative_prompt": " ",
        "seed": 42,
        "vl_reference_area": 64 * 64,
        "eval_samples": "eval dataset",
    }
    for (ds, sample), preview, m in zip(samples, result.samples, metrics["samples"], strict=True):
        target, _ = load_sample_images(ds, sample, 10**8)
        size = output_size((W, H), target.size)
        target_v = target if target.size == size else cover_crop(target.size, size).apply(target)  # no stretch
        assert (m["width"], m["height"]) == size
        assert m["key"] == sample.key and m["dataset"] == "eval-images"
        assert m["psnr_lora"] == pytest.approx(independent_psnr(preview.lora, target_v), abs=1e-9)
        assert m["psnr_base"] == pytest.approx(independent_psnr(preview.base, target_v), abs=1e-9)
        assert m["psnr_lora"] != m["psnr_base"]
    assert metrics["psnr_lora"] == pytest.approx(np.mean([m["psnr_lora"] for m in metrics["samples"]]))
    assert metrics["psnr_base"] == pytest.approx(np.mean([m["psnr_base"] for m in metrics["samples"]]))


def test_heldout_loss_is_deterministic_and_sees_the_lora(v2, v2_result):
    _, entries, result = v2_result
    metrics = v2.store.get_json(result.metrics_key)
    assert set(metrics["heldout_loss"]) == {"0.25", "0.5", "0.75"}
    assert all(math.isfinite(v) for v in metrics["heldout_loss"].values())
    assert metrics["heldout_loss_mean"] == pytest.approx(np.mean(list(metrics["heldout_loss"].values())))
    tr = v2.pipe.transformer
    kw = dict(seed=v2.run.train.seed, device="cpu", dtype=torch.float32)
    again = heldout_loss(tr, v2.store, entries, **kw)
    assert again.per_sigma == metrics["heldout_loss"]  # bit-identical, not just close
    with adapters_disabled(tr):
        base = heldout_loss(tr, v2.store, entries, **kw)
    assert all(abs(base.per_sigma[k] - again.per_sigma[k]) > 1e-6 for k in again.per_sigma)
    assert heldout_loss(tr, v2.store, entries, **kw).per_sigma == again.per_sigma  # adapter back on


def test_adapter_state_and_trainability_are_restored(v2, v2_result):
    tr = v2.pipe.transformer
    lora = {n: p.requires_grad for n, p in tr.named_parameters() if "lora_" in n}
    assert lora and all(lora.values())  # add_adapter made them trainable; a preview must not change that
    frozen = [n for n, p in tr.named_parameters() if "lora_" not in n and p.requires_grad]
    with adapters_disabled(tr):
        pass
    assert {n: p.requires_grad for n, p in tr.named_parameters() if "lora_" in n} == lora
    assert [n for n, p in tr.named_parameters() if "lora_" not in n and p.requires_grad] == frozen


def test_rendering_is_reproducible(v2, v2_result):
    samples, _, result = v2_result
    again = render_validation(v2.pipe, v2.run, samples[:1], step=11, store=v2.store, prefix=PREFIX)
    assert np.array_equal(np.asarray(again.samples[0].lora), np.asarray(result.samples[0].lora))
    assert again.heldout is None and v2.store.get_json(again.metrics_key)["heldout_loss"] is None


def test_edit_v1_with_a_lora_loaded_from_an_exported_file(tmp_path, tiny_models):
    from diffusers import QwenImageEditPipeline
    from peft.utils import get_peft_model_state_dict

    s = Setup(tmp_path, tiny_models, "edit-v1", refs=1, eval_set=False)
    trained = load_pipeline(tiny_models("edit-v1"), "edit-v1").transformer
    attach_lora(trained, seed=3)
    QwenImageEditPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(trained)
    )
    s.pipe.load_lora_weights(tmp_path / "lora", adapter_name="edit")
    samples = select_eval_samples(s.run, s.paired)
    entries = index_entries(s.store, s.index_keys, samples)
    grads = {n: p.requires_grad for n, p in s.pipe.transformer.named_parameters()}
    result = render_validation(
        s.pipe, s.run, samples, step=0, store=s.store, prefix="runs/v1/validation", loss_index=entries
    )
    for (_, sample), p in zip(samples, result.samples, strict=True):
        W, H = output_size(s.run.train.validation_size, sample.bucket)
        grid = Image.open(io.BytesIO(s.store.get_bytes(p.grid_key)))
        assert grid.width == (1 + 3) * W and grid.height >= H + 2 * LABEL_HEIGHT
        assert not np.array_equal(np.asarray(p.lora), np.asarray(p.base))
    assert math.isfinite(result.heldout.mean)
    # toggling adapters (peft's set_adapter makes LoRA weights trainable) left every requires_grad as it was
    assert {n: p.requires_grad for n, p in s.pipe.transformer.named_parameters()} == grads
    assert len(result.samples) == 2 and result.samples[0].dataset_id == "demo-images"


def test_a_title_wider_than_its_grid_wraps_at_its_separators_and_loses_nothing():
    from PIL import ImageFont

    from shared.evaluate.grid import _title_lines, compose_grid

    title = "step 150 · demo-images/0000 · PSNR base 16.31 dB, LoRA 20.59 dB"
    font = ImageFont.load_default()
    assert font.getlength(title) > 4 * 64 - 4  # a 64 px CPU preview's grid is narrower than its title
    lines = _title_lines(title, 4 * 64 - 4)
    assert len(lines) > 1 and " · ".join(lines) == title
    assert all(font.getlength(line) <= 4 * 64 - 4 for line in lines)
    cells = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "white")]
    grid = compose_grid(cells, ["ref 1", "base", "LoRA", "target"], (64, 64), title=title)
    assert grid.size == (4 * 64, 64 + (len(lines) + 1) * LABEL_HEIGHT)
    assert np.array_equal(np.asarray(grid.crop((2 * 64, grid.height - 64, 3 * 64, grid.height))), np.asarray(cells[2]))
    assert _title_lines(title, 2000) == [title]  # a wide grid keeps it on one line


def test_ten_references_go_in_a_strip_of_thumbnails_as_wide_as_the_renders():
    from shared.evaluate.grid import compose_grid

    colours = [(25 * i, 255 - 25 * i, 100) for i in range(10)]
    refs = [Image.new("RGB", (64, 64), c) for c in colours]
    outputs = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    labels = [f"ref {i + 1}" for i in range(10)] + ["base", "LoRA", "target"]
    grid = compose_grid([*refs, *outputs], labels, (64, 64), thumbnails=10)
    tw = 3 * 64 // 10  # ten equal thumbnails across the three renders' width
    assert grid.size == (3 * 64, LABEL_HEIGHT + tw + LABEL_HEIGHT + 64)
    pixels = np.asarray(grid)
    for i, c in enumerate(colours):  # each reference in its own thumbnail, in order
        assert tuple(pixels[LABEL_HEIGHT + tw // 2, i * tw + tw // 2]) == c
    row = grid.crop((64, grid.height - 64, 2 * 64, grid.height))
    assert np.array_equal(np.asarray(row), np.asarray(outputs[1]))
    three = compose_grid([*refs[:3], *outputs], labels[:3] + labels[10:], (64, 64), thumbnails=3)
    assert three.size == (6 * 64, LABEL_HEIGHT + 64)  # up to three references stay beside the renders
