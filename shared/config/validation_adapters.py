"""Previews with the LoRAs people stack on the model at inference: SimpleTuner's ``validation_adapter_*`` options.

An *adapter run* is one set of frozen LoRA files (a few-step Lightning LoRA, a style LoRA) at their strengths, with
the profile they are run with: steps, guidance and scheduler settings (a few-step LoRA needs its own: 4 or 8 steps,
guidance 1, its shift). Each run renders every preview sample twice from the same seed and references, the adapters
alone ("<label>") and with the trained LoRA ("<label> + LoRA"); ``validation_adapter_mode: comparison`` keeps the
normal base and LoRA renders beside them, ``adapter_only`` shows the run alone.

The runs come from ``validation_adapter_path`` (one file: ``validation_adapter_name``, ``validation_adapter_strength``)
or ``validation_adapter_config``: a list (or ``{"runs": [...]}``) whose entries are a path, or an object with
``label``, ``path`` or ``paths`` (each a path or ``{path, strength}``), ``strength``, and the profile keys ``steps``,
``guidance`` and ``scheduler`` (scheduler config values, e.g. ``{"shift": 3.0, "use_dynamic_shifting": false}``).
Profile keys a run leaves out come from ``validation_adapter_steps`` / ``validation_adapter_guidance`` and, for the
scheduler, from a ``scheduler_config.json`` beside the (first) adapter file, as few-step LoRAs ship it.

**Effect retention** of a run, per sample: how much of the LoRA's change at the normal profile survives at the
run's, ``r = <Δf, Δn> / <Δn, Δn>`` with ``Δn = LoRA − base`` (normal profile) and ``Δf = (run + LoRA) − run``, over
the images' pixels in [0, 1]: 1 means the change is all there, 0 that it is gone, below 0 that it is reversed;
undefined (None) where the LoRA changes nothing at the normal profile. Comparison mode only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import errors
from shared.config.schema import TrainConfig

SCHEDULER_FILE = "scheduler_config.json"
_SCHEDULER_KEYS = {
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "time_shift_type",
    "shift_terminal",
    "invert_sigmas",
    "stochastic_sampling",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
}


@dataclass(frozen=True)
class AdapterRun:
    label: str
    adapters: tuple[tuple[str, str, float], ...]  # (adapter name, file, strength)
    steps: int | None = None
    guidance: float | None = None
    scheduler: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, float]:
        return {name: strength for name, _, strength in self.adapters}

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "adapters": [{"file": Path(f).name, "strength": s} for _, f, s in self.adapters],
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": dict(self.scheduler),
        }


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_").lower() or "adapter"


def _stem(path: str) -> str:
    return Path(path.rstrip("/")).stem or "adapter"


def _strength(value: Any, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise errors.InvalidInput(f"{where}: strength must be a number above 0, got {value!r}")
    return float(value)


def scheduler_beside(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    file = (p if p.is_dir() else p.parent) / SCHEDULER_FILE
    if not file.is_file():
        return {}
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise errors.InvalidInput(f"{file}: not readable JSON ({err})") from None
    return {k: v for k, v in doc.items() if k in _SCHEDULER_KEYS}


def _scheduler(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.InvalidInput(f"{where}.scheduler: expected an object of scheduler settings, got {value!r}")
    unknown = sorted(set(value) - _SCHEDULER_KEYS)
    if unknown:
        raise errors.InvalidInput(
            f"{where}.scheduler: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(_SCHEDULER_KEYS))}"
        )
    return dict(value)


def _entries(config: Any) -> list[Any]:
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            raise errors.InvalidInput(
                "validation_adapter_config: write the runs inline as JSON (a list), not a file path or other text"
            ) from None
    if isinstance(config, dict):
        config = config.get("runs")
    if not isinstance(config, list) or not config:
        raise errors.InvalidInput(
            'validation_adapter_config: expected a non-empty list of runs (or {"runs": [...]}), each a path or '
            "{label, path or paths, strength, steps, guidance, scheduler}"
        )
    return config


def adapter_runs(train: TrainConfig) -> list[AdapterRun]:
    """The configured adapter runs (none with ``validation_adapter_mode: none``); InvalidInput naming the option."""
    if train.validation_adapter_mode == "none":
        return []
    if train.validation_adapter_path and train.validation_adapter_config is not None:
        raise errors.InvalidInput("validation_adapter_path and validation_adapter_config: give one of them, not both")
    raw: list[Any]
    if train.validation_adapter_path:
        raw = [
            {
                "label": train.validation_adapter_name or _stem(train.validation_adapter_path),
                "path": train.validation_adapter_path,
                "strength": train.validation_adapter_strength,
            }
        ]
    elif train.validation_adapter_config is not None:
        raw = _entries(train.validation_adapter_config)
    else:
        return []
    runs: list[AdapterRun] = []
    for i, entry in enumerate(raw):
        where = (
            f"validation_adapter_config[{i}]" if train.validation_adapter_config is not None else "validation_adapter"
        )
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise errors.InvalidInput(f"{where}: expected a path or an object, got {entry!r}")
        base = _strength(entry.get("strength"), where, 1.0)
        items = entry.get("paths", entry.get("adapters"))
        items = [entry["path"]] if items is None and "path" in entry else items
        if not isinstance(items, list) or not items:
            raise errors.InvalidInput(f"{where}: give the adapter as path or a list of paths")
        adapters = []
        for j, item in enumerate(items):
            path, strength = (item, base) if isinstance(item, str) else (None, base)
            if isinstance(item, dict):
                path, strength = item.get("path"), _strength(item.get("strength"), f"{where}.paths[{j}]", base)
            if not isinstance(path, str) or not path:
                raise errors.InvalidInput(f"{where}.paths[{j}]: expected a LoRA file path, got {item!r}")
            adapters.append((f"val_{i}_{j}_{_slug(_stem(path))}", path, strength))
        label = str(entry.get("label") or entry.get("name") or _stem(adapters[0][1]))
        steps = entry.get("steps", train.validation_adapter_steps)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise errors.InvalidInput(f"{where}.steps: expected a whole number of at least 1, got {steps!r}")
        guidance = entry.get("guidance", train.validation_adapter_guidance)
        if guidance is not None and (
            isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance <= 0
        ):
            raise errors.InvalidInput(f"{where}.guidance: expected a number above 0, got {guidance!r}")
        scheduler = _scheduler(entry.get("scheduler"), where)  # scheduler_config.json beside: read at render time
        runs.append(AdapterRun(label, tuple(adapters), steps, None if guidance is None else float(guidance), scheduler))
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise errors.InvalidInput(f"validation_adapter_config: labels must differ, got {labels}")
    return runs
