"""A Qwen-Image-2.1 edit LoRA with five references, as a user runs it: ``edittuner train
example=qwen_image.v2.1-edit-lora-tiny`` starts the three services, generates the tiny model and the data, encodes,
trains, renders previews on eval_svc and writes the report; the LoRA it copies out loads into diffusers'
``QwenImage21Pipeline`` and changes the edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.cli.main import main
from shared.evaluate.grid import LABEL_HEIGHT

pytestmark = pytest.mark.slow  # starts the three services and a training worker

REFERENCES = 5


def _edit(pipe: object, refs: list[Image.Image]) -> torch.Tensor:
    out = pipe(  # type: ignore[operator]
        "make the shapes red",
        image=refs,
        num_inference_steps=2,
        output_resolution=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert isinstance(out, torch.Tensor)
    return out


def test_edittuner_train_of_v21_with_five_references_through_the_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the tiny preset generates its model and data under ./.edittuner/tiny/
    argv = [
        "train",
        "example=qwen_image.v2.1-edit-lora-tiny",
        "max_train_steps=6",
        "checkpoint_step_interval=3",
        "validation_step_interval=3",
        "learning_rate=1e-2",
        "--quiet",
    ]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = captured.out
    assert "started local services" in captured.out + captured.err
    output = tmp_path / "output" / "tiny-v2.1"
    lora_file = output / "pytorch_lora_weights.safetensors"
    assert f"pytorch_lora_weights.safetensors: {Path('output/tiny-v2.1/pytorch_lora_weights.safetensors')}" in out

    # previews: two steps, each sample's grid with the five references in the thumbnail strip over the renders
    for step in (3, 6):
        grids = sorted((output / "validation" / f"step-{step}").glob("*.png"))
        assert len(grids) == 2, grids
        metrics = json.loads((output / "validation" / f"step-{step}" / "metrics.json").read_text())
        assert metrics["step"] == step and len(metrics["samples"]) == 2
        with Image.open(grids[0]) as grid:
            W = 64  # validation_resolution 64x64 at the samples' square aspect
            thumb = 3 * W // REFERENCES
            assert grid.width == 3 * W  # base, LoRA, target; the references above them
            assert (grid.height - W - thumb) % LABEL_HEIGHT == 0 and grid.height > W + thumb + 2 * LABEL_HEIGHT
    report = (output / "report" / "index.html").read_text(encoding="utf-8")
    assert "step-6" in report and "0000.png" in report

    # the LoRA loads into diffusers' pipeline for 2.1 and changes its edit of the same five references
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

    from shared.model.loading import processor_without_video

    processor_without_video()
    pipe = QwenImage21Pipeline.from_pretrained(tmp_path / ".edittuner" / "tiny" / "v2.1" / "model")
    data = tmp_path / ".edittuner" / "tiny" / "v2.1" / "data"
    refs = [Image.open(data / f"reference_{c}" / "0000.png").convert("RGB") for c in "abcde"]
    base = _edit(pipe, refs)
    pipe.load_lora_weights(output, weight_name=lora_file.name, adapter_name="run")
    assert pipe.transformer.peft_config["run"].r == 8
    tuned = _edit(pipe, refs)
    assert (tuned - base).abs().max().item() > 1e-4
