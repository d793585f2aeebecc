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
  thread-based, and a bound keeps the unary capacity a number one can state (``max_workers - max_streams``).

gRPC's own health and reflection services pass through untouched (their Watch does not hold a thread).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shared.rpc.interceptors import Behavior, is_infra, rewrap

log = logging.getLogger(__name__)

RETRY_AFTER_MS = 5000


class MalformedRequest:
    """Stands for a request whose bytes did not decode; the guard's behaviour wrapper answers it."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error

    def message(self) -> str:
        detail = str(self.error).strip() or type(self.error).__name__
        return (f"the request is not a valid {self.type_name} message ({detail[:200]}); the client must send the "
                "message its method takes (see protos/)")


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


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    """Undecodable requests → INVALID_ARGUMENT naming the message type (unary and streaming requests)."""

    def intercept_service(self, continuation, handler_call_details):
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
            def call(request, context):
                yield from behavior(screen(request, context), context)

            return call

        return rewrap(handler, unary, streaming, deserializer=tolerant(handler.request_deserializer))


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """At most ``max_streams`` response streams open at once; beyond: RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, max_streams: int):
        self.max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams) if max_streams > 0 else None
        self._lock = threading.Lock()
        self.open = 0

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming or is_infra(handler_call_details.method):
            return handler
        behavior = handler.unary_stream or handler.stream_stream

        def call(request, context):
            if self._slots is None or not self._slots.acquire(blocking=False):
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(RETRY_AFTER_MS)),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"this server already has {self.max_streams} open streams, its limit "
                              f"(EDITTUNER_MAX_STREAMS); retry in {RETRY_AFTER_MS // 1000} s or close other watches")
            released = threading.Event()

            def release() -> None:
                with self._lock:
                    if released.is_set():
                        return
                    released.set()
                    self.open -= 1
                self._slots.release()

            with self._lock:
                self.open += 1
            context.add_callback(release)  # a client that goes away may never let the generator finish
            try:
                yield from behavior(request, context)
            finally:
                release()

        return rewrap(handler, lambda unary: unary, lambda _: call)
