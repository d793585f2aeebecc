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
