"""The adapters a run trains beside: the assistant LoRA (SimpleTuner's ``assistant_lora_path``) and the LoRA the
trained adapter starts from (``init_lora``). The files are read and attached by ``shared.model.adapters``."""

from __future__ import annotations

from typing import Any

from shared.config.schema import TrainConfig
from shared.errors import InvalidInput


def start_adapters(transformer: Any, cfg: TrainConfig, resume_step: int | None) -> int:
    """Attach the assistant LoRA (frozen, active in every training forward at ``assistant_lora_strength``) and, for
    a new run, put init_lora's weights in the trained adapter; returns the step a new run counts from
    (``init_lora_step``, else the file's ``global_step`` metadata, else 0)."""
    from shared.model.adapters import (
        ASSISTANT,
        TRAINED,
        attach_frozen_adapter,
        global_step_of,
        init_lora,
        set_active_adapters,
    )

    if cfg.assistant_lora is not None:
        attach_frozen_adapter(transformer, ASSISTANT, cfg.assistant_lora, "assistant_lora_path")
        set_active_adapters(transformer, {TRAINED: 1.0, ASSISTANT: cfg.assistant_lora_strength})
    if cfg.init_lora is None or resume_step is not None:  # a resume restores the checkpoint's weights
        return 0
    init_lora(transformer, cfg.init_lora, cfg.lora_rank, cfg.effective_lora_alpha)
    limit = cfg.max_train_steps or None
    if cfg.init_lora_step is not None:
        if limit is not None and cfg.init_lora_step >= limit:
            raise InvalidInput(f"init_lora_step {cfg.init_lora_step} must be below max_train_steps {limit}")
        return cfg.init_lora_step
    step = global_step_of(cfg.init_lora, "init_lora") or 0
    if limit is not None and step >= limit:
        raise InvalidInput(
            f"init_lora: the file's metadata says global_step {step}, not below max_train_steps {limit}; set "
            "init_lora_step: 0 for a new run from it, or raise max_train_steps to continue its count"
        )
    return step
