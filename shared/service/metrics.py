"""The Prometheus metrics of EditTuner's services (prometheus-client), named per Prometheus conventions.

Every metric takes its labels from a small fixed set (service, state, kind): never a job or run id, which would
make a new time series per job. ``Metrics(registry)`` builds them on a registry so that tests use a fresh one.

No ``run`` label either, not even on the latest-value gauges (loss, PSNR) the dashboard's Run row shows: trainer_svc
trains one run at a time (its job manager has one worker) and eval_svc renders one validation at a time, so those
gauges always hold the run in progress, and the time range picks a run as well as a variable would. A run label
would leave one series per run behind in every gauge, for as long as the service lives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.train.events import TrainEvent

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
SAVE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
DATA_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        r = registry
        self.registry = r
        self.encoder_images = Counter(
            "edittuner_encoder_images", "Cache entries encoded (latents and caption embeddings)", registry=r
        )
        self.encoder_cache_hits = Counter(
            "edittuner_encoder_cache_hits", "Cache entries found already encoded", registry=r
        )
        self.trainer_steps = Counter("edittuner_trainer_steps", "Optimizer steps taken", registry=r)
        self.trainer_loss = Gauge("edittuner_trainer_loss", "Training loss of the latest step", registry=r)
        self.trainer_samples_per_second = Gauge(
            "edittuner_trainer_samples_per_second", "Training throughput", registry=r
        )
        self.trainer_step_seconds = Histogram(
            "edittuner_trainer_step_seconds", "Seconds per optimizer step", buckets=STEP_BUCKETS, registry=r
        )
        self.trainer_data_wait_seconds = Histogram(
            "edittuner_trainer_data_wait_seconds",
            "Seconds of a step spent waiting for batches (part of the step's seconds)",
            buckets=DATA_WAIT_BUCKETS,
            registry=r,
        )
        self.trainer_learning_rate = Gauge(
            "edittuner_trainer_learning_rate", "Learning rate of the latest step", registry=r
        )
        self.checkpoint_save_seconds = Histogram(
            "edittuner_trainer_checkpoint_save_seconds",
            "Seconds to write a checkpoint",
            buckets=SAVE_BUCKETS,
            registry=r,
        )
        self.eval_render_seconds = Histogram(
            "edittuner_eval_render_seconds", "Seconds to render one validation", buckets=SAVE_BUCKETS, registry=r
        )
        self.eval_psnr = Gauge(
            "edittuner_eval_psnr_decibels",
            "Mean PSNR against the targets of the latest validation render, kind base (adapters off) or lora",
            ["kind"],
            registry=r,
        )
        self.eval_heldout_loss = Gauge(
            "edittuner_eval_heldout_loss", "Held-out flow-matching loss of the latest validation render", registry=r
        )
        self.gpu_memory = Gauge(
            "edittuner_gpu_memory_bytes", "GPU memory of this process", ["service", "kind"], registry=r
        )

    def record_train_event(self, e: TrainEvent, batch_size: int = 1) -> None:
        """Feed a training worker's event into the trainer metrics."""
        if e.is_step:
            seconds = e.seconds_per_step or 0.0
            self.trainer_steps.inc()
            self.trainer_loss.set(e.loss or 0.0)
            self.trainer_learning_rate.set(e.lr or 0.0)
            self.trainer_step_seconds.observe(seconds)
            self.trainer_data_wait_seconds.observe(e.data_wait or 0.0)
            if seconds > 0:
                self.trainer_samples_per_second.set(batch_size / seconds)
        elif e.phase == "checkpoint" and e.seconds is not None:
            self.checkpoint_save_seconds.observe(e.seconds)
        for kind in ("allocated", "reserved", "peak", "peak_reserved"):
            if f"gpu_{kind}_bytes" in e.gpu:
                self.gpu_memory.labels(service="trainer", kind=kind).set(e.gpu[f"gpu_{kind}_bytes"])

    def record_validation(self, v: dict[str, Any]) -> None:
        """Feed a finished render (``ValidationResult.to_json``, what its metrics.json holds) into the eval gauges. A
        value the render lacks (no samples, no held-out loss) reads NaN, never the previous render's."""
        for kind in ("base", "lora"):
            self.eval_psnr.labels(kind=kind).set(_or_nan(v.get(f"psnr_{kind}")))
        self.eval_heldout_loss.set(_or_nan(v.get("heldout_loss_mean")))

    def collect_jobs(self, service: str, counts: Callable[[], dict[str, int]]) -> None:
        """``edittuner_jobs{service,state}``, read from the job manager at each scrape (never stale)."""
        self.registry.register(_JobsCollector(service, counts))

    def record_gpu(self, service: str) -> None:
        """This process's GPU memory: allocated and reserved now, and the peak of each (the reserved one is what the
        caching allocator held from the device, fragmentation included)."""
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.labels(service=service, kind="allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels(service=service, kind="reserved").set(torch.cuda.memory_reserved())
            self.gpu_memory.labels(service=service, kind="peak").set(torch.cuda.max_memory_allocated())
            self.gpu_memory.labels(service=service, kind="peak_reserved").set(torch.cuda.max_memory_reserved())


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


class _JobsCollector(Collector):
    def __init__(self, service: str, counts: Callable[[], dict[str, int]]):
        self.service, self.counts = service, counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("edittuner_jobs", "Jobs by state", labels=["service", "state"])
        counts = self.counts()
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            g.add_metric([self.service, state], counts.get(state, 0))
        yield g


def start_gpu_job(device_name: str) -> None:
    """At the start of an encode or render job: bind the job's GPU (``device=cuda:N``, so the CUDA context and the
    libraries' scratch space go there, not to GPU 0) and start its memory peak anew, so the peak the service exports
    is this job's, not the largest since the process started."""
    from shared.model.device import reset_peak, resolve_device
    from shared.train import distributed

    reset_peak(distributed.rank_device(resolve_device(device_name), distributed.Dist()))
