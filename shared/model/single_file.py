"""The transformer from a community single file (``pretrained_transformer_model_name_or_path``): a GGUF (ComfyUI-GGUF's
Q8_0, Q4_K_M …) or a ``.safetensors`` (bf16, ComfyUI's ``*_fp8_e4m3fn``, ``fp8_scaled`` with its scale tensors).
The VAE, text encoder and processor still come from the model folder, and so does the transformer's config, which
this file is checked against.

``inspect_transformer_file`` reads only the file's header (the GGUF's tensor table, the safetensors JSON header):
the types of its tensors, their bytes, and whether its names and shapes are the flavour's transformer. Everything a
file can get wrong is found there, named with the file and the tensor, before any weight is read:
cut short, not a GGUF, a type nothing here dequantizes, another model's tensors, a ComfyUI quantization format other
than fp8. ``load_transformer_file`` then builds the transformer with the file's quantized Linears kept as they are
(``shared.model.frozen_linear``) and every other tensor in the compute dtype.

Names: ComfyUI's Qwen-Image files use diffusers' names, with or without the ``model.diffusion_model.`` prefix, which
is stripped; Qwen-Image-2.1's fused ``img_mlp.gate_up`` is split into ``gate_layer`` and ``proj`` as diffusers'
converter does (gate rows first). The GGUF metadata's ``general.architecture`` (ComfyUI-GGUF writes ``qwen_image``)
must name a Qwen-Image model where the file has one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared import errors
from shared.config.flavours import get_flavour

log = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."
# ComfyUI's per-layer quantization tensors (legacy ``scale_weight``/``scale_input`` and today's names) and its marker
_SCALES = (".scale_weight", ".weight_scale")
_AUX = (*_SCALES, ".scale_input", ".input_scale", ".comfy_quant")
# ComfyUI's marker tensors: fp8_scaled (its dtype is the fp8 type), and Qwen-Image-Edit-2511's reference timestep
_MARKERS = ("scaled_fp8", "__index_timestep_zero__")
ZERO_COND_MARKER = "__index_timestep_zero__"
# safetensors dtype names → the names this project shows
_ST_KINDS = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


@dataclass(frozen=True)
class TensorEntry:
    name: str  # diffusers' name (prefix stripped, 2.1's gate_up split)
    kind: str  # GGUF type name (Q8_0, Q4_K, BF16, F32 …) or safetensors dtype (BF16, float8_e4m3fn …)
    shape: tuple[int, ...]  # the logical shape (a GGUF block tensor's, not its bytes')
    nbytes: int  # bytes in the file


@dataclass(frozen=True)
class TransformerFile:
    path: str
    format: str  # "gguf" or "safetensors"
    architecture: str | None  # GGUF general.architecture
    tensors: tuple[TensorEntry, ...]
    fp8_scaled: bool  # ComfyUI fp8_scaled: per-tensor scales beside the fp8 weights

    @property
    def quantized(self) -> bool:
        """Whether the file's Linears keep the file's own types (every GGUF; a safetensors with fp8 weights)."""
        return self.format == "gguf" or any(t.kind in _FP8_FORMATS for t in self.tensors)

    def kinds(self) -> dict[str, tuple[int, int]]:
        """Type → (tensors, bytes), largest first."""
        out: dict[str, list[int]] = {}
        for t in self.tensors:
            c = out.setdefault(t.kind, [0, 0])
            c[0] += 1
            c[1] += t.nbytes
        return {k: (c[0], c[1]) for k, c in sorted(out.items(), key=lambda kv: -kv[1][1])}

    def describe(self) -> str:
        """``GGUF (qwen_image): Q8_0 ×846 21.6 GB, F32 ×1087 0.1 GB`` — for ``edittuner check`` and the run's log."""
        kind = (
            "GGUF" + (f" ({self.architecture})" if self.architecture else "")
            if self.format == "gguf"
            else "safetensors"
        )
        if self.fp8_scaled:
            kind += ", ComfyUI fp8_scaled"
        parts = [f"{k} ×{n} {_size(b)}" for k, (n, b) in self.kinds().items()]
        return f"{kind}: " + ", ".join(parts)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------------------- locating
def transformer_candidates(value: str) -> list[Path]:
    """Where ``pretrained_transformer_model_name_or_path`` is looked for, in order: as given, then (a relative path)
    under ``EDITTUNER_MODEL_DIR``."""
    path = Path(value).expanduser()
    root = os.environ.get("EDITTUNER_MODEL_DIR")
    return [path, Path(root) / path] if root and not path.is_absolute() else [path]


def find_transformer_file(value: str, option: str = "pretrained_transformer_model_name_or_path") -> Path:
    """The local file ``value`` names (``transformer_candidates``); an error naming the places looked at."""
    candidates = transformer_candidates(value)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise errors.InvalidInput(
        f"{option}: {value!r} was not found (looked at {', '.join(map(str, candidates))}); place the file under "
        "EDITTUNER_MODEL_DIR, or give its full path"
    )


# ------------------------------------------------------------------------------------------------ inspection
def _bad(path: str | Path, what: str) -> errors.InvalidInput:
    return errors.InvalidInput(f"transformer file {path}: {what}")


def _gguf_supported() -> set[str]:
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | {"F32", "F16"}


def _gguf_entries(path: Path) -> tuple[list[tuple[str, str, tuple[int, ...], int]], str | None]:
    """(raw name, type, logical shape, bytes) per tensor, and general.architecture; errors for a file that is not a
    complete GGUF or holds a type nothing here dequantizes."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        """The tensor table checked before gguf-py indexes into it: an unknown type id and a tensor past the end of
        the file are named, where the reader would fail with a bare ValueError or IndexError."""

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise _bad(
                        path,
                        f"tensor {name} has quantization type id {int(raw_dtype[0])}, which the gguf package "
                        "installed here does not know; convert the file to a type listed in docs/TRAINING.md",
                    ) from None
                block, type_size = GGML_QUANT_SIZES[qtype]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise _bad(
                        path,
                        f"cut short: tensor {name} ends at byte {end} but the file has {size} bytes; download it again",
                    )
            super()._build_tensors(start_offs, fields)

    try:
        reader = CheckedReader(str(path))
    except errors.InvalidInput:
        raise
    except (ValueError, IndexError, OSError, KeyError, UnicodeDecodeError) as err:
        what = "not a GGUF file (its first bytes are not 'GGUF')" if "magic" in str(err) else "not a complete GGUF file"
        raise _bad(path, f"{what} ({type(err).__name__}: {err}); download it again") from None
    arch = None
    field = reader.fields.get("general.architecture")
    if field is not None:
        arch = str(field.contents())
    supported = _gguf_supported()
    out = []
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in supported:
            raise _bad(
                path,
                f"tensor {t.name} is {kind}, which the loader cannot dequantize (it reads "
                f"{', '.join(sorted(supported))}); use a file in one of those types",
            )
        out.append((t.name, kind, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.n_bytes)))
    return out, arch


def _safetensors_entries(path: Path) -> tuple[list[tuple[str, str, tuple[int, ...], int]], dict[str, str]]:
    """(raw name, type, shape, bytes) per tensor and ComfyUI's per-layer quantization formats (from the header's
    ``_quantization_metadata``; ``.comfy_quant`` tensors are read at load, their formats checked here too)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            out = []
            formats: dict[str, str] = {}
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                shape = tuple(int(d) for d in sl.get_shape())
                n = 1
                for d in shape:
                    n *= d
                if name.endswith(".comfy_quant"):
                    conf = json.loads(bytes(f.get_tensor(name).tolist()).decode())
                    formats[name[: -len(".comfy_quant")]] = str(conf.get("format"))
                    continue
                if dtype not in _ST_KINDS and _canonical(name) not in _MARKERS:
                    raise _bad(
                        path, f"tensor {name} is stored as {dtype}, which is not a weight type this loader reads"
                    )
                kind = _ST_KINDS.get(dtype, dtype)
                out.append((name, kind, shape, n * {"F32": 4, "F16": 2, "BF16": 2}.get(kind, 1)))
    except errors.InvalidInput:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise _bad(path, f"not a complete safetensors file ({err}); download it again") from None
    if "_quantization_metadata" in meta:
        try:
            layers = json.loads(meta["_quantization_metadata"]).get("layers", {})
            formats.update({k: str(v.get("format")) for k, v in layers.items()})
        except (ValueError, AttributeError) as err:
            raise _bad(path, f"its _quantization_metadata header is not readable JSON ({err})") from None
    for layer, fmt in formats.items():
        if fmt not in _FP8_FORMATS:
            raise _bad(
                path,
                f"layer {layer} is quantized as {fmt!r}, a ComfyUI format this loader does not read (it reads "
                f"{', '.join(_FP8_FORMATS)}); use the fp8, bf16 or a GGUF file of the model",
            )
    return out, formats


def _canonical(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _split_gate_up(name: str) -> tuple[str, str] | None:
    """Qwen-Image-2.1's ComfyUI ``img_mlp.gate_up``: (gate_layer's name, proj's name), else None."""
    if ".img_mlp.gate_up." not in name:
        return None
    return name.replace("gate_up", "gate_layer"), name.replace("gate_up", "proj")


def _expected(flavour: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter of the flavour's transformer built from ``config`` on the meta device: name → shape."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformer_class(flavour).from_config(config)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def transformer_class(flavour: str) -> Any:
    """The diffusers transformer class of ``flavour``."""
    return transformer_class_named(get_flavour(flavour).transformer_class_name)


def transformer_class_named(class_name: str) -> Any:
    """``QwenImage21Transformer2DModel`` by that name; for any other name, ``QwenImageTransformer2DModel``."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    if class_name == "QwenImage21Transformer2DModel":
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

        return QwenImage21Transformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel


def inspect_transformer_file(path: str | Path, flavour: str, config: dict[str, Any]) -> TransformerFile:
    """The file's tensors and types, checked against the flavour's transformer (``config``: its config.json)."""
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "does not exist or is not a file")
    suffix = path.suffix.lower()
    arch = None
    formats: dict[str, str] = {}
    if suffix == ".gguf":
        raw, arch = _gguf_entries(path)
    elif suffix == ".safetensors":
        raw, formats = _safetensors_entries(path)
    else:
        raise _bad(path, f"expected a .gguf or .safetensors file, not {suffix or 'a file without extension'}")
    if arch is not None and not arch.startswith("qwen_image"):
        raise _bad(
            path,
            f"it holds a {arch!r} model (general.architecture), not Qwen-Image; use a Qwen-Image GGUF of flavour "
            f"{get_flavour(flavour).name}",
        )
    entries: list[TensorEntry] = []
    scaled = any(_canonical(n) == "scaled_fp8" or n.endswith(_SCALES) for n, *_ in raw) or bool(formats)
    flav = get_flavour(flavour)
    if any(_canonical(n) == ZERO_COND_MARKER for n, *_ in raw) and not flav.zero_cond_t:
        raise _bad(
            path,
            f"it carries ComfyUI's {ZERO_COND_MARKER} marker: it is Qwen-Image-Edit-2511, model_flavour edit-v3, "
            f"not {flav.name}",
        )
    for name, kind, shape, nbytes in raw:
        name = _canonical(name)
        if name in _MARKERS or name.endswith(_AUX):
            if name.endswith(_SCALES) and len(shape) and max(shape) > 1:
                raise _bad(path, f"{name} holds {shape} scales: only per-tensor fp8 scales are read here")
            continue
        halves = _split_gate_up(name) if get_flavour(flavour).joint_sequence else None
        if halves is not None and shape:
            half = (shape[0] // 2, *shape[1:])
            entries += [TensorEntry(h, kind, half, nbytes // 2) for h in halves]
        else:
            entries.append(TensorEntry(name, kind, shape, nbytes))
    tf = TransformerFile(str(path), suffix[1:], arch, tuple(entries), scaled)
    _check_against(tf, flavour, _expected(flavour, config))
    return tf


def _check_against(tf: TransformerFile, flavour: str, expected: dict[str, tuple[int, ...]]) -> None:
    have = {t.name: t.shape for t in tf.tensors}
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    wrong = sorted(n for n in set(have) & set(expected) if have[n] != expected[n])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its tensors are missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors are not its (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        n = wrong[0]
        parts.append(f"{len(wrong)} have other shapes (e.g. {n}: {have[n]} in the file, {expected[n]} in the model)")
    flav = get_flavour(flavour)
    raise _bad(
        tf.path,
        f"not the {flav.transformer_class_name} of flavour {flav.name} described by the model folder's "
        f"transformer/config.json: {'; '.join(parts)}. Is it a file of another model or flavour?",
    )


# --------------------------------------------------------------------------------------------------- loading
def _read(tf: TransformerFile) -> Iterator[tuple[str, torch.Tensor]]:
    if tf.format == "gguf":
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        yield from load_gguf_checkpoint(tf.path).items()  # the file in host memory, GGUFParameter per block tensor
    else:
        from safetensors.torch import load_file

        yield from load_file(tf.path).items()


def _state_dict(tf: TransformerFile, flavour: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The file's tensors under diffusers' names, and each fp8 layer's scale (module name → scale)."""
    sd: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for raw, tensor in _read(tf):
        name = _canonical(raw)
        if name in _MARKERS or name.endswith(_AUX):
            if name.endswith(_SCALES):
                scales[name.rsplit(".", 1)[0]] = float(tensor.float().reshape(-1)[0])
            continue
        halves = _split_gate_up(name) if get_flavour(flavour).joint_sequence else None
        if halves is not None:
            gate, up = tensor.chunk(2, dim=0)  # GGUF blocks run along the rows' last dimension: a row split is exact
            sd[halves[0]], sd[halves[1]] = gate, up
        else:
            sd[name] = tensor
    for layer in [k for k in scales if k.endswith(".img_mlp.gate_up")]:  # both halves keep the per-tensor scale
        scale = scales.pop(layer)
        scales[layer[: -len("gate_up")] + "gate_layer"] = scales[layer[: -len("gate_up")] + "proj"] = scale
    return sd, scales


def load_transformer_file(
    tf: TransformerFile, flavour: str, config: dict[str, Any], *, dtype: torch.dtype
) -> torch.nn.Module:
    """The flavour's transformer (on the CPU) from ``tf``: quantized Linears kept in the file's bytes, everything
    else in ``dtype``; every parameter filled from the file (checked: none is left on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    from shared.model.frozen_linear import FP8_DTYPES, Fp8Linear, gguf_linear

    sd, scales = _state_dict(tf, flavour)
    with init_empty_weights():  # parameters on meta; the RoPE tables (buffers) real
        model = transformer_class(flavour).from_config(config)
    fp8 = set(FP8_DTYPES.values())
    kept = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        weight = sd.get(f"{name}.weight")
        bias = sd.get(f"{name}.bias")
        new: torch.nn.Module | None = None
        if isinstance(weight, GGUFParameter):
            new = gguf_linear(weight, bias, module.out_features, module.in_features, dtype)
        elif weight is not None and weight.dtype in fp8:
            new = Fp8Linear(weight, scales.get(name, 1.0), bias, dtype)
        if new is None:
            continue
        sd.pop(f"{name}.weight")
        sd.pop(f"{name}.bias", None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        kept += 1
    rest = {}
    for k, v in sd.items():
        if isinstance(v, GGUFParameter):  # a block-typed tensor outside a Linear (a norm's weight): dequantized
            v = dequantize_gguf_tensor(v)
        elif v.dtype in fp8:
            v = v.float() * scales.get(k.rsplit(".", 1)[0], 1.0)
        rest[k] = v.to(dtype) if v.is_floating_point() else v
    model.load_state_dict(rest, strict=False, assign=True)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise _bad(tf.path, f"{len(left)} parameters were not in it (e.g. {', '.join(left[:3])})")
    model.requires_grad_(False)
    model.eval()
    log.info("transformer file %s: %s; %d Linear layers keep the file's types", tf.path, tf.describe(), kept)
    out: torch.nn.Module = model
    return out
