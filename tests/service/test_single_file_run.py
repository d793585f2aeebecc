"""A LoRA trained over a GGUF transformer file as a user runs it: ``edittuner check`` names the file's types, then
``edittuner train example=qwen_image.edit-v2-lora-tiny pretrained_transformer_model_name_or_path=<file>
validation_on_full_precision=true`` starts the three services (the file is a server path: trainer_svc and eval_svc
read it under their model roots), trains over the Q8_0 file, renders previews on eval_svc on the file's transformer
and on the folder's, and writes the report; the LoRA it copies out is the file a run on the folder exports, key for
key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from shared.cli.main import main
from shared.evaluate.full_precision import FULL_LABEL
from shared.model.tiny_files import write_gguf

pytestmark = pytest.mark.slow  # starts the three services and a training worker


def test_edittuner_train_over_a_gguf_file_through_the_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the tiny preset generates its model and data under ./.edittuner/tiny/
    preset = "example=qwen_image.edit-v2-lora-tiny"
    assert main(["plan", preset]) in (0, 2)  # generates the tiny model the GGUF is written from
    capsys.readouterr()
    model = tmp_path / ".edittuner" / "tiny" / "edit-v2" / "model"
    gguf = tmp_path / "models" / "qwen-image-edit-2509-Q8_0.gguf"
    gguf.parent.mkdir()
    write_gguf(load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors")), gguf, "Q8_0")
    file_args = [f"pretrained_transformer_model_name_or_path={gguf}", "validation_on_full_precision=true"]

    assert main(["check", preset, *file_args]) == 0
    assert f"transformer {gguf}: GGUF (qwen_image): Q8_0 ×34" in capsys.readouterr().out

    argv = [
        "train",
        preset,
        *file_args,
        "max_train_steps=4",
        "checkpoint_step_interval=2",
        "validation_step_interval=4",
        "learning_rate=1e-2",
        "--quiet",
    ]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "started local services" in captured.out + captured.err
    output = tmp_path / "output" / "tiny-edit-v2"
    metrics = json.loads((output / "validation" / "step-4" / "metrics.json").read_text())
    [entry] = metrics["adapters"]
    assert entry["label"] == FULL_LABEL and entry["psnr_lora"] is not None
    assert all(s["adapters"][0]["label"] == FULL_LABEL for s in metrics["samples"])
    report = (output / "report" / "index.html").read_text(encoding="utf-8")
    assert FULL_LABEL in report
    lora = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in lora
