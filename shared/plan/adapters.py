"""What the LoRA files a run loads beside its base cost (``shared.model.adapters``): the assistant in the trainer
and, at its inference strength, in the previews; the preview adapter runs in eval (and in the worker when it
renders). Parameters from each file's safetensors header where the file is on this host, else assumed the size of
the trained LoRA; every adapter run adds two renders per preview sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

from shared.config.schema import TrainConfig
from shared.config.validation_adapters import adapter_runs


def file_params(path: str) -> int | None:
    """Elements in a LoRA file (header only), or None where it is not a readable file on this host."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        p = files[0] if len(files) == 1 else p / "pytorch_lora_weights.safetensors"
    try:
        with p.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    return int(sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"))


def stacked_bytes(train: TrainConfig, n_lora: int, compute_bytes: int) -> tuple[int, int, list[str]]:
    """(trainer bytes, eval bytes, assumptions) of the frozen adapters, stored in the compute dtype."""
    notes: list[str] = []

    def size(path: str) -> int:
        n = file_params(path)
        if n is None:
            notes.append(f"{path}: not readable here; counted as large as the trained LoRA ({n_lora / 1e6:.1f}M)")
            return n_lora
        return n

    trainer = size(train.assistant_lora) * compute_bytes if train.assistant_lora else 0
    ev = trainer if train.assistant_lora and train.assistant_lora_inference_strength > 0 else 0
    runs = adapter_runs(train)
    ev += sum(size(f) for r in runs for _, f, _ in r.adapters) * compute_bytes
    if runs:
        notes.append(
            f"{len(runs)} preview adapter run(s): 2 more renders per preview sample each"
            + (", beside the base and LoRA renders" if train.validation_adapter_mode == "comparison" else "")
        )
    return trainer, ev, notes
