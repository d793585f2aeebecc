"""Client side of the services for the CLI: stubs, submit, watch with progress, Ctrl-C handling."""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any, Callable

import grpc

from shared.errors import EditTunerError, InvalidInput, Unavailable
from shared.rpc import common_pb2, encoder_pb2, encoder_pb2_grpc, eval_pb2, eval_pb2_grpc, trainer_pb2, \
    trainer_pb2_grpc
from shared.service_common import state_name

STUBS = {"encoder": (encoder_pb2_grpc.EncoderServiceStub, encoder_pb2),
         "trainer": (trainer_pb2_grpc.TrainerServiceStub, trainer_pb2),
         "eval": (eval_pb2_grpc.EvalServiceStub, eval_pb2)}
DEFAULT_PORTS = {"encoder": 50051, "trainer": 50052, "eval": 50053}
TIMEOUT_S = 30.0


class Client:
    """One service's stub with the channel's token and a deadline on every unary call."""

    def __init__(self, service: str, address: str, token: str | None = None):
        from shared.rpc.client import make_channel

        if service not in STUBS:
            raise InvalidInput(f"unknown service {service!r}; one of {', '.join(STUBS)}")
        stub_cls, self.pb = STUBS[service]
        self.service, self.address = service, address
        self.channel = make_channel(address, token=token if token is not None else os.environ.get("EDITTUNER_TOKEN"),
                                    tls_ca=os.environ.get("EDITTUNER_TLS_CA") or None,
                                    tls=os.environ.get("EDITTUNER_TLS", "") == "1")
        self.stub = stub_cls(self.channel)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            raise rpc_error(self.service, self.address, e) from None

    def get(self, job_id: str) -> common_pb2.Job:
        return self.call("GetJob", self.pb.GetJobRequest(job_id=job_id)).job

    def cancel(self, job_id: str) -> common_pb2.Job:
        return self.call("CancelJob", self.pb.CancelJobRequest(job_id=job_id)).job

    def list(self, state: str | None = None) -> list[common_pb2.Job]:
        req = self.pb.ListJobsRequest(page_size=100)
        if state:
            req.state = getattr(common_pb2, f"JOB_STATE_{state.upper()}")
        return list(self.call("ListJobs", req).jobs)

    def watch(self, job_id: str, on_update: Callable[[common_pb2.Job], None]) -> common_pb2.Job:
        """Stream the job's events until it ends; returns the last snapshot."""
        last = None
        try:
            for ev in self.stub.WatchJob(self.pb.WatchJobRequest(job_id=job_id)):
                last = ev.job
                on_update(last)
        except grpc.RpcError as e:
            raise rpc_error(self.service, self.address, e) from None
        return last if last is not None else self.get(job_id)

    def close(self) -> None:
        self.channel.close()


def rpc_error(service: str, address: str, e: grpc.RpcError) -> EditTunerError:
    from shared.rpc.client import domain_error

    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{service}_svc at {address} is not reachable ({e.details()}); is it running? "
                           "Start it with `edittuner serve " + service + "` or leave --server unset")
    return domain_error(e)


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
    lines = [f"job {job.job_id} ({job.kind}): {state_name(job)}" + (f", attempt {job.attempt}" if job.attempt > 1
                                                                  else "")]
    p = job.progress
    if p.phase:
        lines.append(f"  {p.phase} {p.step}/{p.total}" + (f" loss {p.loss:.4f}" if p.loss else "") +
                     (f" — {p.message}" if p.message else ""))
    if job.error:
        lines.append(f"  error ({job.error_code}): {job.error}")
    for k, v in sorted(job.outputs.items()):
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


def wait_for_validations(job: common_pb2.Job, eval_address: str | None,
                         on_update: Callable[[common_pb2.Job], None] | None = None) -> list[common_pb2.Job]:
    """Follow the Render jobs a finished run submitted (``validations``: "step:job_id,…") to their end."""
    pairs = [v.split(":", 1) for v in job.outputs.get("validations", "").split(",") if ":" in v]
    if not pairs or eval_address is None:
        return []
    client = Client("eval", eval_address)
    try:
        return [client.watch(job_id, on_update or (lambda j: None)) for _, job_id in pairs]
    finally:
        client.close()
