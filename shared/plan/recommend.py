"""Overrides that make a run fit: checkpointing, then a smaller precision, a lower resolution, a lower rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Callable

from shared.config.schema import RunConfig
from shared.plan.memory import linear_weight_bytes

PRECISION_LADDER = ("no_change", "int8-quanto", "nf4-bnb", "int4-quanto")  # the recommendation's order
RESOLUTION_LADDER = (1024, 768, 512)


# ------------------------------------------------------------------------------------------ recommendation
def _with_resolution(run: RunConfig, side: int) -> RunConfig:
    """``run`` with every image and conditioning dataset at ``side``² pixels (and packed references too)."""
    data = dataclasses.replace(run.data, datasets=tuple(
        dataclasses.replace(d, resolution=float(side), resolution_type="pixel_area")
        if d.dataset_type in ("image", "conditioning") else d for d in run.data.datasets))
    train = run.train
    packed = train.model_flavour == "edit-v1" or not train.model_kwargs.match_target_res  # refs at reference_area
    if packed and train.model_kwargs.reference_area > side * side:
        train = dataclasses.replace(train, model_kwargs=dataclasses.replace(train.model_kwargs,
                                                                            reference_area=side * side))
    return dataclasses.replace(run, train=train, data=data)


def _candidates(run: RunConfig) -> list[tuple[dict[str, Any], int | None]]:
    """(config overrides, dataset side or None) in preference order: checkpointing on; then a smaller precision;
    then a lower resolution; then rank 8."""
    t = run.train
    cur_bytes = linear_weight_bytes(t.base_model_precision, 3072, 3072)
    precisions = [t.base_model_precision] + [p for p in PRECISION_LADDER
                                             if p != t.base_model_precision
                                             and linear_weight_bytes(p, 3072, 3072) < cur_bytes]
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


def recommend_overrides(run: RunConfig, memory: int, gpu: str, predict: Callable[..., Any]
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
            changes.append(f"multidatabackend.json: \"resolution\": {side} for {ids}")
        return changes, p.trainer.total
    return [], None


def apply_recommendation(run: RunConfig, recommendation: list[str]) -> RunConfig:
    """``run`` with a recommendation applied (what a user does by hand), so it can be planned again."""
    train, side = run.train, None
    for item in recommendation:
        if item.startswith("multidatabackend.json:"):
            side = int(re.search(r'"resolution": (\d+)', item).group(1))  # type: ignore[union-attr]
            continue
        key, _, value = item.partition("=")
        if key == "model_kwargs.reference_area":
            train = dataclasses.replace(train, model_kwargs=dataclasses.replace(train.model_kwargs,
                                                                                reference_area=int(value)))
        else:
            train = dataclasses.replace(train, **{key: json.loads(value) if value in ("true", "false") or
                                                  value.isdigit() else value})
    run = dataclasses.replace(run, train=train)
    return _with_resolution(run, side) if side is not None else run
