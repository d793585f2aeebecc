"""The gRPC server all three services share: configuration, interceptors, health, reflection, metrics, shutdown.

A service's ``__main__`` is expected to look like::

    config = ServiceConfig.from_env("EDITTUNER_ENCODER", default_port=50051)
    servicer = EncoderServicer(...)
    running = build_server(config, lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s),
                           [encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name])
    install_sigterm(running)
    running.set_serving(True)          # once its models can load
    running.wait_for_termination()     # returns after SIGTERM/SIGINT and the grace period; then clean up

Health starts NOT_SERVING for "" and every named service, and goes back to NOT_SERVING (for good) when
``stop`` begins, so a load balancer or ``wait_for_serving`` stops sending work before the port closes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from shared import errors
from shared.errors import ConfigError, Problem
from shared.rpc.guards import DecodeGuardInterceptor, StreamLimitInterceptor
from shared.rpc.interceptors import BearerAuthInterceptor, ErrorInterceptor, MetricsInterceptor, status_for

if TYPE_CHECKING:
    from shared.rpc.interceptors import ServerInterceptor

__all__ = [
    "status_for",
    "ServiceConfig",
    "RunningServer",
    "build_server",
    "install_sigterm",
    "DEFAULT_MAX_MESSAGE_BYTES",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
UNARY_RESERVE = 8  # server threads never taken by streams
DEFAULT_PEER_STREAMS = 8


@dataclass(frozen=True)
class ServiceConfig:
    """How one service process listens and what it works with. Built by ``from_env`` in a service's
    ``__main__`` (or directly, e.g. by the CLI starting local services on loopback with ``port=0``)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise (EDITTUNER_HOST); other interfaces need a token
    port: int = 50051  # 0: the OS picks one; RunningServer.port says which
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: the OS picks one
    store_url: str | None = None  # shared.store.url.open_store's URL; None: the embedded local store
    model_dir: str | None = None
    device: str = "auto"
    token: str | None = None  # when set, every call but health/reflection needs "authorization: Bearer <token>"
    tls_cert: str | None = None  # PEM paths; both or neither
    tls_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # send and receive
    grace_s: float = 30.0  # on stop: how long running calls may finish before they are cancelled
    # The server is synchronous: one thread per call in flight, a Watch stream holding its thread for as long as
    # it is open. Streams are bounded below the thread count, so ``max_workers - max_streams`` threads always
    # remain for unary calls (see shared.rpc.guards.StreamLimitInterceptor).
    max_workers: int = 64
    max_streams: int = 48
    # Beyond max_streams, for the other services' calls only (x-edittuner-peer; with peer_token, that value only):
    # a trainer following its encode job never waits behind dashboards for a stream slot. None: what max_workers
    # leaves beyond max_streams and the unary threads, at most DEFAULT_PEER_STREAMS (8 with the defaults).
    peer_streams: int | None = None
    peer_token: str | None = None
    max_queued: int = 16  # jobs waiting beyond the running ones; more are RESOURCE_EXHAUSTED with a retry hint
    keepalive_s: float = 15.0  # a Watch stream re-sends the job's state at least this often; HTTP/2 pings too
    allow_insecure: bool = False  # listen beyond loopback without a token (EDITTUNER_ALLOW_INSECURE=1)
    dataset_roots: tuple[str, ...] = ()  # server folders a request's local dataset may be read from
    model_roots: tuple[str, ...] = ()  # server folders a request's local model directory may be read from

    def __post_init__(self) -> None:
        if self.peer_streams is None:
            spare = self.max_workers - UNARY_RESERVE - self.max_streams
            object.__setattr__(self, "peer_streams", max(0, min(DEFAULT_PEER_STREAMS, spare)))
        problems = [Problem(name, message) for name, message in self._problems()]
        if problems:
            raise ConfigError(problems, "invalid service configuration")

    @property
    def loopback(self) -> bool:
        return self.host in _LOOPBACK

    def _problems(self) -> list[tuple[str, str]]:
        found = []
        if not 0 <= self.port <= 65535:
            found.append(("port", f"{self.port} is not a port number (0-65535; 0 picks a free one)"))
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            found.append(("metrics_port", f"{self.metrics_port} is not a port number (0-65535)"))
        if bool(self.tls_cert) != bool(self.tls_key):
            found.append(("tls_cert", "TLS needs both a certificate and its key (tls_cert and tls_key), or neither"))
        if self.max_message_bytes < 1024:
            found.append(("max_message_bytes", f"{self.max_message_bytes} is too small (at least 1024)"))
        if self.grace_s < 0:
            found.append(("grace_s", f"{self.grace_s} must be 0 or more seconds"))
        if self.max_workers < 1:
            found.append(("max_workers", f"{self.max_workers} must be at least 1"))
        assert self.peer_streams is not None  # set above
        if self.peer_streams < 0:
            found.append(("peer_streams", f"{self.peer_streams} must be 0 or more"))
        elif not 0 <= self.max_streams <= self.max_workers - UNARY_RESERVE - self.peer_streams:
            found.append(
                (
                    "max_streams",
                    f"{self.max_streams} must be between 0 and max_workers - peer_streams - "
                    f"{UNARY_RESERVE} ({self.max_workers - self.peer_streams - UNARY_RESERVE}): "
                    "streams must leave threads for unary calls",
                )
            )
        if self.max_queued < 1:
            found.append(("max_queued", f"{self.max_queued} must be at least 1"))
        if self.keepalive_s <= 0:
            found.append(("keepalive_s", f"{self.keepalive_s} must be more than 0 seconds"))
        if not self.loopback and not self.token and not self.allow_insecure:
            found.append(
                (
                    "host",
                    f"listening on {self.host} without a token would let anyone who can reach this "
                    "host submit jobs and read what they produce: set EDITTUNER_TOKEN (clients send "
                    "it too), or bind to 127.0.0.1 (EDITTUNER_HOST), or set EDITTUNER_ALLOW_INSECURE=1 "
                    "to accept that risk on a network you trust",
                )
            )
        return found

    @property
    def address(self) -> str:
        """``host:port`` to listen on (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_env(cls, prefix: str, env: Mapping[str, str] | None = None, *, default_port: int = 50051) -> ServiceConfig:
        """Read ``<prefix>_<NAME>`` (e.g. ``EDITTUNER_ENCODER_PORT``), falling back to ``EDITTUNER_<NAME>`` for
        every name but PORT and METRICS_PORT, which are per service only. Folder lists (DATASET_ROOTS) are
        separated by ``:``. Every bad value is reported at once (``ConfigError``)."""
        env = os.environ if env is None else env
        prefix = prefix.rstrip("_")
        problems: list[Problem] = []

        def get(name: str, shared: bool = True) -> tuple[str, str | None]:
            for var in (f"{prefix}_{name}", *((f"EDITTUNER_{name}",) if shared else ())):
                value = env.get(var)
                if value is not None and value.strip():
                    return var, value.strip()
            return f"{prefix}_{name}", None

        def number(name: str, kind: type, default: Any, shared: bool = True) -> Any:
            var, raw = get(name, shared)
            if raw is None:
                return default
            try:
                return kind(raw)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                problems.append(Problem(f"${var}", f"{raw!r} is not {what}"))
                return default

        def flag(name: str) -> bool:
            var, raw = get(name)
            if raw is None:
                return False
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                problems.append(Problem(f"${var}", f"{raw!r} is not 1 or 0"))
            return raw.lower() in ("1", "true", "yes")

        def folders(name: str) -> tuple[str, ...]:
            raw = get(name)[1]
            return tuple(p for p in (raw or "").split(":") if p)

        model_dir = get("MODEL_DIR")[1]
        kwargs = dict(
            host=get("HOST")[1] or cls.host,
            port=number("PORT", int, default_port, shared=False),
            metrics_port=number("METRICS_PORT", int, None, shared=False),
            store_url=get("STORE")[1],
            model_dir=model_dir,
            device=get("DEVICE")[1] or cls.device,
            token=get("TOKEN")[1],
            tls_cert=get("TLS_CERT")[1],
            tls_key=get("TLS_KEY")[1],
            max_message_bytes=number("MAX_MESSAGE_BYTES", int, DEFAULT_MAX_MESSAGE_BYTES),
            grace_s=number("GRACE_S", float, cls.grace_s),
            max_workers=number("MAX_WORKERS", int, cls.max_workers),
            max_streams=number("MAX_STREAMS", int, cls.max_streams),
            peer_streams=number("PEER_STREAMS", int, None),
            peer_token=get("PEER_TOKEN")[1],
            max_queued=number("MAX_QUEUED", int, cls.max_queued),
            keepalive_s=number("KEEPALIVE_S", float, cls.keepalive_s),
            allow_insecure=flag("ALLOW_INSECURE"),
            dataset_roots=folders("DATASET_ROOTS"),
            model_roots=folders("MODEL_ROOTS") or ((model_dir,) if model_dir else ()),
        )
        if problems:
            raise ConfigError(problems, f"invalid service configuration in the environment ({prefix}_*)")
        return cls(**kwargs)


@dataclass
class RunningServer:
    """A started server. ``port``/``metrics_port`` are the bound ones (useful with port 0)."""

    server: grpc.Server
    config: ServiceConfig
    health: health.HealthServicer
    service_names: list[str]
    port: int
    metrics_port: int | None = None
    _metrics_httpd: Any = None
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: bool = False

    @property
    def target(self) -> str:
        """An address a client on this host can dial."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def set_serving(self, serving: bool = True) -> None:
        """SERVING (or NOT_SERVING) for "" and every service; ignored once ``stop`` has begun."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Health → NOT_SERVING, refuse new calls, let running ones finish for ``grace`` seconds (default
        ``config.grace_s``), cancel the rest, close /metrics. Blocks until done; calling it again is a no-op."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            grace = self.config.grace_s if grace is None else grace
            log.info("stopping %s (grace %.1fs)", ", ".join(self.service_names), grace)
            self.health.enter_graceful_shutdown()
            self.server.stop(grace).wait()
            if self._metrics_httpd is not None:
                self._metrics_httpd.shutdown()
                self._metrics_httpd.server_close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Blocks until the server has stopped (True) or ``timeout`` passed (False)."""
        timed_out = self.server.wait_for_termination(timeout)  # grpc returns True on *timeout*
        return not timed_out


def server_options(config: ServiceConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # A second server on a taken port must fail to bind, not share it silently.
        ("grpc.so_reuseport", 0),
        # HTTP/2 pings find clients that vanished without closing their streams (a killed laptop, a dropped NAT).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping us that often
    ]


def build_server(
    config: ServiceConfig,
    add_servicers: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    registry: CollectorRegistry | None = None,
) -> RunningServer:
    """Create, wire and start a server: interceptors (metrics, then auth when a token is set, then error
    mapping), ``add_servicers(server)``, grpc.health.v1 (NOT_SERVING until ``set_serving``), reflection for
    ``service_names`` + health, TLS when configured, /metrics when ``metrics_port`` is set."""
    registry = REGISTRY if registry is None else registry
    interceptors: list[ServerInterceptor] = [MetricsInterceptor(registry)]
    if config.token:
        interceptors.append(BearerAuthInterceptor(config.token))
    assert config.peer_streams is not None  # ServiceConfig.__post_init__ sets it
    interceptors += [
        StreamLimitInterceptor(config.max_streams, config.peer_streams, config.peer_token),
        ErrorInterceptor(),
        DecodeGuardInterceptor(),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=server_options(config),
        # Calls beyond this wait for no thread: they are RESOURCE_EXHAUSTED at once rather than queued unboundedly.
        maximum_concurrent_rpcs=config.max_workers * 4,
    )
    add_servicers(server)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    names = list(service_names)
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    port = _bind(server, config)
    _warn_if_exposed(config)
    running = RunningServer(server=server, config=config, health=health_servicer, service_names=names, port=port)
    if config.metrics_port is not None:
        try:
            httpd, _ = start_http_server(
                config.metrics_port, addr=config.host.strip("[]") or "0.0.0.0", registry=registry
            )
        except OSError as err:
            server.stop(0)
            raise errors.Unavailable(
                f"cannot serve /metrics on {config.host}:{config.metrics_port}: "
                f"{err.strerror or err}; is the port taken?"
            ) from err
        running._metrics_httpd = httpd
        running.metrics_port = httpd.server_port
    server.start()
    log.info(
        "%s listening on %s%s",
        ", ".join(names) or "server",
        config.address.rsplit(":", 1)[0] + f":{port}",
        f", metrics on :{running.metrics_port}" if running.metrics_port is not None else "",
    )
    return running


def _bind(server: grpc.Server, config: ServiceConfig) -> int:
    try:
        credentials = _server_credentials(config)
        if credentials is None:
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(config.address, credentials)
    except RuntimeError as err:  # grpc raises on a failed bind
        raise errors.Unavailable(
            f"cannot listen on {config.address}: {err}; is the port taken or the address not on this host?"
        ) from err
    if port == 0:
        raise errors.Unavailable(
            f"cannot listen on {config.address}: is the port taken or the address not on this host?"
        )
    return port


def _server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    pems = {}
    for what, path in (("tls_cert", config.tls_cert), ("tls_key", config.tls_key)):
        try:
            pems[what] = Path(str(path)).read_bytes()
        except OSError as err:
            raise ConfigError(
                [Problem(what, f"cannot read {path}: {err.strerror or err}")], "invalid service configuration"
            ) from err
    return grpc.ssl_server_credentials([(pems["tls_key"], pems["tls_cert"])])


def _warn_if_exposed(config: ServiceConfig) -> None:
    if config.loopback:
        return
    if not config.token:  # only with allow_insecure: ServiceConfig refuses it otherwise
        log.warning(
            "listening on %s without a token (EDITTUNER_ALLOW_INSECURE=1): anyone who can reach this "
            "address can submit jobs",
            config.address,
        )
    elif not config.tls_cert:
        log.warning(
            "listening on %s with a token but without TLS: the token crosses the network in clear", config.address
        )


def install_sigterm(
    running: RunningServer, grace: float | None = None, on_stop: Callable[[], None] | None = None
) -> None:
    """On SIGTERM or SIGINT: ``on_stop()`` (a service stops its jobs: a training worker starts its last
    checkpoint at once, open Watch streams end), then ``running.stop(grace)``, in a background thread (health
    NOT_SERVING, refuse new calls, wait the grace period), so ``running.wait_for_termination()`` in the main
    thread returns and the process can exit. A second signal cancels the calls still running at once. Call from
    the main thread."""
    signalled = threading.Event()

    def shutdown() -> None:
        if on_stop is not None:
            try:
                on_stop()
            except Exception:
                log.exception("stopping the service's work failed")
        running.stop(grace)

    def on_signal(signum: int, _frame: Any) -> None:
        if signalled.is_set():
            log.warning("%s again: cancelling the calls still running", signal.Signals(signum).name)
            running.server.stop(0)
            return
        signalled.set()
        log.info("%s: shutting down", signal.Signals(signum).name)
        threading.Thread(target=shutdown, name="grpc-shutdown").start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
