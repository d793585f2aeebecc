"""The doctor's block rows: ``shared.plan.probe`` per precision, a pass when the precision computes the same
function as bf16 within its bound, keeps every bias, uses no known-wrong weight class and trains its LoRA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shared.cli.doctor.rows import Check, Row
from shared.model.device import free_gpu_memory
from shared.plan.probe import (
    BLOCK_PRECISIONS,
    REAL_BLOCK,
    REAL_TOKENS,
    SMALL_BLOCK,
    SMALL_TOKENS,
    block_inputs,
    build_transformer,
    describe,
    probe_precision,
)


def precision_row(precision: str, reference: Any, inputs: dict[str, Any], device: torch.device, steps: int) -> Row:
    data, problems = probe_precision(precision, reference, inputs, device, steps)
    if problems:
        return Row(
            f"block {precision}",
            "fail",
            describe(data) + "; " + "; ".join(problems),
            f"do not train with base_model_precision={precision} on this host; report the row",
            data=data,
        )
    return Row(f"block {precision}", "pass", describe(data), data=data)


def block_rows(device: torch.device, *, small: bool, precisions: tuple[str, ...] = BLOCK_PRECISIONS) -> list[Check]:
    """(name, function) pairs for ``Report.run``: the bf16 reference built once, then one row per precision."""
    cfg: dict[str, Any] = SMALL_BLOCK if small else REAL_BLOCK
    side, text = SMALL_TOKENS if small else REAL_TOKENS
    steps = 1 if device.type == "cpu" else 3
    state: dict[str, Any] = {}

    def reference() -> Row:
        state["model"] = build_transformer(cfg, device).requires_grad_(False)
        state["inputs"] = block_inputs(cfg, side, text, device)
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        n = sum(p.numel() for p in state["model"].parameters())
        return Row(
            "block bf16 reference",
            "pass",
            f"one block of QwenImageTransformer2DModel, width {width}, text "
            f"{cfg['joint_attention_dim']}, {n / 1e6:.0f}M parameters, {2 * side * side} image + {text} text "
            f"tokens, on {device}",
            data={"width": width, "params": n, "image_tokens": 2 * side * side, "text_tokens": text},
        )

    def one(precision: str) -> Callable[[], Row]:
        def run() -> Row:
            if "model" not in state:
                return Row(f"block {precision}", "skip", "the bf16 reference failed to build")
            return precision_row(precision, state["model"], state["inputs"], device, steps)

        return run

    def done() -> list[Row]:
        state.clear()
        free_gpu_memory()
        return []

    return (
        [("block bf16 reference", reference)] + [(f"block {p}", one(p)) for p in precisions] + [("block cleanup", done)]
    )
