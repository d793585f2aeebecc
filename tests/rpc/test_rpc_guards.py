"""What a hostile or broken client sends a real service's server (port 0, production interceptors): undecodable
bytes, invalid UTF-8, unknown enum values, bad ids, configs nested 100 000 deep, floods of Watch streams — each
gets its own status (never INTERNAL), and open streams never starve unary calls. Also the safe defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry

from encoder_svc.service import EncoderServicer
from shared import errors
from shared.rpc import common_pb2, encoder_pb2, encoder_pb2_grpc
from shared.rpc.client import make_channel
from shared.rpc.server import ServiceConfig, build_server
from shared.service.common import ServerPaths
from shared.service.jobs import JobManager
from shared.store.local import LocalStore

ROOT = Path(__file__).resolve().parents[2]
SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


def never_runs(job, ctx):
    raise AssertionError("the manager is not started: jobs stay queued")


@pytest.fixture
def service(tmp_path):
    """An encoder servicer over a real job manager with one queued job, behind the production server layer."""
    jobs = JobManager(LocalStore(tmp_path / "store"), "encoder", never_runs)
    queued = jobs.submit("encode", {"x": 1}, "queued-job")
    config = ServiceConfig(host="127.0.0.1", port=0, grace_s=0.5, max_workers=12, max_streams=4, keepalive_s=0.3)
    servicer = EncoderServicer(jobs, SimpleNamespace(paths=ServerPaths()), keepalive_s=config.keepalive_s)
    running = build_server(
        config,
        lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s),
        [SERVICE],
        registry=CollectorRegistry(),
    )
    running.set_serving(True)
    channel = make_channel(running.target)
    yield SimpleNamespace(
        jobs=jobs, job=queued, running=running, channel=channel, stub=encoder_pb2_grpc.EncoderServiceStub(channel)
    )
    jobs.shutdown(wait=False)
    channel.close()
    running.stop(0)


def raw(service, method: str, data: bytes, streaming: bool = False):
    path = f"/{SERVICE}/{method}"
    if streaming:
        return list(service.channel.unary_stream(path)(data, timeout=5))
    return service.channel.unary_unary(path)(data, timeout=5)


@pytest.mark.parametrize(
    "data",
    [os.urandom(64), b"\x0a\x02\xff\xfe", b"\x12\x05\x0a\x03\xc3\x28\x41"],
    ids=["random bytes", "invalid UTF-8 in request_id", "invalid UTF-8 in a nested string"],
)
def test_undecodable_requests_are_invalid_argument_naming_the_message(service, data):
    with pytest.raises(grpc.RpcError) as info:
        raw(service, "SubmitEncode", data)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("the request is not a valid edittuner.encoder.v1.SubmitEncodeRequest")


def test_undecodable_stream_request_is_invalid_argument_too(service):
    with pytest.raises(grpc.RpcError) as info:
        raw(service, "WatchJob", b"\x0a\x01\xff", streaming=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "edittuner.encoder.v1.WatchJobRequest" in info.value.details()


def test_a_valid_request_still_decodes(service):
    reply = raw(service, "GetJob", encoder_pb2.GetJobRequest(job_id=service.job.job_id).SerializeToString())
    assert encoder_pb2.GetJobResponse.FromString(reply).job.job_id == service.job.job_id


@pytest.mark.parametrize(
    "request_, field",
    [
        (encoder_pb2.ListJobsRequest(state=99), "state: 99 is not a job state"),
        (encoder_pb2.ListJobsRequest(page_size=-1), "page_size: -1 is negative"),
        (encoder_pb2.ListJobsRequest(page_token="%%%"), "invalid page_token"),
    ],
)
def test_bad_list_parameters_are_invalid_argument_naming_the_field(service, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        service.stub.ListJobs(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "a/b", "", "x" * 500])
def test_malformed_job_ids_are_invalid_argument(service, job_id):
    for call in (service.stub.GetJob, service.stub.CancelJob):
        with pytest.raises(grpc.RpcError) as info:
            call(getattr(encoder_pb2, call._method.decode().rsplit("/", 1)[1] + "Request")(job_id=job_id), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(service.stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=job_id), timeout=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "config_json, what",
    [
        ("[" * 100_000, "nests objects and lists more than 64 levels"),
        ("{" + " " * (5 * 1024 * 1024) + "}", "a config file is at most"),
    ],
)
def test_hostile_config_text_is_invalid_argument_naming_the_file(service, config_json, what):
    files = common_pb2.RunConfigFiles(config_json=config_json, data_json="[]", config_name="config.json")
    with pytest.raises(grpc.RpcError) as info:
        service.stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id="x", files=files), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.json" in info.value.details() and what in info.value.details()


def test_streams_beyond_the_bound_are_refused_with_a_retry_hint_and_unary_calls_stay_answered(service):
    """max_workers 12, max_streams 4: 10 watchers, 4 of them held open; every unary call is still answered."""
    results: list[object] = []
    lock = threading.Lock()
    opened = threading.Semaphore(0)

    def watch() -> None:
        call = service.stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=service.job.job_id))
        try:
            for _ in call:
                opened.release()  # at least one event came: the stream holds a server thread now
                with lock:
                    results.append("open")
                break
            for _ in call:  # then keep it open until the server ends it
                pass
        except grpc.RpcError as e:
            with lock:
                results.append((e.code(), e.details(), dict(e.trailing_metadata() or ())))

    threads = [threading.Thread(target=watch, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    for _ in range(4):
        assert opened.acquire(timeout=30)
    deadline = time.monotonic() + 30
    while sum(1 for r in results if isinstance(r, tuple)) < 6:
        assert time.monotonic() < deadline, results
        time.sleep(0.02)
    refused = [r for r in results if isinstance(r, tuple)]
    assert len(refused) == 6 and results.count("open") == 4
    for code, details, trailers in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in 5 s" in details
        assert trailers.get("grpc-retry-pushback-ms") == "5000"
    for _ in range(40):  # with 4 streams holding threads, unary calls still find one
        assert service.stub.GetJob(encoder_pb2.GetJobRequest(job_id=service.job.job_id), timeout=10).job.job_id
    service.jobs.shutdown(wait=False)  # a shutdown ends the open streams at once, UNAVAILABLE: watch again
    for t in threads:
        t.join(30)
    ends = [r for r in results if isinstance(r, tuple) and r[0] == grpc.StatusCode.UNAVAILABLE]
    assert len(ends) == 4 and all("is shutting down" in d and "watch it again" in d for _, d, _ in ends)


def test_a_watch_resends_the_state_as_a_keepalive(service):
    stream = service.stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=service.job.job_id), timeout=10)
    first, second, third = next(stream), next(stream), next(stream)  # keepalive_s=0.3: no change, same state
    assert first.job.job_id == second.job.job_id == third.job.job_id and third.job.state == first.job.state
    stream.cancel()


# ----------------------------------------------------------------------------------------------- defaults
def test_the_default_address_is_loopback_and_other_interfaces_need_a_token():
    assert ServiceConfig().host == "127.0.0.1"
    with pytest.raises(errors.ConfigError) as info:
        ServiceConfig(host="0.0.0.0")
    assert info.value.problems[0].where == "host" and "EDITTUNER_ALLOW_INSECURE=1" in str(info.value)
    assert ServiceConfig(host="0.0.0.0", token="t").host == "0.0.0.0"
    assert ServiceConfig(host="0.0.0.0", allow_insecure=True).allow_insecure
    with pytest.raises(errors.ConfigError, match="max_streams"):
        ServiceConfig(max_workers=16, max_streams=12)  # would leave fewer than 8 threads to unary calls


def test_a_service_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITTUNER_")}
    env |= {"EDITTUNER_HOST": "0.0.0.0", "EDITTUNER_ENCODER_PORT": "0", "EDITTUNER_STORE": str(tmp_path / "s")}
    result = subprocess.run(
        [sys.executable, "-m", "encoder_svc"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "encoder_svc cannot start" in result.stderr and "without a token" in result.stderr
    assert "EDITTUNER_ALLOW_INSECURE=1" in result.stderr
