"""The planner counts the LoRA files a run loads beside its base (shared/plan/adapters.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def test_stacked_adapters_are_counted_in_the_trainer_and_eval(tmp_path: Path) -> None:
    """The assistant in the trainer (and in eval at an inference strength above 0), each preview adapter in eval,
    from the files' headers: a 1M-element file adds 2 MB in bf16."""
    from safetensors.torch import save_file

    from shared.config.loading import load_run_config
    from shared.plan.predict import plan_run

    lora = tmp_path / "lightning.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(1000, 1000)}, str(lora))
    base = ["example=qwen_image.edit-v2-lora", "mixed_precision=bf16"]
    plain = plan_run(load_run_config(overrides=base))
    stacked = plan_run(
        load_run_config(
            overrides=[
                *base,
                f"assistant_lora_path={lora}",
                "assistant_lora_inference_strength=1",
                f"validation_adapter_path={lora}",
            ]
        )
    )
    grow = {s: stacked.services[s].total - plain.services[s].total for s in ("trainer", "eval")}
    assert grow == {"trainer": 2_000_000, "eval": 4_000_000}
    assert any("preview adapter run" in a for a in stacked.assumptions)
