"""The base's bytes when the transformer comes from a community single file
(``pretrained_transformer_model_name_or_path``: a GGUF, a ComfyUI ``.safetensors``), and synthetic files of the real
model's shapes for the docs' rows.

As ``shared.model.single_file.load_transformer_file`` holds a quantized file (every GGUF; a safetensors with fp8
weights): each Linear whose weight the loader keeps (a GGUF weight of any type but F32/F16, diffusers'
``GGUFParameter``: the K-quants, Q8_0, BF16 …; a safetensors weight in fp8) stays in the file's bytes
(``FrozenGGUFLinear``, ``Fp8Linear``); every other tensor (biases, norms, the small F32 tensors, a Linear weight
stored in F32/F16/BF16 outside those) is held in the compute dtype; ``base_model_precision`` is not applied. Such a
Linear dequantizes its weight on every forward and again in backward and autograd saves no weight-sized tensor, so
the activations are bf16's (no quanto-like saved input); the dequantization working set is one Linear's weight at a
time, in fp16/fp32 and then in the compute dtype, counted as 2 x (the largest kept Linear's in x out) x 4 bytes.
A file that is not quantized (bf16/fp32 safetensors) is quantized by ``base_model_precision`` like a model folder.

Synthetic files (``synthetic_file``), the real model's tensors as the community tools write them:

- GGUF (ComfyUI-GGUF: ``tools/convert.py`` writes the BF16 file, llama.cpp's ``llama-quantize`` with its
  ``tools/lcpp.patch`` quantizes it): 1-D tensors and tensors of at most 1024 elements are F32; ``img_in``,
  ``txt_in``, ``time_text_embed``, ``proj_out`` and ``norm_out`` are not quantized (BF16); every other weight is
  ``Q8_0`` for Q8_0. For ``Q4_K_M`` it is Q4_K, except ``to_v``, ``add_v_proj``, ``img_mlp.net.2`` and
  ``txt_mlp.net.2`` (Q6_K), and every tensor of block 0 and of the last block (Q5_K, which wins over Q6_K; the
  patch names block 59, Qwen-Image's last). A weight whose row length (its input features) is not a multiple of the
  type's block (256 for the K-quants, 32 for Q8_0) falls back to F16, as the patch does.
- ``fp8`` (ComfyUI's ``*_fp8_e4m3fn``): every 2-D Linear weight in float8_e4m3fn, 1 byte per element; the rest
  BF16. ``fp8_scaled`` adds one fp32 scale per Linear to the file (4 bytes each); ``Fp8Linear`` holds it as a Python
  float, and ``inspect_transformer_file`` does not list the scale tensors, so neither does the synthetic file: its
  resident bytes are fp8's.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import TYPE_CHECKING

from shared import errors
from shared.config.schema import is_single_file
from shared.model.single_file import (
    TensorEntry,
    TransformerFile,
    find_transformer_file,
    inspect_transformer_file,
)
from shared.plan.counts import TransformerCounts, build_meta_transformer

if TYPE_CHECKING:
    from shared.config.schema import RunConfig

SCHEMES = ("Q8_0", "Q4_K_M", "fp8", "fp8_scaled")
SMALL = 1024  # ComfyUI-GGUF convert.py's QUANTIZATION_THRESHOLD: tensors this small stay F32
GGUF_UNQUANTIZED = ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out.")  # lcpp.patch, qwen_image
Q6_K_NAMES = (".to_v.weight", ".add_v_proj.weight", ".img_mlp.net.2.weight", ".txt_mlp.net.2.weight")
GGUF_PLAIN = ("F32", "F16")  # GGUF types diffusers reads as plain tensors: the loader casts them
FP8_KINDS = ("float8_e4m3fn", "float8_e5m2")
DEQUANT_LABEL = "dequantization working set"
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


# ---------------------------------------------------------------------------------------------- bytes
def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _is_linear_weight(t: TensorEntry) -> bool:
    """Every 2-D parameter of both transformer classes is a Linear's weight (the tests check it on meta)."""
    return len(t.shape) == 2 and t.name.endswith(".weight")


def kept_in_file(tf: TransformerFile, t: TensorEntry) -> bool:
    """Whether the loader keeps ``t`` in the file's bytes: a quantized file's Linear weight of a type it keeps."""
    if not tf.quantized or not _is_linear_weight(t):
        return False
    return t.kind not in GGUF_PLAIN if tf.format == "gguf" else t.kind in FP8_KINDS


def _kinds(entries: list[TensorEntry]) -> str:
    by: dict[str, list[int]] = {}
    for t in entries:
        c = by.setdefault(t.kind, [0, 0])
        c[0] += 1
        c[1] += t.nbytes
    return ", ".join(f"{k} ×{n}" for k, (n, _) in sorted(by.items(), key=lambda kv: (-kv[1][1], kv[0])))


def dequant_working_bytes(tf: TransformerFile) -> int:
    """2 x the largest kept Linear's in x out x 4 bytes: its weight dequantized (fp16/fp32), then cast."""
    sizes = [_numel(t.shape) for t in tf.tensors if kept_in_file(tf, t)]
    return 2 * max(sizes) * 4 if sizes else 0


def file_weight_bytes(tf: TransformerFile, compute_bytes: int) -> dict[str, int]:
    """The resident bytes of the transformer the loader builds from ``tf`` (a quantized file): the kept Linear
    weights at their file bytes, by type; Linear weights the loader casts, and everything else (biases, norms,
    F32 small tensors), at ``numel x compute_bytes``; and the dequantization working set."""
    kept = [t for t in tf.tensors if kept_in_file(tf, t)]
    cast = [t for t in tf.tensors if _is_linear_weight(t) and not kept_in_file(tf, t)]
    rest = [t for t in tf.tensors if not _is_linear_weight(t)]
    out = {f"base weights (file: {_kinds(kept)})": sum(t.nbytes for t in kept)}
    if cast:
        out[f"Linear weights in the compute dtype (file: {_kinds(cast)})"] = (
            sum(_numel(t.shape) for t in cast) * compute_bytes
        )
    out["biases + norms"] = sum(_numel(t.shape) for t in rest) * compute_bytes
    out[DEQUANT_LABEL] = dequant_working_bytes(tf)
    return out


# ------------------------------------------------------------------------------------------- synthetic
def _gguf_bytes(kind: str, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return _numel(shape) // block * size


def gguf_kind(name: str, shape: tuple[int, ...], scheme: str, layers: int) -> str:
    """The type ComfyUI-GGUF's tools give tensor ``name`` of ``shape`` in a ``scheme`` (Q8_0, Q4_K_M) file of a
    model with ``layers`` blocks (the module docstring's rules)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1 or _numel(shape) <= SMALL:
        return "F32"
    if any(p in name for p in GGUF_UNQUANTIZED) or len(shape) != 2:
        return "BF16"
    kind = scheme
    if scheme == "Q4_K_M":
        kind = "Q6_K" if any(p in name for p in Q6_K_NAMES) else "Q4_K"
        if "transformer_blocks.0." in name or f"transformer_blocks.{layers - 1}." in name:
            kind = "Q5_K"
    if shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0]:
        return "F16"
    return kind


def _entry(scheme: str, name: str, shape: tuple[int, ...], layers: int) -> TensorEntry:
    if scheme in ("fp8", "fp8_scaled"):
        kind = "float8_e4m3fn" if len(shape) == 2 and name.endswith(".weight") else "BF16"
        return TensorEntry(name, kind, shape, _numel(shape) * _BYTES[kind])
    kind = gguf_kind(name, shape, scheme, layers)
    return TensorEntry(name, kind, shape, _gguf_bytes(kind, shape))


@functools.lru_cache(maxsize=16)
def _synthetic(config_json: str, class_name: str, scheme: str, layers: int) -> TransformerFile:
    model = build_meta_transformer(json.loads(config_json), class_name)
    shapes = {n: tuple(int(d) for d in p.shape) for n, p in model.state_dict().items()}
    entries = tuple(_entry(scheme, n, s, layers) for n, s in shapes.items())
    gguf = scheme in ("Q8_0", "Q4_K_M")
    return TransformerFile(
        f"<synthetic {scheme}>",
        "gguf" if gguf else "safetensors",
        "qwen_image" if gguf else None,
        entries,
        scheme == "fp8_scaled",
    )


def synthetic_file(counts: TransformerCounts, scheme: str) -> TransformerFile:
    """The model of ``counts`` as a ``scheme`` file (Q8_0, Q4_K_M, fp8, fp8_scaled) by the module docstring's rules:
    every parameter, Linears (``counts.linears``) and norms, under diffusers' names as ``inspect_transformer_file``
    lists a real file's."""
    if scheme not in SCHEMES:
        raise errors.InvalidInput(f"transformer file scheme {scheme!r} is unknown: {', '.join(SCHEMES)}")
    tf = _synthetic(json.dumps(counts.config, sort_keys=True, default=list), counts.class_name, scheme, counts.layers)
    linears = {f"{li.name}.weight" for li in counts.linears}
    assert linears == {t.name for t in tf.tensors if _is_linear_weight(t)}, "a 2-D parameter that is not a Linear"
    return tf


# -------------------------------------------------------------------------------------------- the run's
@functools.lru_cache(maxsize=8)
def _inspect(path: str, size: int, mtime_ns: int, flavour: str, config_json: str) -> TransformerFile:
    del size, mtime_ns  # the cache's key: a file replaced in place is inspected again
    return inspect_transformer_file(path, flavour, json.loads(config_json))


def run_transformer_file(
    run: RunConfig, counts: TransformerCounts, override: TransformerFile | str | None = None
) -> TransformerFile | None:
    """The file the run's transformer comes from: ``override`` (a ``TransformerFile``, or a ``synthetic_file``
    scheme of ``counts``' shapes), else ``pretrained_transformer_model_name_or_path`` when it names a single file
    (found as the loader finds it, inspected against ``counts.config``: the model folder's, or for a hub id the real
    model's published config), else None (a model folder, or another folder's transformer)."""
    if isinstance(override, TransformerFile):
        return override
    if isinstance(override, str):
        return synthetic_file(counts, override)
    t = run.train
    value = getattr(t, "pretrained_transformer_model_name_or_path", None)
    if not value or not is_single_file(value):
        return None
    path = find_transformer_file(str(value))
    st = os.stat(path)
    config = json.dumps(counts.config, sort_keys=True, default=list)
    return _inspect(str(path.resolve()), st.st_size, st.st_mtime_ns, t.model_flavour, config)


def file_assumption(tf: TransformerFile, precision: str) -> str:
    """The plan's assumption line for a quantized file."""
    ignored = f" (base_model_precision {precision} is not applied)" if precision != "no_change" else ""
    return (
        f"transformer file {tf.path}: {tf.describe()}; its quantized Linears keep the file's bytes{ignored} and "
        "dequantize their weight on every forward and again in backward, saving no weight for backward "
        "(activations as bf16's); the dequantization working set is 2 x the largest Linear in fp32; the step time "
        "takes bf16's MFU, assumed: the dequantization's time is not measured at full size"
    )
