"""GPUs the planner knows (peak bf16 FLOP/s, memory) and memory sizes as users write them ('24GiB')."""

from __future__ import annotations

import re

from shared import errors

GiB = 2**30


# name → (peak dense bf16 FLOP/s (SXM parts), total memory in bytes, about as torch.cuda.mem_get_info reports it)
GPUS: dict[str, tuple[float, int]] = {
    "H100": (989e12, 85_031_714_816),
    "H200": (989e12, 150_110_011_392),
    "A100": (312e12, 85_095_874_560),
    "L40S": (362e12, 48_305_799_168),
    "RTX4090": (165e12, 25_390_678_016),
    "RTX3090": (71e12, 25_447_170_048),
}


# ------------------------------------------------------------------------------------------------ sizes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(TiB|TB|GiB|GB|MiB|MB)\s*$", re.IGNORECASE)
_UNITS = {"tib": 2**40, "tb": 10**12, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}


def parse_size(text: str) -> int:
    """'24GiB' → 25769803776, '80GB' → 80000000000 (GiB/GB/MiB/MB/TiB/TB, any case); InvalidInput otherwise."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise errors.InvalidInput(f"GPU memory {text!r}: expected a size like '24GiB', '80GB' or '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def gpu_spec(name: str) -> tuple[str, float, int]:
    """(canonical name, peak bf16 FLOP/s, memory bytes) of a GPU named like 'H100', 'rtx 4090', 'NVIDIA L40S'."""
    key = re.sub(r"[\s_-]+", "", str(name).upper()).removeprefix("NVIDIA").removeprefix("GEFORCE")
    for cand in (key, "RTX" + key):
        if cand in GPUS:
            return cand, *GPUS[cand]
    for known in GPUS:  # a device name such as "NVIDIA H100 80GB HBM3"
        if known in key:
            return known, *GPUS[known]
    raise errors.InvalidInput(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)} (or give --gpu-memory)")
