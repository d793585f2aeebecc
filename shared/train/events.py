"""What a training run reports, typed: its events (``TrainEvent``), and the training worker's protocol.

The trainer, the encoding before it and the external validator emit ``TrainEvent``s; every consumer (the CLI's
progress bars, trainer_svc's job progress and metrics, the trackers) reads the same fields, and quantities derived
from them (``data_wait_fraction``) are computed here, once.

The training worker (``shared.service.worker``) prints one JSON object per line on stdout, written by
``encode_line`` and read back by ``decode_line`` in its supervisor (``shared.service.supervisor``):

    {"event": {...}}     a TrainEvent, while it runs
    {"result": {...}}    a WorkerResult, last, on success
    {"error": "...", "code": "...", "kind": "...", "rank": N}    a WorkerError, last, on failure

``code`` is the error's status name (``shared.errors.STATUS_CODES``): the supervisor raises the class the table
gives for it. Any other line (a library's stray print) is not a message; the supervisor logs it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from shared import errors

Phase = Literal["encode", "train", "checkpoint", "validation", "validation_ready"]
PHASES: tuple[str, ...] = get_args(Phase)
GPU_MEMORY_KEYS = ("gpu_allocated_bytes", "gpu_reserved_bytes", "gpu_peak_bytes", "gpu_peak_reserved_bytes")


@dataclass(frozen=True)
class TrainEvent:
    """One progress report. ``step``/``total``: the phase's position (optimizer steps in train, items in encode).
    A finished training step sets ``loss`` (and ``lr``, ``seconds_per_step``, ``data_wait``, ``grad_norm`` when
    clipping computes it, ``gpu`` memory); a checkpoint sets ``seconds``; ``validation_ready`` (a LoRA exported
    for eval_svc) sets ``lora_key`` and ``run_id``."""

    phase: Phase
    step: int = 0
    total: int = 0
    message: str = ""
    loss: float | None = None
    lr: float | None = None
    seconds_per_step: float | None = None
    data_wait: float | None = None  # seconds of the step spent waiting for batches
    grad_norm: float | None = None
    rollout_forwards: int | None = None  # scheduled sampling's forwards without gradient, over the step
    seconds: float | None = None  # a checkpoint's save time
    gpu: dict[str, int] = field(default_factory=dict)  # GPU_MEMORY_KEYS → bytes
    lora_key: str = ""
    run_id: str = ""

    @property
    def is_step(self) -> bool:
        """A finished optimizer step (not the "training" line that starts the phase)."""
        return self.phase == "train" and self.loss is not None

    @property
    def data_wait_fraction(self) -> float:
        """The share of the step's time spent waiting for data; 0 when unknown."""
        if not self.seconds_per_step or self.data_wait is None:
            return 0.0
        return self.data_wait / self.seconds_per_step

    def to_json(self) -> dict[str, Any]:
        """The fields that are set (a consumer tells "not measured" from 0)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name not in ("phase", "step", "total") and value in ("", {})):
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, doc: object) -> TrainEvent:
        """The event ``to_json`` wrote; ValueError naming the field for anything else."""
        if not isinstance(doc, dict):
            raise ValueError(f"an event is a JSON object, not {type(doc).__name__}")
        unknown = sorted(set(doc) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown event fields {unknown}")
        if doc.get("phase") not in PHASES:
            raise ValueError(f"event phase {doc.get('phase')!r} is not one of {list(PHASES)}")
        kw: dict[str, Any] = {"phase": doc["phase"]}
        for name in ("step", "total", "rollout_forwards"):
            if name in doc:
                kw[name] = _int(doc[name], name)
        for name in ("loss", "lr", "seconds_per_step", "data_wait", "grad_norm", "seconds"):
            if name in doc:
                kw[name] = _float(doc[name], name)
        for name in ("message", "lora_key", "run_id"):
            if name in doc:
                kw[name] = _str(doc[name], name)
        if "gpu" in doc:
            gpu = doc["gpu"]
            if not isinstance(gpu, dict) or not set(gpu) <= set(GPU_MEMORY_KEYS):
                raise ValueError(f"event field gpu: expected an object with keys among {list(GPU_MEMORY_KEYS)}")
            kw["gpu"] = {k: _int(v, f"gpu.{k}") for k, v in gpu.items()}
        return cls(**kw)


@dataclass(frozen=True)
class WorkerResult:
    """A finished (or, with ``interrupted``, stopped and checkpointed) run, as rank 0 reports it."""

    run_id: str
    steps: int
    processes: int
    final_loss: float | None
    lora: list[str]  # the LoRA files' store keys
    checkpoints: list[int]
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: object) -> WorkerResult:
        if not isinstance(doc, dict):
            raise ValueError(f"a result is a JSON object, not {type(doc).__name__}")
        try:
            final = doc["final_loss"]
            return cls(
                run_id=_str(doc["run_id"], "run_id"),
                steps=_int(doc["steps"], "steps"),
                processes=_int(doc["processes"], "processes"),
                final_loss=None if final is None else _float(final, "final_loss"),
                lora=[_str(k, "lora") for k in _list(doc["lora"], "lora")],
                checkpoints=[_int(s, "checkpoints") for s in _list(doc["checkpoints"], "checkpoints")],
                interrupted=bool(doc.get("interrupted", False)),
            )
        except KeyError as e:
            raise ValueError(f"result field {e.args[0]} is missing") from None


@dataclass(frozen=True)
class WorkerError:
    """Why the worker failed: the message for the user, the status name of its class (``errors.status_name``;
    INTERNAL for an unexpected error, whose traceback is in the worker's log), the class's name, and with several
    ranks the rank that reported it."""

    message: str
    code: str
    kind: str
    rank: int | None = None

    @classmethod
    def of(cls, err: BaseException, message: str | None = None, rank: int | None = None) -> WorkerError:
        return cls(str(err) if message is None else message, errors.status_name(err), type(err).__name__, rank)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "code": self.code, "kind": self.kind}
        if self.rank is not None:
            out["rank"] = self.rank
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> WorkerError:
        rank = doc.get("rank")
        return cls(
            message=_str(doc["error"], "error"),
            code=_str(doc.get("code", errors.INTERNAL), "code"),
            kind=_str(doc.get("kind", ""), "kind"),
            rank=None if rank is None else _int(rank, "rank"),
        )


WorkerMessage = TrainEvent | WorkerResult | WorkerError


def encode_line(message: WorkerMessage) -> str:
    """The line the worker prints for ``message`` (without the newline)."""
    if isinstance(message, TrainEvent):
        doc: dict[str, Any] = {"event": message.to_json()}
    elif isinstance(message, WorkerResult):
        doc = {"result": message.to_json()}
    else:
        doc = message.to_json()
    return json.dumps(doc)


def decode_line(line: str) -> WorkerMessage | None:
    """The message a line holds; None for a line that is no protocol message (not a JSON object with one of the
    protocol's keys). A protocol message with a malformed body raises ValueError naming the field: the worker and
    its supervisor disagree, which must not pass silently."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if "event" in doc:
        return TrainEvent.from_json(doc["event"])
    if "result" in doc:
        return WorkerResult.from_json(doc["result"])
    if "error" in doc:
        return WorkerError.from_json(doc)
    return None


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {name}: expected an integer, got {value!r}")
    return value


def _float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field {name}: expected a number, got {value!r}")
    return float(value)


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name}: expected a string, got {value!r}")
    return value


def _list(value: object, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"field {name}: expected a list, got {value!r}")
    return value
