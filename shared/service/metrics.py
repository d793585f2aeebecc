"""The Prometheus metrics of EditTuner's services (prometheus-client), named per Prometheus conventions.

Every metric takes its labels from a small fixed set (service, state, kind): never a job or run id, which would
make a new time series per job. ``Metrics(registry)`` builds them on a registry so that tests use a fresh one.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
SAVE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.registry = r
        self.encoder_images = Counter("edittuner_encoder_images", "Cache entries encoded (latents and caption "
                                      "embeddings)", registry=r)
        self.encoder_cache_hits = Counter("edittuner_encoder_cache_hits", "Cache entries found already encoded",
                                          registry=r)
        self.trainer_steps = Counter("edittuner_trainer_steps", "Optimizer steps taken", registry=r)
        self.trainer_loss = Gauge("edittuner_trainer_loss", "Training loss of the latest step", registry=r)
        self.trainer_samples_per_second = Gauge("edittuner_trainer_samples_per_second", "Training throughput",
                                                registry=r)
        self.trainer_step_seconds = Histogram("edittuner_trainer_step_seconds", "Seconds per optimizer step",
                                              buckets=STEP_BUCKETS, registry=r)
        self.trainer_learning_rate = Gauge("edittuner_trainer_learning_rate", "Learning rate of the latest step",
                                           registry=r)
        self.checkpoint_save_seconds = Histogram("edittuner_trainer_checkpoint_save_seconds",
                                                 "Seconds to write a checkpoint", buckets=SAVE_BUCKETS, registry=r)
        self.eval_render_seconds = Histogram("edittuner_eval_render_seconds", "Seconds to render one validation",
                                             buckets=SAVE_BUCKETS, registry=r)
        self.gpu_memory = Gauge("edittuner_gpu_memory_bytes", "GPU memory of this process", ["service", "kind"],
                                registry=r)

    def record_train_event(self, e: dict[str, Any], batch_size: int = 1) -> None:
        """Feed a training worker's event into the trainer metrics."""
        if e.get("phase") == "train" and "loss" in e:
            self.trainer_steps.inc()
            self.trainer_loss.set(e["loss"])
            self.trainer_learning_rate.set(e.get("lr", 0.0))
            seconds = e.get("seconds_per_step") or 0.0
            self.trainer_step_seconds.observe(seconds)
            if seconds > 0:
                self.trainer_samples_per_second.set(batch_size / seconds)
        elif e.get("phase") == "checkpoint" and "seconds" in e:
            self.checkpoint_save_seconds.observe(e["seconds"])
        for kind in ("allocated", "reserved", "peak"):
            if f"gpu_{kind}_bytes" in e:
                self.gpu_memory.labels(service="trainer", kind=kind).set(e[f"gpu_{kind}_bytes"])

    def collect_jobs(self, service: str, counts: Callable[[], dict[str, int]]) -> None:
        """``edittuner_jobs{service,state}``, read from the job manager at each scrape (never stale)."""
        self.registry.register(_JobsCollector(service, counts))

    def record_gpu(self, service: str) -> None:
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.labels(service=service, kind="allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels(service=service, kind="reserved").set(torch.cuda.memory_reserved())
            self.gpu_memory.labels(service=service, kind="peak").set(torch.cuda.max_memory_allocated())


class _JobsCollector(Collector):
    def __init__(self, service: str, counts: Callable[[], dict[str, int]]):
        self.service, self.counts = service, counts

    def collect(self):
        g = GaugeMetricFamily("edittuner_jobs", "Jobs by state", labels=["service", "state"])
        counts = self.counts()
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            g.add_metric([self.service, state], counts.get(state, 0))
        yield g
