"""The optimizers a config may name: SimpleTuner's names, each with the library that provides it.

Data only (no library is imported here): ``shared.train.optimizers`` builds them. A name is accepted by the config
when it is listed; whether its library is installed and the device supports it is checked when the run starts.

How a name's arguments are made, later ones winning: the library's defaults; SimpleTuner's settings for the name
where they differ from the library's (``defaults``); for the Adam-family names marked ``adam_args`` (EditTuner's
``adamw`` and ``adamw8bit`` as before, and the torch/bitsandbytes/torchao Adam and AdamW classes) ``adam_beta1``,
``adam_beta2``, ``adam_epsilon`` and ``adam_weight_decay``; ``optimizer_beta1`` with ``optimizer_beta2`` as
``betas``; ``optimizer_config``. ``learning_rate`` is the lr, except where a name has ``lr_default`` (Prodigy): there
learning_rate left at EditTuner's default means the library's lr (see ``prodigy``'s note); ``lr=`` in
optimizer_config sets it exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from typing_extensions import Unpack

WEIGHT_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class OptimizerSpec:
    target: str  # module.Class that implements it
    library: str  # the package to install (pip name)
    state_bytes: int  # optimizer state per trained parameter with the settings below (the planner's figure)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # SimpleTuner's settings that differ from the library's
    adam_args: bool = False  # betas, eps, weight_decay from adam_beta1/adam_beta2/adam_epsilon/adam_weight_decay
    cuda_only: str = ""  # why it needs CUDA ("" when it also runs on the CPU)
    cpu_instead: str = ""  # what to name on the CPU instead
    min_cuda_capability: tuple[int, int] | None = None  # on CUDA; the reason is in the note
    cuda_defaults: Mapping[str, Any] = field(default_factory=dict)  # added on CUDA (torch's fused kernels)
    schedule_free: bool = False  # train()/eval() modes, its own warmup (lr_warmup_steps), a constant lr schedule
    weights: Literal["fp32", "bf16"] = "fp32"  # the dtype the LoRA parameters train in
    lr_default: float | None = None  # the library's lr, used when learning_rate is left at EditTuner's default
    alias_of: str | None = None
    note: str = ""

    @property
    def module(self) -> str:
        return self.target.rsplit(".", 1)[0]

    @property
    def import_name(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def bytes_per_param(self) -> int:
        """Weight + gradient + optimizer state, per trained LoRA parameter."""
        return 2 * WEIGHT_BYTES[self.weights] + self.state_bytes


class _Options(TypedDict, total=False):
    """OptimizerSpec's keyword fields, as the helpers below take them."""

    adam_args: bool
    cuda_only: str
    cpu_instead: str
    min_cuda_capability: tuple[int, int] | None
    cuda_defaults: Mapping[str, Any]
    schedule_free: bool
    weights: Literal["fp32", "bf16"]
    lr_default: float | None
    alias_of: str | None
    note: str


# The option sets below are given with ** beside other keywords: each has exactly its keys, so that a type
# checker sees that no keyword is given twice.
class _Adam(TypedDict):
    adam_args: bool


class _Paged(TypedDict):
    cuda_only: str


class _Fp8(TypedDict):
    min_cuda_capability: tuple[int, int]
    note: str


_ADAM: _Adam = {"adam_args": True}
_PAGED: _Paged = {
    "cuda_only": "paged memory: bitsandbytes pages the state to host RAM under GPU memory pressure; on the CPU "
    "it would silently run the unpaged optimizer"
}
_AO = (
    "torch.compile per parameter shape (a C++ compiler on the CPU, Triton on CUDA); tensors under 4096 values "
    "keep fp32 state"
)
_FP8: _Fp8 = {
    "min_cuda_capability": (8, 9),
    "note": "fp8 state needs compute capability 8.9+ on CUDA (Ada, Hopper); a storage format only on the CPU. " + _AO,
}
_SF = "schedule-free: the exported LoRA is the averaged (eval-mode) weights; lr_warmup_steps is its own warmup"


def _torch(cls: str, state: int, defaults: Mapping[str, Any] | None = None, **kw: Unpack[_Options]) -> OptimizerSpec:
    return OptimizerSpec(f"torch.optim.{cls}", "torch", state, defaults or {}, **kw)


def _bnb(cls: str, state: int, defaults: Mapping[str, Any] | None = None, **kw: Unpack[_Options]) -> OptimizerSpec:
    return OptimizerSpec(f"bitsandbytes.optim.{cls}", "bitsandbytes", state, defaults or {}, **kw)


def _optimi(cls: str, state: int, defaults: Mapping[str, Any] | None = None, **kw: Unpack[_Options]) -> OptimizerSpec:
    return OptimizerSpec(f"optimi.{cls}", "torch-optimi", state, defaults or {}, **kw)


def _ao(cls: str, state: int, **kw: Unpack[_Options]) -> OptimizerSpec:
    return OptimizerSpec(f"torchao.optim.{cls}", "torchao", state, **({"note": _AO} | kw | _ADAM))


def _sf(note: str = "", **defaults: Any) -> OptimizerSpec:
    return OptimizerSpec(
        "schedulefree.AdamWScheduleFree",
        "schedulefree",
        8,
        {"betas": (0.9, 0.999), "eps": 1e-8} | defaults,
        schedule_free=True,
        note=_SF + (f"; {note}" if note else ""),
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": _torch(
        "AdamW", 8, cuda_defaults={"fused": True}, **_ADAM, note="EditTuner's default; fused kernel on CUDA"
    ),
    "adamw8bit": _bnb(
        "AdamW8bit", 2, alias_of="bnb-adamw8bit", **_ADAM, note="SimpleTuner's deprecated name for bnb-adamw8bit"
    ),
    "adamw_bf16": _optimi(
        "AdamW",
        6,
        {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6, "kahan_sum": True},
        weights="bf16",
        note="SimpleTuner's default, its AdamWBF16 (stochastic rounding); here "
        "torch-optimi's AdamW with Kahan summation (why: shared.train."
        "optimizers)",
    ),
    # torch.optim (SimpleTuner's torch-* names; torch-sparseadam is left out: LoRA gradients are dense)
    "torch-adam": _torch("Adam", 8, cuda_defaults={"fused": True}, **_ADAM),
    "torch-adamw": _torch("AdamW", 8, cuda_defaults={"fused": True}, **_ADAM),
    "torch-sgd": _torch("SGD", 0, note="momentum 0: no state"),
    "torch-radam": _torch("RAdam", 8),
    "torch-nadam": _torch("NAdam", 8),
    "torch-rmsprop": _torch("RMSprop", 4),
    "torch-adagrad": _torch("Adagrad", 4),
    "torch-adadelta": _torch("Adadelta", 8),
    "torch-adafactor": _torch("Adafactor", 1, note="factored second moment: a row and a column per matrix"),
    "torch-adamax": _torch("Adamax", 8),
    "torch-asgd": _torch("ASGD", 4),
    # torch-optimi (kahan_sum is left to optimi: on for bf16/fp16 weights, where it matters)
    "optimi-stableadamw": _optimi("StableAdamW", 8),
    "optimi-adamw": _optimi("AdamW", 8, {"weight_decay": 0.0}),
    "optimi-lion": _optimi("Lion", 4),
    "optimi-radam": _optimi("RAdam", 8, {"decouple_wd": True}),
    "optimi-ranger": _optimi("Ranger", 12),
    "optimi-adan": _optimi("Adan", 16, {"betas": (0.98, 0.92, 0.999)}),
    "optimi-adam": _optimi("Adam", 8),
    "optimi-sgd": _optimi("SGD", 0, note="momentum 0: no state"),
    # schedule-free
    "adamw_schedulefree": _sf(weight_decay=1e-2),
    "adamw_schedulefree+aggressive": _sf(weight_decay=1e-3, eps=1e-6),
    "adamw_schedulefree+no_kahan": _sf(
        "the library's class has no Kahan summation, which fp32 LoRA weights do "
        "not need: all three names are it, with SimpleTuner's settings",
        weight_decay=1e-3,
        eps=1e-6,
    ),
    "prodigy": OptimizerSpec(
        "prodigyopt.Prodigy",
        "prodigyopt",
        16,
        {"betas": (0.9, 0.99)},
        lr_default=1.0,
        note="lr 1.0 (Prodigy's and SimpleTuner's) when learning_rate is left at EditTuner's "
        "default 1e-4; another learning_rate is used as given, with a warning outside "
        "0.1-10; optimizer_config lr=... sets it exactly",
    ),
    # bitsandbytes (min_8bit_size 4096: smaller tensors keep 32-bit state)
    "bnb-adagrad": _bnb("Adagrad", 4),
    "bnb-adagrad8bit": _bnb("Adagrad8bit", 1),
    "bnb-adam": _bnb("Adam", 8, **_ADAM),
    "bnb-adam8bit": _bnb("Adam8bit", 2, **_ADAM),
    "bnb-adamw": _bnb("AdamW", 8, **_ADAM),
    "bnb-adamw8bit": _bnb("AdamW8bit", 2, **_ADAM),
    "bnb-adamw-paged": _bnb("PagedAdamW", 8, cpu_instead="bnb-adamw or adamw", **_PAGED, **_ADAM),
    "bnb-adamw8bit-paged": _bnb("PagedAdamW8bit", 2, cpu_instead="bnb-adamw8bit or adamw", **_PAGED, **_ADAM),
    "bnb-lion": _bnb("Lion", 4),
    "bnb-lion8bit": _bnb("Lion8bit", 1),
    "bnb-lion-paged": _bnb("PagedLion", 4, cpu_instead="bnb-lion", **_PAGED),
    "bnb-lion8bit-paged": _bnb("PagedLion8bit", 1, cpu_instead="bnb-lion8bit", **_PAGED),
    "bnb-ademamix": _bnb("AdEMAMix", 12),
    "bnb-ademamix8bit": _bnb("AdEMAMix8bit", 3),
    "bnb-ademamix-paged": _bnb("PagedAdEMAMix", 12, cpu_instead="bnb-ademamix", **_PAGED),
    "bnb-ademamix8bit-paged": _bnb("PagedAdEMAMix8bit", 3, cpu_instead="bnb-ademamix8bit", **_PAGED),
    # torchao low-bit state
    "ao-adamw8bit": _ao("AdamW8bit", 2),
    "ao-adamw4bit": _ao("AdamW4bit", 1),
    "ao-adamfp8": _ao("AdamFp8", 2, **_FP8),
    "ao-adamwfp8": _ao("AdamWFp8", 2, **_FP8),
}


def check_optimizer(name: str) -> str | None:
    if name in OPTIMIZERS:
        return None
    import difflib

    hint = difflib.get_close_matches(name, list(OPTIMIZERS), n=1)
    return (
        f"{name!r} is not an optimizer EditTuner knows"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + "; one of "
        + ", ".join(sorted(OPTIMIZERS))
    )


# ------------------------------------------------------------------------------------------ optimizer_config
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_optimizer_config(text: str | None) -> dict[str, Any]:
    """SimpleTuner's ``optimizer_config``, 'weight_decay=0.0,eps=1e-6', as keyword arguments: integers, numbers
    (1e5, -0.5, inf), true/false and none become values, anything else stays a string. ValueError on a malformed
    or repeated item."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or not _KEY.fullmatch(key) or not raw:
            raise ValueError(f"{item.strip()!r} is not key=value (write e.g. 'weight_decay=0.0,eps=1e-6')")
        if key in out:
            raise ValueError(f"{key!r} is given twice")
        out[key] = _value(raw)
    return out


def _value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(low):
        return float(low)
    return raw


# ------------------------------------------------------------------------------------------------ the table
def optimizer_table_markdown() -> str:
    """name | library.class | CPU? | notes, one row per name (docs/CONFIGURATION.md includes it)."""
    rows = ["| name | library.class | CPU? | notes |", "|---|---|---|---|"]
    for name, s in OPTIMIZERS.items():
        if s.cuda_only:
            cpu = f"no: needs CUDA ({s.cuda_only.split(':')[0]}); use {s.cpu_instead}"
        elif s.min_cuda_capability:
            cpu = "yes (CUDA: compute capability {}.{}+)".format(*s.min_cuda_capability)
        else:
            cpu = "yes"
        notes = [s.note] if s.note else []
        if s.weights != "fp32":
            notes.append(f"LoRA weights in {s.weights}")
        if s.defaults:
            notes.append("SimpleTuner's " + ", ".join(f"{k}={v}" for k, v in s.defaults.items()))
        if s.adam_args:
            notes.append("betas/eps/weight_decay from adam_*")
        notes.append(f"{s.bytes_per_param} B/param with weight and grad")
        lib = s.library if s.library == s.import_name else f"{s.library} (`{s.import_name}`)"
        rows.append(f"| `{name}` | {lib}: `{s.target}` | {cpu} | {'; '.join(notes)} |")
    return "\n".join(rows) + "\n"
