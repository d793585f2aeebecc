"""The whole flow through the three services with the MinIO store against a real S3 server, scraped by a real
Prometheus: steps, loss and gRPC calls must be queryable."""

from __future__ import annotations

import os
import time
import uuid
from urllib.parse import urlsplit

import pytest
from prom import require_tool, start_prometheus
from s3server import ACCESS_KEY, SECRET_KEY
from safetensors.torch import load as load_safetensors

from shared.cli.remote import wait_for_validations
from shared.config.loading import read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.rpc import trainer_pb2
from shared.rpc.client import Client
from shared.service.common import files_to_proto, state_name
from shared.service.local_stack import start_local_stack
from shared.store.s3 import MinioStore

pytestmark = pytest.mark.slow  # starts the services on an S3 server


def settled(prom, expr: str, want: float, timeout: float = 30.0) -> float:
    """The query's value once a scrape taken after the event shows it (older scrapes may still be the latest)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        samples = prom.query(expr)
        value = float(samples[0]["value"][1]) if samples else None
        if value == want:
            break
        time.sleep(0.5)
    return value


def test_minio_flow_scraped_by_prometheus(tmp_path, s3_server, tiny_models):
    require_tool("prometheus")
    bucket = f"edittuner-{uuid.uuid4().hex[:8]}"
    host = urlsplit(s3_server).netloc
    env = {
        **os.environ,
        "EDITTUNER_S3_ACCESS_KEY": ACCESS_KEY,
        "EDITTUNER_S3_SECRET_KEY": SECRET_KEY,
        "EDITTUNER_WORKDIR": str(tmp_path / "work"),
    }
    root = write_dataset(tmp_path / "data", n=3, references=2)
    cfg, data = write_configs(
        tmp_path / "cfg",
        root,
        tiny_models("edit-v2"),
        "edit-v2",
        2,
        max_train_steps=6,
        checkpoint_step_interval=3,
        validation_step_interval=6,
        num_eval_images=1,
        output_dir=str(tmp_path / "out" / "minio-run"),
    )
    with (
        start_local_stack(f"minio://{host}/{bucket}", tmp_path / "logs", env=env) as stack,
        start_prometheus({s: [f"127.0.0.1:{p}"] for s, p in stack.metrics_ports.items()}) as prom,
    ):
        c = Client("trainer", stack.addresses["trainer"])
        job = c.call(
            "StartRun",
            trainer_pb2.StartRunRequest(
                request_id=uuid.uuid4().hex, files=files_to_proto(read_config_files(cfg, data))
            ),
        ).job
        final = c.watch(job.job_id, lambda j: None)
        assert state_name(final) == "succeeded", final.error
        [render] = wait_for_validations(final, stack.addresses["eval"])
        assert state_name(render) == "succeeded", render.error
        store = MinioStore(host, ACCESS_KEY, SECRET_KEY, bucket)
        lora = load_safetensors(store.get_bytes("runs/minio-run/lora/pytorch_lora_weights.safetensors"))
        assert len(lora) == 16
        assert store.is_committed("runs/minio-run/checkpoints/step-6")
        assert store.list("runs/minio-run/validation/step-6")[0].endswith(".png")
        assert any(k.startswith("cache/index/") for k in store.list("cache"))
        assert settled(prom, 'edittuner_trainer_steps_total{job="trainer"}', 6) == 6
        loss = prom.wait_for('edittuner_trainer_loss{job="trainer"}', timeout=30)
        assert float(loss[0]["value"][1]) > 0
        assert settled(prom, 'grpc_server_handled_total{grpc_method="StartRun",grpc_code="OK"}', 1) == 1
        # latents of 3 targets and 6 references, and 3 caption embeddings
        assert settled(prom, 'edittuner_encoder_images_total{job="encoder"}', 12) == 12
        assert settled(prom, 'edittuner_jobs{service="trainer",state="succeeded"}', 1) == 1
        assert settled(prom, 'sum(edittuner_trainer_step_seconds_count{job="trainer"})', 6) == 6
