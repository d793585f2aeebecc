"""Where a run's validation previews are made: the strategy ``train_run`` takes.

- ``IN_THIS_PROCESS``: the training process renders them with its own transformer (``edittuner train
  --in-process``, and the worker when trainer and eval_svc do not fit their GPU together);
- ``ON_EVAL_SVC``: the training process exports the step's LoRA and emits a ``validation_ready`` event, which
  trainer_svc hands to eval_svc as a Render job;
- ``AUTO``: one of the two, as the planner decides for this process's GPU (trainer_svc's worker);
- ``NONE``: no previews.

Either way the previews come from one routine, ``shared.evaluate.validation.RunValidation.render``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shared.config.schema import RunConfig
from shared.store.base import ObjectStore
from shared.train import distributed
from shared.train.events import TrainEvent
from shared.train.trainer import Trainer

if TYPE_CHECKING:
    from shared.evaluate.validation import RunValidation

log = logging.getLogger(__name__)
Validator = Callable[[Trainer, int], dict[str, Any]]  # (trainer, step) → the step's result, as Trainer.validate


class Previews(Protocol):
    """A place previews are made. ``in_process``: its validator renders here (so trackers log its results)."""

    @property
    def in_process(self) -> bool: ...

    def validator(self, run: RunConfig, store: ObjectStore, events: Callable[[TrainEvent], None]) -> Validator | None:
        """What ``Trainer`` calls at each validation step; None: no previews."""
        ...


@dataclass(frozen=True)
class InThisProcess:
    in_process: bool = True

    def validator(self, run: RunConfig, store: ObjectStore, events: Callable[[TrainEvent], None]) -> Validator:
        return in_process_validator(run, store)


@dataclass(frozen=True)
class OnEvalService:
    in_process: bool = False

    def validator(self, run: RunConfig, store: ObjectStore, events: Callable[[TrainEvent], None]) -> Validator:
        return external_validator(events)


@dataclass(frozen=True)
class NoPreviews:
    in_process: bool = False

    def validator(self, run: RunConfig, store: ObjectStore, events: Callable[[TrainEvent], None]) -> None:
        return None


@dataclass(frozen=True)
class Auto:
    """In this process or on eval_svc, as ``shared.plan.predict.validation_site`` decides for this process's
    device (logged, so the run's log says where its previews come from)."""

    def choose(self, run: RunConfig) -> InThisProcess | OnEvalService:
        from shared.model.device import resolve_device
        from shared.plan.predict import validation_site

        device = distributed.rank_device(resolve_device(run.train.device), distributed.current())
        site, why = validation_site(run, device)
        log.info("validation: %s", why)
        return IN_THIS_PROCESS if site == "training worker" else ON_EVAL_SVC

    @property
    def in_process(self) -> bool:
        raise TypeError("Auto is resolved with choose(run) before training")

    def validator(self, run: RunConfig, store: ObjectStore, events: Callable[[TrainEvent], None]) -> Validator:
        return self.choose(run).validator(run, store, events)


IN_THIS_PROCESS = InThisProcess()
ON_EVAL_SVC = OnEvalService()
NONE = NoPreviews()
AUTO = Auto()


def resolve(previews: Previews, run: RunConfig) -> Previews:
    """``AUTO`` decided for this run; any other place as it is."""
    return previews.choose(run) if isinstance(previews, Auto) else previews


def external_validator(events: Callable[[TrainEvent], None]) -> Validator:
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


def in_process_validator(run: RunConfig, store: ObjectStore) -> Validator:
    """Previews with the training transformer itself (no second copy of the weights): the VAE, and the text
    encoder only where a preview sample's embeddings are not cached, are loaded on first use beside it."""
    previews: RunValidation | None = None
    pipe: Any = None
    full: Any = None  # validation_on_full_precision: the folder's unquantized transformer, loaded on first use

    def validate(trainer: Trainer, step: int) -> dict[str, Any]:
        nonlocal previews, pipe, full
        if previews is None:  # imported here: the pipelines' libraries load after the process's logging set-up
            from shared.evaluate.validation import RunValidation

            previews = RunValidation(run, store, trainer.run_id, list((trainer.index_keys or {}).values()))
        if pipe is None:
            from shared.model.loading import load_pipeline

            text = ("text_encoder", "tokenizer", "processor") if previews.eval_set().needs_text_encoder else ()
            pipe = load_pipeline(
                run.train.model_path,
                run.train.model_flavour,
                device=trainer.device,
                dtype=trainer.dtype,
                components=("vae", *text, "scheduler"),
            )
        from shared.evaluate.full_precision import load_full_transformer, wanted

        if full is None and wanted(run):
            full = load_full_transformer(run, trainer.device, trainer.dtype)
        result = previews.render(
            pipe,
            step,
            _training_weights(pipe, trainer, full, run),
            what=f"the validation at step {step}",
            next_one="the next one",
            detail_on_oom=True,
            full=full,
        )
        return result.to_json()

    return validate


@contextmanager
def _training_weights(pipe: Any, trainer: Trainer, full: Any = None, run: RunConfig | None = None) -> Iterator[None]:
    """The pipeline renders with the training transformer, holding the weights the LoRA file holds (the EMA's
    with use_ema); afterwards the pipeline lets it go. ``full``: the full-precision transformer gets the exported
    LoRA file too."""
    from shared.evaluate.full_precision import lora_from_bytes
    from shared.model.lora import DIFFUSERS_FILE

    pipe.transformer = trainer.transformer
    try:
        with trainer.exported_weights():
            if full is None or run is None:
                yield
            else:
                with lora_from_bytes(pipe, full, trainer.export_files(fmt="diffusers")[DIFFUSERS_FILE], run):
                    yield
    finally:
        pipe.transformer = None
