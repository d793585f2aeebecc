"""FLOPs of a training step and the seconds it takes at an assumed model FLOPs utilisation."""

from __future__ import annotations

from shared.plan.counts import LinearInfo, TransformerCounts
from shared.plan.memory import per_stream
from shared.plan.tokens import Tokens

# Model FLOPs utilisation per base_model_precision: hardware FLOPs (with checkpointing's recompute) per second over
# the card's dense bf16 peak. Measured on one NVIDIA H200 (torch 2.11 + CUDA 13.0; `edittuner doctor --full`,
# shared.plan.step) at edit-v2, 1024 px, three references (17,012 tokens per sample), checkpointing, rank-16 LoRA,
# AdamW: bf16 4.09 s/step, int8-quanto 4.37, fp8-quanto 4.45, nf4-bnb 4.10, int4-quanto 25.1 (see
# shared/plan/measured.json and docs/BENCHMARKS.md). Fewer tokens per step use the card less well: below that size
# these are optimistic. int4-quanto recovers its weight through an identity matmul and an unpack in every backward
# (quanto's TinyGemm layout): six times slower. int8-bnb and int2-quanto were not measured at full size: assumed.
MFU: dict[str, float] = {
    "no_change": 0.38,
    "int8-quanto": 0.36,
    "fp8-quanto": 0.35,
    "nf4-bnb": 0.38,
    "int4-quanto": 0.062,
    "int8-bnb": 0.25,
    "int2-quanto": 0.25,
}
MEASURED_MFU = ("no_change", "int8-quanto", "fp8-quanto", "nf4-bnb", "int4-quanto")
ATTENTION_BACKWARD = 2.0  # dQ, dK from dS and dV, dP from dO: 2x the forward (bench/gpu_step.py counts the same)


# ------------------------------------------------------------------------------------------------ FLOPs
def step_flops(
    counts: TransformerCounts, tokens: Tokens, targets: list[LinearInfo], rank: int, *, checkpointing: bool
) -> dict[str, float]:
    """FLOPs of one sample's forward + backward. The base is frozen, so its Linears' backward computes input
    gradients only (1x forward); attention backward is ATTENTION_BACKWARD x forward; the LoRA trains (2x);
    checkpointing re-runs the forward. Attention spans ``tokens.attention_pairs()``: every pair of the edit models'
    full attention; for Qwen-Image-2.1 the (query run, keys up to its end) rectangles its processor computes."""
    n = per_stream(tokens)
    linear = 2.0 * sum(li.in_features * li.out_features * n[li.stream] for li in counts.linears)
    attention = 4.0 * tokens.attention_pairs() * counts.width * counts.layers  # QK^T and PV
    lora = 2.0 * sum(rank * (li.in_features + li.out_features) * n[li.stream] for li in targets)
    forward = linear + attention + lora
    backward = linear + ATTENTION_BACKWARD * attention + 2 * lora
    return {"forward": forward, "backward": backward, "recompute": forward if checkpointing else 0.0}
