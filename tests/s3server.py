"""A real S3 server for tests: moto's server in its own process on loopback.

A separate process (not moto's in-process mocks) so the storage layer is tested over real HTTP, the way it
talks to MinIO in production: signing, headers, metadata casing, connection errors. Self-contained so any test
module or conftest can use it: ``endpoint, stop = start_s3_server()`` or ``with s3_server() as endpoint``.
Moto accepts any credentials.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

ACCESS_KEY = "edittuner-test"
SECRET_KEY = "edittuner-test-secret"


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=0.5).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False
    return True


def _log_tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


class _DiedAtStart(RuntimeError):
    """The server exited before answering, e.g. another process took the port between pick and bind."""


def _start_once(timeout_s: float) -> tuple[str, Callable[[], None]]:
    """Start moto on a fresh port and wait until it answers HTTP."""
    port = free_port()
    # The request log goes to a file, not a pipe: a pipe nobody reads fills up and blocks the server.
    log = tempfile.TemporaryFile()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(log)
            log.close()
            raise _DiedAtStart(f"moto S3 server exited with {proc.returncode} at start; its log:\n{tail}")
        if _answers(f"{endpoint}/moto-api/"):
            return endpoint, stop
        time.sleep(0.05)
    tail = _log_tail(log)
    stop()
    raise RuntimeError(f"moto S3 server did not answer on {endpoint} within {timeout_s:.0f}s; its log:\n{tail}")


def start_s3_server(timeout_s: float = 30.0, attempts: int = 3) -> tuple[str, Callable[[], None]]:
    """Start a moto S3 server; returns its endpoint URL (``http://127.0.0.1:<port>``) and a stop function."""
    for attempt in range(attempts):
        try:
            return _start_once(timeout_s)
        except _DiedAtStart:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@contextmanager
def s3_server(timeout_s: float = 30.0) -> Iterator[str]:
    endpoint, stop = start_s3_server(timeout_s)
    try:
        yield endpoint
    finally:
        stop()
