"""A tiny CPU run's own numbers reach the metrics the dashboard's Run row shows: the trainer's loss, step seconds
and data wait from the worker's events (fed to the metrics as trainer_svc feeds them), the validation PSNRs and
held-out loss from eval_svc's render; read back from a real /metrics endpoint and through a real Prometheus
evaluating the Run row's queries."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from deployfiles import DASHBOARD, row_panels
from prom import require_tool, start_prometheus
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from eval_svc.service import EvalCore
from shared.config.loading import load_run_config, read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.service.common import files_to_params
from shared.service.metrics import Metrics
from shared.service.records import JobRecord, JobState
from shared.store.local import LocalStore
from shared.train.events import TrainEvent
from shared.train.trainer import Trainer

STEPS = 4
BATCH = 1  # train_batch_size x gradient_accumulation_steps, what trainer_svc passes with each event


class _Ctx:
    """The part of a job context an executor uses."""

    def progress(self, **fields) -> None:
        pass

    def set_output(self, key: str, value: str) -> None:
        pass


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models):
    """Trains STEPS steps, then eval_svc's core renders the exported LoRA: the events, the run's metrics.jsonl,
    the render's metrics.json and the eval service's metrics."""
    tmp = tmp_path_factory.mktemp("run-metrics")
    root = write_dataset(tmp / "data", n=3, references=1)
    cfg, data = write_configs(
        tmp / "cfg",
        root,
        tiny_models("edit-v2"),
        "edit-v2",
        1,
        max_train_steps=STEPS,
        checkpoint_step_interval=STEPS,
        num_eval_images=1,
        lora_rank=4,
        seed=3,
        output_dir=str(tmp / "out" / "live"),
    )
    store = LocalStore(tmp / "store")
    DatasetEncoder(load_run_config(cfg), store).encode()
    events: list[TrainEvent] = []
    trainer = Trainer(load_run_config(cfg), store, events=events.append)
    trainer.setup()
    summary = trainer.train()
    [lora] = [k for k in summary.lora_keys if k.endswith("/pytorch_lora_weights.safetensors")]
    eval_metrics = Metrics(CollectorRegistry())
    params = files_to_params(read_config_files(cfg, data)) | {
        "run_id": summary.run_id,
        "step": STEPS,
        "lora_key": lora,
        "index_keys": [],
    }
    now = time.time()
    outputs = EvalCore(store, eval_metrics, idle_release_s=0).execute(
        JobRecord("job-1", "req-1", "render", JobState.RUNNING, params, now, now), _Ctx()
    )
    history = [json.loads(line) for line in store.get_bytes(f"runs/{summary.run_id}/metrics.jsonl").splitlines()]
    return {
        "events": events,
        "steps": [h for h in history if "loss" in h],
        "render": json.loads(store.get_bytes(outputs.metrics_key)),
        "eval_metrics": eval_metrics,
    }


def trainer_metrics(events: list[TrainEvent]) -> Metrics:
    m = Metrics(CollectorRegistry())
    for e in events:
        m.record_train_event(e, BATCH)
    return m


@contextmanager
def exporter(registry: CollectorRegistry) -> Iterator[str]:
    """A /metrics endpoint for ``registry`` on loopback, as the services serve theirs: yields "host:port"."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample of ``registry`` as its /metrics endpoint serves it: (name, labels) → value."""
    with exporter(registry) as target:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{target}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_trainer_endpoint_serves_the_runs_loss_step_seconds_and_data_wait(run):
    steps = run["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    served = scrape(trainer_metrics(run["events"]).registry)
    assert served[("edittuner_trainer_loss", ())] == steps[-1]["loss"]
    assert served[("edittuner_trainer_steps_total", ())] == STEPS
    assert served[("edittuner_trainer_step_seconds_count", ())] == STEPS
    assert served[("edittuner_trainer_step_seconds_sum", ())] == pytest.approx(sum(s["seconds"] for s in steps))
    assert served[("edittuner_trainer_data_wait_seconds_count", ())] == STEPS
    assert served[("edittuner_trainer_data_wait_seconds_sum", ())] == pytest.approx(sum(s["data_wait"] for s in steps))
    waited, stepped = (served[(f"edittuner_trainer_{n}_seconds_sum", ())] for n in ("data_wait", "step"))
    assert 0 < waited < stepped  # the wait is part of the step


def test_the_eval_endpoint_serves_the_renders_psnrs_and_heldout_loss(run):
    render = run["render"]
    assert render["step"] == STEPS and render["samples"]
    served = scrape(run["eval_metrics"].registry)
    assert served[("edittuner_eval_psnr_decibels", (("kind", "base"),))] == render["psnr_base"]
    assert served[("edittuner_eval_psnr_decibels", (("kind", "lora"),))] == render["psnr_lora"]
    assert served[("edittuner_eval_heldout_loss", ())] == render["heldout_loss_mean"]
    assert served[("edittuner_eval_render_seconds_count", ())] == 1


def test_a_render_without_a_value_reads_nan_not_the_previous_one():
    m = Metrics(CollectorRegistry())
    m.record_validation({"psnr_base": 20.0, "psnr_lora": 25.0, "heldout_loss_mean": 0.5})
    m.record_validation({"psnr_base": None, "psnr_lora": None, "heldout_loss_mean": None})
    values = [m.registry.get_sample_value("edittuner_eval_psnr_decibels", {"kind": k}) for k in ("base", "lora")]
    assert all(math.isnan(v) for v in values + [m.registry.get_sample_value("edittuner_eval_heldout_loss")])


def test_prometheus_evaluates_the_run_rows_queries_to_the_runs_values(run):
    """The trainer's exporter serves half the run's steps at Prometheus's first scrape and all of them after, so
    the row's rates over [1m] compare two scrapes, as during a run."""
    require_tool("prometheus")
    row = row_panels(json.loads(DASHBOARD.read_text()), "Run")
    panels = {p["title"]: [t["expr"] for t in p["targets"]] for p in row}
    # a CPU trainer reports no GPU memory; these fixed values stand in for a CUDA trainer's, for that panel
    gpu = {"gpu_allocated_bytes": 3 << 30, "gpu_reserved_bytes": 4 << 30, "gpu_peak_bytes": 5 << 30}
    events = [dataclasses.replace(e, gpu=gpu) if e.is_step else e for e in run["events"]]
    half = [i for i, e in enumerate(events) if e.is_step][STEPS // 2]
    trainer = trainer_metrics(events[:half])
    steps = run["steps"]
    with (
        exporter(trainer.registry) as trainer_target,
        exporter(run["eval_metrics"].registry) as eval_target,
        start_prometheus({"trainer": [trainer_target], "eval": [eval_target]}) as prom,
    ):
        prom.wait_for(f"edittuner_trainer_steps_total == {STEPS // 2}", timeout=30)
        for e in events[half:]:
            trainer.record_train_event(e, BATCH)
        prom.wait_for(f"edittuner_trainer_steps_total == {STEPS}")
        prom.wait_for("edittuner_eval_heldout_loss")
        values = {
            title: [[(s["metric"], float(s["value"][1])) for s in prom.query(e)] for e in exprs]
            for title, exprs in panels.items()
        }
    for title, results in values.items():
        assert all(results) and all(math.isfinite(v) for r in results for _, v in r), (title, results)

    def value(title: str, target: int = 0) -> float:
        [(_, v)] = values[title][target]
        return v

    later = steps[STEPS // 2 :]  # the steps between the two scrapes a rate compares
    losses = [s["loss"] for s in steps]
    assert value("Training loss") == losses[-1]
    assert min(losses) <= value("Training loss", 1) <= max(losses)
    # a rate extrapolates its samples towards the window's start, a counter no further than where it would reach
    # 0: sum and count may stretch differently, which leaves their ratio within a factor 0.5-1.05 of the mean
    assert value("Seconds per step") == pytest.approx(sum(s["seconds"] for s in later) / len(later), rel=0.5)
    assert 0 <= value("Data wait") < 1
    assert value("Data wait", 1) == pytest.approx(sum(s["data_wait"] for s in later) / len(later), rel=0.5, abs=1e-6)
    assert sorted((m["kind"], v) for m, v in values["Trainer GPU memory"][0]) == [
        ("allocated", 3 << 30),
        ("peak", 5 << 30),
    ]
    render = run["render"]
    assert sorted((m["kind"], v) for m, v in values["Validation PSNR"][0]) == [
        ("base", render["psnr_base"]),
        ("lora", render["psnr_lora"]),
    ]
    assert value("Held-out loss") == render["heldout_loss_mean"]
