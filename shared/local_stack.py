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
        return s.getsockname()[1]


@dataclass
class LocalStack:
    addresses: dict[str, str]
    metrics_ports: dict[str, int]
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

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

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stack_env(store: str, addresses: dict[str, str], metrics_ports: dict[str, int],
              base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["EDITTUNER_STORE"] = store
    for svc in SERVICES:
        env[f"EDITTUNER_{svc.upper()}_HOST"] = "127.0.0.1"
        env[f"EDITTUNER_{svc.upper()}_PORT"] = addresses[svc].rsplit(":", 1)[1]
        env[f"EDITTUNER_{svc.upper()}_METRICS_PORT"] = str(metrics_ports[svc])
        env[f"EDITTUNER_{svc.upper()}_ADDR"] = addresses[svc]
    return env


def start_local_stack(store: str, log_dir: Path, *, timeout_s: float = 120.0, env: dict[str, str] | None = None,
                      services: tuple[str, ...] = SERVICES) -> LocalStack:
    from shared.rpc.client import make_channel, wait_for_serving

    log_dir.mkdir(parents=True, exist_ok=True)
    addresses = {s: f"127.0.0.1:{free_port()}" for s in SERVICES}
    metrics_ports = {s: free_port() for s in SERVICES}
    full_env = stack_env(store, addresses, metrics_ports, env)
    stack = LocalStack(addresses, metrics_ports, log_dir)
    for svc in services:
        log = open(log_dir / f"{svc}.log", "ab")
        stack.procs[svc] = subprocess.Popen([sys.executable, "-m", f"{svc}_svc"], env=full_env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for svc in services:
            channel = make_channel(addresses[svc], token=full_env.get("EDITTUNER_TOKEN") or None)
            try:
                wait_for_serving(channel, "", timeout_s)
            except Exception as e:
                code = stack.procs[svc].poll()
                raise Unavailable(f"local {svc}_svc did not become ready ({e}); exit code {code}; log "
                                  f"{log_dir / f'{svc}.log'}:\n{stack.log_tail(svc)}") from None
            finally:
                channel.close()
    except BaseException:
        stack.stop(grace_s=5)
        raise
    return stack
