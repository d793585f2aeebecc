"""Rendering the adapter runs of ``shared.config.validation_adapters``: their adapters attached for a validation,
their render settings, and the effect retention (defined there)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from shared.config.validation_adapters import AdapterRun, adapter_runs, scheduler_beside

if TYPE_CHECKING:
    from shared.evaluate.render_pair import RenderSettings

__all__ = ["adapter_runs", "attached", "effect_retention", "profile", "run_means"]


@contextmanager
def attached(transformer: Any, runs: Sequence[AdapterRun]) -> Iterator[None]:
    """Every run's adapter files attached (frozen, inactive until a render asks for them) for the block."""
    from shared.model.adapters import attach_frozen_adapter, detach_adapter

    names: list[str] = []
    try:
        for run in runs:
            for name, path, _ in run.adapters:
                attach_frozen_adapter(transformer, name, path, "validation_adapter_path")
                names.append(name)
        yield
    finally:
        for name in names:
            detach_adapter(transformer, name)


def effect_retention(
    base: Image.Image, lora: Image.Image, run_base: Image.Image, run_lora: Image.Image
) -> float | None:
    """``<Δf, Δn> / <Δn, Δn>`` over pixels in [0, 1] (the module's docstring); None when Δn is 0."""

    def px(im: Image.Image) -> np.ndarray:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0

    dn = px(lora) - px(base)
    df = px(run_lora) - px(run_base)
    norm = float(np.sum(dn * dn))
    return None if norm == 0 else float(np.sum(df * dn) / norm)


def profile(cfg: RenderSettings, run: AdapterRun) -> RenderSettings:
    """The render settings of an adapter run: its steps, guidance and scheduler values where it sets them (the
    scheduler's also from a scheduler_config.json beside its first file, which the config's values override), its
    adapters in every cell beside the run's own frozen ones. Called where the files are: after a service has
    checked they are under its model folders."""
    import dataclasses

    return dataclasses.replace(
        cfg,
        steps=run.steps or cfg.steps,
        guidance=run.guidance if run.guidance is not None else cfg.guidance,
        extra_adapters={**cfg.extra_adapters, **run.weights},
        scheduler={**cfg.scheduler, **scheduler_beside(run.adapters[0][1]), **run.scheduler},
    )


def run_means(run: AdapterRun, per_sample: Sequence[Mapping[str, Any]], scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """An adapter run's entry in metrics.json: its profile (``scheduler``: the values it rendered with) and its
    samples' mean PSNRs and effect retention."""
    return {**run.to_json(), "scheduler": dict(scheduler), **sample_means(per_sample)}


def sample_means(per_sample: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The mean PSNRs and effect retention of a run's per-sample scores (None where no sample has one)."""

    def mean(key: str) -> float | None:
        values = [float(a[key]) for a in per_sample if a.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {"psnr_base": mean("psnr_base"), "psnr_lora": mean("psnr_lora"), "retention": mean("retention")}
