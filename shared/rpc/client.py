"""The client side: channels with the service's token and limits, deadlines on every unary call, health waits.

    channel = make_channel("encoder:50051", token=os.environ.get("EDITTUNER_TOKEN"))
    wait_for_serving(channel, "edittuner.encoder.v1.EncoderService", timeout=120)
    stub = encoder_pb2_grpc.EncoderServiceStub(channel)
    job = call(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id=..., files=...)).job
    for event in stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=job.job_id)):  # a stream: no deadline
        ...

``call`` turns a failed call back into the domain error the server raised (``shared.errors``), so a CLI prints
the server's message and a service calling another maps it on with the same code.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import errors
from shared.rpc import (
    common_pb2,
    data_pb2,
    data_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    eval_pb2,
    eval_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from shared.rpc.guards import PEER_KEY
from shared.rpc.patience import Patience

DEFAULT_DEADLINE_S = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

Response = TypeVar("Response")
log = logging.getLogger(__name__)

if TYPE_CHECKING:
    # grpc-stubs makes these generic in (request, response); grpcio's runtime classes cannot be subscripted.
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamUnary = grpc.StreamUnaryClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _Metadata(_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream):
    """Adds fixed metadata to every call: ``authorization: Bearer <token>`` (works on plaintext channels too,
    unlike call credentials, which grpc only sends over TLS), ``x-edittuner-peer`` on a service's channels."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self._pairs = tuple(pairs)

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), *self._pairs]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], grpc.CallFuture[Any]],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> grpc.CallFuture[Any]:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], grpc.CallIterator[Any]],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> grpc.CallIterator[Any]:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], grpc.CallFuture[Any]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> grpc.CallFuture[Any]:
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], grpc.CallIterator[Any]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> grpc.CallIterator[Any]:
        return continuation(self._with_token(client_call_details), request_iterator)


def make_channel(
    target: str,
    *,
    token: str | None = None,
    tls_ca: str | Path | None = None,
    tls: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
    peer: str | None = None,
) -> grpc.Channel:
    """A channel to ``target`` (``host:port``). ``tls_ca``: PEM of the CA that signed the server's certificate
    (implies TLS); ``tls=True`` without it trusts the system roots. ``token``: sent as a bearer token. ``peer``:
    sent as ``x-edittuner-peer`` (a service calling another, see ``shared.rpc.guards.is_peer``)."""
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        *options,
    ]
    if tls_ca is not None or tls:
        root = Path(tls_ca).read_bytes() if tls_ca is not None else None
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), opts)
    else:
        channel = grpc.insecure_channel(target, opts)
    pairs = ([("authorization", f"Bearer {token}")] if token else []) + ([(PEER_KEY, peer)] if peer else [])
    if pairs:
        channel = grpc.intercept_channel(channel, _Metadata(pairs))
    return channel


def domain_error(err: grpc.RpcError) -> errors.EditTunerError:
    """The ``shared.errors`` exception a failed call stands for; its message is the server's."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.Unavailable(f"the service did not answer in time (DEADLINE_EXCEEDED): {details}")
    if code == grpc.StatusCode.UNAVAILABLE and not details.strip():
        details = "the service is unreachable"
    cls = errors.error_class(code.name)
    if cls is errors.EditTunerError:  # UNKNOWN, INTERNAL, or a code no domain error maps to: say which
        return errors.EditTunerError(f"{code.name}: {details}")
    return cls(details)


def call(
    method: Callable[..., Response],
    request: Any,
    *,
    timeout: float = DEFAULT_DEADLINE_S,
    metadata: Sequence[tuple[str, str]] | None = None,
    wait_for_ready: bool | None = None,
) -> Response:
    """``method(request)`` with a deadline (seconds; required), raising ``domain_error`` on failure."""
    if timeout is None or timeout <= 0:
        raise ValueError(f"call() needs a positive deadline in seconds, got {timeout!r}")
    try:
        return method(request, timeout=timeout, metadata=metadata, wait_for_ready=wait_for_ready)
    except grpc.RpcError as err:
        raise domain_error(err) from err


def wait_for_serving(
    channel: grpc.Channel, service: str = "", timeout: float = DEFAULT_DEADLINE_S, poll_s: float = 0.1
) -> None:
    """Block until the health service reports ``service`` ("" = the whole server) SERVING; raise
    ``errors.Unavailable`` after ``timeout`` seconds, ``errors.NotFound`` if the server does not know it."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.Unavailable(f"{service or 'the server'} is not SERVING after {timeout:g}s (last: {last})")
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 5.0), wait_for_ready=True
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise errors.NotFound(f"the server's health service does not know {service!r}") from err
            last = f"{err.code().name}: {err.details()}"
        else:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))


# --------------------------------------------------------------------------------------- service clients
STUBS: dict[str, tuple[Callable[[grpc.Channel], Any], ModuleType]] = {
    "encoder": (encoder_pb2_grpc.EncoderServiceStub, encoder_pb2),
    "trainer": (trainer_pb2_grpc.TrainerServiceStub, trainer_pb2),
    "eval": (eval_pb2_grpc.EvalServiceStub, eval_pb2),
    "data": (data_pb2_grpc.DataServiceStub, data_pb2),
}  # DataService answers on every service's port
DEFAULT_PORTS = {"encoder": 50051, "trainer": 50052, "eval": 50053}
TIMEOUT_S = 30.0
RECONNECT_S = 120.0
TRANSFER_TIMEOUT_S = 600.0  # one file up or down


CLIENT_WAIT_S = 120.0  # EDITTUNER_CLIENT_WAIT_S: how long a CLI call follows a busy server's retry hints


def client_wait_s(env: Mapping[str, str] | None = None) -> float:
    raw = (os.environ if env is None else env).get("EDITTUNER_CLIENT_WAIT_S", "").strip()
    try:
        value = float(raw) if raw else CLIENT_WAIT_S
    except ValueError:
        value = -1.0
    if value < 0:
        raise errors.InvalidInput(f"EDITTUNER_CLIENT_WAIT_S={raw!r} is not a number of seconds (0 or more)")
    return value


class Client:
    """One service's stub with the channel's token and a deadline on every unary call. A server that answers
    "busy" (RESOURCE_EXHAUSTED: its queue is full, its streams are all open) or "unavailable, retry in N s" is
    asked again after its hint, for up to ``wait_s`` seconds (EDITTUNER_CLIENT_WAIT_S, default 120), each wait
    logged; a server that cannot be reached fails at once (``rpc_error`` says how to start it)."""

    def __init__(self, service: str, address: str, token: str | None = None, *, wait_s: float | None = None):
        if service not in STUBS:
            raise errors.InvalidInput(f"unknown service {service!r}; one of {', '.join(STUBS)}")
        stub_cls, self.pb = STUBS[service]
        self.service, self.address = service, address
        self.channel = make_channel(
            address,
            token=token if token is not None else os.environ.get("EDITTUNER_TOKEN"),
            tls_ca=os.environ.get("EDITTUNER_TLS_CA") or None,
            tls=os.environ.get("EDITTUNER_TLS", "") == "1",
        )
        self.stub = stub_cls(self.channel)
        self.patience = Patience(
            f"{service}_svc at {address}",
            client_wait_s() if wait_s is None else wait_s,
            on_wait=log.warning,
            codes=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}),
            hinted_only=frozenset({grpc.StatusCode.UNAVAILABLE}),
            budget_name="EDITTUNER_CLIENT_WAIT_S",
        )

    def call(self, method: str, request: Any) -> Any:
        """A unary call (every submit carries a request_id, so asking again never makes a second job)."""
        try:
            return self.patience.call(getattr(self.stub, method), request, timeout_s=TIMEOUT_S)
        except grpc.RpcError as e:
            raise rpc_error(self.service, self.address, e) from None

    def call_stream(
        self, method: str, request: Any, *, streaming_response: bool = False, timeout_s: float = TRANSFER_TIMEOUT_S
    ) -> Any:
        """A streaming call: ``request`` is an iterator of messages for a client stream; with
        ``streaming_response`` the answer is an iterator. Failures become the server's domain errors."""
        try:
            if not streaming_response:
                return getattr(self.stub, method)(request, timeout=timeout_s)
            return self._mapped(getattr(self.stub, method)(request, timeout=timeout_s))
        except grpc.RpcError as e:
            raise rpc_error(self.service, self.address, e) from None

    def _mapped(self, responses: Any) -> Any:
        try:
            yield from responses
        except grpc.RpcError as e:
            raise rpc_error(self.service, self.address, e) from None

    def get(self, job_id: str) -> common_pb2.Job:
        job: common_pb2.Job = self.call("GetJob", self.pb.GetJobRequest(job_id=job_id)).job
        return job

    def cancel(self, job_id: str) -> common_pb2.Job:
        job: common_pb2.Job = self.call("CancelJob", self.pb.CancelJobRequest(job_id=job_id)).job
        return job

    def list(self, state: str | None = None) -> list[common_pb2.Job]:
        req = self.pb.ListJobsRequest(page_size=100)
        if state:
            req.state = getattr(common_pb2, f"JOB_STATE_{state.upper()}")
        return list(self.call("ListJobs", req).jobs)

    def watch(
        self, job_id: str, on_update: Callable[[common_pb2.Job], None], *, reconnect_s: float = RECONNECT_S
    ) -> common_pb2.Job:
        """Stream the job's events until it ends; returns the last snapshot. Jobs outlive their service's
        restarts, so a stream that ends UNAVAILABLE (the service stopping, a dropped connection) is opened again,
        for up to ``reconnect_s`` seconds of trying; one refused RESOURCE_EXHAUSTED (the server's streams are all
        open) becomes polling GetJob (``shared.rpc.patience``)."""
        patience = dataclasses.replace(self.patience, budget_s=reconnect_s, hinted_only=frozenset())
        try:
            return patience.watch_job(self.stub, self.pb, job_id, on_update, timeout_s=TIMEOUT_S)
        except grpc.RpcError as e:
            raise rpc_error(self.service, self.address, e) from None

    def close(self) -> None:
        self.channel.close()


def rpc_error(service: str, address: str, e: grpc.RpcError) -> errors.EditTunerError:
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(
            f"{service}_svc at {address} is not reachable ({e.details()}); is it running? "
            "Start it with `edittuner serve " + service + "` or leave --server unset"
        )
    return domain_error(e)
