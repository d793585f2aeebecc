"""The body of every service's ``__main__``: configuration from the environment, store, jobs, server, metrics.

Only here (and in each ``__main__``) is the environment read; everything below takes typed arguments.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import EditTunerError
from shared.logs import quiet_call_noise, quiet_import_noise
from shared.rpc import data_pb2, data_pb2_grpc
from shared.rpc.server import ServiceConfig, build_server, install_sigterm
from shared.service.common import ServerPaths
from shared.service.data import DataServicer
from shared.service.jobs import JobManager
from shared.service.metrics import Metrics
from shared.service.spool import RecordSpool
from shared.store.uploads import MAX_FILE_BYTES
from shared.store.url import open_store

if TYPE_CHECKING:
    import grpc

    from shared.service.jobs import Executor
    from shared.store.base import ObjectStore

log = logging.getLogger(__name__)
DEFAULT_STORE = ".edittuner/store"


def serve(
    name: str,
    default_port: int,
    make: Callable[
        [ServiceConfig, ObjectStore, Metrics], tuple[Any, Executor, str, Callable[[JobManager, grpc.Server], None]]
    ],
    env: dict[str, str] | None = None,
) -> int:
    """``make(config, store, metrics) -> (core, execute, service_full_name, add_servicer(jobs, server))``; every
    service also serves DataService (shared.service.data).

    A configuration the service cannot start with (a bad variable, no token beyond loopback, an unreachable
    store) is printed as one message and exits 2, no traceback. On SIGTERM/SIGINT the jobs stop first (a
    training worker starts its last checkpoint at once, Watch streams end), then the server drains."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    quiet_import_noise()
    quiet_call_noise()  # eval_svc's previews through an int8-bnb base
    env = dict(os.environ if env is None else env)
    try:
        config = ServiceConfig.from_env(f"EDITTUNER_{name.upper()}", env, default_port=default_port)
        store = open_store(config.store_url or DEFAULT_STORE)
    except EditTunerError as err:
        print(f"{name}_svc cannot start: {err}", file=sys.stderr)
        return 2
    metrics = Metrics()
    try:
        core, execute, full_name, add = make(config, store, metrics)
    except EditTunerError as err:
        print(f"{name}_svc cannot start: {err}", file=sys.stderr)
        return 2
    jobs = JobManager(
        store, name, execute, max_queued=config.max_queued, spool=RecordSpool(workdir(env) / "job-spool" / name)
    )
    metrics.collect_jobs(name, jobs.jobs_by_state)
    data = DataServicer(
        store, server_paths(config), workdir(env), int(env.get("EDITTUNER_MAX_UPLOAD_BYTES") or MAX_FILE_BYTES)
    )

    def add_all(server: grpc.Server) -> None:
        add(jobs, server)
        # uploads and downloads on every port; grpcio-tools generates the *_pb2_grpc modules unannotated
        data_pb2_grpc.add_DataServiceServicer_to_server(data, server)  # type: ignore[no-untyped-call]

    names = [full_name, data_pb2.DESCRIPTOR.services_by_name["DataService"].full_name]
    try:
        running = build_server(config, add_all, names)
    except EditTunerError as err:
        print(f"{name}_svc cannot start: {err}", file=sys.stderr)
        return 2
    install_sigterm(running, on_stop=lambda: jobs.shutdown(wait=False))
    jobs.start()
    running.set_serving(True)
    log.info(
        "%s_svc serving on %s (store %s, metrics port %s)", name, running.port, store.describe(), running.metrics_port
    )
    running.wait_for_termination()
    jobs.shutdown(wait=True, grace_s=config.grace_s)
    log.info("%s_svc stopped", name)
    return 0


def server_paths(config: ServiceConfig) -> ServerPaths:
    return ServerPaths(dataset_roots=config.dataset_roots, model_roots=config.model_roots)


def peer_channel(env: dict[str, str], name: str, token: str | None, caller: str = "") -> Any:
    """A channel to the service ``name`` at EDITTUNER_<NAME>_ADDR, or None. Its calls say they come from a peer
    (``x-edittuner-peer``: EDITTUNER_PEER_TOKEN, else ``caller``), which the peer's stream limit keeps slots for."""
    from shared.rpc.client import make_channel

    address = env.get(f"EDITTUNER_{name.upper()}_ADDR")
    if not address:
        return None
    return make_channel(
        address,
        token=token,
        tls_ca=env.get("EDITTUNER_TLS_CA") or None,
        tls=env.get("EDITTUNER_TLS", "") == "1",
        peer=env.get("EDITTUNER_PEER_TOKEN") or caller or "service",
    )


def workdir(env: dict[str, str]) -> Path:
    return Path(env.get("EDITTUNER_WORKDIR") or ".edittuner/work")


__all__ = ["serve", "peer_channel", "workdir", "server_paths"]
