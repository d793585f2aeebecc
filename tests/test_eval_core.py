"""eval_svc's core loads a LoRA from its file, so alpha (in the file's metadata) is applied, not alpha = rank."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from eval_svc.service import ADAPTER, EvalCore
from shared.model.loading import load_pipeline, load_transformer
from shared.model.lora import attach_lora, lora_state_dict, save_lora_files
from shared.service.metrics import Metrics
from shared.store.local import LocalStore


def test_lora_alpha_from_the_file_reaches_the_pipeline(tmp_path, tiny_models):
    model = tiny_models("edit-v2")
    tr = load_transformer(model, "edit-v2")
    attach_lora(tr, 4, 2.0, 0.0, ["to_q", "to_k"], seed=0)
    files = save_lora_files(lora_state_dict(tr), alpha=2.0, rank=4, fmt="diffusers", transformer=tr)
    store = LocalStore(tmp_path / "store")
    store.put_bytes("runs/r/lora/pytorch_lora_weights.safetensors", files["pytorch_lora_weights.safetensors"])
    core = EvalCore(store, Metrics(CollectorRegistry()), idle_release_s=0)
    pipe = load_pipeline(model, "edit-v2")
    core._load_lora(pipe, "runs/r/lora/pytorch_lora_weights.safetensors")
    cfg = pipe.transformer.peft_config[ADAPTER]
    assert cfg.r == 4 and cfg.lora_alpha == 2.0
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling[ADAPTER] == torch.tensor(0.5).item()
