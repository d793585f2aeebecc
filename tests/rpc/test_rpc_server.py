"""The shared gRPC server layer, over real servers on port 0 with the production interceptors: error mapping
(row by row), message limits, deadlines and metrics."""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from rpcfake import LIMIT, SERVICE, handled, make_error, rpc_error, start, wait_until

from shared import errors
from shared.rpc import common_pb2, encoder_pb2, encoder_pb2_grpc
from shared.rpc.client import make_channel
from shared.rpc.interceptors import clip_details, server_metrics


@pytest.fixture(scope="module")
def server():
    running, registry = start()
    running.set_serving(True)
    channel = make_channel(running.target, max_message_bytes=4 * LIMIT)
    yield running, registry, encoder_pb2_grpc.EncoderServiceStub(channel)
    channel.close()
    running.stop(0)


# ------------------------------------------------------------------------------------------ error mapping
@pytest.mark.parametrize("cls, code", errors.STATUS_CODES, ids=lambda c: getattr(c, "__name__", c))
def test_every_row_of_the_status_table(server, cls, code):
    _, _, stub = server
    err = rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id=cls.__name__))
    assert err.code() == grpc.StatusCode[code]
    assert err.details() == str(make_error(cls.__name__))


@pytest.mark.parametrize("name", ["ConfigError", "DatasetError", "ProblemsError"])
def test_invalid_argument_lists_every_problem_with_its_field(server, name):
    _, _, stub = server
    err = rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id=name))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = err.details().split("\n")
    assert lines[0].endswith(": 2 problems")
    assert lines[1:] == [
        "  - config.json: $.learning_rate: 'fast' is not a number",
        "  - multidatabackend.json: $[0].instance_data_dir: folder /nope does not exist",
    ]


@pytest.mark.parametrize(
    "name,code", [("Diverged", grpc.StatusCode.UNKNOWN), ("MissingRun", grpc.StatusCode.NOT_FOUND)]
)
def test_unlisted_subclasses_map_through_their_nearest_listed_base(server, name, code):
    _, _, stub = server
    err = rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id=name))
    assert (err.code(), err.details()) == (code, str(make_error(name)))


@pytest.mark.parametrize("name", ["RuntimeError", "ValueError"])
def test_unexpected_exception_is_internal_hides_the_text_and_logs_the_traceback(server, caplog, name):
    _, _, stub = server
    with caplog.at_level(logging.ERROR, logger="shared.rpc.interceptors"):
        err = rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id=name))
    assert err.code() == grpc.StatusCode.INTERNAL
    match = re.fullmatch(r"internal error; see the service log \(id ([0-9a-f]{8})\)", err.details())
    assert match, err.details()
    assert "secret" not in err.details()
    [record] = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert record.exc_info[0].__name__ == name and "secret" in str(record.exc_info[1])
    assert "SubmitEncode" in record.getMessage()


def test_grpc_abort_passes_through(server):
    _, _, stub = server
    err = rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="abort"))
    assert (err.code(), err.details()) == (grpc.StatusCode.ALREADY_EXISTS, "job j1 exists")


@pytest.mark.parametrize(
    "error,code",
    [
        ("NotFound", grpc.StatusCode.NOT_FOUND),
        ("ConfigError", grpc.StatusCode.INVALID_ARGUMENT),
        ("RuntimeError", grpc.StatusCode.INTERNAL),
    ],
)
def test_streaming_errors_map_after_the_events_already_sent(server, error, code):
    _, _, stub = server
    steps = []
    with pytest.raises(grpc.RpcError) as info:
        for event in stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=f"3:{error}"), timeout=5):
            steps.append(event.job.progress.step)
    assert steps == [0, 1, 2]
    assert info.value.code() == code
    if code == grpc.StatusCode.INTERNAL:
        assert info.value.details().startswith("internal error; see the service log (id ")
    else:
        assert info.value.details() == str(make_error(error))


def test_long_problem_lists_are_cut_to_fit_a_trailer(server):
    _, _, stub = server
    err = rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="many:1000"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED from an oversized trailer
    lines = err.details().split("\n")
    assert lines[0] == "invalid configuration: 1000 problems"
    assert lines[1].startswith("  - config.json: $.key_0: unknown key")
    kept = len(lines) - 2
    assert lines[-1] == f"  ... and {1001 - kept - 1} more lines (the service log has the whole message)"
    assert clip_details("short") == "short"
    assert len(clip_details("é" * 10_000)) < 2000


# ----------------------------------------------------------------------------------- limits and deadlines
def test_request_over_the_size_limit_is_resource_exhausted(server):
    _, _, stub = server
    request = encoder_pb2.SubmitEncodeRequest(
        request_id="ok", files=common_pb2.RunConfigFiles(config_json="x" * (LIMIT + 1))
    )
    err = rpc_error(stub.SubmitEncode, request)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id="ok"), timeout=5).job.job_id == "j1"


def test_response_over_the_size_limit_is_resource_exhausted(server):
    _, _, stub = server
    err = rpc_error(stub.GetJob, encoder_pb2.GetJobRequest(job_id="big"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_shorter_than_the_method_is_deadline_exceeded_and_not_logged_as_internal(server, caplog):
    _, registry, stub = server
    with caplog.at_level(logging.INFO, logger="shared.rpc.interceptors"):
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id="slow"), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The handler goes on after the client gave up; when it raises, the interceptor logs one quiet line. The
        # call is counted by the metrics interceptor, from grpc's end-of-call callback or when the handler returns,
        # whichever comes first, on another thread: wait for both conditions the assertions read.
        wait_until(
            lambda: [r for r in caplog.records if "then raised Unavailable" in r.getMessage()],
            30,
            "the slow handler never finished",
        )
        wait_until(
            lambda: handled(registry, "SubmitEncode", "DEADLINE_EXCEEDED") >= 1, 30, "the call was never counted"
        )
    [record] = [r for r in caplog.records if "then raised Unavailable" in r.getMessage()]
    assert record.levelno == logging.INFO and "ended with DEADLINE_EXCEEDED" in record.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert handled(registry, "SubmitEncode", "DEADLINE_EXCEEDED") == 1


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_count_and_time_calls_with_the_conventional_labels():
    running, registry = start()
    try:
        stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(running.target))
        for _ in range(2):
            stub.GetJob(encoder_pb2.GetJobRequest(job_id="a"), timeout=5)
        rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="NotFound"))
        rpc_error(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="ConfigError"))
        assert len(list(stub.WatchJob(encoder_pb2.WatchJobRequest(job_id="2:"), timeout=5))) == 2
        with pytest.raises(grpc.RpcError):
            list(stub.WatchJob(encoder_pb2.WatchJobRequest(job_id="1:IntegrityError"), timeout=5))
        health_pb2_grpc.HealthStub(make_channel(running.target)).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        running.stop(0)
    assert handled(registry, "GetJob", "OK") == 2
    assert handled(registry, "SubmitEncode", "NOT_FOUND") == 1
    assert handled(registry, "SubmitEncode", "INVALID_ARGUMENT") == 1
    assert handled(registry, "WatchJob", "OK", "server_stream") == 1
    assert handled(registry, "WatchJob", "DATA_LOSS", "server_stream") == 1
    started = {"grpc_service": SERVICE, "grpc_method": "SubmitEncode", "grpc_type": "unary"}
    assert registry.get_sample_value("grpc_server_started_total", started) == 2
    assert registry.get_sample_value("grpc_server_handling_seconds_count", started) == 2
    assert registry.get_sample_value("grpc_server_handling_seconds_bucket", {**started, "le": "+Inf"}) == 2
    services = {s.labels.get("grpc_service") for m in registry.collect() for s in m.samples}
    assert "grpc.health.v1.Health" not in services  # health probes are not counted


def test_metrics_are_created_once_per_registry():
    registry = CollectorRegistry()
    assert server_metrics(registry) is server_metrics(registry)
    assert server_metrics(None) is server_metrics(None)  # the global registry: no duplicate-name error


def test_metrics_endpoint_serves_the_registry():
    import urllib.request

    running, _ = start(metrics_port=0)
    try:
        encoder_pb2_grpc.EncoderServiceStub(make_channel(running.target)).GetJob(
            encoder_pb2.GetJobRequest(job_id="a"), timeout=5
        )
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        running.stop(0)
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="GetJob",'
        f'grpc_service="{SERVICE}",grpc_type="unary"}} 1.0'
    ) in body
