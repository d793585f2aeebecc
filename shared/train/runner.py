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
from typing import Any

import torch

from shared.config.schema import RunConfig
from shared.encode.encoder import DatasetEncoder, EncodeStats
from shared.errors import EditTunerError
from shared.evaluate.report import refresh_run_report
from shared.store.base import ObjectStore
from shared.store.local import LocalStore
from shared.train import distributed
from shared.train.events import TrainEvent
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
    validate: bool | str = True,
    until_step: int | None = None,
    encode: bool = True,
    run_id: str | None = None,
    stop: threading.Event | None = None,
    copy_to_output_dir: bool = True,
    index_keys: dict[str, str] | None = None,
) -> RunResult:
    """``validate``: True renders previews here; "external" exports the LoRA at each validation step and emits a
    ``validation_ready`` event for a supervisor to hand to eval_svc; "auto" (trainer_svc's worker) is "external"
    unless the planner says the trainer and eval_svc do not fit their shared GPU together, and then True (see
    ``shared.plan.predict.validation_site``; the choice is logged); False skips validation. ``stop``: see
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
    if validate == "auto":
        validate = choose_validation(run)
    validator = (
        external_validator(events) if validate == "external" else make_validator(run, store) if validate else None
    )
    if tracker is not None and validator is not None and validate != "external":
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


def choose_validation(run: RunConfig) -> bool | str:
    """True (in this worker) or "external" (eval_svc), as ``shared.plan.predict.validation_site`` decides for this
    process's device; logged, so the run's log says where its previews come from."""
    from shared.model.device import resolve_device
    from shared.plan.predict import validation_site

    device = distributed.rank_device(resolve_device(run.train.device), distributed.current())
    site, why = validation_site(run, device)
    log.info("validation: %s", why)
    return True if site == "training worker" else "external"


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


def external_validator(events: Callable[[Event], None]) -> Callable[[Trainer, int], dict[str, Any]]:
    """Validation by another service: write this step's LoRA to the store and say where it is."""

    def validate(trainer: Trainer, step: int) -> dict[str, Any]:
        keys = trainer.export(f"{trainer.prefix}/validation/step-{step}/lora", fmt="diffusers")
        lora_key = next(k for k in keys if k.endswith("/pytorch_lora_weights.safetensors"))
        events(
            TrainEvent(
                "validation_ready",
                step,
                trainer.max_steps,
                f"LoRA for validation at step {step}",
                lora_key=lora_key,
                run_id=trainer.run_id,
            )
        )
        return {"step": step, "lora_key": lora_key, "external": True}

    return validate


def make_validator(run: RunConfig, store: ObjectStore) -> Callable[[Trainer, int], dict[str, Any]]:
    """Previews with the training transformer itself (no second copy of the weights): the VAE, and the text
    encoder only where a preview sample's embeddings are not cached, are loaded on first use beside it."""
    from shared.data.pairing import pair_datasets
    from shared.encode.cache import index_key, settings_for
    from shared.evaluate.preview import eval_set, out_of_memory, render_validation, validation_settings

    state: dict[str, Any] = {"out_of_memory": 0}

    def validate(trainer: Trainer, step: int) -> dict[str, Any]:
        if "pipe" not in state:
            from shared.model.loading import load_pipeline

            paired, _ = pair_datasets(run, store)
            keys = list((trainer.index_keys or {}).values()) or [
                index_key(run, ds.id, settings_for(run)) for ds in run.data.image_datasets
            ]
            state["eval"] = ev = eval_set(run, paired, store, keys)
            text = ("text_encoder", "tokenizer", "processor") if ev.needs_text_encoder else ()
            state["pipe"] = load_pipeline(
                run.train.model_path,
                run.train.model_flavour,
                device=trainer.device,
                dtype=trainer.dtype,
                components=("vae", *text, "scheduler"),
            )
        pipe, ev = state["pipe"], state["eval"]
        vrun, changes = validation_settings(pipe, run, state["out_of_memory"])
        pipe.transformer = trainer.transformer
        try:
            with trainer.exported_weights():  # the weights the LoRA file holds: the EMA when use_ema
                result = render_validation(
                    pipe,
                    vrun,
                    ev.samples,
                    step=step,
                    store=store,
                    prefix=f"{trainer.prefix}/validation",
                    loss_index=ev.entries,
                    eval_label=ev.label,
                    conditioning=ev.conditioning,
                )
        except torch.OutOfMemoryError as err:  # recorded by the trainer; the run goes on
            state["out_of_memory"] += 1
            raise out_of_memory(
                err,
                run,
                state["out_of_memory"],
                changes,
                f"the validation at step {step}",
                "the next one",
                f" ({str(err).splitlines()[0][:200]})",
            ) from err
        finally:
            pipe.transformer = None
        refresh_run_report(store, trainer.run_id)  # readable while the run goes on: the metrics of its checkpoints
        return result.to_json()

    return validate


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
