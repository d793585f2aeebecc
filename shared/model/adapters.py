"""Frozen LoRA adapters beside the trained one, and LoRA files read in any key format.

People run edit models with other LoRAs stacked on them (a few-step Lightning LoRA, a style LoRA) and train for
bases that carry one (an assistant LoRA). Such an adapter is attached to the transformer next to the trained
adapter (``TRAINED``) under its own name, frozen, never fused into the base weights, so it works on every
quantized base and leaves the trained adapter's tensors, its checkpoints and its export untouched. Which adapters
are active, at which strengths, is switched per forward with ``active_adapters``.

Files are read by diffusers' own ``QwenImageLoraLoaderMixin.lora_state_dict`` and attached by
``load_lora_adapter``, the code ``pipe.load_lora_weights`` runs: diffusers files (``transformer.<module>.lora_A``),
ComfyUI files (``diffusion_model.<module>.lora_A`` + ``.alpha``) and kohya files (``lora_unet_<module>.lora_down``)
all load, as they load in diffusers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from shared import errors

if TYPE_CHECKING:
    from shared.config.schema import TrainConfig

log = logging.getLogger(__name__)

TRAINED = "default"  # the trained adapter's name (``shared.model.lora.attach_lora``)
_PREFERRED_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors")


def resolve_adapter_file(path: str, option: str) -> Path:
    """The safetensors file ``path`` names: itself, or in a folder its one ``.safetensors`` file (the diffusers
    file when there are several). InvalidInput naming ``option`` otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        preferred = [p / name for name in _PREFERRED_FILES if (p / name).is_file()]
        if preferred:
            return preferred[0]
        if len(files) == 1:
            return files[0]
        listed = ", ".join(f.name for f in files[:5]) or "none"
        raise errors.InvalidInput(
            f"{option}: the folder {p} holds {len(files)} .safetensors files ({listed}); name the LoRA file itself"
        )
    if not p.is_file():
        raise errors.InvalidInput(
            f"{option}: {p} does not exist; give the path of a LoRA .safetensors file or its folder"
        )
    if p.suffix != ".safetensors":
        raise errors.InvalidInput(f"{option}: {p} is not a .safetensors file (pickled LoRAs are not loaded)")
    return p


def read_lora_file(path: str, option: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A LoRA file's transformer tensors in diffusers' naming (``transformer.<module>.lora_A.weight``; ComfyUI and
    kohya files converted, their alphas folded into the weights as diffusers folds them) and its adapter metadata
    (rank and alpha of a diffusers file; None when it has none)."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    file = resolve_adapter_file(path, option)
    try:
        sd, metadata = QwenImageLoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    except Exception as err:  # noqa: BLE001  # safetensors, diffusers' converters: any failure is the file's
        raise errors.InvalidInput(f"{option}: {file} is not a LoRA diffusers can read ({err})") from None
    tensors = {k: v for k, v in sd.items() if k.startswith("transformer.")}
    if not tensors:
        sample = ", ".join(list(sd)[:3]) or "no tensors"
        raise errors.InvalidInput(
            f"{option}: {file} holds no LoRA for a Qwen-Image transformer (keys such as {sample}); expected diffusers "
            "(transformer.<module>.lora_A.weight), ComfyUI (diffusion_model.<module>…) or kohya (lora_unet_…) keys"
        )
    return tensors, metadata


def _modules_with(transformer: torch.nn.Module, name: str) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def _lora_grads(transformer: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n}


def _restore_grads(transformer: torch.nn.Module, grads: Mapping[str, bool]) -> None:
    for n, p in transformer.named_parameters():
        if n in grads:
            p.requires_grad_(grads[n])


def attach_frozen_adapter(transformer: Any, name: str, path: str, option: str) -> list[str]:
    """Load the LoRA file at ``path`` as the frozen adapter ``name``; returns the modules it adapts. The adapters
    active before stay active (``active_adapters`` switches them). InvalidInput naming ``option`` when the file's
    modules are not the transformer's."""
    if name == TRAINED or name in getattr(transformer, "peft_config", {}):
        raise errors.InvalidInput(f"{option}: the adapter name {name!r} is taken; choose another")
    sd, metadata = read_lora_file(path, option)
    modules = sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in sd if ".lora_" in k})
    linear = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    linear |= {n.removesuffix(".base_layer") for n in linear}
    unknown = [m for m in modules if m not in linear]
    if unknown or not modules:
        raise errors.InvalidInput(
            f"{option}: {len(unknown)} of the {len(modules)} layers the LoRA adapts are not layers of this "
            f"transformer (e.g. {', '.join(unknown[:3])}): a LoRA for another model?"
        )
    grads = _lora_grads(transformer)
    active = _active(transformer)
    kwargs: dict[str, Any] = {"adapter_name": name, "prefix": "transformer"}
    if metadata:
        kwargs["metadata"] = metadata
    try:
        transformer.load_lora_adapter(sd, **kwargs)
    except (ValueError, RuntimeError, KeyError) as err:
        raise errors.InvalidInput(f"{option}: the LoRA does not fit this transformer ({err})") from None
    attached = _modules_with(transformer, name)
    if len(attached) != len(modules):
        raise errors.InvalidInput(f"{option}: {len(modules) - len(attached)} of its {len(modules)} layers did not load")
    for n, p in transformer.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)
    frozen = set(getattr(transformer, "_edittuner_frozen", ()))
    transformer._edittuner_frozen = frozen | {name}
    _restore_grads(transformer, grads)
    set_active_adapters(transformer, active)
    log.info("%s: %s attached as frozen adapter %r on %d layers", option, path, name, len(attached))
    return modules


def _active(transformer: Any) -> dict[str, float]:
    """The active adapters and their strengths (peft's scale over lora_alpha / r), read from the first layer."""
    from peft.tuners.lora import LoraLayer

    for m in transformer.modules():
        if isinstance(m, LoraLayer):
            if m.disable_adapters:
                return {}
            out = {}
            for name in m.active_adapters:
                if name in m.scaling:
                    base = m.lora_alpha[name] / m.r[name]
                    out[name] = float(m.scaling[name] / base) if base else 1.0
            return out
    return {}


def set_active_adapters(transformer: Any, weights: Mapping[str, float]) -> None:
    """Activate exactly ``weights`` (adapter → strength; empty: none). peft makes active adapters trainable: the
    caller's requires_grad flags are put back."""
    grads = _lora_grads(transformer)
    if not weights:
        transformer.disable_adapters()
    else:
        transformer.enable_adapters()
        transformer.set_adapters(list(weights), [float(w) for w in weights.values()])
    _restore_grads(transformer, grads)


@contextmanager
def active_adapters(transformer: Any, weights: Mapping[str, float]) -> Iterator[None]:
    """Inside the block only the adapters of ``weights`` run, at those strengths (empty: the base alone); the
    previous set and every requires_grad flag come back after."""
    before = _active(transformer)
    set_active_adapters(transformer, weights)
    try:
        yield
    finally:
        set_active_adapters(transformer, before)


def detach_adapter(transformer: Any, name: str) -> None:
    """Delete the adapter ``name`` (a frozen one attached for a render)."""
    if name in getattr(transformer, "peft_config", {}):
        transformer.delete_adapters(name)
    transformer._edittuner_frozen = set(getattr(transformer, "_edittuner_frozen", ())) - {name}


def adapter_names(transformer: Any) -> list[str]:
    return sorted(getattr(transformer, "peft_config", {}))


def _file_scale(metadata: Mapping[str, Any] | None, rank: int) -> float:
    """The file's LoRA scale (alpha / r): from a diffusers file's adapter metadata, else 1 (diffusers loads a file
    without it at alpha = r; ComfyUI and kohya alphas are already folded into the weights by the conversion)."""
    if not metadata:
        return 1.0
    alpha = metadata.get("transformer.lora_alpha", metadata.get("lora_alpha"))
    r = metadata.get("transformer.r", metadata.get("r", rank))
    return float(alpha) / float(r) if alpha is not None and r else 1.0


def global_step_of(path: str, option: str) -> int | None:
    """The ``global_step`` a LoRA file's safetensors metadata records (SimpleTuner writes it), or None."""
    from safetensors import safe_open

    file = resolve_adapter_file(path, option)
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        raw = (handle.metadata() or {}).get("global_step")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        raise errors.InvalidInput(f"{option}: {file}'s global_step metadata {raw!r} is not a step number") from None


def init_lora(transformer: Any, path: str, rank: int, alpha: float, option: str = "init_lora") -> None:
    """Start the trained adapter from the LoRA file at ``path``: the same modules and rank, its A as is and its B
    rescaled by (the file's alpha / r) / (alpha / rank), so the adapter's product B·A·scale is the file's. A file
    that does not fit is refused with the keys that differ."""
    from shared.model.lora import load_lora_state_dict, lora_state_dict

    sd, metadata = read_lora_file(path, option)
    theirs = {k.removeprefix("transformer."): v for k, v in sd.items()}
    ours = lora_state_dict(transformer, TRAINED)
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        parts = [
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})"
            for label, keys in (("not in the file", missing), ("not trained here", unexpected))
            if keys
        ]
        raise errors.InvalidInput(
            f"{option}: {path} adapts other layers than lora_target_modules here ({'; '.join(parts)}); train the "
            "same lora_target_modules as the file"
        )
    ranks = sorted({int(v.shape[0]) for k, v in theirs.items() if k.endswith(".lora_A.weight")})
    if ranks != [rank]:
        raise errors.InvalidInput(f"{option}: {path} has LoRA rank {', '.join(map(str, ranks))}; set lora_rank to it")
    factor = _file_scale(metadata, rank) / (alpha / rank)
    start = {k: (v * factor if k.endswith(".lora_B.weight") and factor != 1.0 else v) for k, v in theirs.items()}
    load_lora_state_dict(transformer, {k: v.to(ours[k].dtype) for k, v in start.items()}, TRAINED)
    log.info("%s: the trained adapter starts from %s (B scaled by %g for lora_alpha %g)", option, path, factor, alpha)


# ------------------------------------------------------------------------------------ previews' adapter sets
class AdapterModel(Protocol):
    """A diffusers model that takes peft adapters (``ModelMixin`` with ``PeftAdapterMixin``)."""

    def modules(self) -> Iterator[torch.nn.Module]: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def disable_adapters(self) -> None: ...


def has_adapter(transformer: object) -> bool:
    return bool(getattr(transformer, "_hf_peft_config_loaded", False))


def _tuner_layers(transformer: AdapterModel) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(transformer: AdapterModel) -> Iterator[None]:
    """Run the base model inside the block, then put every adapter layer back exactly as it was.

    diffusers' ``disable_adapters``/``enable_adapters`` also flip ``requires_grad`` of the LoRA weights (peft's
    ``set_adapter`` makes active adapters trainable), and a layer may have been disabled before we came: so the
    previous per-layer state and every parameter's ``requires_grad`` are restored rather than blindly enabled —
    a training transformer keeps training the same parameters, an inference one stays frozen.
    """
    if not has_adapter(transformer):
        yield
        return
    layers = _tuner_layers(transformer)
    was_disabled = [layer.disable_adapters for layer in layers]
    grads = {p: p.requires_grad for p in transformer.parameters()}
    transformer.disable_adapters()
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for p, flag in grads.items():
            p.requires_grad_(flag)


@contextmanager
def using_adapters(transformer: Any, weights: Mapping[str, float]) -> Iterator[None]:
    """Render with exactly ``weights`` (adapter → strength; empty: the base, every adapter layer off), then put
    the adapters and every requires_grad flag back as they were."""
    if not has_adapter(transformer):
        yield
    elif not weights:
        with adapters_disabled(transformer):
            yield
    else:
        with active_adapters(transformer, weights):
            yield


ASSISTANT = "assistant"  # the assistant LoRA's adapter name (``shared.train.adapters``)


def preview_adapters(train: TrainConfig) -> dict[str, float]:
    """The frozen adapters in every preview cell, base included: the assistant LoRA at
    ``assistant_lora_inference_strength`` when that is above 0 (it is part of the model as it is run)."""
    extra = {}
    if train.assistant_lora is not None and train.assistant_lora_inference_strength > 0:
        extra[ASSISTANT] = train.assistant_lora_inference_strength
    return extra


@contextmanager
def lora_file_in(pipe: Any, transformer: Any, lora_file: Path, train: TrainConfig | None = None) -> Iterator[None]:
    """For the block: ``lora_file`` loaded into ``transformer`` as the ``TRAINED`` adapter by the pipeline's own
    loader (diffusers reads the LoRA's alpha from the file's metadata; a state dict would apply it at alpha = rank),
    and beside it the frozen adapters ``train``'s previews use (the assistant LoRA at its inference strength).
    Afterwards both are gone, also when loading failed halfway."""
    own = pipe.transformer
    try:
        pipe.transformer = transformer
        try:
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=TRAINED)
        finally:
            pipe.transformer = own
        if train is not None and ASSISTANT in preview_adapters(train) and train.assistant_lora is not None:
            attach_frozen_adapter(transformer, ASSISTANT, train.assistant_lora, "assistant_lora_path")
        yield
    finally:
        detach_adapter(transformer, ASSISTANT)
        if TRAINED in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters([TRAINED])


def trained_adapters(transformer: Any) -> dict[str, float]:
    """The active adapters that are not frozen ones (``attach_frozen_adapter``): the LoRA being trained or
    previewed, whatever its name (the pipeline may have loaded it from a file under any)."""
    frozen: set[str] = getattr(transformer, "_edittuner_frozen", set())
    return {n: w for n, w in _active(transformer).items() if n not in frozen}
