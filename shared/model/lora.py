"""LoRA adapters on the Qwen-Image transformer: attach, checkpoint state, and export for diffusers and ComfyUI.

Three key spaces, one module naming (diffusers' ``QwenImageTransformer2DModel``, which ComfyUI shares):

- peft state (checkpoints, resume): ``transformer_blocks.0.attn.to_q.lora_A.weight``
- diffusers file: ``transformer.<module>.lora_A.weight`` + the adapter config in the safetensors metadata
  (``lora_adapter_metadata``), exactly what ``QwenImageEditPipeline.save_lora_weights`` writes
- ComfyUI file: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``; ComfyUI (and diffusers'
  Qwen converter) scale by ``alpha / rank``, so alpha must be in the file: ComfyUI ignores safetensors metadata.

ComfyUI skips keys it cannot map with a log line and applies the rest; the exporter therefore checks every key
against the transformer (``check_comfyui_keys``) and refuses to write a file that would load partially.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from safetensors.torch import save as safetensors_save

from shared import errors

LORA_A, LORA_B, ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"
DIFFUSERS_PREFIX = "transformer."
COMFYUI_PREFIX = "diffusion_model."
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"
FORMATS = ("diffusers", "comfyui", "both")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: LoraConfig kwargs as JSON
_INITS: dict[str, bool | Literal["gaussian"]] = {
    "default": True,
    "gaussian": "gaussian",
}  # peft's init_lora_weights values


# ------------------------------------------------------------------------------------------------- attaching
def _base(module: torch.nn.Module) -> torch.nn.Module:
    """The layer a peft LoRA wrapper wraps (or the module itself): names stay valid after attaching."""
    return getattr(module, "base_layer", module)


def _is_linear(module: torch.nn.Module) -> bool:
    """quanto QLinear and bitsandbytes Linear4bit/Linear8bitLt subclass nn.Linear: all of them are LoRA targets."""
    return isinstance(_base(module), torch.nn.Linear)


def linear_names(transformer: torch.nn.Module) -> list[str]:
    """Full names of the Linear layers (unwrapping LoRA wrappers), in module order."""
    return [
        n
        for n, m in transformer.named_modules()
        if _is_linear(m) and not n.endswith(".base_layer") and ".lora_" not in n
    ]


def target_choices(transformer: torch.nn.Module) -> list[str]:
    """What ``target_modules`` may name: the per-block Linear names as LoRA configs write them (``to_q``, not
    ``attn.to_q``; ``img_mlp.net.0.proj``), then the top-level ones (``proj_out``, ...). Any suffix of a Linear's
    full name is accepted; these are the ones worth listing."""
    block, top = [], []
    for name in linear_names(transformer):
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "transformer_blocks" and parts[1].isdigit():
            short = ".".join(parts[2:]).removeprefix("attn.")
            if short not in block:
                block.append(short)
        else:
            top.append(name)
    return block + top


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the module's full name is the target or ends with ``.<target>``."""
    return name == target or name.endswith("." + target)


def check_target_modules(transformer: torch.nn.Module, target_modules: Iterable[str]) -> list[str]:
    """Raise InvalidInput unless every target names at least one Linear; return the targets as a list."""
    targets = list(target_modules)
    if isinstance(target_modules, str) or not targets:
        raise errors.InvalidInput(
            'lora_target_modules must be a non-empty list of layer names, e.g. ["to_q", "to_k", "to_v", "to_out.0"]'
        )
    names = linear_names(transformer)
    unknown = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unknown:
        raise errors.InvalidInput(
            f"lora_target_modules: {', '.join(map(repr, unknown))} name{'s' if len(unknown) == 1 else ''} no Linear "
            f"layer of the transformer; valid names: {', '.join(target_choices(transformer))}"
        )
    return targets


def attach_lora(
    transformer: Any,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Iterable[str],
    *,
    init: str = "gaussian",
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    adapter_name: str = "default",
) -> None:
    """Freeze ``transformer`` and add a trainable LoRA adapter (diffusers' ``add_adapter``) on ``target_modules``.

    ``init="gaussian"`` draws A from a normal of std 1/rank and sets B = 0 (the adapter starts as a no-op);
    ``"default"`` is peft's Kaiming-uniform A, B = 0. With ``seed`` the draw is reproducible and independent of the
    device (peft builds the adapter on the CPU before moving it) without disturbing the global RNG. ``dtype``: the
    adapters' dtype; fp32 is the right choice on a bf16 base, where AdamW updates of lr 1e-4 would round away.
    """
    from peft import LoraConfig

    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise errors.InvalidInput(
            f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank={rank}, alpha={alpha}, dropout={dropout}"
        )
    if init not in _INITS:
        raise errors.InvalidInput(f"LoRA init {init!r} is unknown: expected one of {', '.join(_INITS)}")
    targets = check_target_modules(transformer, target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates an int, but scales by alpha / r: floats work
        lora_dropout=dropout,
        init_lora_weights=_INITS[init],
        target_modules=targets,
    )
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        transformer.add_adapter(config, adapter_name=adapter_name)
    for p in transformer.parameters():
        if p.requires_grad and dtype is not None:
            p.data = p.data.to(dtype)
    wrong = [
        n for n, p in transformer.named_parameters() if p.requires_grad != ("lora_" in n and f".{adapter_name}." in n)
    ]
    assert not wrong, f"after add_adapter exactly the LoRA parameters must train; mismatched: {wrong[:5]}"


# ------------------------------------------------------------------------------------------ checkpoint state
def _peft_state(transformer: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state: dict[str, torch.Tensor] = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return state


def lora_state_dict(transformer: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (adapter name stripped), detached copies on their device."""
    return {k: v.detach().clone() for k, v in _peft_state(transformer, adapter_name).items()}


def load_lora_state_dict(transformer: Any, sd: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Restore a ``lora_state_dict`` exactly (resume): every key must exist with its shape, none may be missing,
    and the loaded values are read back and compared; anything else raises InvalidInput."""
    from peft.utils import set_peft_model_state_dict

    expected = _peft_state(transformer, adapter_name)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise errors.InvalidInput(
            "LoRA state does not fit this transformer's adapter (different rank or "
            "target modules?): " + _summary(missing=missing, unexpected=unexpected, shape_mismatch=shapes)
        )
    set_peft_model_state_dict(transformer, dict(sd), adapter_name=adapter_name)
    after = _peft_state(transformer, adapter_name)
    differ = [k for k, v in sd.items() if not torch.equal(after[k], v.to(after[k].device, after[k].dtype))]
    if differ:
        raise errors.InvalidInput("LoRA state did not load: " + _summary(not_restored=differ))


def _summary(**groups: list[str]) -> str:
    parts = []
    for label, items in groups.items():
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label.replace('_', ' ')}: {', '.join(items[:5])}{more}")
    return "; ".join(parts)


# -------------------------------------------------------------------------------------------------- export
def lora_modules(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The module names a peft state dict adapts, sorted."""
    return sorted({k[: -len(s)] for k in sd for s in (LORA_A, LORA_B) if k.endswith(s)})


def _check_peft_state(sd: Mapping[str, torch.Tensor], rank: int) -> None:
    problems = [f"{k}: not a LoRA A/B weight" for k in sd if not k.endswith((LORA_A, LORA_B))]
    for m in lora_modules(sd):
        a, b = sd.get(m + LORA_A), sd.get(m + LORA_B)
        if a is None or b is None:
            problems.append(f"{m}: has only one of lora_A / lora_B")
        elif a.shape[0] != rank or b.shape[1] != rank:
            problems.append(f"{m}: rank of A {tuple(a.shape)} / B {tuple(b.shape)} is not {rank}")
    if not sd:
        problems.append("the LoRA state is empty")
    if problems:
        raise errors.InvalidInput("cannot export the LoRA: " + "; ".join(problems))


def diffusers_lora_state(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft state → the keys ``QwenImageEditPipeline.save_lora_weights`` writes (``transformer.`` prefix)."""
    return {DIFFUSERS_PREFIX + k: v for k, v in sd.items()}


def comfyui_lora_state(
    sd: Mapping[str, torch.Tensor], alpha: float, rank: int, prefix: str = COMFYUI_PREFIX
) -> dict[str, torch.Tensor]:
    """peft state → ComfyUI's keys (``prefix`` + the module name: ``diffusion_model.`` for the edit models, none for
    Qwen-Image-2.1, see ``Flavour.comfyui_lora_prefix``), A/B unchanged plus one ``alpha`` scalar per module, so
    the loader's ``alpha / rank`` scale equals the trainer's ``lora_alpha / r``."""
    _check_peft_state(sd, rank)
    out = {prefix + k: v for k, v in sd.items()}
    for module in lora_modules(sd):
        out[prefix + module + ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def peft_adapter_config(sd: Mapping[str, torch.Tensor], alpha: float, rank: int) -> dict[str, Any]:
    """The LoraConfig kwargs diffusers' ``load_lora_weights`` rebuilds the adapter from (``lora_adapter_metadata``).

    Only r, lora_alpha and the full module names: enough to reproduce the scale exactly, and free of keys that an
    older peft's ``LoraConfig(**kwargs)`` would reject (a full ``LoraConfig.to_dict()`` carries every new field).
    """
    return {"r": int(rank), "lora_alpha": float(alpha), "target_modules": lora_modules(sd)}


def check_comfyui_keys(
    comfy_sd: Mapping[str, torch.Tensor], transformer: torch.nn.Module, prefix: str = COMFYUI_PREFIX
) -> list[str]:
    """Problems that would make ComfyUI load ``comfy_sd`` partially or not at all; empty when every key maps to a
    Linear of ``transformer`` with a matching shape and every adapted module has lora_A, lora_B and alpha."""
    problems: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in comfy_sd.items():
        if not key.startswith(prefix):
            problems.append(f"{key}: does not start with {prefix!r}")
            continue
        body = key[len(prefix) :]
        suffix = next((s for s in (LORA_A, LORA_B, ALPHA) if body.endswith(s)), None)
        if suffix is None:
            problems.append(f"{key}: ends in none of {LORA_A}, {LORA_B}, {ALPHA}")
            continue
        module_name = body[: -len(suffix)]
        problem = _module_problem(transformer, module_name, suffix, value)
        if problem:
            problems.append(f"{key}: {problem}")
            continue
        parts.setdefault(module_name, {})[suffix] = value
    for module_name, have in sorted(parts.items()):
        lacking = [s.lstrip(".") for s in (LORA_A, LORA_B, ALPHA) if s not in have]
        if lacking:
            problems.append(f"{prefix}{module_name}: no {', '.join(lacking)}")
        elif have[LORA_A].shape[0] != have[LORA_B].shape[1]:
            problems.append(
                f"{prefix}{module_name}: lora_A has rank {have[LORA_A].shape[0]}, lora_B {have[LORA_B].shape[1]}"
            )
    return problems


def _module_problem(transformer: torch.nn.Module, name: str, suffix: str, value: torch.Tensor) -> str | None:
    try:
        module = _base(transformer.get_submodule(name))
    except AttributeError:
        return f"the transformer has no module {name!r}"
    if not isinstance(module, torch.nn.Linear):
        return f"{name!r} is a {type(module).__name__}, not a Linear layer"
    if suffix == ALPHA:
        return None if value.numel() == 1 else f"alpha must be a scalar, has shape {tuple(value.shape)}"
    if value.dim() != 2:
        return f"expected a 2-D weight, got shape {tuple(value.shape)}"
    if suffix == LORA_A and value.shape[1] != module.in_features:
        return f"lora_A has {value.shape[1]} inputs, {name} has {module.in_features}"
    if suffix == LORA_B and value.shape[0] != module.out_features:
        return f"lora_B has {value.shape[0]} outputs, {name} has {module.out_features}"
    return None


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """Contiguous CPU tensors in ``dtype`` (alpha scalars stay fp32: they are exact in any float dtype anyway)."""
    out = {k: (v if k.endswith(ALPHA) else v.to(dtype)).detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors_save(out, metadata=dict(metadata))


def save_lora_files(
    sd: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    rank: int,
    fmt: str,
    transformer: torch.nn.Module,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    comfyui_prefix: str = COMFYUI_PREFIX,
) -> dict[str, bytes]:
    """Export a peft LoRA state as safetensors files: file name → bytes, for the caller to put in the object store
    or on disk (``DIFFUSERS_FILE`` and/or ``COMFYUI_FILE`` by ``fmt``).

    Saved in float32 by default: the adapters train in fp32, so the export is exact and the diffusers and ComfyUI
    files reproduce the trained model bit for bit; at rank 16 on the four attention projections of Qwen-Image
    that is ~94 MB, small beside the 40 GB base. ``dtype=torch.bfloat16`` halves it, as many shared LoRAs are.
    Both files carry ``metadata`` (values JSON-encoded unless strings) plus rank, alpha and target modules; the
    diffusers file also the adapter config diffusers rebuilds the LoRA from, which carries alpha.
    """
    if fmt not in FORMATS:
        raise errors.InvalidInput(f"lora_format {fmt!r} is unknown: expected one of {', '.join(FORMATS)}")
    if metadata and ADAPTER_METADATA_KEY in metadata:
        raise ValueError(f"{ADAPTER_METADATA_KEY!r} is written by save_lora_files itself")
    comfy = comfyui_lora_state(sd, alpha, rank, comfyui_prefix)  # checks the peft state, then against the model
    problems = check_comfyui_keys(comfy, transformer, comfyui_prefix)
    if problems:
        raise errors.InvalidInput(
            f"the LoRA does not fit the transformer, a {fmt} file would load partially: "
            + "; ".join(problems[:10])
            + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        )
    config = peft_adapter_config(sd, alpha, rank)
    meta = {
        "format": "pt",
        "edittuner.lora_rank": str(int(rank)),
        "edittuner.lora_alpha": str(float(alpha)),
        "edittuner.target_modules": json.dumps(config["target_modules"]),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    files: dict[str, bytes] = {}
    if fmt in ("diffusers", "both"):
        adapter_meta = {DIFFUSERS_PREFIX + k: v for k, v in config.items()}  # as save_lora_weights packs it
        diff_meta = {**meta, ADAPTER_METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True)}
        files[DIFFUSERS_FILE] = _safetensors_bytes(diffusers_lora_state(sd), dtype, diff_meta)
    if fmt in ("comfyui", "both"):
        # no lora_adapter_metadata here: diffusers would apply alpha twice (once from it, once from the .alpha keys)
        comfy_meta = {**meta, "ss_network_dim": str(int(rank)), "ss_network_alpha": str(float(alpha))}
        files[COMFYUI_FILE] = _safetensors_bytes(comfy, dtype, comfy_meta)
    return files
