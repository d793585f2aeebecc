"""One training run end to end, in this process: encode what is missing, train, validate, export.

``edittuner train`` and the trainer worker (``python -m shared.service.worker``) both call ``train_run``; the
services later split the encode and validation parts out to encoder_svc and eval_svc.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.config.schema import RunConfig
from shared.encode.encoder import DatasetEncoder, EncodeStats
from shared.errors import EditTunerError
from shared.evaluate.report import refresh_run_report
from shared.store.base import ObjectStore
from shared.store.local import LocalStore
from shared.train import distributed
from shared.train.events import TrainEvent
from shared.train.previews import IN_THIS_PROCESS, Previews, resolve
from shared.train.trackers import logs_dir, open_tracker
from shared.train.trainer import Event, Trainer, TrainSummary, run_id_for

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    encode: EncodeStats
    summary: TrainSummary
    outputs: dict[str, str]


def train_run(
    run: RunConfig,
    store: ObjectStore,
    *,
    events: Callable[[Event], None] | None = None,
    previews: Previews = IN_THIS_PROCESS,
    until_step: int | None = None,
    encode: bool = True,
    run_id: str | None = None,
    stop: threading.Event | None = None,
    copy_to_output_dir: bool = True,
    index_keys: dict[str, str] | None = None,
) -> RunResult:
    """``previews``: where the validation previews are made (``shared.train.previews``: in this process, on
    eval_svc through ``validation_ready`` events, where the planner says for trainer_svc's worker, or none).
    ``stop``: see
    ``Trainer.train``. ``copy_to_output_dir``: with the local store, copy the LoRA and previews to the config's
    output_dir — only for a run the user started on their own machine; a service's worker never writes outside
    the store (output_dir then only names the run). With report_to, the trackers hear the events and the
    in-process validations; their files go to the store's runs/<run>/logs/ (and, for a run on this machine, live
    into output_dir's logging_dir)."""
    events = events or (lambda e: None)
    run_id = run_id or run_id_for(run.train.output_dir)
    dist = distributed.current()  # with several processes rank 0 encodes, tracks and copies; all of them train
    on_this_machine = copy_to_output_dir and isinstance(store, LocalStore) and dist.main
    tracker = (
        open_tracker(
            run, store, run_id, logs_dir(run.train.output_dir, run.train.logging_dir) if on_this_machine else None
        )
        if dist.main
        else None
    )  # a missing tracker fails first
    if tracker is not None:
        events = _tee(events, tracker)
    stats = encode_missing(run, store, events) if encode and dist.main else EncodeStats()
    if encode:
        distributed.barrier(dist)
    previews = resolve(previews, run)
    validator = previews.validator(run, store, events)
    if tracker is not None and validator is not None and previews.in_process:
        validator = tracker.wrap(validator)
    trainer = Trainer(run, store, run_id=run_id, events=events, validate=validator, index_keys=index_keys)
    trainer.setup()
    try:
        if tracker is not None:
            tracker.start(trainer.step)
        summary = trainer.train(until_step=until_step, stop=stop)
    finally:
        trainer.forward_module = None  # the DDP wrapper goes before the process group (else exits can abort)
        if tracker is not None:
            tracker.close()
    if dist.main:  # also for a stopped run: its curves so far; eval_svc writes it again after each render
        refresh_run_report(store, run_id)
    copy = on_this_machine and not summary.interrupted
    outputs = (
        copy_outputs(
            store, trainer.prefix, Path(run.train.output_dir), logs_dir(run.train.output_dir, run.train.logging_dir)
        )
        if copy
        else {}
    )
    return RunResult(stats, summary, outputs)


def encode_missing(run: RunConfig, store: ObjectStore, events: Callable[[Event], None]) -> EncodeStats:
    """Encode what the cache lacks, reporting progress as encode events, then free the encoders (the
    transformer needs the memory next)."""
    enc = DatasetEncoder(run, store)
    try:
        return enc.encode(
            lambda s, total: events(TrainEvent("encode", s.total, total, f"encoded {s.encoded}, cached {s.cached}"))
        )
    finally:
        enc.release()


def _tee(first: Callable[[Event], None], second: Callable[[Event], None]) -> Callable[[Event], None]:
    def both(e: Event) -> None:
        first(e)
        second(e)

    return both


def copy_outputs(store: ObjectStore, run_prefix: str, output_dir: Path, logs: Path | None = None) -> dict[str, str]:
    """With the local store, put the final LoRA, the previews and the report (``report/index.html``) where the user
    looks: output_dir; the tracker files (runs/<run>/logs/) in ``logs``, by default the logging_dir the run's
    run.json records."""
    output_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for key in store.list(f"{run_prefix}/lora"):
        dest = output_dir / key.rsplit("/", 1)[1]
        store.get_file(key, dest)
        out[dest.name] = str(dest)
    for key in store.list(f"{run_prefix}/validation"):
        dest = output_dir / "validation" / key[len(f"{run_prefix}/validation/") :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, dest)
    if (output_dir / "validation").exists():
        out["validation"] = str(output_dir / "validation")
    for key in store.list(f"{run_prefix}/report"):
        dest = output_dir / "report" / key[len(f"{run_prefix}/report/") :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, dest)
    if (output_dir / "report" / "index.html").exists():
        out["report"] = str(output_dir / "report" / "index.html")
    log_keys = store.list(f"{run_prefix}/logs")
    if log_keys:
        logs = logs or logs_dir(output_dir, _recorded_logging_dir(store, run_prefix))
        for key in log_keys:
            dest = logs / key[len(f"{run_prefix}/logs/") :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(key, dest)
        out["logs"] = str(logs)
    return out


def _recorded_logging_dir(store: ObjectStore, run_prefix: str) -> str:
    """The run's logging_dir from its run.json: callers without the config (the CLI after a service run)."""
    try:
        return str(store.get_json(f"{run_prefix}/run.json")["config"].get("logging_dir") or "logs")
    except (EditTunerError, KeyError, TypeError):
        return "logs"
