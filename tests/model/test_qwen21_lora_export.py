"""The LoRA file the project exports (``shared.model.lora.save_lora_files``, diffusers format) for a
Qwen-Image-2.1 transformer: ``QwenImage21Pipeline.load_lora_weights`` takes it, reads its alpha, and it changes
the pipeline's output."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from shared.model.loading import processor_without_video
from shared.model.lora import DIFFUSERS_FILE, attach_lora, lora_state_dict, save_lora_files
from shared.model.tiny_qwen21 import save_tiny_qwen21

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    processor_without_video()
    return save_tiny_qwen21(tmp_path_factory.mktemp("qi21") / "model")


def _edit(pipe: Any) -> torch.Tensor:
    ref = Image.new("RGBA", (96, 64), (200, 40, 40, 255))
    out = pipe(
        "make it red",
        image=[ref],
        num_inference_steps=2,
        output_resolution=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert isinstance(out, torch.Tensor)
    return out


def test_the_exported_lora_loads_into_the_pipeline_and_changes_its_output(model: Path, tmp_path: Path) -> None:
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

    pipe = QwenImage21Pipeline.from_pretrained(model)
    trained = copy.deepcopy(pipe.transformer)
    attach_lora(trained, 4, 2.0, 0.0, TARGETS, seed=0)
    with torch.no_grad():  # a trained LoRA: lora_B is zero at init, which would change nothing
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    sd = lora_state_dict(trained)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in sd} >= {"to_q", "gate_layer", "proj", "out"}
    files = save_lora_files(sd, alpha=2.0, rank=4, fmt="diffusers", transformer=trained)
    (tmp_path / DIFFUSERS_FILE).write_bytes(files[DIFFUSERS_FILE])

    base = _edit(pipe)
    pipe.load_lora_weights(tmp_path, weight_name=DIFFUSERS_FILE, adapter_name="run")
    cfg = pipe.transformer.peft_config["run"]
    assert cfg.r == 4 and cfg.lora_alpha == 2.0  # the alpha from the file's metadata, not alpha = rank
    loaded = {n for n, _ in pipe.transformer.named_parameters() if "lora_A.run" in n}
    assert len(loaded) == len([k for k in sd if "lora_A" in k])  # every trained module, none dropped
    tuned = _edit(pipe)
    assert (tuned - base).abs().max() > 1e-3


def test_the_comfyui_file_uses_the_names_comfyuis_loader_maps_and_patches_its_fused_mlp_exactly(model: Path) -> None:
    """ComfyUI's Qwen-Image-2.1 model fuses img_mlp.gate_layer and img_mlp.proj into one img_mlp.gate_up weight
    (gate rows first) and its LoRA loader patches each half from the LoRA of the unfused name; it maps those two
    only without a ``diffusion_model.`` prefix. The file uses bare module names with an alpha each; applied to the
    fused weight as the loader applies it, it gives the weights peft's merge gives the unfused model."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load as load_safetensors

    from shared.config.flavours import get_flavour
    from shared.model.lora import ALPHA, COMFYUI_FILE, LORA_A, LORA_B, check_comfyui_keys

    transformer = QwenImage21Transformer2DModel.from_pretrained(model, subfolder="transformer")
    attach_lora(transformer, 4, 2.0, 0.0, TARGETS, seed=0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    sd = lora_state_dict(transformer)
    prefix = get_flavour("v2.1").comfyui_lora_prefix
    files = save_lora_files(sd, alpha=2.0, rank=4, fmt="both", transformer=transformer, comfyui_prefix=prefix)
    comfy = load_safetensors(files[COMFYUI_FILE])
    assert not any(k.startswith(("diffusion_model.", "transformer.")) for k in comfy)
    assert "transformer_blocks.1.img_mlp.gate_layer.lora_A.weight" in comfy
    assert float(comfy["transformer_blocks.0.img_mlp.proj.alpha"]) == 2.0
    assert check_comfyui_keys(comfy, transformer, prefix) == []

    def delta(module: str) -> torch.Tensor:  # the loader's patch: (alpha / rank) * B @ A
        a, b = comfy[module + LORA_A], comfy[module + LORA_B]
        return float(comfy[module + ALPHA]) / a.shape[0] * (b @ a)

    block = transformer.transformer_blocks[1].img_mlp
    gate, up = block.gate_layer.base_layer.weight.detach().clone(), block.proj.base_layer.weight.detach().clone()
    fused = torch.cat([gate, up], dim=0)  # ComfyUI's img_mlp.gate_up: gate rows first
    half = fused.shape[0] // 2
    fused[:half] += delta("transformer_blocks.1.img_mlp.gate_layer")  # offset (0, 0, half)
    fused[half:] += delta("transformer_blocks.1.img_mlp.proj")  # offset (0, half, half)
    for m in transformer.modules():  # peft's own merge of the unfused model
        if isinstance(m, BaseTunerLayer):
            m.merge()
    gate_m, up_m = block.gate_layer.base_layer.weight, block.proj.base_layer.weight
    assert torch.allclose(fused[:half], gate_m, atol=1e-6) and torch.allclose(fused[half:], up_m, atol=1e-6)
    assert not torch.allclose(fused[:half], gate, atol=1e-3)  # the patch did something
