"""What a training process sets on its GPU, and the memory figures it reads back: fp32 matmuls in TF32; the peak
measured from the end of setup, reported with what the caching allocator reserved beside what tensors allocated.
On a CPU nothing is set and there are no figures.
"""

from __future__ import annotations

import torch

from shared.model.device import reset_peak as reset_peak  # the trainer's gpu.reset_peak, at the end of setup
from shared.train import distributed


def allow_tf32(device: torch.device) -> None:
    """fp32 matmuls in TF32 on CUDA (cuBLAS; convolutions already are, by torch's default). The fp32 LoRA's inputs
    are cast up from bf16 activations (8 significant bits), which TF32 (11) holds exactly; its weights are rounded
    to TF32 inside the product only, still finer than the bf16 base they add to. The legacy flag, not
    ``fp32_precision``: torch raises when one API is read after the other set it, and diffusers, transformers and
    torchao read the legacy ones."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


def memory(device: torch.device, dist: distributed.Dist) -> dict[str, int]:
    """This GPU's memory now and at its peak since ``reset_peak``; with several processes the largest over the ranks
    (every rank calls it). The reserved peak is what the process held from the device, fragmentation included:
    the figure to set beside the planner's prediction and the card's size."""
    if device.type != "cuda":
        return {}
    values = [
        torch.cuda.memory_allocated(device),
        torch.cuda.memory_reserved(device),
        torch.cuda.max_memory_allocated(device),
        torch.cuda.max_memory_reserved(device),
    ]
    if dist.active:
        values = [int(v) for v in distributed.all_max(torch.tensor(values, device=device), dist).tolist()]
    return dict(
        zip(
            ("gpu_allocated_bytes", "gpu_reserved_bytes", "gpu_peak_bytes", "gpu_peak_reserved_bytes"),
            values,
            strict=True,
        )
    )
