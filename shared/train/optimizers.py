"""The configured optimizer, built by the library made for it, and the schedule-free optimizers' weight modes.

The names, libraries and settings are data (``shared.config.optimizers``); here only the chosen library is imported,
its arguments are assembled and checked against the class's own signature (an ``optimizer_config`` key it does not
take is an error naming the keys it does), and the device is checked before anything is allocated.

``adamw_bf16`` is torch-optimi's AdamW with Kahan summation over bf16 LoRA weights, not torchao's
``_AdamW(bf16_stochastic_round=True)`` (SimpleTuner's own AdamWBF16 rounds stochastically too):

- Kahan summation is deterministic. Stochastic rounding draws random bits for every element of every update
  (torchao: ``torch.randint`` inside a compiled graph), so the trajectory depends on a random stream besides the
  run's own; with Kahan a resumed run repeats the uninterrupted one bit for bit, as every other optimizer here does.
- The compensation buffer carries what rounding to bf16 lost into the next step, so the small updates of LoRA
  training are not lost; stochastic rounding keeps them only in expectation and adds noise per step. torch-optimi
  reports bf16 training with Kahan summation matching fp32-weight training.
- No torch.compile: torchao compiles its step per parameter shape (slow on the CPU, Triton on CUDA); optimi runs
  eager foreach (or its Triton) kernels. The price is the bf16 compensation buffer, 2 bytes per LoRA parameter.

Schedule-free optimizers (``adamw_schedulefree*``) train at one point of their iterate sequence and export another,
the average: ``eval_weights`` puts the average in the parameters for export, validation and previews, and puts the
training weights back exactly afterwards (the library's ``train()`` after ``eval()`` is equal only up to rounding,
which would make every export perturb the run).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

from shared.config.optimizers import OPTIMIZERS, OptimizerSpec, parse_optimizer_config
from shared.config.schema import TrainConfig
from shared.errors import InvalidInput
from shared.train.toolchain import require_compiler

log = logging.getLogger(__name__)

_DEFAULT_LR = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "learning_rate")
_NOT_ARGUMENTS = {"self", "params", "args"}  # bitsandbytes' `args` is its internal config object
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the LoRA parameters train in: fp32, except for optimizers made for bf16 weights (adamw_bf16)."""
    return _DTYPES[OPTIMIZERS[cfg.optimizer].weights]


def lr_scheduler_name(cfg: TrainConfig) -> str:
    """Schedule-free optimizers schedule themselves: a constant lr schedule, as SimpleTuner overrides it."""
    if not OPTIMIZERS[cfg.optimizer].schedule_free:
        return cfg.lr_scheduler
    if cfg.lr_scheduler != "constant":
        log.warning(
            "lr_scheduler %s is not used with %s: schedule-free optimizers keep the lr constant (their "
            "warmup is lr_warmup_steps=%d)",
            cfg.lr_scheduler,
            cfg.optimizer,
            cfg.lr_warmup_steps,
        )
    return "constant"


def check_optimizer_args(cfg: TrainConfig, device: torch.device) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class and its arguments, or InvalidInput: the device, the library, optimizer_config and the betas are
    checked here, which the trainer does before it loads the model."""
    spec = OPTIMIZERS[cfg.optimizer]
    check_device(cfg.optimizer, spec, device)
    if spec.import_name == "torchao":  # compiled per parameter shape at its first step
        require_compiler(f"optimizer={cfg.optimizer}", "use a bitsandbytes 8-bit optimizer (bnb-adamw8bit) instead")
    cls = optimizer_class(cfg.optimizer, spec)
    return cls, optimizer_kwargs(cfg, spec, cls, device)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    name = cfg.optimizer
    spec = OPTIMIZERS[name]
    cls, kwargs = check_optimizer_args(cfg, device)
    _log_lr(cfg, spec, kwargs["lr"])
    try:
        optimizer = cls(params, **kwargs)
    except (TypeError, ValueError) as err:  # a value of the wrong kind or out of range, from optimizer_config
        raise InvalidInput(f"optimizer {name} ({spec.target}) refused its arguments {kwargs}: {err}") from None
    if spec.schedule_free:
        # it starts in eval mode and refuses to step there; torch.optim.Optimizer has no train(), schedule-free ones do
        optimizer.train()  # type: ignore[attr-defined]
    return optimizer


def check_device(name: str, spec: OptimizerSpec, device: torch.device) -> None:
    if spec.cuda_only and device.type != "cuda":
        raise InvalidInput(f"optimizer {name} needs CUDA ({spec.cuda_only}): use {spec.cpu_instead} on the CPU")
    if spec.min_cuda_capability and device.type == "cuda":
        have = torch.cuda.get_device_capability(device)
        if have < spec.min_cuda_capability:
            need = "{}.{}".format(*spec.min_cuda_capability)
            raise InvalidInput(
                f"optimizer {name} needs CUDA compute capability {need} or newer for fp8 state; "
                f"{torch.cuda.get_device_name(device)} has {have[0]}.{have[1]}: use ao-adamw8bit or "
                "bnb-adamw8bit"
            )


def optimizer_class(name: str, spec: OptimizerSpec) -> type[torch.optim.Optimizer]:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        raise InvalidInput(
            f"optimizer {name} needs the {spec.library} package, which is not installed here "
            f"({err}): pip install {spec.library}"
        ) from None
    return cast("type[torch.optim.Optimizer]", getattr(module, spec.target.rsplit(".", 1)[1]))


def accepted_arguments(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """Keyword argument → default of the optimizer class's constructor (what optimizer_config may set)."""
    sig = inspect.signature(cls.__init__)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in _NOT_ARGUMENTS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def optimizer_kwargs(
    cfg: TrainConfig, spec: OptimizerSpec, cls: type[torch.optim.Optimizer], device: torch.device
) -> dict[str, Any]:
    """The constructor's keyword arguments, in the order of precedence the config module describes."""
    name = cfg.optimizer
    accepted = accepted_arguments(cls)
    try:
        extra = parse_optimizer_config(cfg.optimizer_config)
    except ValueError as err:
        raise InvalidInput(f"optimizer_config: {err}") from None
    unknown = sorted(set(extra) - set(accepted))
    if unknown:
        raise InvalidInput(
            f"optimizer_config: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an "
            f"argument of {name} ({spec.target}); it takes {', '.join(sorted(accepted))}"
        )
    if "betas" in extra:
        raise InvalidInput(
            "optimizer_config: betas cannot be written there (',' separates the items); use "
            "optimizer_beta1 and optimizer_beta2"
        )
    kw: dict[str, Any] = {"lr": _lr(cfg, spec)} | dict(spec.defaults)
    if spec.adam_args:
        kw |= {
            "betas": (cfg.adam_beta1, cfg.adam_beta2),
            "eps": cfg.adam_epsilon,
            "weight_decay": cfg.adam_weight_decay,
        }
    if (cfg.optimizer_beta1 is None) != (cfg.optimizer_beta2 is None):
        raise InvalidInput("optimizer_beta1 and optimizer_beta2 go together: give both or neither")
    if cfg.optimizer_beta1 is not None:
        if "betas" not in accepted:
            raise InvalidInput(f"optimizer_beta1/optimizer_beta2: {name} ({spec.target}) takes no betas")
        default = tuple(kw.get("betas", accepted["betas"]))
        kw["betas"] = (cfg.optimizer_beta1, cfg.optimizer_beta2, *default[2:])  # Adan, AdEMAMix keep a third
    if spec.schedule_free:
        kw["warmup_steps"] = cfg.lr_warmup_steps
    if device.type == "cuda":
        kw |= dict(spec.cuda_defaults)
    return kw | extra


def _lr(cfg: TrainConfig, spec: OptimizerSpec) -> float:
    if spec.lr_default is not None and cfg.learning_rate == _DEFAULT_LR:
        return spec.lr_default
    return cfg.learning_rate


def _log_lr(cfg: TrainConfig, spec: OptimizerSpec, lr: float) -> None:
    if spec.lr_default is None:
        return
    if cfg.learning_rate == _DEFAULT_LR and lr == spec.lr_default:
        log.info(
            "%s: lr %g, its own default (learning_rate was left at EditTuner's %g; optimizer_config lr=... "
            "sets another)",
            cfg.optimizer,
            lr,
            _DEFAULT_LR,
        )
    elif not 0.1 <= lr / spec.lr_default <= 10:
        log.warning(
            "%s: lr %g is far from %g; its lr scales the step size it estimates, so values near 1.0 are "
            "the usual choice",
            cfg.optimizer,
            lr,
            spec.lr_default,
        )


# ------------------------------------------------------------------------------------- schedule-free modes
def is_schedule_free(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextmanager
@torch.no_grad()
def eval_weights(optimizer: Any) -> Iterator[None]:
    """Inside the block the parameters hold a schedule-free optimizer's averaged (eval-mode) weights; after it,
    the training weights bit for bit and train mode. A no-op for other optimizers, and when already in eval mode
    (nested blocks)."""
    if not is_schedule_free(optimizer) or not all(g.get("train_mode", True) for g in optimizer.param_groups):
        yield
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()  # the library's own mode flags ...
        for p, s in zip(params, saved, strict=True):  # ... and the training weights exactly, not up to rounding
            p.copy_(s)
