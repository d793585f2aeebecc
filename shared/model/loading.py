"""The one place that loads Qwen-Image-Edit models.

Services, the trainer and the tests all load through ``load_pipeline`` so that the real ``from_pretrained`` path
(local directory in the Hugging Face repo layout, or a hub id where the host can reach the hub) is the only one,
and the workarounds it needs on a CPU-only host live here and nowhere else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from shared import errors
from shared.config.flavours import get_flavour
from shared.config.schema import is_single_file
from shared.model.location import locate_model

log = logging.getLogger(__name__)


# Every component any flavour's pipeline has, as save_pretrained lays them out (one subfolder each); a flavour's
# own list is ``Flavour.components`` (Qwen-Image-2.1's has no tokenizer/: its processor holds the tokenizer).
COMPONENTS: tuple[str, ...] = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")


def processor_without_video() -> None:
    """Build and load ``Qwen2VLProcessor`` (the edit models') and ``Qwen3VLProcessor`` (Qwen-Image-2.1's) without
    their video processor, on every host.

    The processors' attribute lists include a video processor, which needs torchvision, and their
    ``from_pretrained`` then insists on a ``video_preprocessor_config.json``. The image pipelines never pass video.
    Dropping ``video_processor`` from the attribute list (``__init__``/``from_pretrained`` then skip it) makes
    loading the same on a host where torchvision imports (GPU hosts with a CUDA torch usually have it) as on one
    where it does not: the real model's folder loads either way, and so does the tiny model, which has no video
    processor to write. Deciding by whether torchvision imports would load the tiny model on a CPU and fail it on a
    GPU host. Idempotent.
    """
    from transformers import Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    base = ProcessorMixin.__dict__["get_attributes"].__func__  # the classmethod's function
    for cls in (Qwen2VLProcessor, Qwen3VLProcessor):
        if getattr(cls, "_edittuner_without_video", False):
            continue
        # a monkeypatch, which mypy refuses: it types class attributes as fixed
        cls.get_attributes = classmethod(  # type: ignore[method-assign, assignment]
            lambda c: [a for a in base(c) if a != "video_processor"]
        )
        cls._edittuner_without_video = True  # type: ignore[union-attr]  # a marker the classes lack


def pipeline_class(flavour: str) -> type[Any]:
    """The diffusers pipeline class whose prompt template and reference handling the flavour was trained with."""
    import diffusers

    cls: type[Any] = getattr(diffusers, get_flavour(flavour).pipeline_class_name)
    return cls


def _expected_layout(flavour: str) -> str:
    flav = get_flavour(flavour)
    return (
        f"a {flav.pipeline_class_name} pipeline in the Hugging Face repo layout (model_index.json, "
        + ", ".join(f"{c}/" for c in flav.components)
        + ")"
    )


def _check_local_dir(path: Path, flavour: str, wanted: Iterable[str]) -> None:
    """Fail with a sentence naming the path and what it lacks, before diffusers fails with a deep traceback."""
    index = path / "model_index.json"
    if not path.is_dir():
        raise errors.InvalidInput(
            f"model directory {path} does not exist or is not a directory: expected {_expected_layout(flavour)}"
        )
    if not index.is_file():
        raise errors.InvalidInput(
            f"model directory {path} has no model_index.json: expected {_expected_layout(flavour)}"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise errors.InvalidInput(f"{index}: not readable JSON ({err})") from None
    expected = get_flavour(flavour).pipeline_class_name
    if class_name != expected:
        raise errors.InvalidInput(
            f"{index}: _class_name is {class_name!r} but flavour {get_flavour(flavour).name} needs {expected!r}; "
            "pick the flavour that matches the weights"
        )
    missing = [c for c in wanted if not (path / c).is_dir()]
    if missing:
        raise errors.InvalidInput(
            f"model directory {path} lacks {', '.join(f'{c}/' for c in missing)}: expected {_expected_layout(flavour)}"
        )


def _wanted_components(components: Literal["all"] | Iterable[str], flavour: str) -> tuple[str, ...]:
    """The flavour's components among ``components`` (a name the flavour's pipeline lacks, such as Qwen-Image-2.1's
    tokenizer, is left out)."""
    own = get_flavour(flavour).components
    if components == "all":
        return own
    wanted = tuple(components)
    unknown = sorted(set(wanted) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown pipeline components {unknown}; known: {COMPONENTS}")
    return tuple(c for c in wanted if c in own)


def load_pipeline(
    source: str | Path,
    flavour: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    components: Literal["all"] | Iterable[str] = "all",
) -> Any:
    """Load the flavour's pipeline from a local directory (hub layout) or a hub id, on ``device`` in ``dtype``.

    Components left out of ``components`` are passed as ``None``: they are neither read nor allocated, which is
    how the encoder avoids holding the 20B-parameter transformer it never calls.
    """
    wanted = _wanted_components(components, flavour)
    processor_without_video()
    quiet_progress_bars()
    cls = pipeline_class(flavour)
    loc = locate_model(str(source))
    log.info("model %s (%s): loading from %s", source, ", ".join(wanted), loc.where)
    if loc.local:
        _check_local_dir(Path(loc.source), flavour, wanted)
    skipped = {c: None for c in get_flavour(flavour).components if c not in wanted}
    try:
        pipe = cls.from_pretrained(loc.source, dtype=dtype, **skipped)
    except (OSError, ValueError) as err:  # unreadable weights, unreachable or unknown hub repo
        if not loc.local:
            raise loc.missing_error(str(source), err) from err
        raise errors.InvalidInput(f"cannot load model directory {loc.source} as {cls.__name__}: {err}") from err
    if getattr(pipe, "transformer", None) is not None:
        apply_flavour(pipe.transformer, flavour)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_encoder_pipeline(
    source: str | Path,
    flavour: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_precision: str = "no_change",
) -> Any:
    """The pipeline without transformer or scheduler: all that encoding latents and prompt embeddings needs.

    ``text_encoder_precision`` (``text_encoder_1_precision``): the text encoder is loaded on the CPU, quantized
    there (``shared.model.quantize``) and only then moved to ``device``, so the device never holds it in ``dtype``.
    """
    if text_encoder_precision == "no_change":
        return load_pipeline(
            source, flavour, device=device, dtype=dtype, components=get_flavour(flavour).encoder_components
        )
    from shared.model.quantize import check_precision, quantize_text_encoder

    check_precision(text_encoder_precision, device, option="text_encoder_1_precision")  # before reading weights
    pipe = load_pipeline(source, flavour, device="cpu", dtype=dtype, components=get_flavour(flavour).encoder_components)
    quantize_text_encoder(pipe.text_encoder, text_encoder_precision, device=device, compute_dtype=dtype)
    pipe.vae.to(device)
    return pipe


# What a preview render needs when the caption embeddings are cached: no text encoder, tokenizer or processor.
RENDER_COMPONENTS: tuple[str, ...] = ("transformer", "vae", "scheduler")


def load_render_pipeline(
    source: str | Path,
    flavour: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str = "no_change",
    quantize_via: str = "cpu",
    text_encoder: bool = False,
    transformer_file: str | None = None,
    transformer_subfolder: str | None = "transformer",
) -> tuple[Any, tuple[str, ...]]:
    """The pipeline previews render with, and the components it holds: the transformer at ``precision``
    (``base_model_precision``, quantized by the code training uses, so a preview shows the weights training
    trained against), the VAE and scheduler, and the text encoder only when ``text_encoder`` (embeddings not
    cached). Returns (pipe, components loaded)."""
    flav = get_flavour(flavour)
    # QwenImage21Pipeline's __init__ reads its processor (its chat template counts the system prompt's tokens):
    # the tokenizer's few MB, not the text encoder
    cached = RENDER_COMPONENTS + (("processor",) if flav.joint_sequence else ())
    wanted = flav.components if text_encoder else cached
    if precision == "no_change" and not transformer_file:
        return load_pipeline(source, flavour, device=device, dtype=dtype, components=wanted), wanted
    from shared.model.quantize import check_precision, quantize_transformer

    check_precision(precision, device)  # before reading any weight
    pipe = load_pipeline(
        source, flavour, device=device, dtype=dtype, components=[c for c in wanted if c != "transformer"]
    )
    transformer = load_transformer(
        source, flavour, dtype=dtype, transformer=transformer_file, subfolder=transformer_subfolder
    )
    pipe.transformer = quantize_transformer(
        transformer, precision, device=device, compute_dtype=dtype, quantize_via=quantize_via
    )
    return pipe, wanted


def configure_vae(vae: Any, *, tiling: bool, slicing: bool) -> Any:
    """``vae_enable_tiling`` / ``vae_enable_slicing`` on a diffusers VAE: tiles of 256 pixels (stride 192, blended)
    for images above that size, and one image of a batch at a time. Both lower the peak memory of encoding large
    images; slicing gives the same latents, tiling latents close to the untiled ones (the tests measure how close)."""
    if tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    if slicing:
        vae.enable_slicing()
    else:
        vae.disable_slicing()
    return vae


def quiet_progress_bars() -> None:
    """Loading bars would interleave with service logs; progress is reported through job events instead."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def apply_flavour(transformer: Any, flavour: str) -> Any:
    """The flavour's conditioning on the transformer, whatever its config says: edit-v3 always runs with
    ``zero_cond_t`` (reference tokens modulated at t=0), edit-v1/v2 never. A config that disagrees is logged and
    overridden (the flag changes the forward only, not the weights)."""
    flav = get_flavour(flavour)
    if flav.joint_sequence:  # Qwen-Image-2.1 conditions by its own config (causal_condition), read as shipped
        if not transformer.config.get("causal_condition", True):
            log.warning("transformer config has causal_condition=false; %s was released with true", flav.name)
        return transformer
    want = flav.zero_cond_t
    has = bool(transformer.config.get("zero_cond_t", False))
    if has != want:
        log.info(
            "transformer config has zero_cond_t=%s; flavour %s runs with zero_cond_t=%s",
            has,
            get_flavour(flavour).name,
            want,
        )
    transformer.zero_cond_t = want
    for block in getattr(transformer, "transformer_blocks", []):
        block.zero_cond_t = want
    transformer.register_to_config(zero_cond_t=want)
    return transformer


def scheduler_config(source: str | Path) -> dict[str, Any]:
    """The model's scheduler config (``scheduler/scheduler_config.json``): base/max shift and sequence lengths
    for ``flow_schedule_auto_shift``."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    loc = locate_model(str(source))
    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(loc.source, subfolder="scheduler"))
    except (OSError, ValueError) as err:
        if not loc.local:
            raise loc.missing_error(str(source), err) from err
        raise errors.InvalidInput(f"cannot read the scheduler config of {loc.source}: {err}") from err


def transformer_config(source: str | Path, flavour: str) -> dict[str, Any]:
    """The flavour's transformer config (``transformer/config.json`` of the model folder): what a single transformer
    file is built with and checked against. The folder needs no transformer weights for it."""
    from shared.model.single_file import transformer_class

    loc = locate_model(str(source))
    try:
        return dict(transformer_class(flavour).load_config(loc.source, subfolder="transformer"))
    except (OSError, ValueError) as err:
        if not loc.local:
            raise loc.missing_error(str(source), err) from err
        raise errors.InvalidInput(
            f"cannot read {Path(loc.source) / 'transformer' / 'config.json'} ({err}): a transformer file is built "
            "with the model folder's transformer config"
        ) from err


def inspect_transformer_source(source: str | Path, flavour: str, transformer: str) -> Any:
    """The ``TransformerFile`` (types, bytes, checked names and shapes) of ``pretrained_transformer_model_name_or_path``
    when it is a single file, found as its loading finds it."""
    from shared.model.single_file import find_transformer_file, inspect_transformer_file

    path = find_transformer_file(transformer)
    return inspect_transformer_file(path, flavour, transformer_config(source, flavour))


def load_transformer(
    source: str | Path,
    flavour: str,
    *,
    dtype: torch.dtype = torch.float32,
    transformer: str | None = None,
    subfolder: str | None = "transformer",
) -> Any:
    """Just the flavour's transformer (on CPU, in ``dtype``): what training needs, quantized afterwards.

    ``transformer`` (``pretrained_transformer_model_name_or_path``): a single file (``shared.model.single_file``:
    GGUF, ComfyUI bf16/fp8/fp8_scaled safetensors; quantized Linears keep the file's types) or another folder
    holding the transformer under ``subfolder`` (``pretrained_transformer_subfolder``; none: the folder itself)."""
    from shared.model.single_file import (
        find_transformer_file,
        inspect_transformer_file,
        load_transformer_file,
        transformer_class,
    )

    cls = transformer_class(flavour)
    if transformer and is_single_file(transformer):
        config = transformer_config(source, flavour)
        tf = inspect_transformer_file(find_transformer_file(transformer), flavour, config)
        return apply_flavour(load_transformer_file(tf, flavour, config, dtype=dtype), flavour)
    where = transformer or source
    sub = subfolder if transformer else "transformer"
    sub = None if sub in (None, "", "none", ".") else sub
    loc = locate_model(str(where))
    log.info("model %s (transformer): loading from %s", where, loc.where)
    if loc.local and not transformer:
        _check_local_dir(Path(loc.source), flavour, ("transformer",))
    try:
        model = cls.from_pretrained(loc.source, subfolder=sub, dtype=dtype)
    except (OSError, ValueError) as err:
        if not loc.local:
            raise loc.missing_error(str(where), err) from err
        raise errors.InvalidInput(f"cannot load the transformer of {loc.source}: {err}") from err
    return apply_flavour(model, flavour)
