"""``validation_on_full_precision``: the previews of a run trained on a quantized base (a GGUF or fp8 transformer
file, or ``base_model_precision``) rendered a second time on the model folder's unquantized transformer, with the
same LoRA file loaded into it, so a user sees the LoRA on the model they will also run it on.

Each sample gets two more cells (``full base``, ``full + LoRA``) from the same seed, and an entry under ``adapters``
labelled ``FULL_LABEL``: its PSNRs, and the effect retention (``shared.config.validation_adapters``) of the LoRA's
change on the quantized base carried over to the full-precision one (1: all of it). The full-precision transformer
is held beside the quantized one: the memory of both.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from shared.config.schema import RunConfig
from shared.evaluate.adapter_runs import sample_means

log = logging.getLogger(__name__)

FULL_LABEL = "full precision"


def wanted(run: RunConfig) -> bool:
    """Whether the run's previews render on the full-precision transformer too: asked for, and the base quantized."""
    t = run.train
    if t.validation_on_full_precision and not t.full_precision_previews:
        log.info("validation_on_full_precision: the base is not quantized; the previews are already full precision")
    return t.full_precision_previews


def load_full_transformer(run: RunConfig, device: torch.device | str, dtype: torch.dtype) -> Any:
    """The model folder's transformer in ``dtype`` on ``device``, frozen, for rendering."""
    from shared.model.loading import load_transformer

    t = run.train
    model = load_transformer(t.model_path, t.model_flavour, dtype=dtype)
    model.requires_grad_(False)
    return model.to(device).eval()


@contextmanager
def lora_from_bytes(pipe: Any, full: Any, data: bytes, run: RunConfig) -> Iterator[None]:
    """A diffusers LoRA file's bytes (the training worker's ``Trainer.export_files``) loaded into ``full``, with the
    run's preview adapters, for the block (``shared.model.adapters.lora_file_in``)."""
    from shared.model.adapters import lora_file_in
    from shared.model.lora import DIFFUSERS_FILE

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DIFFUSERS_FILE
        path.write_bytes(data)
        with lora_file_in(pipe, full, path, run.train):
            yield


def full_means(per_sample: list[dict[str, Any]]) -> dict[str, Any]:
    """The full-precision entry of metrics.json's ``adapters``: the samples' mean PSNRs and effect retention."""
    return {"label": FULL_LABEL, "full_precision": True, **sample_means(per_sample)}


@contextmanager
def rendering_on(pipe: Any, transformer: Any) -> Iterator[None]:
    """The pipeline renders with ``transformer`` for the block."""
    own = pipe.transformer
    pipe.transformer = transformer
    try:
        yield
    finally:
        pipe.transformer = own
