"""``doctor --full``: one real-size training step per precision (``shared.plan.step``) beside the planner's
prediction for the same run: edit-v2 with three references at 1024 by default, gradient checkpointing, batch 1,
the default LoRA."""

from __future__ import annotations

import functools
import math

import torch

from shared.cli.doctor.rows import Check, Row
from shared.errors import clear_frames
from shared.model.device import free_gpu_memory
from shared.plan.step import gpu_name, measure_step, planned, real_config

GiB = 2**30
FULL_PRECISIONS = ("no_change", "int8-quanto", "nf4-bnb")


def full_row(
    precision: str,
    device: torch.device,
    steps: int = 2,
    flavour: str = "edit-v2",
    resolution: int = 1024,
    references: int = 3,
) -> Row:
    name = "bf16" if precision == "no_change" else precision
    check = f"step {name} {flavour} {resolution} x{references} refs"
    if device.type != "cuda":
        return Row(check, "skip", "needs a GPU: the real 20B transformer (41 GB in bf16)")
    gpu = gpu_name(device)
    plan = planned(precision, flavour=flavour, resolution=resolution, references=references, gpu=gpu)
    tok = plan.tokens
    predicted_gib = plan.trainer.total / GiB
    tokens = f"{tok.target}+{tok.references}x{tok.per_reference}+{tok.text}={tok.total} tokens"
    m = None
    try:
        m = measure_step(precision, device, plan, real_config(flavour), steps)
    except torch.OutOfMemoryError as err:
        clear_frames(err)  # the failed step's tensors live in its frames: drop them before giving memory back
    if m is None:
        free_gpu_memory()
        return Row(
            check,
            "info",
            f"out of memory on {torch.cuda.get_device_name(device)}; the planner predicted "
            f"{predicted_gib:.1f} GiB ({tokens})",
            data={"predicted_gib": predicted_gib, "oom": True},
        )
    data = {
        "precision": precision,
        "tokens": tok.total,
        "tokens_text": tok.text,
        "gpu": gpu,
        "predicted_gib": round(predicted_gib, 2),
        "predicted_s_per_step": round(plan.seconds_per_step, 3),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()},
    }
    finite = all(math.isfinite(x) for x in m["losses"])
    under = m["device_used_gib"] / predicted_gib - 1
    detail = (
        f"{tokens}: {m['s_per_step']:.2f} s/step (predicted {plan.seconds_per_step:.2f}), peak "
        f"{m['allocated_gib']:.1f} GiB allocated / {m['reserved_gib']:.1f} reserved / "
        f"{m['device_used_gib']:.1f} device used (predicted {predicted_gib:.1f}); built in {m['build_s']:.0f} s"
    )
    if not finite:
        return Row(check, "fail", detail + f"; loss not finite {m['losses']}", "report this row", data=data)
    if under > 0.10:
        return Row(
            check,
            "warn",
            detail,
            f"the planner under-predicts this run by {100 * under:.0f}%: leave that "
            "much more headroom than `edittuner plan` says",
            data=data,
        )
    slower = m["s_per_step"] / plan.seconds_per_step
    if slower > 1.5:
        return Row(
            check,
            "warn",
            detail,
            f"steps take {slower:.1f}x the planner's time on this card: expect runs "
            "that much longer than `edittuner plan` says",
            data=data,
        )
    return Row(check, "pass", detail, data=data)


def full_rows(device: torch.device, precisions: tuple[str, ...] = FULL_PRECISIONS, steps: int = 2) -> list[Check]:
    return [(f"step {p}", functools.partial(full_row, p, device, steps)) for p in precisions]
