"""What a hostile or broken client can send the server, and how each is answered without costing the others.

- ``DecodeGuardInterceptor``: bytes that do not decode as the method's request message (random bytes, invalid
  UTF-8 in a string field, a message of another service) are ``INVALID_ARGUMENT`` naming the message type. grpc
  itself answers a failed decode with INTERNAL "Exception deserializing request!" before any interceptor code
  runs, so the guard swaps in a deserializer that never raises: it returns a ``MalformedRequest`` the wrapped
  behaviour turns into the status.
- ``StreamLimitInterceptor``: the server is synchronous (a thread per call in flight) and a Watch stream holds
  its thread for as long as the job runs. Past ``max_streams`` open streams a new one is ``RESOURCE_EXHAUSTED``
  at once, with a retry hint (the ``grpc-retry-pushback-ms`` trailer and the message), so the remaining threads
  stay free for unary calls. A bound, rather than grpc.aio: the job manager, the executors and every servicer are
  thread-based, and a bound keeps the unary capacity a number one can state (``max_workers - max_streams -
  peer_streams``). Beyond the clients' ``max_streams``, ``peer_streams`` more are kept for the other services
  (calls carrying ``x-edittuner-peer``, see ``is_peer``): a trainer following its encode job never competes with
  dashboards and scripts for the last slot.

gRPC's own health and reflection services pass through untouched (their Watch does not hold a thread).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from shared.rpc.interceptors import Behavior, ServerInterceptor, is_infra, rewrap

if TYPE_CHECKING:
    from shared.rpc.interceptors import Continuation, Handler

log = logging.getLogger(__name__)

RETRY_AFTER_MS = 5000
PEER_KEY = "x-edittuner-peer"  # metadata a service's calls to another service carry (shared.rpc.client)


def is_peer(metadata: grpc.Metadata | None, peer_token: str | None) -> bool:
    """Whether a call comes from another EditTuner service: it carries ``x-edittuner-peer``, whose value must be
    ``peer_token`` when the server has one (EDITTUNER_PEER_TOKEN); without one, any value does (the bearer token,
    when set, has already admitted the caller)."""
    for key, value in metadata or ():
        if key != PEER_KEY:
            continue
        given = value.decode() if isinstance(value, bytes) else str(value)
        if peer_token:
            return hmac.compare_digest(given.encode(), peer_token.encode())
        return bool(given)
    return False


class MalformedRequest:
    """Stands for a request whose bytes did not decode; the guard's behaviour wrapper answers it."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error

    def message(self) -> str:
        detail = str(self.error).strip() or type(self.error).__name__
        return (
            f"the request is not a valid {self.type_name} message ({detail[:200]}); the client must send the "
            "message its method takes (see protos/)"
        )


def _type_name(deserializer: Callable[[bytes], Any] | None) -> str:
    message_class = getattr(deserializer, "__self__", None)  # a generated Message.FromString
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or "protobuf"


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    name = _type_name(deserializer)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as err:  # noqa: BLE001 - any decode failure is the client's
            return MalformedRequest(name, err)

    return decode


class DecodeGuardInterceptor(ServerInterceptor):
    """Undecodable requests → INVALID_ARGUMENT naming the message type (unary and streaming requests)."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or is_infra(handler_call_details.method):
            return handler

        def reject_malformed(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            return request

        def each(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in requests:
                yield reject_malformed(request, context)

        def screen(request: Any, context: grpc.ServicerContext) -> Any:
            return each(request, context) if handler.request_streaming else reject_malformed(request, context)

        def unary(behavior: Behavior) -> Behavior:
            return lambda request, context: behavior(screen(request, context), context)

        def streaming(behavior: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                yield from behavior(screen(request, context), context)

            return call

        return rewrap(handler, unary, streaming, deserializer=tolerant(handler.request_deserializer))


class StreamLimitInterceptor(ServerInterceptor):
    """At most ``max_streams`` response streams from clients and ``peer_streams`` more from peers (``is_peer``)
    open at once; beyond: RESOURCE_EXHAUSTED with a retry hint. A peer takes a client slot when its own are all
    open."""

    def __init__(self, max_streams: int, peer_streams: int = 0, peer_token: str | None = None):
        self.max_streams, self.peer_streams, self.peer_token = max_streams, peer_streams, peer_token
        self._slots = threading.BoundedSemaphore(max_streams) if max_streams > 0 else None
        self._peer_slots = threading.BoundedSemaphore(peer_streams) if peer_streams > 0 else None
        self._lock = threading.Lock()
        self.open = 0
        self.open_peer = 0

    def _acquire(self, peer: bool) -> threading.BoundedSemaphore | None:
        for pool in (self._peer_slots, self._slots) if peer else (self._slots,):
            if pool is not None and pool.acquire(blocking=False):
                return pool
        return None

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming or is_infra(handler_call_details.method):
            return handler
        behavior = handler.unary_stream or handler.stream_stream
        assert behavior is not None  # a response-streaming handler has one of the two
        peer = is_peer(handler_call_details.invocation_metadata, self.peer_token)

        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            pool = self._acquire(peer)
            if pool is None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(RETRY_AFTER_MS)),))
                limit = f"{self.max_streams} open streams, its limit (EDITTUNER_MAX_STREAMS)"
                if peer:
                    limit = (
                        f"{self.max_streams + self.peer_streams} open streams, its limit for services "
                        "(EDITTUNER_MAX_STREAMS + EDITTUNER_PEER_STREAMS)"
                    )
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server already has {limit}; retry in {RETRY_AFTER_MS // 1000} s or close other watches",
                )
            released = threading.Event()
            counts_peer = pool is self._peer_slots

            def release() -> None:
                with self._lock:
                    if released.is_set():
                        return
                    released.set()
                    self.open -= 1
                    self.open_peer -= counts_peer
                pool.release()

            with self._lock:
                self.open += 1
                self.open_peer += counts_peer
            context.add_callback(release)  # a client that goes away may never let the generator finish
            try:
                yield from behavior(request, context)
            finally:
                release()

        return rewrap(handler, lambda unary: unary, lambda _: call)
