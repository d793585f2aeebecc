"""The learning-rate schedule by SimpleTuner's ``lr_scheduler`` names, from diffusers' schedules where they exist.

- ``constant``, ``constant_with_warmup``, ``linear``, ``cosine`` (warmup, then a half cosine to 0),
  ``cosine_with_restarts`` (``lr_num_cycles`` hard restarts): diffusers' ``get_scheduler``, as SimpleTuner calls
  it for these names except ``cosine``, which SimpleTuner replaces with its own restarting cosine; here it is
  diffusers' single decay, the schedule the name means elsewhere.
- ``polynomial``: diffusers' polynomial decay from the learning rate to ``lr_end`` with ``lr_power``.
- ``sine``: SimpleTuner's own wave, ``lr_end + (lr - lr_end) * (1 + sin(pi * step / lr_warmup_steps)) / 2``.

Every schedule is a ``LambdaLR`` whose state is its step count, so checkpoints hold it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shared.config.checks import check_schedule
from shared.errors import ConfigError


def build_scheduler(
    cfg: Any, name: str, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``name`` (cfg.lr_scheduler, or constant for schedule-free optimizers) over total_steps."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    problems = check_schedule(cfg, "config.json")  # the config's own rules, for a config built without loading
    if problems:
        raise ConfigError(problems)
    warmup = cfg.lr_warmup_steps
    if name == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, total_steps, lr_end=cfg.lr_end, power=cfg.lr_power
        )
    if name == "sine":
        base = float(optimizer.param_groups[0]["lr"])  # the optimizer's (Prodigy's 1.0 when it sets it)
        floor = min(cfg.lr_end, base) / base if base > 0 else 0.0

        def wave(step: int) -> float:
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.sin(math.pi * step / warmup))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, wave)
    extra = {"num_cycles": cfg.lr_num_cycles} if name == "cosine_with_restarts" else {}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, **extra)
