"""Waiting out a busy or restarting service instead of failing: how a service calls its peers, and how the CLI
follows a server's retry hint.

An answer that says "later" is waited out: RESOURCE_EXHAUSTED (a full queue, the stream limit), UNAVAILABLE (a
peer restarting, its store down) and DEADLINE_EXCEEDED (a peer too slow to answer in time). The wait is the
server's ``grpc-retry-pushback-ms`` hint when it sent one, else exponential backoff (0.5 s doubling up to 30 s),
each with ±20 % jitter so that clients refused together do not come back together. Before each wait ``on_wait``
hears what is awaited::

    waiting for encoder_svc: queue full: 16 encoder jobs are waiting (max_queued=16); retry in 5 s

Once ``budget_s`` has passed (the last wait is cut to end with it, then one more try) the call fails
``errors.Unavailable`` with the peer's last answer. Any
other answer (INVALID_ARGUMENT, NOT_FOUND, ...) is final at once: the ``grpc.RpcError`` is raised as it came.

    patience = Patience("encoder_svc at 10.0.0.5:50051", budget_s=1800, on_wait=log.warning)
    job = patience.call(stub.SubmitEncode, request).job     # Submit is idempotent on its request_id
    job = patience.watch_job(stub, encoder_pb2, job.job_id, on_update)

``watch_job`` follows a job over WatchJob; a stream the server refuses for its stream limit falls back to
polling GetJob (a unary call takes a thread only for an instant), and a stream that breaks is opened again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from shared import errors
from shared.rpc import common_pb2
from shared.rpc.interceptors import PUSHBACK_KEY

log = logging.getLogger(__name__)
Response = TypeVar("Response")

WAIT_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)
TERMINAL = frozenset({common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED})
POLL_S = 2.0  # GetJob every this often while a Watch stream is refused (or the server's hint, when longer)


def pushback_s(err: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds (``grpc-retry-pushback-ms``), or None. A negative value means "do not
    retry" in gRPC's retry design; it is read as no hint."""
    # grpc-stubs types the pairs as _Metadatum objects without __iter__; grpcio's are (key, value) tuples
    trailing: grpc.Metadata | None = (
        err.trailing_metadata() if hasattr(err, "trailing_metadata") else None  # type: ignore[assignment]
    )
    for key, value in trailing or ():
        if key == PUSHBACK_KEY:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return ms / 1000.0 if ms >= 0 else None
    return None


def reason(err: grpc.RpcError) -> str:
    """The server's message up to its advice (the part after the first ';' is what to do, said by us instead)."""
    details = (err.details() or "").strip() or "no answer"
    return details.split(";", 1)[0].strip()


@dataclass
class Patience:
    """How long and on what to wait when calling ``peer`` (e.g. ``"encoder_svc at 10.0.0.5:50051"``).

    ``codes``: the status codes waited out. ``hinted_only``: codes waited out only when the server sent a retry
    hint (the CLI's UNAVAILABLE: a server that says "retry in 5 s" is up, one that refuses the connection is
    not, and the user should hear that at once). ``sleep(seconds)``: how a wait is spent; a job passes one that
    wakes and raises on cancellation. ``clock``: the monotonic clock the budget is counted on.
    ``budget_name``: the setting to raise ``budget_s`` with, for messages."""

    peer: str
    budget_s: float
    on_wait: Callable[[str], None] | None = None
    codes: frozenset[grpc.StatusCode] = WAIT_CODES
    hinted_only: frozenset[grpc.StatusCode] = frozenset()
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    budget_name: str = ""
    min_wait_s: float = 0.5
    max_wait_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    @property
    def name(self) -> str:
        return self.peer.split(" at ", 1)[0]

    def call(self, method: Callable[..., Response], request: Any, *, timeout_s: float = 30.0) -> Response:
        """``method(request)`` with a deadline of ``timeout_s``, its "later" answers waited out."""
        started, attempt = self.clock(), 0
        while True:
            try:
                return method(request, timeout=timeout_s)
            except grpc.RpcError as err:
                self.wait_after(err, started, attempt)
                attempt += 1

    def wait_after(self, err: grpc.RpcError, started: float, attempt: int) -> None:
        """Wait before the next try of a call first tried at ``started`` (monotonic) and failed ``attempt + 1``
        times; raise ``err`` itself when it is not a "later", and ``Unavailable`` when the budget is spent."""
        code, hint = err.code(), pushback_s(err)
        if code not in self.codes or (code in self.hinted_only and hint is None):
            raise err
        pause = hint if hint is not None else min(self.max_wait_s, self.min_wait_s * 2**attempt)
        pause = max(0.05, pause * self.rng.uniform(0.8, 1.2))
        waited = self.clock() - started
        if waited >= self.budget_s:
            setting = f", {self.budget_name}" if self.budget_name else ""
            raise errors.Unavailable(
                f"{self.peer} answered {code.name}: {(err.details() or 'no answer').strip()} (gave up after waiting "
                f"{waited:.0f} s; the wait budget is {self.budget_s:g} s{setting})"
            ) from None
        pause = min(pause, self.budget_s - waited)  # the last wait ends with the budget: one more try then
        said = reason(err) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else f"{code.name}: {reason(err)}"
        message = (
            f"waiting for {self.name}: {said}; retry in {pause:.0f} s"
            if pause >= 1
            else f"waiting for {self.name}: {said}; retry in {pause:.1f} s"
        )
        if self.on_wait is not None:
            self.on_wait(message)
        self.sleep(pause)

    def watch_job(
        self, stub: Any, pb: Any, job_id: str, on_update: Callable[[common_pb2.Job], None], *, timeout_s: float = 30.0
    ) -> common_pb2.Job:
        """Follow job ``job_id`` on ``stub`` (the service's stub, ``pb`` its messages) until it is terminal;
        ``on_update`` sees each state. Returns the last state."""
        started, attempt = self.clock(), 0
        while True:
            last: common_pb2.Job | None = None
            try:
                for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
                    last = event.job
                    started, attempt = self.clock(), 0  # an answer: the budget starts again
                    on_update(last)
                    if last.state in TERMINAL:
                        return last
                self.sleep(self.min_wait_s)  # the stream ended before the job did: open another
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    log.info("%s refused a Watch stream (%s): polling GetJob instead", self.peer, reason(err))
                    return self.poll_job(stub, pb, job_id, on_update, hint=pushback_s(err), timeout_s=timeout_s)
                self.wait_after(err, started, attempt)
                attempt += 1

    def poll_job(
        self,
        stub: Any,
        pb: Any,
        job_id: str,
        on_update: Callable[[common_pb2.Job], None],
        *,
        hint: float | None = None,
        timeout_s: float = 30.0,
    ) -> common_pb2.Job:
        """GetJob every ``POLL_S`` (or ``hint``, when longer) until the job is terminal."""
        every = max(POLL_S, hint or 0.0)
        while True:
            job: common_pb2.Job = self.call(stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout_s=timeout_s).job
            on_update(job)
            if job.state in TERMINAL:
                return job
            self.sleep(every)
