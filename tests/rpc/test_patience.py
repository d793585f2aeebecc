"""Waiting out a busy server: the retry hint followed, the budget kept, peers given their own stream slots, a refused
Watch turned into polling, and a server that answers UNAVAILABLE before its client's deadline instead of retrying
its store past it. Real servers on loopback (port 0), the real encoder servicer over a job manager."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry

from shared import deadline, errors
from shared.config.loading import read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.rpc import common_pb2, encoder_pb2, encoder_pb2_grpc
from shared.rpc.client import Client, make_channel
from shared.rpc.patience import Patience, pushback_s
from shared.rpc.server import ServiceConfig, build_server
from shared.service.common import ServerPaths, files_to_proto
from shared.service.jobs import JobManager
from shared.store.local import LocalStore

SERVICE = "edittuner.encoder.v1.EncoderService"


class Encoder:
    """encoder_svc's servicer and job manager behind build_server; jobs wait on ``gate`` (held by the test)."""

    def __init__(self, tmp: Path, *, store=None, max_queued: int = 1, **config):
        self.gate = threading.Event()

        def execute(job, ctx):
            while not self.gate.wait(0.05):
                ctx.check_cancelled()
            return {"done": job.request_id}

        from encoder_svc.service import EncoderServicer

        self.jobs = JobManager(store or LocalStore(tmp / "store"), "encoder", execute, max_queued=max_queued)
        self.jobs.start()
        paths = ServerPaths(dataset_roots=("/",), model_roots=("/",))
        servicer = EncoderServicer(self.jobs, SimpleNamespace(paths=paths), keepalive_s=0.3)
        cfg = ServiceConfig(
            host="127.0.0.1",
            port=0,
            grace_s=0.5,
            max_workers=16,
            keepalive_s=0.3,
            **({"max_streams": 2, "peer_streams": 2} | config),
        )
        self.running = build_server(
            cfg,
            lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s),
            [SERVICE],
            registry=CollectorRegistry(),
        )
        self.address = f"127.0.0.1:{self.running.port}"

    def submit(self, request_id: str):
        return self.jobs.submit("encode", {"n": request_id}, request_id)

    def fill(self):
        """One job running (held by the gate), the queue (max_queued=1) full behind it; returns the queued one."""
        running = self.submit("running")
        until = time.monotonic() + 30
        while self.jobs.get(running.job_id).state.value != "running":
            assert time.monotonic() < until, "the first job never started"
            time.sleep(0.01)
        return self.submit("queued")

    def close(self) -> None:
        self.gate.set()
        self.running.stop(0)
        self.jobs.shutdown(wait=True, grace_s=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models):
    """A run's config files as a request carries them (a tiny model and dataset, so the servicer accepts them)."""
    tmp = tmp_path_factory.mktemp("patience")
    cfg, data = write_configs(
        tmp / "cfg", write_dataset(tmp / "data", n=2, references=1), tiny_models("edit-v2"), "edit-v2", 1
    )
    return files_to_proto(read_config_files(cfg, data))


@pytest.fixture
def encoder(tmp_path):
    e = Encoder(tmp_path)
    yield e
    e.close()


def hold_streams(channel: grpc.Channel, job_id: str, n: int) -> list:
    """``n`` open Watch streams on ``job_id`` (each has had its first event)."""
    stub = encoder_pb2_grpc.EncoderServiceStub(channel)
    calls = []
    for _ in range(n):
        call = stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=job_id))
        next(call)
        calls.append(call)
    return calls


def submit(stub, files, request_id: str, timeout: float = 5.0):
    return stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id=request_id, files=files), timeout=timeout)


def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint(encoder, files):
    encoder.fill()
    stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(encoder.address))
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, files, "third")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full: 1 encoder jobs are waiting (max_queued=1); retry in 5 s" in e.value.details()
    assert pushback_s(e.value) == 5.0


def test_patience_follows_the_hint_says_what_it_waits_for_and_gets_through(encoder, files):
    queued = encoder.fill()
    stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(encoder.address))
    waits, slept = [], []

    def sleep(seconds: float) -> None:  # the queue frees while the client waits
        slept.append(seconds)
        encoder.jobs.cancel(queued.job_id)

    patience = Patience(
        f"encoder_svc at {encoder.address}", budget_s=60, on_wait=waits.append, sleep=sleep, rng=random.Random(0)
    )
    job = patience.call(
        stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="mine", files=files), timeout_s=5
    ).job
    assert job.request_id == "mine"
    assert len(waits) == 1 and waits[0].startswith(
        "waiting for encoder_svc: queue full: 1 encoder jobs are waiting (max_queued=1); retry in "
    )
    assert 4.0 <= slept[0] <= 6.0  # the server's 5 s hint, with jitter, not the 0.5 s first backoff


def test_past_the_budget_the_call_fails_naming_the_peer_and_its_answer(encoder, files):
    encoder.fill()
    stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(encoder.address))
    slept, now = [], [0.0]

    def sleep(seconds: float) -> None:  # a clock that moves only while the client waits
        slept.append(seconds)
        now[0] += seconds

    patience = Patience(
        f"encoder_svc at {encoder.address}",
        budget_s=12,
        sleep=sleep,
        clock=lambda: now[0],
        budget_name="EDITTUNER_PEER_WAIT_S",
        rng=random.Random(0),
    )
    with pytest.raises(errors.Unavailable) as e:
        patience.call(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="mine", files=files), timeout_s=5)
    assert f"encoder_svc at {encoder.address} answered RESOURCE_EXHAUSTED: queue full" in str(e.value)
    assert "the wait budget is 12 s, EDITTUNER_PEER_WAIT_S" in str(e.value)
    assert len(slept) == 3 and all(4.0 <= x <= 6.0 for x in slept[:2])  # the server's 5 s hint, with jitter,
    assert sum(slept) == pytest.approx(12.0)  # and a last wait cut to end with the budget, then a last try


def test_an_answer_that_is_not_later_is_final_at_once(encoder):
    stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(encoder.address))
    slept = []
    patience = Patience("encoder_svc", budget_s=60, sleep=slept.append)
    with pytest.raises(grpc.RpcError) as e:
        patience.call(stub.GetJob, encoder_pb2.GetJobRequest(job_id="0123456789ab"), timeout_s=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and slept == []


def test_peers_have_stream_slots_beyond_the_clients_limit(encoder):
    job = encoder.submit("running")
    client = make_channel(encoder.address)
    held = hold_streams(client, job.job_id, 2)  # the clients' limit (max_streams=2)
    with pytest.raises(grpc.RpcError) as e:
        hold_streams(client, job.job_id, 1)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 open streams" in e.value.details()
    peer = make_channel(encoder.address, peer="trainer")
    held += hold_streams(peer, job.job_id, 2)  # peer_streams=2 more, for services only
    with pytest.raises(grpc.RpcError) as e:
        hold_streams(peer, job.job_id, 1)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        "4 open streams, its limit for services (EDITTUNER_MAX_STREAMS + EDITTUNER_PEER_STREAMS)" in e.value.details()
    )
    stub = encoder_pb2_grpc.EncoderServiceStub(client)
    assert stub.GetJob(encoder_pb2.GetJobRequest(job_id=job.job_id), timeout=5).job.job_id == job.job_id
    for call in held:
        call.cancel()


def test_with_a_peer_token_only_its_holders_get_the_peer_slots(tmp_path):
    e = Encoder(tmp_path, max_streams=1, peer_streams=1, peer_token="s3cret")
    try:
        job = e.submit("running")
        hold = hold_streams(make_channel(e.address), job.job_id, 1)
        with pytest.raises(grpc.RpcError):  # the header without the token: a client like any other
            hold_streams(make_channel(e.address, peer="trainer"), job.job_id, 1)
        hold += hold_streams(make_channel(e.address, peer="s3cret"), job.job_id, 1)
        for call in hold:
            call.cancel()
    finally:
        e.close()


def test_a_refused_watch_becomes_polling_until_the_job_ends(tmp_path):
    e = Encoder(tmp_path, max_streams=1, peer_streams=0)
    try:
        job = e.submit("running")
        held = hold_streams(make_channel(e.address), job.job_id, 1)
        stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(e.address, peer="trainer"))
        seen, slept = [], []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            if len(slept) == 2:
                e.gate.set()  # the job finishes while the client polls

        patience = Patience("encoder_svc", budget_s=60, sleep=sleep)
        final = patience.watch_job(stub, encoder_pb2, job.job_id, lambda j: seen.append(j.state), timeout_s=5)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED and final.outputs["done"] == "running"
        assert seen[0] == common_pb2.JOB_STATE_RUNNING and len(seen) >= 3  # polled, not streamed
        assert all(s >= 5.0 for s in slept)  # every poll after the server's 5 s hint
        for call in held:
            call.cancel()
    finally:
        e.close()


def test_the_cli_client_follows_the_hint_and_fails_fast_on_an_unreachable_server(encoder, files, caplog):
    queued = encoder.fill()
    c = Client("encoder", encoder.address)
    c.patience.sleep = lambda seconds: encoder.jobs.cancel(queued.job_id)
    with caplog.at_level("WARNING", logger="shared.rpc.client"):
        job = c.call("SubmitEncode", encoder_pb2.SubmitEncodeRequest(request_id="cli", files=files)).job
    assert job.request_id == "cli"
    assert "waiting for encoder_svc: queue full" in caplog.text
    gone = Client("encoder", "127.0.0.1:1", wait_s=60)
    started = time.monotonic()
    with pytest.raises(errors.Unavailable, match="is not reachable"):
        gone.call("GetJob", encoder_pb2.GetJobRequest(job_id="0123456789ab"))
    assert time.monotonic() - started < 10  # no hint from a server that is not there: no waiting


def test_a_deadline_bounds_the_retry_budget_of_what_runs_under_it():
    assert deadline.budget(120.0) == (120.0, False)
    with deadline.serving(5.0):
        left, bounded = deadline.budget(120.0)
        assert bounded and 3.9 < left <= 4.0
        assert deadline.budget(2.0) == (2.0, False)
    with deadline.serving(None):
        assert deadline.budget(120.0) == (120.0, False)
    assert deadline.remaining() is None
