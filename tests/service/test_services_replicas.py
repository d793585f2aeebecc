"""trainer_svc fans an encode out to the encoder replicas it is given (EDITTUNER_ENCODER_ADDRS): two encoder_svc
processes encode disjoint shards of the run's dataset at once, the first merges their manifests and writes the
index, and the run trains on it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from shared.config.loading import load_run_config, read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.rpc import encoder_pb2, trainer_pb2
from shared.rpc.client import Client
from shared.service.common import files_to_proto, state_name
from shared.service.local_stack import free_port, start_local_stack
from shared.store.local import LocalStore

pytestmark = pytest.mark.slow  # starts encoder replicas and the trainer


def test_two_encoder_replicas_split_the_encode_of_a_run(tmp_path, tiny_models):
    root = write_dataset(tmp_path / "data", n=4, references=1)
    cfg, data = write_configs(
        tmp_path / "cfg",
        root,
        tiny_models("edit-v2"),
        "edit-v2",
        1,
        max_train_steps=1,
        checkpoint_step_interval=1,
        validation_step_interval=100,
        num_eval_images=1,
        output_dir=str(tmp_path / "out" / "replicas"),
        vae_batch_size=1,
    )
    _, items, _, _ = DatasetEncoder(load_run_config(cfg), LocalStore(tmp_path / "plan")).prepare()
    env = {**os.environ, "EDITTUNER_WORKDIR": str(tmp_path / "work")}
    stack = start_local_stack(str(tmp_path / "store"), tmp_path / "logs", env=env, services=("encoder", "eval"))
    second = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "logs" / "encoder-2.log", "ab")
    replica = subprocess.Popen(
        [sys.executable, "-m", "encoder_svc"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **stack.env,
            "EDITTUNER_ENCODER_PORT": second.rsplit(":", 1)[1],
            "EDITTUNER_ENCODER_METRICS_PORT": str(free_port()),
        },
    )
    try:
        stack.procs["encoder-2"] = replica
        stack.addresses["encoder-2"] = second
        stack.wait_ready("encoder-2")
        stack.env["EDITTUNER_ENCODER_ADDRS"] = f"{stack.addresses['encoder']},{second}"
        stack.launch("trainer")
        stack.wait_ready("trainer")
        c = Client("trainer", stack.addresses["trainer"])
        job = c.call(
            "StartRun",
            trainer_pb2.StartRunRequest(
                request_id=uuid.uuid4().hex, files=files_to_proto(read_config_files(cfg, data))
            ),
        ).job
        final = c.watch(job.job_id, lambda j: None)
        assert state_name(final) == "succeeded", final.error
        jobs = {name: Client("encoder", stack.addresses[name]).list() for name in ("encoder", "encoder-2")}
        shards = [j for js in jobs.values() for j in js if "shard" in j.request_id]
        assert sorted(j.request_id.rsplit("-", 3)[1] for j in shards) == ["0", "1"]
        assert all(state_name(j) == "succeeded" and int(j.outputs["encoded"]) > 0 for j in shards)
        assert sum(int(j.outputs["encoded"]) for j in shards) == len(items)  # every entry once, by one replica
        (fin,) = [j for j in jobs["encoder"] if j.request_id.endswith("-finalize")]
        assert fin.outputs["index"].startswith("cache/index/") and int(fin.outputs["encoded"]) == 0
        store = LocalStore(tmp_path / "store")
        assert not [k for k in store.list("cache/") if "manifest.shard-" in k]
        assert store.exists(final.outputs["lora"])
        bad = Client("encoder", second)
        try:
            bad.call(
                "SubmitEncode",
                encoder_pb2.SubmitEncodeRequest(
                    request_id="x", files=files_to_proto(read_config_files(cfg, data)), shard_index=2, shard_count=2
                ),
            )
        except Exception as e:  # noqa: BLE001
            assert "shard_index 2 with shard_count 2" in str(e) and "InvalidInput" in type(e).__name__
        else:
            raise AssertionError("a shard_index past shard_count was accepted")
    finally:
        stack.stop()
        log.close()
