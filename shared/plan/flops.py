"""FLOPs of a training step and the seconds it takes at an assumed model FLOPs utilisation.
"""

from __future__ import annotations

from shared.plan.counts import LinearInfo, TransformerCounts
from shared.plan.memory import per_stream
from shared.plan.tokens import Tokens

MFU_BF16 = 0.35
MFU_QUANTIZED = 0.25  # quanto dequantizes the weight for every matmul; bnb likewise
ATTENTION_BACKWARD = 2.0  # dQ, dK from dS and dV, dP from dO: 2x the forward (bench/gpu_step.py counts the same)


# ------------------------------------------------------------------------------------------------ FLOPs
def step_flops(counts: TransformerCounts, tokens: Tokens, targets: list[LinearInfo], rank: int, *,
               checkpointing: bool) -> dict[str, float]:
    """FLOPs of one sample's forward + backward. The base is frozen, so its Linears' backward computes input
    gradients only (1x forward); attention backward is ATTENTION_BACKWARD x forward; the LoRA trains (2x);
    checkpointing re-runs the forward."""
    n = per_stream(tokens)
    linear = 2.0 * sum(li.in_features * li.out_features * n[li.stream] for li in counts.linears)
    attention = 4.0 * tokens.total**2 * counts.width * counts.layers
    lora = 2.0 * sum(rank * (li.in_features + li.out_features) * n[li.stream] for li in targets)
    forward = linear + attention + lora
    backward = linear + ATTENTION_BACKWARD * attention + 2 * lora
    return {"forward": forward, "backward": backward, "recompute": forward if checkpointing else 0.0}
