"""What the deployment tests share: where the assets are, the metric names the services export, the variables
compose.yaml requires, the Kubernetes manifests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prom import require_tool

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
    "edittuner_trainer_steps_total",
    "edittuner_trainer_loss",
    "edittuner_trainer_samples_per_second",
    "edittuner_trainer_learning_rate",
    "edittuner_gpu_memory_bytes",
    "edittuner_encoder_images_total",
    "edittuner_encoder_cache_hits_total",
    "edittuner_jobs",
    "grpc_server_handled_total",
    "edittuner_eval_psnr_decibels",
    "edittuner_eval_heldout_loss",
}
HISTOGRAMS = {
    "edittuner_trainer_step_seconds",
    "edittuner_trainer_data_wait_seconds",
    "edittuner_trainer_checkpoint_save_seconds",
    "edittuner_eval_render_seconds",
    "grpc_server_handling_seconds",
}
ALLOWED_SERIES = METRICS | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

# Dummy values for the variables compose.yaml requires (${VAR:?...}).
REQUIRED_ENV = {
    "MINIO_ROOT_USER": "dummy-user",
    "MINIO_ROOT_PASSWORD": "dummy-password-123",
    "GRAFANA_ADMIN_PASSWORD": "dummy-grafana",
    "EDITTUNER_TOKEN": "dummy-token-0123456789",
}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def services(compose: dict) -> dict:
    return compose["services"]


def row_panels(dashboard: dict, title: str) -> list[dict]:
    """The panels under the dashboard's expanded row ``title``, up to the next row."""
    start = next(i for i, p in enumerate(dashboard["panels"]) if p["type"] == "row" and p["title"] == title)
    panels = []
    for panel in dashboard["panels"][start + 1 :]:
        if panel["type"] == "row":
            break
        panels.append(panel)
    return panels


def k8s_docs() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


# Environment variable names that hold credentials: never a literal value in compose.yaml or the manifests.
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return [require_tool("docker-compose")]


def run_compose_config(tmp_path, env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    empty_env_file = tmp_path / "empty.env"  # ignore a developer's own .env
    empty_env_file.write_text("")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDITTUNER_", "MINIO_", "GRAFANA_", "COMPOSE_", "PROMETHEUS_"))
    }
    env.update(env_overrides)
    return subprocess.run(
        compose_command() + ["--env-file", str(empty_env_file), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
