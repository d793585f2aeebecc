"""Job records as they are stored (``jobs/<service>/<job_id>.json``), their states, and the error table."""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import enum
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, cast

from shared import errors

PROGRESS_FIELDS: dict[str, Any] = {  # field → value before the executor reports one
    "phase": "",
    "step": 0,
    "total": 0,
    "loss": 0.0,
    "seconds_per_step": 0.0,
    "message": "",
    "learning_rate": 0.0,
    "data_wait_fraction": 0.0,
}
INTERRUPTED_MESSAGE = "interrupted by service shutdown; will resume"
RECOVERED_MESSAGE = "interrupted by a service restart; will resume"
SHUTDOWN = "shutdown"
MAX_REQUEST_ID_CHARS = 256
MAX_PAGE_SIZE = 1000


JobCancelled = errors.JobCancelled  # where the job manager's callers have always found it


def error_code(err: BaseException) -> str:
    """A failed or cancelled job's ``error_code``: the status name of ``errors.STATUS_CODES``."""
    return errors.status_name(err)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobRecord:
    job_id: str
    request_id: str
    kind: str
    state: JobState
    params: dict[str, Any]
    created: float
    updated: float
    progress: dict[str, Any] = field(default_factory=lambda: dict(PROGRESS_FIELDS))
    outputs: dict[str, str] = field(default_factory=dict)  # the results as strings: the deprecated Job.outputs
    error: str = ""
    error_code: str = ""
    attempt: int = 0
    # The typed results as JSON under the job's kind, {"train": {...}} (shared.service.outputs); {} before any, and
    # in a record stored before it existed, whose ``outputs`` alone hold them
    result: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> JobRecord:
        """A record as ``to_json`` wrote it; missing optional fields take their defaults (older records)."""
        try:
            names = {f.name for f in dataclasses.fields(cls)}
            fields = {k: v for k, v in doc.items() if k in names}
            fields["state"] = JobState(fields["state"])
            fields["progress"] = {**PROGRESS_FIELDS, **(fields.get("progress") or {})}
            return cls(**fields)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise errors.IntegrityError(f"job record is malformed ({err!r})") from err

    def snapshot(self) -> JobRecord:
        return copy.deepcopy(self)


def finished_copy(record: JobRecord, state: JobState, error: str, code: str) -> JobRecord:
    """A copy of ``record`` in its new state, to be published with ``publish``."""
    return dataclasses.replace(record.snapshot(), state=state, error=error, error_code=code, updated=time.time())


def json_params(params: dict[str, Any]) -> dict[str, Any]:
    try:
        return cast("dict[str, Any]", json.loads(json.dumps(params)))  # a dict, dumped and read back
    except (TypeError, ValueError) as err:
        raise errors.InvalidInput(f"job parameters must be JSON values: {err}") from err


def request_fingerprint(kind: str, params: dict[str, Any]) -> str:
    text = json.dumps({"kind": kind, "params": params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def parse_state(state: JobState | str) -> JobState:
    try:
        return JobState(state)
    except ValueError:
        raise errors.InvalidInput(
            f"unknown job state {state!r}; use one of {', '.join(s.value for s in JobState)}"
        ) from None


def encode_page_token(last: JobRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([last.created, last.job_id]).encode()).decode()


def decode_page_token(token: str) -> tuple[float, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), str(job_id)
    except (binascii.Error, UnicodeError, ValueError, TypeError):
        raise errors.InvalidInput(
            f"invalid page_token {token!r}: pass the next_page_token of a previous "
            "List response, or an empty string for the first page"
        ) from None
