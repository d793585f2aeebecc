"""Store faults survived: a real S3 server behind a loopback proxy that refuses and resets connections on purpose.

A 30 s outage in the middle of a run costs it nothing (its losses equal an uninterrupted run's); past the retry
budget the store says UNAVAILABLE naming the endpoint; a dataset bucket that does not answer is a dataset error
naming bucket and endpoint; a job record the store could not take is spooled and reconciled at the next start.
"""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
from chaosproxy import ChaosProxy
from s3server import ACCESS_KEY, SECRET_KEY, free_port

from shared import errors
from shared.config.loading import load_run_config
from shared.data.pairing import pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.service.jobs import JobManager
from shared.service.records import JobState
from shared.service.spool import RecordSpool
from shared.store.s3 import MinioStore
from shared.train import previews
from shared.train.events import TrainEvent
from shared.train.runner import train_run

pytestmark = pytest.mark.slow  # trains through a store that goes away and comes back

OUTAGE_S = 30.0


@pytest.fixture
def proxy(s3_server):
    p = ChaosProxy((urlsplit(s3_server).hostname, urlsplit(s3_server).port))
    yield p
    p.close()


def store_at(url: str, bucket: str, retry_s: float) -> MinioStore:
    return MinioStore(urlsplit(url).netloc, ACCESS_KEY, SECRET_KEY, bucket, retry_s=retry_s, connect_timeout_s=2)


def tiny_run(tmp_path, tiny_models, name: str, **overrides):
    root = write_dataset(tmp_path / "data", n=3, references=1)
    base = dict(
        max_train_steps=10,
        checkpoint_step_interval=3,
        learning_rate=1e-3,
        lora_rank=4,
        seed=3,
        output_dir=str(tmp_path / name),
    )
    cfg, _ = write_configs(tmp_path / f"cfg-{name}", root, tiny_models("edit-v2"), "edit-v2", 1, **(base | overrides))
    return load_run_config(cfg)


def test_a_run_rides_out_a_30_s_outage_with_the_losses_of_an_uninterrupted_run(tmp_path, tiny_models, s3_server, proxy):
    run = tiny_run(tmp_path, tiny_models, "outage")
    direct = store_at(s3_server, f"direct-{uuid.uuid4().hex[:8]}", retry_s=10)
    reference = train_run(run, direct, previews=previews.NONE, copy_to_output_dir=False).summary.losses

    outage: list[threading.Thread] = []

    def events(
        e: TrainEvent,
    ) -> None:  # the outage starts after step 2: checkpoints (step 3, 6, 9) and reads fall in it
        if e.is_step and e.step == 2 and not outage:
            outage.append(proxy.outage(OUTAGE_S))

    flaky = store_at(proxy.url, f"flaky-{uuid.uuid4().hex[:8]}", retry_s=120)
    started = time.monotonic()
    result = train_run(run, flaky, events=events, previews=previews.NONE, copy_to_output_dir=False)
    assert outage and proxy.refused_or_reset > 0, "the outage must have hit the run"
    assert time.monotonic() - started >= OUTAGE_S / 2  # it really waited the store out
    assert result.summary.losses == reference  # bit for bit: nothing was lost or redone differently
    assert result.summary.steps == 10 and result.summary.checkpoints == [3, 6, 9]
    assert flaky.is_committed("runs/outage/checkpoints/step-9") and flaky.exists(
        "runs/outage/lora/pytorch_lora_weights.safetensors"
    )


def test_past_the_retry_budget_the_store_is_unavailable_naming_the_endpoint(s3_server, proxy):
    store = store_at(proxy.url, f"budget-{uuid.uuid4().hex[:8]}", retry_s=1.5)
    store.put_bytes("a", b"1")
    proxy.go_down("refuse")
    started = time.monotonic()
    with pytest.raises(errors.Unavailable, match=rf"http://127.0.0.1:{proxy.port} is unreachable.*retried for 1.5 s"):
        store.get_bytes("a")
    assert time.monotonic() - started >= 1.5  # it retried for the budget before giving up
    proxy.come_up()
    assert store.get_bytes("a") == b"1"


def test_an_unreachable_dataset_bucket_is_a_dataset_error_naming_bucket_and_endpoint(
    tmp_path, tiny_models, monkeypatch
):
    monkeypatch.setenv("EDITTUNER_STORE_RETRY_S", "1")
    root = write_dataset(tmp_path / "data", n=2, references=1)
    cfg, data = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1)
    port = free_port()  # nothing listens there
    text = data.read_text()
    import json

    entries = json.loads(text)
    for e in entries:
        e.pop("instance_data_dir")
        e.update(
            type="aws",
            aws_bucket_name="their-images",
            aws_data_prefix=e["id"],
            aws_endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="k",
            aws_secret_access_key="s",
        )
    data.write_text(json.dumps(entries))
    with pytest.raises(errors.DatasetError) as info:
        pair_datasets(load_run_config(cfg))
    message = str(info.value)
    assert f"bucket 'their-images' at http://127.0.0.1:{port} is unreachable" in message
    assert "retried for 1 s" in message and "aws_endpoint_url" in message


def test_a_record_the_store_could_not_take_is_spooled_and_reconciled_at_the_next_start(tmp_path, s3_server, proxy):
    bucket = f"jobs-{uuid.uuid4().hex[:8]}"
    spool = RecordSpool(tmp_path / "spool")
    go = threading.Event()

    def fails_during_the_outage(job, ctx):
        go.wait(30)
        raise errors.InvalidInput("the run failed")

    m = JobManager(
        store_at(proxy.url, bucket, retry_s=1.0), "trainer", fails_during_the_outage, spool=spool, spool_retry_s=3600
    )
    m.start()
    job = m.submit("train", {}, "r")
    deadline = time.monotonic() + 30
    while m.get(job.job_id).state != JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proxy.go_down("refuse")  # the final record's write will fail, retries and all
    go.set()
    while not spool.has(job.job_id):
        assert time.monotonic() < deadline, "the failed record was never spooled"
        time.sleep(0.02)
    m.shutdown(wait=True, grace_s=5)
    proxy.come_up()
    stale = store_at(s3_server, bucket, retry_s=5).get_json(f"jobs/trainer/{job.job_id}.json")
    assert stale["state"] == "running"  # what the store says: the run would be run again without the spool
    again = JobManager(store_at(s3_server, bucket, retry_s=5), "trainer", fails_during_the_outage, spool=spool)
    record = again.get(job.job_id)
    assert record.state == JobState.FAILED and record.error == "the run failed"
    assert store_at(s3_server, bucket, retry_s=5).get_json(f"jobs/trainer/{job.job_id}.json")["state"] == "failed"
    assert not spool.has(job.job_id)
