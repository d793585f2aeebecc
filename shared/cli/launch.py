"""``edittuner train --in-process`` on several processes (``num_processes`` > 1 or ``num_machines`` > 1): this
process encodes what is missing, then torchrun starts the training worker on every rank over the same store
(``shared.train.distributed``), and its events feed the progress bars as a single process's would."""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from pathlib import Path

from shared.config.schema import RunConfig
from shared.encode.encoder import EncodeStats
from shared.service.records import JobCancelled
from shared.service.supervisor import run_worker
from shared.service.worker import COMMAND as WORKER_COMMAND
from shared.store.base import ObjectStore
from shared.store.local import LocalStore
from shared.train.distributed import launch_command
from shared.train.events import TrainEvent, WorkerResult
from shared.train.runner import copy_outputs, encode_missing
from shared.train.trackers import logs_dir
from shared.train.trainer import run_id_for


def train_processes(
    args: argparse.Namespace,
    run: RunConfig,
    store: ObjectStore,
    store_url: str,
    events: Callable[[TrainEvent], None],
    stop: threading.Event,
) -> tuple[EncodeStats, WorkerResult, dict[str, str]]:
    """Encode here, train under torchrun; returns the encode stats, the worker's result and the copied outputs.
    On several machines machine 0 encodes before it joins the rendezvous, where the others wait for it."""
    stats = encode_missing(run, store, events) if run.train.machine_rank == 0 else EncodeStats()
    worker = [
        *WORKER_COMMAND,
        "--store",
        store_url,
        "--no-encode",
        *(["--config", str(args.config)] if args.config else []),
        *(["--data", str(args.data)] if args.data else []),
        *(["--no-validation"] if args.no_validation else []),
        *args.overrides,
    ]
    cmd = launch_command(worker, run.train)
    log_path = Path(run.train.output_dir) / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = run_worker(
            cmd,
            on_event=events,
            cancelled=stop,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            log_path=log_path,
            kill_grace_s=120,
        )
    except JobCancelled:
        result = WorkerResult(run_id_for(run.train.output_dir), 0, 0, None, [], [], interrupted=True)
    outputs: dict[str, str] = {}
    if isinstance(store, LocalStore) and not result.interrupted:
        outputs = copy_outputs(
            store,
            f"runs/{result.run_id}",
            Path(run.train.output_dir),
            logs_dir(run.train.output_dir, run.train.logging_dir),
        )
    return stats, result, outputs
