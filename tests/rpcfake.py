"""A fake encoder servicer behind the production server layer, for the gRPC tests: each request names the error
or behaviour it wants, so every mapping can be exercised on a real server on port 0."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from shared import errors
from shared.errors import Problem
from shared.rpc import common_pb2, encoder_pb2, encoder_pb2_grpc
from shared.rpc.server import ServiceConfig, build_server

ROOT = Path(__file__).resolve().parents[1]
SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
LIMIT = 64 * 1024
TWO_PROBLEMS = [
    Problem("config.json: $.learning_rate", "'fast' is not a number"),
    Problem("multidatabackend.json: $[0].instance_data_dir", "folder /nope does not exist"),
]


class Diverged(errors.EditTunerError):
    """An EditTunerError subclass errors.STATUS_CODES does not list (like training.TrainingDiverged)."""


class MissingRun(errors.NotFound):
    """A subclass of a listed error: the nearest listed base decides."""


def make_error(name: str) -> Exception:
    local = {"Diverged": Diverged, "MissingRun": MissingRun, "RuntimeError": RuntimeError, "ValueError": ValueError}
    cls = local[name] if name in local else getattr(errors, name)
    if issubclass(cls, errors.ProblemsError):
        return cls(TWO_PROBLEMS)
    return cls(f"{name} raised on purpose (secret /home/alice/token.txt)")


class FakeEncoder(encoder_pb2_grpc.EncoderServiceServicer):
    """SubmitEncode raises the error named by request_id (or: ok, abort, slow, many:<n>); WatchJob streams
    n events then raises the error in job_id "<n>:<ErrorName>" ("<n>:" ends normally); GetJob("big") answers
    a message over the limit."""

    def SubmitEncode(self, request, context):
        what = request.request_id
        if what == "ok":
            return encoder_pb2.SubmitEncodeResponse(job=common_pb2.Job(job_id="j1", request_id=what))
        if what == "abort":
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "job j1 exists")
        if what == "slow":
            time.sleep(0.6)
            raise errors.Unavailable("too late anyway")
        if what.startswith("many:"):
            raise errors.ConfigError(
                [Problem(f"config.json: $.key_{i}", "unknown key " + "x" * 40) for i in range(int(what[5:]))]
            )
        raise make_error(what)

    def GetJob(self, request, context):
        error = "x" * (2 * LIMIT) if request.job_id == "big" else ""
        return encoder_pb2.GetJobResponse(job=common_pb2.Job(job_id=request.job_id, error=error))

    def WatchJob(self, request, context):
        count, _, error = request.job_id.partition(":")
        for step in range(int(count)):
            yield encoder_pb2.WatchJobResponse(job=common_pb2.Job(job_id="j1", progress=common_pb2.Progress(step=step)))
        if error:
            raise make_error(error)


def start(registry: CollectorRegistry | None = None, **overrides):
    config = ServiceConfig(host="127.0.0.1", port=0, grace_s=0.2, max_message_bytes=LIMIT, **overrides)
    registry = registry if registry is not None else CollectorRegistry()
    running = build_server(
        config,
        lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(FakeEncoder(), s),
        [SERVICE],
        registry=registry,
    )
    return running, registry


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=5, **kwargs)
    return info.value


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def handled(registry, method: str, code: str, kind: str = "unary") -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": kind, "grpc_code": code}
    return registry.get_sample_value("grpc_server_handled_total", labels) or 0.0
