"""A busy encoder never fails a user's run: encoder_svc at its stream limit with a full queue, held by another
client, while a run is started on trainer_svc (a real process); the run waits, its progress saying so, and
succeeds once the other client lets go. With a short wait budget it fails naming the encoder and its answer.
And a SubmitEncode while the store is down is answered UNAVAILABLE naming the store before the client's deadline.

encoder_svc runs in this process (its real ``make``, job manager and server, on loopback) so that the other
client's jobs can be held: the executor waits on a gate for their request ids, and runs every other job as
encoder_svc does. The store-down test runs encoder_svc as its own process, as in a container.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from urllib.parse import urlsplit

import grpc
import pytest
from chaosproxy import ChaosProxy
from prometheus_client import CollectorRegistry
from s3server import ACCESS_KEY, SECRET_KEY

from shared.config.loading import read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.rpc import encoder_pb2, encoder_pb2_grpc, trainer_pb2
from shared.rpc.client import Client, make_channel
from shared.rpc.patience import pushback_s
from shared.rpc.server import ServiceConfig, build_server
from shared.service.common import files_to_proto, state_name
from shared.service.jobs import JobManager
from shared.service.local_stack import LocalStack, free_port, stack_env, start_local_stack
from shared.service.metrics import Metrics
from shared.store.local import LocalStore
from shared.store.s3 import MinioStore

pytestmark = pytest.mark.slow  # starts the services and holds them busy

HELD = "held-by-another-client"


class HeldEncoder:
    """encoder_svc with 2 client streams, 2 peer streams and a queue of 2; jobs of request id ``HELD*`` wait on
    ``gate``, every other job is encoded for real."""

    def __init__(self, store_dir):
        from encoder_svc.__main__ import make

        self.gate = threading.Event()
        config = ServiceConfig(
            host="127.0.0.1",
            port=0,
            grace_s=1,
            max_workers=16,
            max_streams=2,
            peer_streams=2,
            max_queued=2,
            keepalive_s=1,
            dataset_roots=("/",),
            model_roots=("/",),
        )
        store = LocalStore(store_dir)
        _core, execute, name, add = make(config, store, Metrics(CollectorRegistry()))

        def gated(job, ctx):
            if not job.request_id.startswith(HELD):
                return execute(job, ctx)
            while not self.gate.wait(0.05):
                ctx.check_cancelled()
            return {}

        self.jobs = JobManager(store, "encoder", gated, max_queued=config.max_queued)
        self.running = build_server(config, lambda s: add(self.jobs, s), [name], registry=CollectorRegistry())
        self.jobs.start()
        self.running.set_serving(True)
        self.address = f"127.0.0.1:{self.running.port}"

    def close(self) -> None:
        self.gate.set()
        self.running.stop(0)
        self.jobs.shutdown(wait=True, grace_s=2)


def trainer(tmp, name: str, store: str, encoder_address: str, wait_s: float) -> LocalStack:
    """trainer_svc as its own process, talking to ``encoder_address``, with no eval_svc."""
    addresses = {"trainer": f"127.0.0.1:{free_port()}", "encoder": encoder_address, "eval": "127.0.0.1:1"}
    env = stack_env(
        store,
        addresses,
        {s: free_port() for s in addresses},
        {**os.environ, "EDITTUNER_WORKDIR": str(tmp / f"work-{name}"), "EDITTUNER_PEER_WAIT_S": str(wait_s)},
    )
    env.pop("EDITTUNER_EVAL_ADDR")
    (tmp / "logs").mkdir(exist_ok=True)
    stack = LocalStack(addresses, {}, tmp / "logs", env)
    stack.launch("trainer")
    return stack


def wait_until(what: str, condition, timeout_s: float = 300.0):
    until = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_run_waits_for_a_busy_encoder_and_succeeds_once_it_is_free(tmp_path, tiny_models):
    root = write_dataset(tmp_path / "data", n=2, references=1)
    cfg, data = write_configs(
        tmp_path / "cfg",
        root,
        tiny_models("edit-v2"),
        "edit-v2",
        1,
        max_train_steps=2,
        checkpoint_step_interval=2,
        lora_rank=4,
        output_dir=str(tmp_path / "out"),
    )
    files = files_to_proto(read_config_files(cfg, data))
    encoder = HeldEncoder(tmp_path / "store")
    patient = trainer(tmp_path, "patient", str(tmp_path / "store"), encoder.address, wait_s=600)
    hasty = trainer(tmp_path, "hasty", str(tmp_path / "store-hasty"), encoder.address, wait_s=3)
    other = make_channel(encoder.address)  # the other client: a script, a dashboard
    stub = encoder_pb2_grpc.EncoderServiceStub(other)
    streams = []
    try:
        # The other client takes the encoder's worker, fills its queue and holds every client stream.
        held = [
            stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id=f"{HELD}-{i}", files=files), timeout=10).job
            for i in range(1)
        ]
        wait_until("the held job to run", lambda: encoder.jobs.get(held[0].job_id).state.value == "running", 30)
        held += [
            stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id=f"{HELD}-{i}", files=files), timeout=10).job
            for i in (1, 2)
        ]
        for _ in range(2):
            streams.append(stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=held[0].job_id)))
            next(streams[-1])
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id="one-more", files=files), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback_s(refused.value) == 5.0
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.WatchJob(encoder_pb2.WatchJobRequest(job_id=held[0].job_id)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        patient.wait_ready("trainer")
        hasty.wait_ready("trainer")
        runs = {}
        for name, stack in (("patient", patient), ("hasty", hasty)):
            c = Client("trainer", stack.addresses["trainer"])
            runs[name] = (
                c,
                c.call("StartRun", trainer_pb2.StartRunRequest(request_id=uuid.uuid4().hex, files=files)).job,
            )

        # With a 3 s budget the run fails, naming the encoder and what it answered.
        c, job = runs["hasty"]
        failed = c.watch(job.job_id, lambda j: None)
        assert state_name(failed) == "failed"
        assert (
            f"encoder_svc at {encoder.address} answered RESOURCE_EXHAUSTED: queue full: 2 encoder jobs are "
            "waiting (max_queued=2)" in failed.error
        ), failed.error
        assert "EDITTUNER_PEER_WAIT_S" in failed.error

        # With the default budget the run waits, and says so.
        c, job = runs["patient"]
        waiting = wait_until(
            "the run to say it waits",
            lambda: (j := c.get(job.job_id)).progress.message.startswith("waiting for encoder_svc: queue full") and j,
            120,
        )
        assert state_name(waiting) == "running" and waiting.progress.phase == "encode"
        assert "retry in" in waiting.progress.message

        # The other client lets go: its queued jobs cancelled, its running one done, its streams closed.
        for j in held[1:]:
            stub.CancelJob(encoder_pb2.CancelJobRequest(job_id=j.job_id), timeout=10)
        encoder.gate.set()
        for call in streams:
            call.cancel()
        final = c.watch(job.job_id, lambda j: None)
        assert state_name(final) == "succeeded", final.error
        assert final.outputs["steps"] == "2" and final.outputs["lora"]
        ours = [r for r in encoder.jobs.list()[0] if not r.request_id.startswith(HELD)]
        assert [state_name_of(r) for r in ours] == ["succeeded"]  # the run's encode, submitted once
    finally:
        for call in streams:
            call.cancel()
        other.close()
        patient.stop()
        hasty.stop()
        encoder.close()


def state_name_of(record) -> str:
    return record.state.value


def test_a_submit_while_the_store_is_down_is_unavailable_naming_it_within_the_deadline(
    tmp_path, tiny_models, s3_server
):
    proxy = ChaosProxy((urlsplit(s3_server).hostname, urlsplit(s3_server).port))
    bucket = f"down-{uuid.uuid4().hex[:8]}"
    root = write_dataset(tmp_path / "data", n=2, references=1)
    cfg, data = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1)
    files = files_to_proto(read_config_files(cfg, data))
    env = {
        **os.environ,
        "EDITTUNER_WORKDIR": str(tmp_path / "work"),
        "EDITTUNER_S3_ACCESS_KEY": ACCESS_KEY,
        "EDITTUNER_S3_SECRET_KEY": SECRET_KEY,
    }  # the store's retry budget stays its default, 120 s
    stack = start_local_stack(
        f"http://127.0.0.1:{proxy.port}/{bucket}", tmp_path / "logs", env=env, services=("encoder",)
    )
    try:
        stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(stack.addresses["encoder"]))
        proxy.go_down("refuse")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id="while-down", files=files), timeout=5.0)
        took = time.monotonic() - started
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert took < 5.0
        assert f"object store at http://127.0.0.1:{proxy.port} is unreachable" in refused.value.details()
        assert "retry in 5 s" in refused.value.details() and pushback_s(refused.value) == 5.0
        proxy.come_up()
        job = stub.SubmitEncode(encoder_pb2.SubmitEncodeRequest(request_id="while-down", files=files), timeout=30.0).job
        final = Client("encoder", stack.addresses["encoder"]).watch(job.job_id, lambda j: None)
        assert state_name(final) == "succeeded", final.error
        store = MinioStore(f"127.0.0.1:{proxy.port}", ACCESS_KEY, SECRET_KEY, bucket)
        assert int(final.outputs["encoded"]) > 0 and store.list("cache/index/")
    finally:
        stack.stop()
        proxy.close()
