"""The error hierarchy of EditTuner.

Every error a user can cause or meet is one of these. ``STATUS_CODES`` maps them to gRPC status names in one place,
for every layer: a call's status (the servers' ErrorInterceptor), a failed job's ``error_code`` (the job manager),
the class a client raises for a status (``error_class``) and the training worker's errors as its supervisor
re-raises them. The CLI prints ``str(err)`` and exits 1, never a traceback. Each message names the
file, field or object concerned and says what to do. Also ``clear_frames``: what a caught error holds on to.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass


class EditTunerError(Exception):
    """Base class. ``str(err)`` is a complete, user-facing message."""


class InvalidInput(EditTunerError):
    """Bad input from the user: a config, a dataset, an image, a request (gRPC INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Problem:
    """One problem in a user's input: ``where`` is a file plus JSON path (``config.json: $.model_flavour``)
    or a file path, ``message`` says what is wrong and what to do."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ProblemsError(InvalidInput):
    """Several problems found at once, reported together so the user can fix them in one pass."""

    def __init__(self, problems: list[Problem], title: str = "invalid input"):
        self.problems = list(problems)
        self.title = title
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.problems)
        head = f"{self.title}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class ConfigError(ProblemsError):
    """config.json / multidatabackend.json / key=value overrides are invalid."""

    def __init__(self, problems: list[Problem], title: str = "invalid configuration"):
        super().__init__(problems, title)


class DatasetError(ProblemsError):
    """The image folders do not form a usable paired dataset (missing references, unreadable images, ...)."""

    def __init__(self, problems: list[Problem], title: str = "invalid dataset"):
        super().__init__(problems, title)


class NotFound(EditTunerError):
    """A run, job or stored object does not exist (gRPC NOT_FOUND)."""


class IntegrityError(EditTunerError):
    """A stored object does not match its recorded sha256 (gRPC DATA_LOSS)."""


class FailedPrecondition(EditTunerError):
    """The system is not in a state that allows the request, e.g. a run already active (gRPC FAILED_PRECONDITION)."""


class Retryable(EditTunerError):
    """An answer that may change if asked again later. ``retry_after_s``, when set, is when: the services send it
    as the ``grpc-retry-pushback-ms`` trailer, and patient clients (``shared.rpc.patience``) wait that long."""

    def __init__(self, message: str = "", *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ResourceExhausted(Retryable):
    """Out of GPU memory or a full queue (gRPC RESOURCE_EXHAUSTED)."""


class Unavailable(Retryable):
    """A dependency is not ready yet, e.g. models still loading or the store unreachable (gRPC UNAVAILABLE)."""


class JobCancelled(EditTunerError):
    """The job was cancelled (by a client, or by a service shutdown) and its work stopped (gRPC CANCELLED)."""


# Error class → gRPC status name; the first row whose class the error is an instance of decides (subclasses before
# their bases). A domain error no other row names (TrainingDiverged) still carries a complete message for the user:
# UNKNOWN with that message. Anything outside this hierarchy is INTERNAL, and its text stays in the service log.
STATUS_CODES: tuple[tuple[type[EditTunerError], str], ...] = (
    (JobCancelled, "CANCELLED"),
    (InvalidInput, "INVALID_ARGUMENT"),
    (NotFound, "NOT_FOUND"),
    (FailedPrecondition, "FAILED_PRECONDITION"),
    (ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (Unavailable, "UNAVAILABLE"),
    (IntegrityError, "DATA_LOSS"),
    (EditTunerError, "UNKNOWN"),
)
INTERNAL = "INTERNAL"


def status_name(err: BaseException) -> str:
    """The gRPC status name ``err`` maps to (``STATUS_CODES``), INTERNAL for an error outside the hierarchy."""
    return next((code for cls, code in STATUS_CODES if isinstance(err, cls)), INTERNAL)


def error_class(code: str) -> type[EditTunerError]:
    """The class a status name stands for: the first row listing it (``InvalidInput`` for INVALID_ARGUMENT);
    ``EditTunerError`` for a name no row lists."""
    return next((cls for cls, c in STATUS_CODES if c == code), EditTunerError)


def clear_frames(err: BaseException) -> None:
    """Drop the locals of the finished frames ``err`` (and its causes and contexts) passed through.

    A caught error keeps every frame of its traceback alive, and with them their locals, for as long as the error
    is referenced: in the ``except`` block and, through ``raise ... from err``, until the job that fails with it
    has ended. After an out-of-memory error those locals are the failed computation's tensors, so memory freed
    while they live is not given back. The traceback still prints (files, lines and code stay); the frame that is
    handling ``err`` is still running and keeps its locals."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        pending += [e.__cause__, e.__context__]
