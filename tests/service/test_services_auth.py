"""A stack with a bearer token: calls without it are refused; the services' calls to each other carry it."""

from __future__ import annotations

import os
import uuid

import grpc
import pytest

from shared.config.loading import read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.rpc import trainer_pb2
from shared.rpc.client import Client
from shared.service.common import files_to_proto, state_name
from shared.service.local_stack import start_local_stack

pytestmark = pytest.mark.slow  # starts the services with tokens and TLS


def test_token_is_required_and_propagated(tmp_path, tiny_models, monkeypatch):
    token = uuid.uuid4().hex
    env = {**os.environ, "EDITTUNER_TOKEN": token, "EDITTUNER_WORKDIR": str(tmp_path / "work")}
    root = write_dataset(tmp_path / "data", n=2, references=1)
    cfg, data = write_configs(
        tmp_path / "cfg",
        root,
        tiny_models("edit-v1"),
        "edit-v1",
        1,
        max_train_steps=2,
        checkpoint_step_interval=2,
        validation_step_interval=2,
        num_eval_images=1,
        output_dir=str(tmp_path / "out" / "auth"),
    )
    with start_local_stack(str(tmp_path / "store"), tmp_path / "logs", env=env) as stack:
        anonymous = Client("trainer", stack.addresses["trainer"], token="")
        with pytest.raises(grpc.RpcError) as e:
            anonymous.stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = Client("trainer", stack.addresses["trainer"], token="not-the-token")
        with pytest.raises(grpc.RpcError) as e:
            wrong.stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        c = Client("trainer", stack.addresses["trainer"], token=token)
        job = c.call(
            "StartRun",
            trainer_pb2.StartRunRequest(
                request_id=uuid.uuid4().hex, files=files_to_proto(read_config_files(cfg, data))
            ),
        ).job
        final = c.watch(job.job_id, lambda j: None)
        assert state_name(final) == "succeeded", final.error  # encode via encoder_svc needed the token too
        assert final.outputs["validations"].startswith("2:") and "missed_validations" not in final.outputs
