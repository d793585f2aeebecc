"""One real-size training step on this device, built from the planner's own run (``plan_run``): the same token
counts (target, references, text), the real 60-block transformer with random weights, quantized, LoRA-attached
and optimised by the training code, timed after a warm-up. Peaks are read after the model is built (the load is
not the step), as the trainer reports them; "device used" is total minus free memory (what nvidia-smi shows), the
figure the planner's total (with its CUDA overhead) predicts. ``edittuner doctor --full`` and
``bench/gpu_step.py`` report it.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from typing import Any

import torch

from shared.model.device import free_gpu_memory, reset_peak
from shared.plan.probe import build_transformer, peaks, sync

GiB = 2**30


def planned(
    precision: str,
    *,
    flavour: str = "edit-v2",
    resolution: int = 1024,
    references: int = 3,
    checkpointing: bool = True,
    gpu: str = "H100",
) -> Any:
    """The planner's Plan for the hub model of ``flavour`` (the real model's figures, no weights needed)."""
    from shared.config.loading import load_run_config_text
    from shared.plan.predict import plan_run

    ids = [f"ref{i}" for i in range(references)]
    data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": resolution, "conditioning_data": ids}] + [
        {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": resolution} for i in ids
    ]
    cfg = {
        "model_flavour": flavour,
        "base_model_precision": precision,
        "mixed_precision": "bf16",
        "gradient_checkpointing": checkpointing,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "validation_resolution": f"{resolution}x{resolution}",
    }
    return plan_run(load_run_config_text(json.dumps(cfg), json.dumps(data)), gpu=gpu, recommend=False)


def gpu_name(device: torch.device) -> str:
    """The planner's name for this card (H100, H200, ...), H100 when it does not know it."""
    from shared import errors
    from shared.plan.gpus import gpu_spec

    if device.type != "cuda":
        return "H100"
    try:
        return gpu_spec(torch.cuda.get_device_name(device))[0]
    except errors.InvalidInput:
        return "H100"


def edit_flavour_only(flavour: str) -> None:
    """InvalidInput for a flavour this module cannot build a step of: it builds the edit models' dual-stream
    QwenImageTransformer2DModel and their EditBatch layout, not Qwen-Image-2.1's joint sequence."""
    from shared import errors
    from shared.config.flavours import get_flavour

    flav = get_flavour(flavour)
    if flav.joint_sequence:
        raise errors.InvalidInput(
            f"the real-size step measurement (shared.plan.step, doctor --full) builds the edit models' "
            f"QwenImageTransformer2DModel; flavour {flav.name} ({flav.transformer_class_name}) is not supported by it: "
            "`edittuner plan` predicts it, and shared.plan.measure_qwen21 measures its constants on the CPU"
        )


def real_config(flavour: str) -> dict[str, Any]:
    """The edit flavour's real transformer config for ``build_transformer`` (InvalidInput for v2.1)."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    from shared.config.flavours import get_flavour
    from shared.plan.counts import REAL_TRANSFORMER_CONFIG

    edit_flavour_only(flavour)

    keys = set(inspect.signature(QwenImageTransformer2DModel.__init__).parameters)
    cfg = {k: v for k, v in REAL_TRANSFORMER_CONFIG.items() if k in keys}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return cfg | {"zero_cond_t": get_flavour(flavour).zero_cond_t}


def step_inputs(tokens: Any, text_dim: int, device: torch.device, seed: int = 0) -> tuple[Any, Any, Any]:
    """An EditBatch with the plan's token counts: square target and references (side = sqrt(tokens) patches of 2x2
    latents), ``tokens.text`` caption tokens."""
    from shared.model.flow import EditBatch, sample_sigmas

    g = torch.Generator().manual_seed(seed)
    t_side, r_side = math.isqrt(tokens.target), math.isqrt(tokens.per_reference)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    batch = EditBatch(
        latents_BChw=rand(1, 16, 2 * t_side, 2 * t_side),
        refs_BChw=[rand(1, 16, 2 * r_side, 2 * r_side) for _ in range(tokens.references)],
        prompt_embeds_BLD=rand(1, tokens.text, text_dim).to(torch.bfloat16),
        prompt_mask_BL=torch.ones(1, tokens.text, dtype=torch.long, device=device),
        keys=["doctor"],
        text_all_valid=True,
    )
    return batch, rand(1, t_side * t_side, 64), sample_sigmas(1, 3.0, g).to(device)


def time_steps(
    model: Any, opt: torch.optim.Optimizer, inputs: tuple[Any, Any, Any], steps: int, device: torch.device
) -> tuple[float, list[float]]:
    """(seconds per step over ``steps`` steps after one warm-up step, every step's loss): the warm-up takes the
    allocations, the kernel selection and the optimizer's state."""
    from shared.model.flow import flow_matching_loss

    batch, noise, sigmas = inputs
    losses = []
    for i in range(1 + steps):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        loss = flow_matching_loss(model, batch, noise, sigmas, dtype=torch.bfloat16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync(device)
    return (time.perf_counter() - t0) / steps, losses


def measure_step(precision: str, device: torch.device, plan: Any, cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    """Build, quantize and LoRA-attach the model as the trainer does, then time ``steps`` steps after a warm-up
    (the edit flavours: InvalidInput for v2.1's plan)."""
    from shared.config.schema import DEFAULT_TARGET_MODULES
    from shared.model.lora import attach_lora
    from shared.model.quantize import fits_to_quantize_on, quantize_transformer

    edit_flavour_only(plan.flavour)
    free_gpu_memory()
    t0 = time.perf_counter()
    where = device
    if device.type == "cuda":  # 20B bf16 weights are built on the CPU when the card cannot hold them
        meta = build_transformer(cfg, torch.device("meta"))
        where = device if fits_to_quantize_on(meta, device, torch.bfloat16) else torch.device("cpu")
        del meta
    model = build_transformer(cfg, where)
    model = quantize_transformer(
        model, precision, device=device, compute_dtype=torch.bfloat16, quantize_via="accelerator"
    )
    attach_lora(model, plan.lora_rank, float(plan.lora_rank), 0.0, DEFAULT_TARGET_MODULES, seed=0, dtype=torch.float32)
    model.enable_gradient_checkpointing() if plan.checkpointing else model.disable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    sync(device)
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
    batch, noise, sigmas = step_inputs(plan.tokens, cfg["joint_attention_dim"], device)
    free_gpu_memory()
    reset_peak(device)
    seconds, losses = time_steps(model, opt, (batch, noise, sigmas), steps, device)
    out: dict[str, Any] = {"s_per_step": seconds, "build_s": build_s, "losses": losses, "built_on": where.type}
    if device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        out |= {"weights_gib": weights, **peaks(device), "device_used_gib": (total_b - free_b) / GiB}
    del model, opt, params, batch, noise
    free_gpu_memory()
    return out
