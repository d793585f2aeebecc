"""Overrides that make a run fit: for the trainer checkpointing, then a smaller precision, a lower resolution, a
lower rank; for the encoder and eval_svc their own memory options (``SERVICE_LADDERS``), searched after the
trainer's changes are applied.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.plan.memory import linear_weight_bytes

PRECISION_LADDER = ("no_change", "int8-quanto", "nf4-bnb", "int4-quanto")  # the recommendation's order
RESOLUTION_LADDER = (1024, 768, 512)


# ------------------------------------------------------------------------------------------ recommendation
def _with_resolution(run: RunConfig, side: int) -> RunConfig:
    """``run`` with every image and conditioning dataset at ``side``² pixels (and packed references too)."""
    data = dataclasses.replace(
        run.data,
        datasets=tuple(
            dataclasses.replace(d, resolution=float(side), resolution_type="pixel_area")
            if d.dataset_type in ("image", "conditioning")
            else d
            for d in run.data.datasets
        ),
    )
    train = run.train
    packed = (  # refs at reference_area
        not get_flavour(train.model_flavour).sizes_references_to_target or not train.model_kwargs.match_target_res
    )
    if packed and train.model_kwargs.reference_area > side * side:
        train = dataclasses.replace(
            train, model_kwargs=dataclasses.replace(train.model_kwargs, reference_area=side * side)
        )
    return dataclasses.replace(run, train=train, data=data)


def _candidates(run: RunConfig) -> list[tuple[dict[str, Any], int | None]]:
    """(config overrides, dataset side or None) in preference order: checkpointing on; then a smaller precision;
    then a lower resolution; then rank 8."""
    t = run.train
    cur_bytes = linear_weight_bytes(t.base_model_precision, 3072, 3072)
    precisions = [t.base_model_precision] + [
        p for p in PRECISION_LADDER if p != t.base_model_precision and linear_weight_bytes(p, 3072, 3072) < cur_bytes
    ]
    side = max(math.isqrt(ds.target_area) for ds in run.data.image_datasets)
    sides = [None] + [s for s in RESOLUTION_LADDER if s < side]
    ranks = [t.lora_rank] + ([8] if t.lora_rank > 8 else [])
    out = []
    for rank in ranks:
        for s in sides:
            for p in precisions:
                over: dict[str, Any] = {"gradient_checkpointing": True, "base_model_precision": p, "lora_rank": rank}
                out.append((over, s))
    return out


def recommend_overrides(
    run: RunConfig, memory: int, gpu: str, predict: Callable[..., Any]
) -> tuple[list[str], int | None]:
    """The first candidate (see ``_candidates``) whose trainer fits ``memory``, as the changes to make: config
    ``key=value`` overrides, and the dataset resolution as a multidatabackend.json edit. ([], None) if none fits.
    ``predict`` is ``shared.plan.predict.plan_run`` (passed in, so that the two modules do not import each other)."""
    t = run.train
    for over, side in _candidates(run):
        cand = run if side is None else _with_resolution(run, side)
        cand = dataclasses.replace(cand, train=dataclasses.replace(cand.train, **over))
        p = predict(cand, memory, gpu, recommend=False)
        if not p.fits:
            continue
        changes = [f"{k}={json.dumps(v).strip(chr(34))}" for k, v in over.items() if getattr(t, k) != v]
        if side is not None:
            if cand.train.model_kwargs.reference_area != t.model_kwargs.reference_area:
                changes.append(f"model_kwargs.reference_area={cand.train.model_kwargs.reference_area}")
            ids = ", ".join(d.id for d in run.data.datasets if d.dataset_type in ("image", "conditioning"))
            changes.append(f'multidatabackend.json: "resolution": {side} for {ids}')
        return changes, p.trainer.total
    return [], None


# Per service, the override sets tried in order (each a superset of what the encoder or eval needs less of):
# slicing gives the same latents, a quantized text encoder other embeddings, tiling close latents; for eval, tiled
# decoding, then smaller previews (the quickstart's own advice for out-of-memory during validation).
SERVICE_LADDERS: dict[str, tuple[dict[str, Any], ...]] = {
    "encoder": (
        {"vae_enable_slicing": True},
        {"vae_enable_slicing": True, "text_encoder_1_precision": "int8-quanto"},
        {"vae_enable_slicing": True, "text_encoder_1_precision": "nf4-bnb"},
        {"vae_enable_slicing": True, "text_encoder_1_precision": "nf4-bnb", "vae_enable_tiling": True},
    ),
    "eval": (
        {"vae_enable_tiling": True},
        {"vae_enable_tiling": True, "validation_resolution": "768x768"},
        {"vae_enable_tiling": True, "validation_resolution": "512x512"},
    ),
}


# Qwen-Image-2.1's previews keep a prefix KV cache per prompt, which grows with the references and not with the
# preview's size: after tiled decoding, one prompt instead of two (no true CFG, as QwenImage21Pipeline samples by
# default), then smaller previews with both.
QWEN21_EVAL_LADDER: tuple[dict[str, Any], ...] = SERVICE_LADDERS["eval"][:1] + tuple(
    {**o, "validation_guidance": 1} for o in SERVICE_LADDERS["eval"]
)


def service_ladders(run: RunConfig) -> dict[str, tuple[dict[str, Any], ...]]:
    """``SERVICE_LADDERS`` for ``run``'s flavour (v2.1: eval's starts without true CFG)."""
    if get_flavour(run.train.model_flavour).joint_sequence:
        return SERVICE_LADDERS | {"eval": QWEN21_EVAL_LADDER}
    return SERVICE_LADDERS


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value).strip(chr(34))}"


def recommend_service_overrides(
    run: RunConfig, trainer_changes: list[str], memory: int, gpu: str, predict: Callable[..., Any]
) -> dict[str, list[str]]:
    """For each of the encoder and eval that does not fit ``memory`` once ``trainer_changes`` are applied: the
    first set of ``service_ladders`` that makes it fit, as ``key=value`` changes ([] where none does). Each
    service's changes are applied before the next is searched, so together they are what the plan promises."""
    out: dict[str, list[str]] = {}
    current = apply_recommendation(run, trainer_changes)
    for service, ladder in service_ladders(run).items():
        if predict(current, memory, gpu, recommend=False).services[service].fits:
            continue
        out[service] = []
        for over in ladder:
            changes = [_override(k, v) for k, v in over.items() if getattr(current.train, k) != v]
            cand = apply_recommendation(current, changes)
            if changes and predict(cand, memory, gpu, recommend=False).services[service].fits:
                out[service], current = changes, cand
                break
    return out


def smaller_validation(run: RunConfig, failures: int) -> tuple[RunConfig, list[str]]:
    """``run`` with the validation settings to use after ``failures`` out-of-memory renders, and the changes made:
    the ``failures``-th step of eval's ladder (the last one once past it), leaving out resolutions that are not
    below the run's own. No failures: ``run`` as it is."""
    if failures <= 0:
        return run, []
    w, h = run.train.validation_size
    steps = [
        o
        for o in SERVICE_LADDERS["eval"]
        if "validation_resolution" not in o or math.prod(int(x) for x in o["validation_resolution"].split("x")) < w * h
    ]
    over = steps[min(failures, len(steps)) - 1]
    changes = [_override(k, v) for k, v in over.items() if getattr(run.train, k) != v]
    return apply_recommendation(run, changes), changes


def apply_recommendation(run: RunConfig, recommendation: list[str]) -> RunConfig:
    """``run`` with a recommendation applied (what a user does by hand), so it can be planned again."""
    train, side = run.train, None
    for item in recommendation:
        if item.startswith("multidatabackend.json:"):
            side = int(re.search(r'"resolution": (\d+)', item).group(1))  # type: ignore[union-attr]
            continue
        key, _, value = item.partition("=")
        if key == "model_kwargs.reference_area":
            train = dataclasses.replace(
                train, model_kwargs=dataclasses.replace(train.model_kwargs, reference_area=int(value))
            )
        else:
            change: dict[str, Any] = {  # the value of whichever field ``key`` names
                key: json.loads(value) if value in ("true", "false") or value.isdigit() else value
            }
            train = dataclasses.replace(train, **change)
    run = dataclasses.replace(run, train=train)
    return _with_resolution(run, side) if side is not None else run
