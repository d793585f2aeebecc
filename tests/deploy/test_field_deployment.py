"""The three services as compose.yaml configures them, driven by a client on "another machine".

The environment and volumes of encoder, trainer and eval come from `docker-compose config` (the real tool); hosts
are remapped to loopback and free ports, the volumes to temporary folders, MinIO to a real S3 server, CUDA to the
CPU. A client in its own folder, whose dataset the services cannot read, trains on the seed's config and
multidatabackend shape with `edittuner train --server`, gets its LoRA back with `edittuner runs pull --server`,
and a second run uploads nothing. The model sits under EDITTUNER_MODEL_DIR at its hub id's path and the config
names no pretrained_model_name_or_path: the services find it there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from deployfiles import REQUIRED_ENV, run_compose_config
from s3server import ACCESS_KEY, SECRET_KEY, free_port
from safetensors.torch import load_file
from seed_files import SEED_CONFIG, SEED_DATA_V2

from shared.config import jsonc
from shared.data.synthetic import write_dataset
from shared.rpc.client import make_channel, wait_for_serving

pytestmark = pytest.mark.slow  # starts the services as compose configures them, with an S3 server

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"encoder": "encoder:50051", "trainer": "trainer:50052", "eval": "eval:50053"}
EDITTUNER = str(Path(sys.executable).parent / "edittuner")
TINY = [
    "max_train_steps=2",
    "gradient_accumulation_steps=1",
    "mixed_precision=no",
    "validation_step_interval=2",
    "validation_resolution=64x64",
    "validation_num_inference_steps=2",
    "num_eval_images=1",
    "model_kwargs.match_target_res=true",
    "model_kwargs.vl_reference_area=4096",
    "lora_rank=4",
]


def remap(
    env: dict[str, str], volumes: list[str], folders: dict[str, Path], hosts: dict[str, str], ports: dict[str, str]
) -> dict[str, str]:
    """A compose service's environment for a process on this host."""
    mounts = {spec.split(":")[1]: folders[spec.split(":")[1]] for spec in volumes}
    out = {}
    for key, value in env.items():
        value = str(value)
        for container, host in mounts.items():
            if value == container or value.startswith(container + "/"):
                value = str(host) + value[len(container) :]
        for name, address in hosts.items():
            value = value.replace(name, address)
        out[key] = ports.get(key, value)
    out["EDITTUNER_HOST"] = "127.0.0.1"  # loopback instead of the container's every interface
    out["EDITTUNER_DEVICE"] = "cpu"  # no GPU on this machine
    return out


@pytest.fixture(scope="module")
def field(tmp_path_factory, s3_server, tiny_models):
    tmp = tmp_path_factory.mktemp("field")
    bucket = f"edittuner-{uuid.uuid4().hex[:8]}"
    rendered = run_compose_config(
        tmp,
        {**REQUIRED_ENV, "MINIO_ROOT_USER": ACCESS_KEY, "MINIO_ROOT_PASSWORD": SECRET_KEY, "EDITTUNER_BUCKET": bucket},
    )
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    folders = {"/models": tmp / "models", "/datasets": tmp / "datasets", "/hf-cache": tmp / "hf-cache"}
    for f in folders.values():
        f.mkdir()
    shutil.copytree(tiny_models("edit-v2"), folders["/models"] / "Qwen" / "Qwen-Image-Edit-2509")  # its hub id
    grpc_ports = {name: str(free_port()) for name in SERVICES}
    hosts = {
        "minio:9000": urlsplit(s3_server).netloc,
        **{addr: f"127.0.0.1:{grpc_ports[name]}" for name, addr in SERVICES.items()},
    }
    ports = {
        **{f"EDITTUNER_{n.upper()}_PORT": p for n, p in grpc_ports.items()},
        **{f"EDITTUNER_{n.upper()}_METRICS_PORT": str(free_port()) for n in SERVICES},
    }
    procs, logs = {}, {}
    for name in SERVICES:
        svc = services[name]
        env = remap(svc["environment"], svc["volumes"], folders, hosts, ports)
        env |= {"PATH": os.environ["PATH"], "HOME": str(tmp), "EDITTUNER_WORKDIR": str(tmp / "work" / name)}
        logs[name] = tmp / f"{name}.log"
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"{name}_svc"],
            env=env,
            cwd=tmp,
            stdout=open(logs[name], "wb"),
            stderr=subprocess.STDOUT,
        )
    try:
        for name in SERVICES:
            channel = make_channel(f"127.0.0.1:{grpc_ports[name]}", token=REQUIRED_ENV["EDITTUNER_TOKEN"])
            try:
                wait_for_serving(channel, "", 120)
            except Exception:  # noqa: BLE001 - any failure to start shows the log
                raise AssertionError(f"{name}_svc did not start:\n{logs[name].read_text()[-3000:]}") from None
            finally:
                channel.close()
        yield tmp, f"127.0.0.1:{grpc_ports['trainer']}", logs, services
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(30)


def client_run(field, name: str, *extra: str) -> subprocess.CompletedProcess:
    tmp, trainer, _, _ = field
    client = tmp / "client"  # another machine: its own folder, its own data, nothing shared with the services
    data = client / "data"
    if not data.exists():
        write_dataset(data, n=3, references=3)
    entries = jsonc.loads(SEED_DATA_V2, "multidatabackend.json")
    for e in entries:
        e["instance_data_dir"] = "data/" + e["instance_data_dir"].rsplit("/", 1)[1]
        e["resolution"] = 64
    (client / "config" / "qwen_edit").mkdir(parents=True, exist_ok=True)
    (client / "config" / "qwen_edit" / "multidatabackend.json").write_text(json.dumps(entries, indent=2))
    (client / "config" / "config.json").write_text(
        SEED_CONFIG.replace('"edit-v1",      // ou "edit-v2"', '"edit-v2",      // ou "edit-v2"')
    )
    env = {**os.environ, "EDITTUNER_TOKEN": REQUIRED_ENV["EDITTUNER_TOKEN"]}
    env = {k: v for k, v in env.items() if not k.startswith(("EDITTUNER_S3", "EDITTUNER_STORE", "MINIO"))}
    return subprocess.run(
        [
            EDITTUNER,
            "train",
            "--config",
            "config/config.json",
            "--server",
            trainer,
            *TINY,
            f"output_dir=output/{name}",
            *extra,
        ],
        cwd=client,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_remote_client_trains_on_its_own_data_and_pulls_its_lora(field):
    tmp, trainer, logs, services = field
    first = client_run(field, "first")
    assert first.returncode == 0, first.stdout + first.stderr[-4000:]
    uploaded = re.findall(r"uploaded (\d+) of (\d+) files", first.stderr)
    # all four folders went up; a file already sent for another folder (same bytes) is not sent twice
    assert len(uploaded) == 4 and all(0 < int(sent) <= int(total) for sent, total in uploaded)
    assert "edittuner runs pull first DIR --server" in first.stderr
    assert not (tmp / "client" / "output").exists()  # nothing is written on the client but by a pull
    env = {**os.environ, "EDITTUNER_TOKEN": REQUIRED_ENV["EDITTUNER_TOKEN"]}
    pulled = subprocess.run(
        [EDITTUNER, "runs", "pull", "first", "lora-back", "--server", trainer, "--no-checkpoints"],
        cwd=tmp / "client",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pulled.returncode == 0, pulled.stderr
    lora = load_file(tmp / "client" / "lora-back" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in lora)
    assert (tmp / "client" / "lora-back" / "metrics.jsonl").is_file()
    model = tmp / "models" / "Qwen" / "Qwen-Image-Edit-2509"
    for name in ("encoder", "eval"):  # found where the operator put it, without pretrained_model_name_or_path
        assert f"loading from EDITTUNER_MODEL_DIR: {model}" in logs[name].read_text(), name
    worker_logs = list((tmp / "work" / "trainer").rglob("worker.log"))
    assert worker_logs and f"loading from EDITTUNER_MODEL_DIR: {model}" in worker_logs[0].read_text()

    second = client_run(field, "second")
    assert second.returncode == 0, second.stderr[-4000:]
    uploaded = re.findall(r"uploaded (\d+) of (\d+) files", second.stderr)
    assert len(uploaded) == 4 and all(sent == "0" for sent, _ in uploaded)  # the store has every file already
    assert services["trainer"]["environment"]["EDITTUNER_DATASET_ROOTS"] == "/datasets"
