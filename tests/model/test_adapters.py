"""Frozen adapters beside the trained one (``shared.model.adapters``): a LoRA file in diffusers, ComfyUI or kohya
keys loads as diffusers loads it and changes the forward; it stays frozen while the trained adapter trains; the
trained adapter's state and export hold none of its tensors; ``active_adapters`` switches sets and strengths."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from shared import errors
from shared.model.adapters import TRAINED, active_adapters, attach_frozen_adapter, read_lora_file
from shared.model.flow import EditBatch, predict_velocity
from shared.model.latents import pack_latents
from shared.model.loading import load_transformer
from shared.model.lora import COMFYUI_FILE, DIFFUSERS_FILE, attach_lora, lora_state_dict, save_lora_files

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def base(tiny_models: Any) -> Any:
    return load_transformer(tiny_models("edit-v2"), "edit-v2").eval()


@pytest.fixture(scope="module")
def lora_files(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random LoRA (rank 4, alpha 2) written as diffusers, ComfyUI and kohya files."""
    donor = copy.deepcopy(base)
    attach_lora(donor, 4, 2.0, 0.0, TARGETS, seed=3)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    files = save_lora_files(lora_state_dict(donor), alpha=2.0, rank=4, fmt="both", transformer=donor)
    out = tmp_path_factory.mktemp("adapters")
    paths = {"diffusers": out / "lightning" / DIFFUSERS_FILE, "comfyui": out / "comfy.safetensors"}
    paths["diffusers"].parent.mkdir()
    paths["diffusers"].write_bytes(files[DIFFUSERS_FILE])
    paths["comfyui"].write_bytes(files[COMFYUI_FILE])
    comfy = load_safetensors(files[COMFYUI_FILE])
    kohya = {}
    suffixes = ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"), (".alpha", ".alpha"))
    for key, value in comfy.items():  # kohya: lora_unet_<module with _>.lora_down / lora_up / alpha
        body = key.removeprefix("diffusion_model.")
        for suffix, new in suffixes:
            if body.endswith(suffix):
                kohya["lora_unet_" + body[: -len(suffix)].replace(".", "_") + new] = value
    paths["kohya"] = out / "kohya.safetensors"
    save_file(kohya, str(paths["kohya"]))
    return paths


def _batch() -> tuple[EditBatch, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    edit = EditBatch(
        latents_BChw=torch.randn(1, 16, 8, 8, generator=g),
        refs_BChw=[torch.randn(1, 16, 8, 8, generator=g)],
        prompt_embeds_BLD=torch.randn(1, 7, 32, generator=g),
        prompt_mask_BL=torch.ones(1, 7, dtype=torch.long),
        keys=["fixed"],
        text_all_valid=True,
    )
    sigma = torch.tensor([0.6])
    noisy = (1 - sigma) * pack_latents(edit.latents_BChw) + sigma * torch.randn(1, 16, 64, generator=g)
    return edit, noisy, sigma


def _velocity(transformer: Any) -> torch.Tensor:
    batch, noisy, sigma = _batch()
    with torch.no_grad():
        return predict_velocity(transformer, batch, noisy, sigma, torch.float32)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_a_frozen_adapter_in_each_key_format_loads_and_changes_the_forward(
    base: Any, lora_files: dict[str, Path], fmt: str
) -> None:
    tr = copy.deepcopy(base)
    attach_lora(tr, 4, 4.0, 0.0, TARGETS, seed=0)  # the trained adapter: B = 0, a no-op until it trains
    before = _velocity(tr)
    path = lora_files[fmt].parent if fmt == "diffusers" else lora_files[fmt]  # a folder works too
    modules = attach_frozen_adapter(tr, "lightning", str(path), "validation_adapter_path")
    assert len(modules) == 4 * len(tr.transformer_blocks)
    with active_adapters(tr, {TRAINED: 1.0}):
        assert torch.equal(_velocity(tr), before)
    with active_adapters(tr, {TRAINED: 1.0, "lightning": 1.0}):
        full = _velocity(tr)
    with active_adapters(tr, {TRAINED: 1.0, "lightning": 0.5}):
        half = _velocity(tr)
    assert (full - before).abs().max() > 1e-3
    # the strength scales the adapter's change (B·A is linear in it; the forward nearly so at this size)
    assert ((half - before) - 0.5 * (full - before)).abs().max() < 0.2 * (full - before).abs().max()
    trainable = {n for n, p in tr.named_parameters() if p.requires_grad}
    assert trainable and all(f".{TRAINED}." in n for n in trainable)  # the frozen adapter never trains
    assert set(lora_state_dict(tr)) == set(lora_state_dict(tr, TRAINED))
    assert not any("lightning" in k for k in lora_state_dict(tr))


def test_the_three_formats_load_the_same_adapter(base: Any, lora_files: dict[str, Path]) -> None:
    outs = []
    for fmt in ("diffusers", "comfyui", "kohya"):
        tr = copy.deepcopy(base)
        attach_frozen_adapter(tr, "x", str(lora_files[fmt]), "validation_adapter_path")
        with active_adapters(tr, {"x": 1.0}):
            outs.append(_velocity(tr))
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)


def test_bad_adapter_files_are_named(base: Any, tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidInput, match="validation_adapter_path: .* does not exist"):
        read_lora_file(str(tmp_path / "missing.safetensors"), "validation_adapter_path")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(errors.InvalidInput, match="assistant_lora_path: .*junk.safetensors is not a LoRA"):
        read_lora_file(str(tmp_path / "junk.safetensors"), "assistant_lora_path")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(errors.InvalidInput, match="holds no LoRA for a Qwen-Image transformer"):
        read_lora_file(str(tmp_path / "other.safetensors"), "init_lora")
    wrong = {"transformer.transformer_blocks.0.attn.nope.lora_A.weight": torch.zeros(4, 32)}
    wrong["transformer.transformer_blocks.0.attn.nope.lora_B.weight"] = torch.zeros(32, 4)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(errors.InvalidInput, match="not layers of this transformer"):
        attach_frozen_adapter(copy.deepcopy(base), "w", str(tmp_path / "wrong.safetensors"), "validation_adapter_path")


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb"])
def test_a_frozen_adapter_on_a_quantized_base(base: Any, lora_files: dict[str, Path], precision: str) -> None:
    """Attached beside the trained adapter, never fused: it works on quantized bases as on the bf16 one."""
    from shared.model.quantize import quantize_transformer

    tr = quantize_transformer(copy.deepcopy(base), precision, device="cpu", compute_dtype=torch.float32)
    attach_lora(tr, 4, 4.0, 0.0, TARGETS, seed=0)
    before = _velocity(tr)
    attach_frozen_adapter(tr, "lightning", str(lora_files["comfyui"]), "validation_adapter_path")
    with active_adapters(tr, {TRAINED: 1.0, "lightning": 1.0}):
        assert (_velocity(tr) - before).abs().max() > 1e-3
    assert all(f".{TRAINED}." in n for n, p in tr.named_parameters() if p.requires_grad)
