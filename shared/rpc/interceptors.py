"""The server interceptors every EditTuner service runs, outermost first: metrics, bearer auth, error mapping.

- ``ErrorInterceptor`` is the one place domain exceptions (``shared.errors``) become gRPC status codes
  (``errors.STATUS_CODES``). Anything else is INTERNAL with a generic message and an incident id; the traceback goes to
  the log under that id, never to the client. A retryable error's ``retry_after_s`` becomes the
  ``grpc-retry-pushback-ms`` trailer. It also runs each unary-response handler under the call's deadline
  (``shared.deadline``), so retry loops below it give up in time to answer.
- ``BearerAuthInterceptor`` requires ``authorization: Bearer <token>`` metadata.
- ``MetricsInterceptor`` counts and times calls with the conventional ``grpc_server_*`` metric names.

gRPC's own health and reflection services (``INFRA_PREFIXES``) pass through all three untouched: they stay open
without a token, and the health service keeps its non-blocking Watch.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from shared import deadline, errors

log = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.ServicerContext], Any]

if TYPE_CHECKING:
    # grpc-stubs makes these generic in (request, response); grpcio's runtime classes cannot be subscripted.
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Handler | None]
    ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    ServerInterceptor = grpc.ServerInterceptor

INFRA_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

PUSHBACK_KEY = "grpc-retry-pushback-ms"  # the retry hint gRPC defines for a refused call
NO_DEADLINE_S = 10 * 365 * 86400.0

# Status details travel percent-encoded in a trailer, and clients drop trailers over ~8-16 KiB ("metadata size
# exceeds hard limit", RESOURCE_EXHAUSTED). A longer message (hundreds of config problems) is cut at a line, with
# a note, so the client still gets the code and the first problems; the log keeps the whole message.
MAX_DETAILS_WIRE_BYTES = 6000


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code a domain exception maps to (``errors.STATUS_CODES``), or None for an exception outside
    ``shared.errors``."""
    name = errors.status_name(exc)
    return None if name == errors.INTERNAL else grpc.StatusCode[name]


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.v1.FooService/Bar`` → ``("pkg.v1.FooService", "Bar")``."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.rpartition("/")
    return service or "unknown", method or "unknown"


def is_infra(full_method: str) -> bool:
    return full_method.startswith(INFRA_PREFIXES)


def rpc_type(handler: Handler) -> str:
    """The ``grpc_type`` label: unary, client_stream, server_stream or bidi_stream."""
    kind = {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }
    return kind[(bool(handler.request_streaming), bool(handler.response_streaming))]


def rewrap(
    handler: Handler,
    wrap_unary: Callable[[Behavior], Behavior],
    wrap_streaming: Callable[[Behavior], Behavior],
    *,
    deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """The same handler with its behavior wrapped: ``wrap_unary`` for a single response, ``wrap_streaming``
    for a response stream (the wrapper then returns an iterator); ``deserializer`` replaces the request's."""
    de, se = deserializer or handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), de, se)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap_streaming(handler.unary_stream), de, se)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), de, se)
    assert handler.stream_stream is not None  # a handler has exactly one of the four behaviors
    return grpc.stream_stream_rpc_method_handler(wrap_streaming(handler.stream_stream), de, se)


def call_time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds until the client's deadline; None when it set none (grpc then reports an infinite future)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE_S else left


def client_gone_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """DEADLINE_EXCEEDED or CANCELLED once the call is over from the client's side, else None."""
    if context.is_active():
        return None
    return grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0 else grpc.StatusCode.CANCELLED


def context_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code the handler set so far (``context.abort``, ``set_code``), or None."""
    # grpc-stubs lacks ServicerContext.code(), which grpcio has had since 1.38
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    return code


def _is_grpc_abort(exc: BaseException, context: grpc.ServicerContext) -> bool:
    # context.abort() records the code, then raises a bare Exception() for grpc to catch.
    return type(exc) is Exception and not exc.args and context_code(context) is not None


def _wire_len(text: str) -> int:
    """Bytes ``text`` takes as a grpc-message trailer (printable ASCII but '%' as is, the rest %XX)."""
    return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in text.encode())


def clip_details(details: str, budget: int = MAX_DETAILS_WIRE_BYTES) -> str:
    """``details`` if it fits ``budget`` on the wire, else its first lines and how many were left out."""
    if _wire_len(details) <= budget:
        return details
    lines, kept, used = details.split("\n"), [], 0
    for line in lines:
        if used + _wire_len(line) + 3 > budget - 200:  # room for the note
            break
        kept.append(line)
        used += _wire_len(line) + 3
    if not kept:  # one enormous first line
        kept = [lines[0][: (budget - 200) // 3]]
    return "\n".join(kept) + f"\n  ... and {len(lines) - len(kept)} more lines (the service log has the whole message)"


# ------------------------------------------------------------------------------------------------ errors
class ErrorInterceptor(ServerInterceptor):
    """Maps exceptions raised by servicer methods, unary or streaming, to status codes (see ``errors.STATUS_CODES``)."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_infra(method):
            return handler

        def unary(behavior: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    with deadline.serving(call_time_remaining(context)):
                        return behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - the point of this interceptor
                    self.abort(exc, context, method)

            return call

        def streaming(behavior: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                except Exception as exc:  # noqa: BLE001
                    self.abort(exc, context, method)

            return call

        return rewrap(handler, unary, streaming)

    @staticmethod
    def abort(exc: Exception, context: grpc.ServicerContext, method: str) -> NoReturn:
        """Ends the call with the status ``exc`` maps to; always raises (``context.abort`` does)."""
        if _is_grpc_abort(exc, context):
            raise exc
        gone = client_gone_code(context)
        if gone is not None:
            # Deadline passed or client cancelled: nobody will read a status; no traceback for an expected end.
            log.info("%s ended with %s; the handler then raised %s: %s", method, gone.name, type(exc).__name__, exc)
            context.abort(gone, f"call ended: {gone.name}")
        code = status_for(exc)
        if code is None:
            incident = uuid.uuid4().hex[:8]
            log.error("internal error (id %s) in %s", incident, method, exc_info=exc)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error; see the service log (id {incident})")
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            context.set_trailing_metadata(((PUSHBACK_KEY, str(int(retry_after_s * 1000))),))
        log.info("%s: %s: %s", method, code.name, str(exc).split("\n", 1)[0])
        details = clip_details(str(exc))
        if details != str(exc):
            log.warning("%s: %s: %s (the client gets this message shortened)", method, code.name, exc)
        context.abort(code, details)


# -------------------------------------------------------------------------------------------------- auth
class BearerAuthInterceptor(ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED); health and reflection stay open."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("BearerAuthInterceptor needs a non-empty token; leave it out to disable auth")
        self._token = token.encode()

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        if is_infra(handler_call_details.method) or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(_request: Any, context: grpc.ServicerContext) -> NoReturn:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
            )

        return rewrap(handler, lambda _: deny, lambda _: deny)

    def _authorized(self, metadata: grpc.Metadata | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            scheme, _, given = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
                return True
        return False


# ----------------------------------------------------------------------------------------------- metrics
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


@dataclass(frozen=True)
class ServerMetrics:
    started: Counter
    handled: Counter
    handling_seconds: Histogram


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ServerMetrics] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def server_metrics(registry: CollectorRegistry | None = None) -> ServerMetrics:
    """The gRPC server metrics in ``registry`` (default: the global one), created once per registry, so
    several servers in one process share them instead of failing on duplicate names."""
    registry = REGISTRY if registry is None else registry
    with _METRICS_LOCK:
        if registry not in _METRICS:
            labels = ["grpc_service", "grpc_method", "grpc_type"]
            _METRICS[registry] = ServerMetrics(
                started=Counter("grpc_server_started_total", "RPCs started on the server.", labels, registry=registry),
                handled=Counter(
                    "grpc_server_handled_total",
                    "RPCs completed on the server, by status code.",
                    [*labels, "grpc_code"],
                    registry=registry,
                ),
                handling_seconds=Histogram(
                    "grpc_server_handling_seconds",
                    "Time from the start of an RPC to its status (whole stream for streams).",
                    labels,
                    buckets=HANDLING_BUCKETS,
                    registry=registry,
                ),
            )
        return _METRICS[registry]


class _Record:
    """Records one call's outcome exactly once: when the handler ends, or when grpc reports the call over
    (a client that cancels a stream never lets the handler's generator finish)."""

    def __init__(self, metrics: ServerMetrics, labels: tuple[str, str, str], context: grpc.ServicerContext):
        self._metrics, self._labels, self._context = metrics, labels, context
        self._start = time.perf_counter()
        self._done = False
        self._lock = threading.Lock()
        metrics.started.labels(*labels).inc()
        context.add_callback(lambda: self.finish(raised=False))

    def finish(self, raised: bool) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        code = client_gone_code(self._context) or context_code(self._context)
        if code is None:
            code = grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
        self._metrics.handled.labels(*self._labels, code.name).inc()
        self._metrics.handling_seconds.labels(*self._labels).observe(time.perf_counter() - self._start)


class MetricsInterceptor(ServerInterceptor):
    """``grpc_server_started_total``, ``grpc_server_handled_total{..., grpc_code}`` (code names like
    ``INVALID_ARGUMENT``) and the ``grpc_server_handling_seconds`` histogram, per service, method and type."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.metrics = server_metrics(registry)

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or is_infra(handler_call_details.method):
            return handler
        labels = (*split_method(handler_call_details.method), rpc_type(handler))
        metrics = self.metrics

        def unary(behavior: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                record = _Record(metrics, labels, context)
                try:
                    response = behavior(request, context)
                except BaseException:
                    record.finish(raised=True)
                    raise
                record.finish(raised=False)
                return response

            return call

        def streaming(behavior: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                record = _Record(metrics, labels, context)
                try:
                    yield from behavior(request, context)
                except Exception:
                    record.finish(raised=True)
                    raise
                record.finish(raised=False)

            return call

        return rewrap(handler, unary, streaming)
