"""LoRA training of the Qwen-Image-Edit transformer on cached tensors.

Three methods make the loop, so a variant overrides only what differs: ``train()`` (steps, checkpoints,
validation, export), ``train_step()`` (accumulation, clipping, optimizer, EMA) and ``forward_backward()`` (one
micro-batch). The randomness of a micro-step (noise, sigmas) is a function of (seed, step, micro) and the data
order a function of (seed, epoch), so a run resumed from a checkpoint computes bit for bit what an
uninterrupted run computes (on CPU; tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.encode.cache import TRAINING_SAMPLES, settings_for
from shared.errors import EditTunerError, FailedPrecondition, InvalidInput
from shared.model.device import resolve_device
from shared.model.flow import EditBatch, flow_matching_loss, sample_sigmas, step_generator
from shared.model.rollout import Rollout, inference_sigmas, roll_out
from shared.store.base import ObjectStore
from shared.store.checkpoint import (
    CheckpointState,
    capture_rng,
    checkpoint_prefix,
    committed_steps,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from shared.train import distributed, gpu
from shared.train.adapters import start_adapters
from shared.train.ema import LoraEMA
from shared.train.events import TrainEvent
from shared.train.loader import TrainLoader, load_items
from shared.train.optimizers import build_optimizer, check_optimizer_args, eval_weights, lr_scheduler_name, weight_dtype
from shared.train.schedule import build_scheduler
from shared.train.toolchain import require_compiler

if TYPE_CHECKING:
    from shared.config.schema import TrainConfig

log = logging.getLogger(__name__)
Event = TrainEvent


class TrainingDiverged(EditTunerError):
    """The loss became NaN or Inf."""


def run_id_for(output_dir: str) -> str:
    """A run id from the output directory's name: resuming with the same output_dir finds the same run."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", output_dir.rstrip("/").rsplit("/", 1)[-1])
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:100].rstrip("-._")  # one key segment: see check_run_id
    return name or "run"


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    seconds: float
    data_wait: float
    grad_norm: float
    rollout_forwards: int = 0  # scheduled sampling's transformer forwards without gradient, over the step


@dataclass
class TrainSummary:
    run_id: str
    steps: int
    losses: list[float]
    lora_keys: list[str]
    checkpoints: list[int]
    validations: list[dict[str, Any]] = field(default_factory=list)
    data_wait_fraction: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False  # stopped at a step boundary on request, with a checkpoint of that step


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_train_steps``, or ``num_train_epochs`` passes over the data (SimpleTuner's
    rule: epochs count when max_train_steps is 0 or absent; the config refuses both at once)."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    return max(1, cfg.num_train_epochs * math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))


class Trainer:
    def __init__(
        self,
        run: RunConfig,
        store: ObjectStore,
        *,
        run_id: str | None = None,
        events: Callable[[Event], None] | None = None,
        validate: Callable[[Trainer, int], dict[str, Any]] | None = None,
        index_keys: dict[str, str] | None = None,
    ):
        from shared.model.device import resolve_dtype

        self.run, self.cfg, self.store = run, run.train, store
        self.run_id = run_id or run_id_for(self.cfg.output_dir)
        self.prefix = f"runs/{self.run_id}"
        self.dist = distributed.current()  # torchrun's rank and world size (one process without it)
        self.device = distributed.rank_device(resolve_device(self.cfg.device), self.dist)
        self.dtype = resolve_dtype(self.cfg.mixed_precision, self.device)
        # rank 0 reports for the run (its losses are the all-reduced ones); the other ranks only compute
        self.events = (events or (lambda e: None)) if self.dist.main else (lambda e: None)
        self.forward_module: Any = None  # the transformer, or its DDP wrapper with several processes
        self.validate = validate
        self.index_keys = index_keys  # dataset id → cache index key, from the encode job (see load_items)
        self.step = 0
        self.max_steps = self.cfg.max_train_steps  # until setup knows the data (num_train_epochs)
        self.history: list[dict[str, Any]] = []
        self.transformer: Any = None
        self.ema: LoraEMA | None = None
        self.shift_config: dict[str, Any] | None = None  # the scheduler's, with flow_schedule_auto_shift
        self.rollout = Rollout.from_config(self.cfg)  # scheduled sampling; None when off
        self.inference_config: dict[str, Any] | None = None  # the scheduler's, for the rollout's schedule
        self.rollout_forwards = 0  # of the current optimizer step, on this rank

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, transformer: Any = None) -> None:
        """Load and quantize the transformer, attach the LoRA, build optimizer, schedule, data; resume."""
        from shared.model.loading import apply_flavour, load_transformer, scheduler_config
        from shared.model.lora import attach_lora
        from shared.model.quantize import quantize_transformer

        cfg = self.cfg
        if self.dtype == torch.float16:
            raise InvalidInput(
                "mixed_precision: fp16 training would need loss scaling and underflows with this "
                "model; use bf16 (or fp32)"
            )
        check_optimizer_args(cfg, self.device)  # a wrong optimizer setting fails before the model loads
        if cfg.compile_transformer:
            require_compiler("compile_transformer=true", "set compile_transformer=false")
        distributed.check_divisible(cfg.gradient_accumulation_steps, self.dist.world)
        if self.device.type == "cuda" and not cfg.skip_fit_check:
            from shared.plan.predict import check_fits

            check_fits(self.run, self.device)  # ResourceExhausted with overrides that fit, before any loading
        resume_step = resolve_resume(self.store, self.prefix, cfg.resume_from_checkpoint)
        if resume_step is None and committed_steps(self.store, self.prefix):
            raise FailedPrecondition(
                f"run {self.run_id!r} already has checkpoints in {self.store.describe()} (up to step-"
                f"{committed_steps(self.store, self.prefix)[-1]}); pass resume_from_checkpoint=latest to continue it, "
                "or use another output_dir for a new run"
            )
        settings = None if self.index_keys is not None else settings_for(self.run)
        items, null_ok, self.eval_label = load_items(self.store, self.run, settings, index_keys=self.index_keys)
        if self.eval_label == TRAINING_SAMPLES and cfg.holdout_eval_images and cfg.eval_dataset_id is None:
            log.warning(
                "only %d training samples: the %d preview samples stay in training (hold them out on a "
                "dataset of at least %d), so previews and held-out loss are on training samples",
                len({(i.dataset, i.key) for i in items}),
                cfg.num_eval_images,
                2 * cfg.num_eval_images,
            )
        self.loader = TrainLoader(
            items,
            self.store,
            batch_size=cfg.train_batch_size,
            seed=cfg.seed,
            caption_dropout=cfg.caption_dropout_probability,
            random_references=cfg.conditioning_multidataset_sampling == "random",
            null_available=null_ok,
            pin_memory=self.device.type == "cuda",
        )
        gpu.allow_tf32(self.device)  # the fp32 LoRA's matmuls; set once the run is known to start
        torch.manual_seed(cfg.seed)

        def load_base() -> Any:
            model = (
                transformer
                if transformer is not None
                else load_transformer(
                    cfg.model_path,
                    cfg.model_flavour,
                    dtype=self.dtype,
                    transformer=cfg.pretrained_transformer_model_name_or_path,
                    subfolder=cfg.pretrained_transformer_subfolder,
                )
            )
            apply_flavour(model, cfg.model_flavour)
            return quantize_transformer(
                model,
                cfg.base_model_precision,
                device=self.device,
                compute_dtype=self.dtype,
                quantize_via=cfg.quantize_via,
                quantize_activations=cfg.quantize_activations,
            )

        # several processes on one machine load the base in turns: one host copy at a time, not N at once
        self.transformer = distributed.in_turns(load_base, self.dist) if transformer is None else load_base()
        if cfg.flow_schedule_auto_shift:
            self.shift_config = scheduler_config(cfg.model_path)
        if self.rollout is not None:
            self.inference_config = scheduler_config(cfg.model_path)
        attach_lora(
            self.transformer,
            cfg.lora_rank,
            cfg.effective_lora_alpha,
            cfg.lora_dropout,
            cfg.lora_target_modules,
            seed=cfg.seed,
        )
        init_step = start_adapters(self.transformer, cfg, resume_step)
        self.params = [p for n, p in self.transformer.named_parameters() if p.requires_grad]
        for p in self.params:  # adapters train in fp32 whatever the base precision (bf16 for adamw_bf16)
            p.data = p.data.to(weight_dtype(cfg))
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if cfg.compile_transformer:  # buckets change the token count: dynamic shapes avoid a recompile per bucket
            self.transformer.compile_repeated_blocks(dynamic=True)
        self.transformer.train()
        self.forward_module = self.transformer
        if self.dist.active:
            distributed.check_replicas(self.transformer, self.dist)
            self.forward_module = distributed.wrap(self.transformer, self.device)
        self.optimizer = self._optimizer()
        self.max_steps = total_steps(cfg, len(self.loader.batches_of(0)))
        self.scheduler = build_scheduler(cfg, lr_scheduler_name(cfg), self.optimizer, self.max_steps)
        if resume_step is not None:
            self._resume(resume_step)
        else:
            self._start_at(init_step)
            if self.dist.main:
                self.store.put_json(f"{self.prefix}/run.json", self._run_doc())
        if cfg.use_ema and self.ema is None:  # also when EMA is switched on at a resume: start from the weights
            self.ema = LoraEMA(self._named_params(), cfg.ema_decay, self._ema_device())
        gpu.reset_peak(self.device)  # the steps' peak, not the load's: last, after everything setup allocates

    def _start_at(self, step: int) -> None:
        """A new run counting from ``step`` (init_lora_step): the learning-rate schedule moved there; the
        optimizer, the data order and the noise start fresh."""
        if not step:
            return
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": deliberate here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                self.scheduler.step()
        self.step = step
        log.info("run %s counts from step %d (init_lora_step)", self.run_id, step)

    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]

    def _optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.cfg, self.params, self.device)

    def _run_doc(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "config": dataclasses.asdict(self.cfg),
            "config_source": self.run.config_source,
            "data": [dataclasses.asdict(d) | {"aws_secret_access_key": None} for d in self.run.data.datasets],
            "device": str(self.device),
            "dtype": str(self.dtype),
            "created": time.time(),
        }

    # ------------------------------------------------------------------------------------------ resume
    def _resume(self, step: int) -> None:
        from shared.model.lora import load_lora_state_dict

        ck = load_checkpoint(self.store, self.prefix, step)
        load_lora_state_dict(self.transformer, ck.lora)
        for p in self.params:
            p.data = p.data.to(weight_dtype(self.cfg))
        self.optimizer.load_state_dict(ck.optimizer)
        self.scheduler.load_state_dict(ck.scheduler)
        self.loader.load_state_dict(ck.loader)
        if self.cfg.use_ema and ck.ema is not None:
            self.ema = LoraEMA(self._named_params(), self.cfg.ema_decay, self._ema_device())
            self.ema.load(ck.ema)
        restore_rng(ck.rng_tensors, ck.rng)
        self.step = step
        self.history = list(ck.extra.get("history", []))
        log.info("resumed run %s from step %d", self.run_id, step)

    # -------------------------------------------------------------------------------------------- loop
    def train(self, until_step: int | None = None, stop: threading.Event | None = None) -> TrainSummary:
        """Train to ``max_steps`` (or stop after ``until_step``, as a pre-empted worker would). When ``stop``
        is set (SIGTERM to the worker, Ctrl-C in the CLI) the current optimizer step finishes, a checkpoint of it
        is written and training returns ``interrupted``: a resume loses no step."""
        cfg = self.cfg
        last = min(self.max_steps, until_step or self.max_steps)
        started = time.perf_counter()
        wait0 = self.loader.wait_seconds
        losses: list[float] = []
        checkpoints: list[int] = []
        validations: list[dict[str, Any]] = []
        interrupted = False
        self.events(TrainEvent("train", self.step, self.max_steps, "training"))
        try:
            while self.step < last:
                if self._stopping(stop):
                    interrupted = True
                    if self.step > 0 and not self.store.is_committed(checkpoint_prefix(self.prefix, self.step)):
                        checkpoints.append(self.save_checkpoint())
                    break
                r = self.train_step()
                losses.append(r.loss)
                self.history.append(dataclasses.asdict(r))
                self.events(
                    TrainEvent(
                        "train",
                        r.step,
                        self.max_steps,
                        f"rollout {r.rollout_forwards} fwd" if self.rollout else "",  # the progress line shows it
                        loss=r.loss,
                        lr=r.lr,
                        seconds_per_step=r.seconds,
                        data_wait=r.data_wait,
                        grad_norm=r.grad_norm if cfg.max_grad_norm > 0 else None,  # else not computed
                        rollout_forwards=r.rollout_forwards if self.rollout else None,
                        gpu=gpu.memory(self.device, self.dist),
                    )
                )
                if r.step % cfg.checkpoint_step_interval == 0:
                    checkpoints.append(self.save_checkpoint())
                stopping = self._stopping(stop)
                if self.validate and r.step % cfg.validation_step_interval == 0 and not stopping:
                    validations.append(self._validate(r.step))
            if self.step == self.max_steps:
                lora_keys = self.export(f"{self.prefix}/lora")
                stopping = self._stopping(stop)
                if self.validate and self.step % cfg.validation_step_interval != 0 and not stopping:
                    validations.append(self._validate(self.step))
                if self.dist.main:
                    self.store.put_bytes(f"{self.prefix}/metrics.jsonl", self._metrics_jsonl())
                distributed.barrier(self.dist)
            else:
                lora_keys = []
        finally:
            self.loader.close()
        elapsed = time.perf_counter() - started
        wait = self.loader.wait_seconds - wait0
        return TrainSummary(
            self.run_id,
            self.step,
            losses,
            lora_keys,
            checkpoints,
            validations,
            wait / elapsed if elapsed > 0 else 0.0,
            elapsed,
            interrupted,
        )

    def _stopping(self, stop: threading.Event | None) -> bool:
        """Whether to stop at this step boundary; with several processes, when any rank was asked (torchrun
        passes a signal to every rank, but not at the same instant), so that all stop at the same step. A host
        tensor: the group has gloo for those beside nccl (``distributed.process_group_backend``)."""
        asked = stop is not None and stop.is_set()
        if not self.dist.active:
            return asked
        return bool(distributed.all_max(torch.tensor([float(asked)]), self.dist).item())

    def _clip_gradients(self) -> torch.Tensor:
        """The gradients' global norm before clipping (0 without max_grad_norm), then clip_grad_method's clip."""
        cfg = self.cfg
        if cfg.max_grad_norm <= 0:
            return torch.zeros((), device=self.device)
        if cfg.grad_clip_method == "norm":
            return torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grad_value_(self.params, cfg.max_grad_norm)
        return norm

    def train_step(self) -> StepResult:
        """One optimizer step: accumulate micro-batches, clip, step, schedule, EMA."""
        cfg = self.cfg
        step = self.step + 1
        t0 = time.perf_counter()
        wait0 = self.loader.wait_seconds
        A = cfg.gradient_accumulation_steps
        own = distributed.own_micro_batches(A, self.dist)
        losses = [torch.zeros((), device=self.device)] * A
        keys = []
        self.rollout_forwards = 0
        for micro in range(A):
            batch = self.loader.next_batch()  # every rank reads every batch: the loader's position is N's
            keys.append(batch.keys)
            if micro in own:  # DDP averages the gradients on this rank's last micro-batch only
                sync = micro == own[-1] or not self.dist.active
                with contextlib.nullcontext() if sync else self.forward_module.no_sync():
                    losses[micro] = self.forward_backward(batch, step, micro)
        grad_norm = self._clip_gradients()
        # One transfer to the host per step (not one per micro-batch and another for the norm): the losses, the
        # rollout forwards and the norm together, checked before the optimizer touches the weights. With several
        # processes each rank fills in its micro-batches' losses and the sum gives every rank all of them (and
        # the forwards of all ranks; the norm, of the averaged gradients, is the same on every rank: rank 0's is
        # kept).
        forwards = torch.tensor(float(self.rollout_forwards), device=losses[0].device)
        report = torch.stack([*losses, forwards, grad_norm.detach().float().to(losses[0].device)])
        if self.dist.active:
            report[-1] *= float(self.dist.main)
            distributed.all_sum(report, self.dist)
        *values, forwards_all, norm = report.tolist()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise TrainingDiverged(
                f"loss is {values[bad]} at step {step} (micro-batch {bad}); batch samples: {', '.join(keys[bad])}. "
                "Lower learning_rate, check these samples' images, or use mixed_precision fp32 to rule out "
                "overflow"
            )
        lr = float(self.scheduler.get_last_lr()[0])  # torchao's optimizers keep lr as a tensor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step = step
        total = sum(v / cfg.gradient_accumulation_steps for v in values)
        wait = self.loader.wait_seconds - wait0
        if self.dist.active:  # the slowest rank's data wait is the run's
            wait = float(distributed.all_max(torch.tensor([wait], dtype=torch.float64), self.dist).item())
        return StepResult(step, total, lr, time.perf_counter() - t0, wait, norm, int(forwards_all))

    def forward_backward(self, batch: EditBatch, step: int, micro: int) -> torch.Tensor:
        """One micro-batch's forward and backward; returns its loss, detached, on the device (no host sync)."""
        batch = batch.to(self.device, non_blocking=True)
        g = step_generator(self.cfg.seed, step, micro)
        if self.cfg.lora_dropout > 0:  # dropout masks from (seed, step, micro) too: any rank draws the same
            torch.manual_seed(
                int(torch.randint(0, 2**62, (), generator=step_generator(self.cfg.seed + 1, step, micro)))
            )
        B = batch.latents_BChw.shape[0]
        tokens, channels = batch.token_shape()
        noise_BLC = torch.randn(B, tokens, channels, generator=g).to(self.device)
        if self.shift_config is not None:  # flow_schedule_auto_shift: by this batch's image sequence length
            sigmas_B = sample_sigmas(B, 1.0, g, image_seq_len=tokens, scheduler=self.shift_config)
        else:
            sigmas_B = sample_sigmas(B, self.cfg.flow_schedule_shift, g)
        noisy_BLC = self._roll_out(batch, noise_BLC, sigmas_B, step, g) if self.rollout is not None else None
        # masked_loss_probability: drawn from the step's generator, only for batches with masks (others draw nothing)
        masked = batch.loss_mask_Bhw is not None and bool(
            torch.rand((), generator=g) < self.cfg.masked_loss_probability
        )
        loss = flow_matching_loss(
            self.forward_module,
            batch,
            noise_BLC,
            sigmas_B.to(self.device),
            self.dtype,
            noisy_BLC=noisy_BLC,
            masked=masked,
        )
        # DDP averages over the N ranks: N/A makes the sum over all micro-batches what one process computes (torch
        # leaves Tensor.backward unannotated)
        (loss * (self.dist.world / self.cfg.gradient_accumulation_steps)).backward()
        return loss.detach()

    def _roll_out(
        self, batch: EditBatch, noise_BLC: torch.Tensor, sigmas_B: torch.Tensor, step: int, g: torch.Generator
    ) -> torch.Tensor | None:
        """Scheduled sampling: the micro-batch's noisy input made by the current weights from a noisier point of
        the inference schedule (None: no sample rolled out). The transformer itself, not its DDP wrapper: no
        gradient, nothing to synchronise."""
        r = self.rollout
        assert r is not None and self.inference_config is not None  # called only with a rollout, set up in setup
        steps_B = r.draw_steps(batch.latents_BChw.shape[0], step - 1, g)
        schedule_N = inference_sigmas(self.inference_config, r.inference_steps, noise_BLC.shape[1])
        noisy_BLC, forwards = roll_out(
            self.transformer,
            batch,
            noise_BLC,
            sigmas_B,
            steps_B,
            schedule_N,
            sampler=r.sampler,
            order=r.order,
            dtype=self.dtype,
        )
        self.rollout_forwards += forwards
        return noisy_BLC

    @contextmanager
    def exported_weights(self) -> Iterator[None]:
        """Inside the block the adapter holds the weights the exported file holds: the EMA when use_ema, else a
        schedule-free optimizer's averaged weights."""
        with eval_weights(self.optimizer):
            if self.ema is None or not self.cfg.use_ema:
                yield
                return
            with self.ema.swapped_in():
                yield

    def _ema_device(self) -> torch.device:
        return self.device if self.cfg.ema_device == "accelerator" else torch.device("cpu")

    # ------------------------------------------------------------------------------ checkpoints, export
    def lora_state(self, ema: bool = False) -> dict[str, torch.Tensor]:
        from shared.model.lora import lora_state_dict

        sd = lora_state_dict(self.transformer)
        if ema and self.ema is not None:
            by_param = {n.replace(".default", ""): v for n, v in self.ema.state().items()}
            sd = {k: by_param.get(k, v) for k, v in sd.items()}
        return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}

    def export_files(self, ema: bool | None = None, fmt: str | None = None) -> dict[str, bytes]:
        from shared.model.lora import save_lora_files

        use_ema = self.cfg.use_ema if ema is None else ema
        with eval_weights(self.optimizer):  # a schedule-free optimizer exports its averaged weights
            state = self.lora_state(ema=use_ema)
        return save_lora_files(
            state,
            alpha=self.cfg.effective_lora_alpha,
            rank=self.cfg.lora_rank,
            fmt=fmt or self.cfg.lora_format,
            metadata={
                "edittuner.run": self.run_id,
                "edittuner.step": str(self.step),
                "edittuner.flavour": self.cfg.model_flavour,
                "edittuner.base_model": self.cfg.model_path,
                "edittuner.ema": str(bool(use_ema)),
            },
            transformer=self.transformer,
            comfyui_prefix=get_flavour(self.cfg.model_flavour).comfyui_lora_prefix,
        )

    def export(self, prefix: str, fmt: str | None = None) -> list[str]:
        """Rank 0 writes the files (the other ranks return no keys; the callers' barriers order the rest)."""
        if not self.dist.main:
            return []
        return [self.store.put_bytes(f"{prefix}/{name}", data).key for name, data in self.export_files(fmt=fmt).items()]

    def save_checkpoint(self) -> int:
        t0 = time.perf_counter()
        if self.dist.main:  # the state is the same on every rank; the commit marker is written last
            rng_tensors, rng = capture_rng()
            state = CheckpointState(
                step=self.step,
                lora=self.lora_state(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                loader=self.loader.state_dict(),
                ema=self.ema.state() if self.ema else None,
                rng_tensors=rng_tensors,
                rng=rng,
                extra={"history": self.history},
            )
            save_checkpoint(self.store, self.prefix, state, files=self.export_files())
            prune_checkpoints(self.store, self.prefix, self.cfg.checkpoints_total_limit)
            self.store.put_bytes(f"{self.prefix}/metrics.jsonl", self._metrics_jsonl())
        distributed.barrier(self.dist)
        self.events(
            TrainEvent(
                "checkpoint",
                self.step,
                self.max_steps,
                f"checkpoint step-{self.step}",
                seconds=time.perf_counter() - t0,
            )
        )
        return self.step

    def _validate(self, step: int) -> dict[str, Any]:
        self.events(TrainEvent("validation", step, self.max_steps, f"validation at step {step}"))
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            with torch.no_grad(), eval_weights(self.optimizer):  # previews of the weights a LoRA file holds
                result = self.validate(self, step) if self.validate and self.dist.main else {}
        except Exception as e:  # a broken preview must not cost the run; it is recorded and logged
            log.exception("validation at step %d failed", step)
            result = {"step": step, "error": f"{type(e).__name__}: {e}"}
        finally:
            self.transformer.train(was_training)
        distributed.barrier(self.dist)  # the other ranks wait for rank 0's previews
        self.history.append({"validation": result, "step": step})
        return result

    def _metrics_jsonl(self) -> bytes:
        return "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history).encode()
