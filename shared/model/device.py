"""Which device and dtype a run computes on, from the config's ``device`` and ``mixed_precision``."""

from __future__ import annotations

import logging

import torch

from shared import errors

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "no": torch.float32,  # SimpleTuner's mixed_precision="no": full precision
}


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """Map a precision name to a torch dtype.

    ``None`` or ``"auto"`` (the user did not choose) means bf16 on a GPU that computes it natively (compute
    capability 8.0 on: Ampere and later) and fp32 elsewhere: CPUs run bf16 matmuls slowly and with poor accuracy,
    older GPUs only emulate bf16, and fp16, which they do run fast, overflows with this model (training refuses
    it). Such a device gets bf16/fp16 only when asked for explicitly.
    """
    if name is None or name == "auto":
        dev = torch.device(device)
        if dev.type != "cuda":
            return torch.float32
        if _computes_bf16(dev):
            return torch.bfloat16
        log.warning(
            "mixed_precision auto: %s has no native bf16 (compute capability below 8.0), so the run computes "
            "in fp32 (fp16 overflows with this model); set mixed_precision=bf16 to use emulated bf16",
            dev,
        )
        return torch.float32
    try:
        return _DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise errors.InvalidInput(f"unknown precision {name!r}: expected one of auto, bf16, fp16, fp32, no") from None


def _computes_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively; ``is_bf16_supported`` asks about the current GPU, so ``device`` is made
    current for the question. Emulated bf16 counts as no."""
    with torch.cuda.device(device):
        supported: bool = torch.cuda.is_bf16_supported(including_emulation=False)
    return supported


def resolve_device(name: str) -> torch.device:
    """The device of ``device=name``. A CUDA device always carries its index (``auto`` and ``cuda`` mean the current
    GPU, ``cuda:N``): tensors report theirs, and ``torch.device("cuda") != torch.device("cuda:0")``, so a device
    without one never equals a tensor's (the EMA's same-device test, say)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise errors.InvalidInput(f"device {name!r}: CUDA is not available on this host; set device to 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise errors.InvalidInput(f"device {name!r}: this host has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if dev.type == "cuda" and dev.index is None:
        # torch's stub types device.index as int, but a device named without one ("cuda") has None
        return torch.device("cuda", torch.cuda.current_device())  # type: ignore[unreachable]
    return dev


def reset_peak(device: torch.device) -> None:
    """Start ``device``'s memory peak anew (CUDA only): what a step or a job reports is then its own, not the
    load's (a bf16 base before it is quantized on the accelerator, ~41 GB) or an earlier job's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_gpu_memory() -> None:
    """Give memory the caching allocator holds back to the device, so another process on the GPU can use it."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
