"""Qwen-Image-2.1 on a quantized base: the 2.1 transformer's block Linears quantized by the code the edit models
use (its entry and exit layers and the modulation all blocks share kept in the compute dtype), and a LoRA on the
attention and the SwiGLU MLP trains through the joint-sequence forward on it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from shared.model import quantize as Q
from shared.model.flow import EditBatch, flow_matching_loss
from shared.model.flow_qwen21 import Qwen21Sample, collate_qwen21
from shared.model.loading import load_transformer
from shared.model.lora import attach_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]
KEPT = ("img_in", "txt_in.in_layer", "txt_in.out_layer", "modulation.1", "norm_out.linear", "proj_out")


@pytest.fixture(scope="module")
def transformer(tiny_models: Any) -> Any:
    return load_transformer(tiny_models("v2.1"), "v2.1")


def _batch(channels: int, width: int) -> EditBatch:
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(9, dtype=torch.bool)
    pad[2:6] = True  # four slots: one 4x4-token reference
    sample = Qwen21Sample(
        latents_Chw=torch.randn(channels, 4, 4, generator=g),
        refs_Chw=[torch.randn(channels, 4, 4, generator=g)],
        prompt_embeds_LD=torch.randn(9, width, generator=g),
        image_pad_mask_L=pad,
    )
    return collate_qwen21([sample])


@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto", "nf4-bnb", "int8-bnb"])
def test_a_lora_trains_on_a_quantized_qwen21_base(transformer: Any, precision: str) -> None:
    tr = copy.deepcopy(transformer)
    Q.quantize_transformer(tr, precision, device="cpu", compute_dtype=torch.float32)
    quantized = Q.quantized_modules(tr)
    per_block = {n.split(".", 2)[2] for n in quantized if n.startswith("transformer_blocks.")}
    assert per_block == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", *TARGETS[4:]}
    assert len(quantized) == 7 * len(tr.transformer_blocks)
    for name in KEPT:
        assert type(tr.get_submodule(name)) is torch.nn.Linear, name
    attach_lora(tr, rank=4, alpha=4.0, dropout=0.0, target_modules=TARGETS, seed=0)
    with torch.no_grad():  # lora_B starts at zero: give the adapter something to move from
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(len(name)))
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = _batch(tr.config.in_channels, tr.config.context_in_dim)
    noise = torch.randn(1, *batch.token_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    losses = []
    for _ in range(12):
        loss = flow_matching_loss(tr, batch, noise, sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0] and all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    grads = {n for n, p in tr.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any("gate_layer" in n for n in grads)
