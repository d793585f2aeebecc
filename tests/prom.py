"""A real Prometheus server for tests: Debian's `prometheus` binary on a free loopback port, scraping given targets.

    with start_prometheus({"encoder": ["127.0.0.1:9101"]}) as prom:    # or a plain list of "host:port"
        samples = prom.wait_for('edittuner_encoder_images_total', timeout=15)
        samples[0]["metric"]["job"], float(samples[0]["value"][1])

Prometheus 2.x hands discovered targets to its scrapers at most every 5 s, so the first samples arrive about
5-6 s after start whatever the scrape interval (1 s here): start one server per module or session, not per test.

`require_tool(name)` is the suite's rule for tools from Debian packages: absent outside CI the test is skipped
(with the package to install); absent in CI (CI=true) it fails, since .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

# binary -> the Debian package that ships it (what .ci/run installs)
DEBIAN_PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus", "docker-compose": "docker-compose"}


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """The path of the executable `name`; skips the test outside CI when it is absent, fails it in CI."""
    path = shutil.which(name)
    if path:
        return path
    package = DEBIAN_PACKAGES.get(name, name)
    message = f"`{name}` not found: install Debian's {package} package (apt-get install {package}); .ci/run does"
    if in_ci():
        pytest.fail(message + ", so in CI its absence is an error", pytrace=False)
    pytest.skip(message)


# Loopback only: never through an http_proxy the environment may set.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(jobs: Mapping[str, Sequence[str]], scrape_interval: str) -> str:
    # JSON is YAML: no YAML library needed to write the config.
    return json.dumps(
        {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(targets)}]} for job, targets in jobs.items()
            ],
        },
        indent=2,
    )


class Prometheus:
    """A running Prometheus process; use `start_prometheus` (a context manager) or call `stop()`."""

    def __init__(self, jobs: Mapping[str, Sequence[str]], scrape_interval: str = "1s", startup_timeout: float = 20.0):
        binary = require_tool("prometheus")
        self._dir = Path(tempfile.mkdtemp(prefix="edittuner-prom-"))
        config = self._dir / "prometheus.yml"
        config.write_text(_config(jobs, scrape_interval))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = self._dir / "prometheus.log"
        self._log = open(self._log_path, "wb")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with _OPENER.open(self.url + "/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready on {self.url} after {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self._log_path.read_text(errors="replace")[-4000:]

    def _api(self, path: str, params: Mapping[str, str]) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with _OPENER.open(url, timeout=5) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as err:  # a bad expression is a 400 with the reason in the JSON body
            body = json.load(err)
        if body.get("status") != "success":
            raise ValueError(f"{path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: the result's samples, each {"metric": {labels}, "value": [time, "value"]}
        (an empty list when nothing matches; a scalar or string result comes back as one sample without labels)."""
        data = self._api("query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float = 15.0, poll: float = 0.25) -> list[dict]:
        """Polls `query(expr)` until it returns samples; raises TimeoutError naming the targets' state if not."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(expr)
            if samples or time.monotonic() >= deadline:
                break
            time.sleep(poll)
        if not samples:
            raise TimeoutError(f"no samples for {expr!r} after {timeout:.0f} s; targets: {self.targets()}")
        return samples

    def targets(self) -> list[dict]:
        """The active scrape targets as {job, url, health, lastError}."""
        return [
            {"job": t["labels"].get("job"), "url": t["scrapeUrl"], "health": t["health"], "lastError": t["lastError"]}
            for t in self._api("targets", {"state": "active"})["activeTargets"]
        ]

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_prometheus(targets: Mapping[str, Sequence[str]] | Sequence[str], scrape_interval: str = "1s") -> Prometheus:
    """Starts Prometheus scraping `targets`: {job: ["host:port", ...]}, or a list of "host:port" (job "targets").
    Returns once /-/ready answers; use it as a context manager to stop it."""
    if isinstance(targets, str):
        targets = [targets]
    jobs = dict(targets) if isinstance(targets, Mapping) else {"targets": list(targets)}
    return Prometheus(jobs, scrape_interval)
