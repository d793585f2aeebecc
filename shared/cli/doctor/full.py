"""``doctor --full``: one real-size training step per precision beside the planner's prediction for the same run.

The run is the planner's own (``shared.plan.predict.plan_run``): edit-v2 with three references at 1024 by default,
gradient checkpointing, batch 1, the default LoRA. The step is built from that plan's token counts (target,
references, text) on the real 60-block transformer with random weights, quantized, LoRA-attached and optimised by
the training code, and timed after a warm-up. Peaks are read after the model is built (the load is not the step),
as the trainer reports them; "device used" is what nvidia-smi would show (total minus free), the figure the
planner's total (with its CUDA overhead) predicts.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from typing import Any

import torch

from shared.cli.doctor.block import build_transformer, free, reset_peaks, sync
from shared.cli.doctor.rows import Row

GiB = 2**30
FULL_PRECISIONS = ("no_change", "int8-quanto", "nf4-bnb")


def planned(precision: str, *, flavour: str = "edit-v2", resolution: int = 1024, references: int = 3,
            checkpointing: bool = True, gpu: str = "H100") -> Any:
    """The planner's Plan for the hub model of ``flavour`` (the real model's figures, no weights needed)."""
    from shared.config.loading import load_run_config_text
    from shared.plan.predict import plan_run

    ids = [f"ref{i}" for i in range(references)]
    data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": resolution, "conditioning_data": ids}] + [
        {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": resolution}
        for i in ids]
    cfg = {"model_flavour": flavour, "base_model_precision": precision, "mixed_precision": "bf16",
           "gradient_checkpointing": checkpointing, "train_batch_size": 1, "gradient_accumulation_steps": 1,
           "validation_resolution": f"{resolution}x{resolution}"}
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


def real_config(flavour: str) -> dict[str, Any]:
    from diffusers import QwenImageTransformer2DModel

    from shared.config.flavours import get_flavour
    from shared.plan.counts import REAL_TRANSFORMER_CONFIG

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

    batch = EditBatch(latents_BChw=rand(1, 16, 2 * t_side, 2 * t_side),
                      refs_BChw=[rand(1, 16, 2 * r_side, 2 * r_side) for _ in range(tokens.references)],
                      prompt_embeds_BLD=rand(1, tokens.text, text_dim).to(torch.bfloat16),
                      prompt_mask_BL=torch.ones(1, tokens.text, dtype=torch.long, device=device), keys=["doctor"],
                      text_all_valid=True)
    return batch, rand(1, t_side * t_side, 64), sample_sigmas(1, 3.0, g).to(device)


def measure_step(precision: str, device: torch.device, plan: Any, cfg: dict[str, Any], steps: int) -> dict[str, Any]:
    """Build, quantize and LoRA-attach the model as the trainer does, then time ``steps`` steps after a warm-up."""
    from shared.config.schema import DEFAULT_TARGET_MODULES
    from shared.model.flow import flow_matching_loss
    from shared.model.lora import attach_lora
    from shared.model.quantize import fits_to_quantize_on, quantize_transformer

    free(device)
    t0 = time.perf_counter()
    where = device
    if device.type == "cuda":  # 20B bf16 weights are built on the CPU when the card cannot hold them
        meta = build_transformer(cfg, torch.device("meta"))
        where = device if fits_to_quantize_on(meta, device, torch.bfloat16) else torch.device("cpu")
        del meta
    model = build_transformer(cfg, where)
    model = quantize_transformer(model, precision, device=device, compute_dtype=torch.bfloat16,
                                 quantize_via="accelerator")
    attach_lora(model, plan.lora_rank, float(plan.lora_rank), 0.0, DEFAULT_TARGET_MODULES, seed=0,
                dtype=torch.float32)
    model.enable_gradient_checkpointing() if plan.checkpointing else model.disable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    sync(device)
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
    batch, noise, sigmas = step_inputs(plan.tokens, cfg["joint_attention_dim"], device)
    free(device)
    reset_peaks(device)
    losses = []
    for i in range(1 + steps):
        if i == 1:
            sync(device)
            t1 = time.perf_counter()
        loss = flow_matching_loss(model, batch, noise, sigmas, dtype=torch.bfloat16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync(device)
    out: dict[str, Any] = {"s_per_step": (time.perf_counter() - t1) / steps, "build_s": build_s,
                           "losses": losses, "built_on": where.type}
    if device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        out |= {"weights_gib": weights, "allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
                "reserved_gib": torch.cuda.max_memory_reserved(device) / GiB, "device_used_gib": (total_b - free_b) / GiB}
    del model, opt, params, batch, noise
    free(device)
    return out


def full_row(precision: str, device: torch.device, steps: int = 2, flavour: str = "edit-v2", resolution: int = 1024,
             references: int = 3) -> Row:
    name = "bf16" if precision == "no_change" else precision
    check = f"step {name} {flavour} {resolution} x{references} refs"
    if device.type != "cuda":
        return Row(check, "skip", "needs a GPU: the real 20B transformer (41 GB in bf16)")
    gpu = gpu_name(device)
    plan = planned(precision, flavour=flavour, resolution=resolution, references=references, gpu=gpu)
    tok = plan.tokens
    predicted_gib = plan.trainer.total / GiB
    tokens = f"{tok.target}+{tok.references}x{tok.per_reference}+{tok.text}={tok.total} tokens"
    try:
        m = measure_step(precision, device, plan, real_config(flavour), steps)
    except torch.OutOfMemoryError:
        free(device)
        return Row(check, "info", f"out of memory on {torch.cuda.get_device_name(device)}; the planner predicted "
                   f"{predicted_gib:.1f} GiB ({tokens})", data={"predicted_gib": predicted_gib, "oom": True})
    data = {"precision": precision, "tokens": tok.total, "tokens_text": tok.text, "gpu": gpu,
            "predicted_gib": round(predicted_gib, 2), "predicted_s_per_step": round(plan.seconds_per_step, 3),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()}}
    finite = all(math.isfinite(x) for x in m["losses"])
    under = m["device_used_gib"] / predicted_gib - 1
    detail = (f"{tokens}: {m['s_per_step']:.2f} s/step (predicted {plan.seconds_per_step:.2f}), peak "
              f"{m['allocated_gib']:.1f} GiB allocated / {m['reserved_gib']:.1f} reserved / "
              f"{m['device_used_gib']:.1f} device used (predicted {predicted_gib:.1f}); built in {m['build_s']:.0f} s")
    if not finite:
        return Row(check, "fail", detail + f"; loss not finite {m['losses']}", "report this row", data=data)
    if under > 0.10:
        return Row(check, "warn", detail, f"the planner under-predicts this run by {100 * under:.0f}%: leave that "
                   "much more headroom than `edittuner plan` says", data=data)
    return Row(check, "pass", detail, data=data)


def full_rows(device: torch.device, precisions: tuple[str, ...] = FULL_PRECISIONS, steps: int = 2) -> list:
    return [(f"step {p}", (lambda p=p: full_row(p, device, steps))) for p in precisions]
