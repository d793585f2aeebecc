"""The three services as local processes on loopback, for a CLI run without a server (and for tests).

Each service is started as ``python -m <service>`` with its configuration in the environment, exactly as in a
container; the stack waits until every health check says SERVING and stops them with SIGTERM (then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import Unavailable

SERVICES = ("encoder", "trainer", "eval")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]  # (host, port) for an AF_INET socket
        return port


@dataclass
class LocalStack:
    addresses: dict[str, str]
    metrics_ports: dict[str, int]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def launch(self, service: str) -> None:
        log = open(self.log_dir / f"{service}.log", "ab")
        self.procs[service] = subprocess.Popen(
            [sys.executable, "-m", f"{service}_svc"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, service: str, timeout_s: float = 120.0) -> None:
        from shared.rpc.client import make_channel, wait_for_serving

        channel = make_channel(self.addresses[service], token=self.env.get("EDITTUNER_TOKEN") or None)
        deadline = time.monotonic() + timeout_s
        try:
            while True:  # in short waits, so that a service that exited is reported at once, not at the deadline
                try:
                    wait_for_serving(channel, "", min(2.0, max(0.1, deadline - time.monotonic())))
                    return
                except Exception as e:  # noqa: BLE001 - not serving yet, whatever the reason
                    code = self.procs[service].poll()
                    if code is None and time.monotonic() < deadline:
                        continue
                    raise Unavailable(
                        f"local {service}_svc did not become ready ({e}); exit code {code}; log "
                        f"{self.log_dir / f'{service}.log'}:\n{self.log_tail(service)}"
                    ) from None
        finally:
            channel.close()

    def lost_a_port(self) -> bool:
        """A service exited because another process took its port between free_port() and its bind."""
        return any(
            p.poll() is not None
            and ("cannot listen on" in (tail := self.log_tail(s, 5)) or "cannot serve /metrics" in tail)
            for s, p in self.procs.items()
        )

    def stop_one(self, service: str, grace_s: float = 15.0) -> int | None:
        p = self.procs[service]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def restart(self, service: str, timeout_s: float = 120.0) -> None:
        self.stop_one(service)
        self.launch(service)
        self.wait_ready(service, timeout_s)

    def log_tail(self, service: str, n: int = 40) -> str:
        path = self.log_dir / f"{service}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self, grace_s: float = 15.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stack_env(
    store: str, addresses: dict[str, str], metrics_ports: dict[str, int], base: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["EDITTUNER_STORE"] = store
    # The services run on the user's own machine for this user's command: any folder the user can read may hold
    # the datasets and the model (a remote service allows only its configured roots, see ServerPaths).
    env.setdefault("EDITTUNER_DATASET_ROOTS", "/")
    env.setdefault("EDITTUNER_MODEL_ROOTS", "/")
    for svc in SERVICES:
        env[f"EDITTUNER_{svc.upper()}_HOST"] = "127.0.0.1"
        env[f"EDITTUNER_{svc.upper()}_PORT"] = addresses[svc].rsplit(":", 1)[1]
        env[f"EDITTUNER_{svc.upper()}_METRICS_PORT"] = str(metrics_ports[svc])
        env[f"EDITTUNER_{svc.upper()}_ADDR"] = addresses[svc]
    return env


def start_local_stack(
    store: str,
    log_dir: Path,
    *,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    services: tuple[str, ...] = SERVICES,
) -> LocalStack:
    """The services on free loopback ports. A free port can be taken by another process (an outgoing connection's
    ephemeral port) before the service binds it: the stack is then started again on new ports, up to 3 times."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        addresses = {s: f"127.0.0.1:{free_port()}" for s in SERVICES}
        metrics_ports = {s: free_port() for s in SERVICES}
        stack = LocalStack(addresses, metrics_ports, log_dir, stack_env(store, addresses, metrics_ports, env))
        for svc in services:
            stack.launch(svc)
        try:
            for svc in services:
                stack.wait_ready(svc, timeout_s)
        except Unavailable:
            stack.stop(grace_s=5)
            if attempt < 2 and stack.lost_a_port():
                continue
            raise
        except BaseException:
            stack.stop(grace_s=5)
            raise
        return stack
    raise AssertionError("unreachable")
