"""Community single files of a (tiny) transformer, written the way their tools write them, so that the tests and
benchmarks load the same kinds of file a user holds: a GGUF as ComfyUI-GGUF's ``convert.py`` lays it out (diffusers'
names, ``general.architecture = qwen_image``, 1-D and small tensors in F32, the rest in one type) and ComfyUI's
single-file safetensors (``model.diffusion_model.`` prefix; bf16, fp8 e4m3fn, or legacy ``fp8_scaled`` with a
``scale_weight`` per Linear and the ``scaled_fp8`` marker).

The gguf package quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; it has no K-quant encoder, so
``kquant_blocks`` writes valid K-quant blocks from random bytes with small scales, which is what checks that the
K-quant layers load, dequantize as gguf's reference does, and train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "model.diffusion_model."
SMALL = 1024  # convert.py's QUANTIZATION_THRESHOLD: tensors this small stay F32


def _kept_f32(name: str, shape: tuple[int, ...]) -> bool:
    n = int(np.prod(shape))
    return len(shape) == 1 or n <= SMALL


def write_gguf(
    state_dict: dict[str, torch.Tensor],
    path: str | Path,
    qtype: str,
    *,
    arch: str = "qwen_image",
    overrides: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """``path`` holding ``state_dict`` in ``qtype`` (a gguf type name) by convert.py's rules; ``overrides``: tensor
    name → type for single tensors (a K-quant gets ``kquant_blocks``). Returns name → type written."""
    import gguf

    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = {}
    for name, tensor in state_dict.items():
        data = tensor.float().numpy()
        kind = (overrides or {}).get(name) or ("F32" if _kept_f32(name, data.shape) else qtype)
        q = T[kind]
        if kind.endswith("_K"):
            raw = kquant_blocks(q, data.shape, rng)
        else:
            raw = gguf.quants.quantize(data, q)
        writer.add_tensor(name, raw, raw_dtype=q)
        written[name] = kind
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def kquant_blocks(qtype: Any, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bytes in ``qtype``'s block layout (rows × bytes per row) whose fp16 scales are 0.01: finite weights of
    a few units. Q2_K/Q4_K/Q5_K keep d and dmin in their first 4 bytes, Q3_K/Q6_K d in their last 2."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"a K-quant row needs a multiple of {block} values, not {cols}")
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    scale = np.frombuffer(np.array([0.01], np.float16).tobytes(), np.uint8)
    name = getattr(qtype, "name", "")
    if name in ("Q2_K", "Q4_K", "Q5_K"):
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    else:
        blocks[:, size - 2 : size] = scale
    return raw


def write_comfy_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | Path, kind: str, *, prefix: str = PREFIX
) -> None:
    """ComfyUI's single file: ``kind`` ``bf16`` (every tensor), ``fp8`` (2-D weights in float8_e4m3fn, the rest
    bf16) or ``fp8_scaled`` (weights divided by absmax/448 first, that scale stored as ``<layer>.scale_weight``, and
    the ``scaled_fp8`` marker)."""
    from safetensors.torch import save_file

    e4 = torch.float8_e4m3fn
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        linear = name.endswith(".weight") and t.ndim == 2
        if kind == "bf16" or not linear:
            out[prefix + name] = t.to(torch.bfloat16).contiguous()
        elif kind == "fp8":
            out[prefix + name] = t.to(e4)
        elif kind == "fp8_scaled":
            scale = t.abs().max().float() / torch.finfo(e4).max
            out[prefix + name] = (t.float() / scale).to(e4)
            out[prefix + name[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            raise ValueError(f"unknown kind {kind!r}: bf16, fp8 or fp8_scaled")
    if kind == "fp8_scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=e4)
    save_file(out, str(path))
