"""The CLI's side of the services: which address, how a job is shown, Ctrl-C, following validations.

The typed client itself (``Client``) is ``shared.rpc.client``'s, shared with benchmarks and tests."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable

from shared.rpc import common_pb2
from shared.rpc.client import DEFAULT_PORTS, Client
from shared.service.common import state_name
from shared.service.outputs import flat_outputs


def new_request_id() -> str:
    return uuid.uuid4().hex


def resolve_address(service: str, server: str | None) -> str | None:
    """--server, else EDITTUNER_<SERVICE>_ADDR, else EDITTUNER_SERVER (a host; the service's default port)."""
    if server:
        return server
    if os.environ.get(f"EDITTUNER_{service.upper()}_ADDR"):
        return os.environ[f"EDITTUNER_{service.upper()}_ADDR"]
    host = os.environ.get("EDITTUNER_SERVER")
    if host:
        return host if ":" in host else f"{host}:{DEFAULT_PORTS[service]}"
    return None


def describe(job: common_pb2.Job) -> str:
    lines = [
        f"job {job.job_id} ({job.kind}): {state_name(job)}" + (f", attempt {job.attempt}" if job.attempt > 1 else "")
    ]
    p = job.progress
    if p.phase:
        lines.append(
            f"  {p.phase} {p.step}/{p.total}"
            + (f" loss {p.loss:.4f}" if p.loss else "")
            + (f" — {p.message}" if p.message else "")
        )
    if job.error:
        lines.append(f"  error ({job.error_code}): {job.error}")
    for k, v in sorted(flat_outputs(job).items()):  # the typed results, printed as `key: value` strings
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def ask_cancel_or_detach() -> bool:
    """After Ctrl-C: True to cancel the job, False to detach. Without a terminal, detach."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = input("\ncancel the job [c] or detach and leave it running [d]? ").strip().lower()
    except (EOFError, KeyboardInterrupt):
        return False
    return answer.startswith("c")


def wait_for_validations(
    job: common_pb2.Job, eval_address: str | None, on_update: Callable[[common_pb2.Job], None] | None = None
) -> list[common_pb2.Job]:
    """Follow the Render jobs a finished run submitted (``job.train.validations``) to their end."""
    validations = list(job.train.validations)
    if not validations or eval_address is None:
        return []
    client = Client("eval", eval_address)
    try:
        return [client.watch(v.job_id, on_update or (lambda j: None)) for v in validations]
    finally:
        client.close()
