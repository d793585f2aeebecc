"""Quantize the frozen base transformer for LoRA training (``base_model_precision``), and the text encoder for
encoding (``text_encoder_1_precision``, the same two libraries).

Only the base weights are quantized; the LoRA adapters attached afterwards (``shared.model.lora.attach_lora``) stay in
floating point and are the only thing that trains. Two libraries:

- optimum-quanto (``*-quanto``): ``quantize`` + ``freeze`` replace each ``nn.Linear`` by a ``QLinear`` holding
  int8/int4/int2/float8 weights. Works on CPU and CUDA; peft wraps ``QLinear`` (an ``nn.Linear`` subclass) with
  its generic LoRA layer.
- bitsandbytes (``*-bnb``): diffusers' ``BitsAndBytesConfig`` refuses to load without a GPU, so we swap the
  ``nn.Linear`` modules for ``bnb.nn.Linear4bit`` (NF4) / ``Linear8bitLt`` ourselves; bitsandbytes quantizes a
  weight when it is moved with ``.to(device)``. Setting ``is_loaded_in_4bit``/``is_loaded_in_8bit`` on the model
  makes peft use its bitsandbytes LoRA layers, exactly as after a diffusers bnb load. Works on CPU and CUDA.

Both keep ``KEEP_HIGH_PRECISION`` unquantized: the network's entry and exit layers, where quantization error is
not averaged out by later layers (see the constant).

On CUDA both libraries would take kernels the CPU never runs; two of them are wrong or unbuildable where users
train, so this module keeps every device on the kernels the CPU tests exercise (``pure_torch_quanto``,
``Linear8bitDequant``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import types
from collections.abc import Callable
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any, cast

import torch

from shared import errors

if TYPE_CHECKING:
    from bitsandbytes.nn.modules import Params4bit

log = logging.getLogger(__name__)

QUANTO = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")
BNB = ("nf4-bnb", "int8-bnb")
PRECISIONS: tuple[str, ...] = ("no_change", *QUANTO, *BNB)
# text_encoder_1_precision: the values SimpleTuner accepts that this module can apply (SimpleTuner has no int8-bnb
# for text encoders; its torchao and fp8-native values are not built here).
TEXT_ENCODER_PRECISIONS: tuple[str, ...] = ("no_change", *QUANTO, "nf4-bnb")

# Modules kept in the compute dtype (a name matches itself and everything below it). img_in / txt_in project the
# inputs into the residual stream, time_text_embed feeds every block's modulation, norm_out.linear and proj_out
# write the predicted velocity itself: an error there reaches the loss undiluted. Together they are ~0.1% of the
# 20B parameters. This is the Qwen-Image counterpart of what SimpleTuner and most Flux quantization code exclude
# (x_embedder, context_embedder, norm_out, proj_out).
# Qwen-Image-2.1's one ``modulation`` (shared by all 32 blocks, ~1% of its 7B) is kept for the same reason.
KEEP_HIGH_PRECISION: tuple[str, ...] = ("img_in", "txt_in", "time_text_embed", "norm_out", "proj_out", "modulation")

# With quantize_activations a quanto module returns a quantized tensor, which the modulation code cannot split
# (``mod_params.chunk(3)`` on a QTensor fails) and the LayerNorms' outputs feed; those keep float activations and
# get their weights quantized in a second, weights-only pass.
_FLOAT_ACTIVATIONS: tuple[str, ...] = ("*_mod.*", "*norm*")

_LIBRARY = {"quanto": ("optimum.quanto", "optimum-quanto"), "bnb": ("bitsandbytes", "bitsandbytes")}


def _keep_patterns() -> list[str]:
    return [p for name in KEEP_HIGH_PRECISION for p in (name, f"{name}.*")]


def keeps_high_precision(name: str) -> bool:
    """Whether module ``name`` is left unquantized (it or an ancestor is in KEEP_HIGH_PRECISION)."""
    return any(fnmatch(name, p) for p in _keep_patterns())


# ---------------------------------------------------------------------------------------------- validation
def check_precision(
    precision: str, device: torch.device | str, quantize_activations: bool = False, option: str = "base_model_precision"
) -> None:
    """Raise InvalidInput for a combination that cannot work here, before any weight is touched; ``option`` is the
    config key the precision comes from, named in the message."""
    known = PRECISIONS if option == "base_model_precision" else TEXT_ENCODER_PRECISIONS
    if precision not in known:
        raise errors.InvalidInput(f"{option} {precision!r} is unknown: expected one of " + ", ".join(known))
    if quantize_activations and precision not in QUANTO:
        raise errors.InvalidInput(
            f"quantize_activations only applies to the quanto precisions ({', '.join(QUANTO)}); "
            f"base_model_precision is {precision!r}: set quantize_activations to false"
        )
    if precision == "no_change":
        return
    lib = "quanto" if precision in QUANTO else "bnb"
    module, package = _LIBRARY[lib]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise errors.InvalidInput(
            f"{option} {precision!r} needs the {package} package, which is not "
            f"installed: pip install {package}, or use {option} no_change"
        )
    dev = torch.device(device)
    if lib == "bnb" and dev.type not in ("cpu", "cuda", "xpu"):
        raise errors.InvalidInput(
            f"{option} {precision!r}: bitsandbytes does not run on {dev.type}; "
            "use a quanto precision (e.g. int8-quanto) there"
        )
    if precision == "fp8-quanto" and not float8_supported(dev):
        raise errors.InvalidInput(f"{option} fp8-quanto: {dev} cannot hold float8 tensors; use int8-quanto instead")


def float8_supported(device: torch.device | str) -> bool:
    """Whether ``device`` can store and convert float8 (e4m3fn) tensors: a probe, not a table of chips."""
    try:
        probe = torch.ones(2, device=device).to(torch.float8_e4m3fn).to(torch.float32)
        return bool(probe.sum().item() == 2.0)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# ---------------------------------------------------------------------------------------------- entry point
def quantize_transformer(
    transformer: Any,
    precision: str,
    *,
    device: torch.device | str,
    compute_dtype: torch.dtype,
    quantize_via: str = "accelerator",
    quantize_activations: bool = False,
) -> Any:
    """Put ``transformer`` on ``device`` in ``compute_dtype`` with its base weights in ``precision``.

    ``quantize_via="cpu"`` quantizes on the CPU and moves the result: the device never holds the full-precision
    weights (the 20B model does not fit a 24 GB card in bf16), at the cost of a slower quantization.
    ``"accelerator"`` quantizes on the device, which is faster where the full-precision model fits.
    Returns the same (modified in place) module, frozen (no parameter requires grad).
    """
    device = torch.device(device)
    check_precision(precision, device, quantize_activations)
    if _from_quantized_file(transformer) and precision != "no_change":
        log.info(
            "the transformer file's Linears keep its own quantization; base_model_precision %s applies to a "
            "full-precision base only and is not applied",
            precision,
        )
        precision, quantize_activations = "no_change", False
    if quantize_via not in ("cpu", "accelerator"):
        raise errors.InvalidInput(f"quantize_via {quantize_via!r} is unknown: expected 'cpu' or 'accelerator'")
    transformer.requires_grad_(False)
    if (
        quantize_via == "accelerator"
        and precision in QUANTO
        and not fits_to_quantize_on(transformer, device, compute_dtype)
    ):
        quantize_via = "cpu"
    where = torch.device("cpu") if quantize_via == "cpu" else device
    try:
        if precision == "no_change":
            _move(transformer, device, compute_dtype)
        elif precision in QUANTO:
            _move(transformer, where, compute_dtype)
            _quantize_quanto(transformer, precision, quantize_activations)
            transformer.to(device)
        else:
            _move(transformer, None, compute_dtype)  # bnb quantizes from the compute dtype, in .to(device) below
            _swap_bnb_linears(transformer, precision, compute_dtype)
            transformer.to(where)  # bitsandbytes quantizes each weight as it moves
            if where != device:
                transformer.to(device)
    except torch.OutOfMemoryError as err:
        hint = " quantize_via=cpu avoids holding the full-precision weights there;" if quantize_via != "cpu" else ""
        raise errors.ResourceExhausted(
            f"out of memory on {device} while quantizing the transformer to "
            f"{precision}:{hint} or free memory on the device ({err})"
        ) from err
    transformer.requires_grad_(False)
    counts = quantized_modules(transformer)
    log.info("base model %s on %s: %d quantized layers", precision, device, len(counts))
    return transformer


def quantize_text_encoder(
    text_encoder: Any, precision: str, *, device: torch.device | str, compute_dtype: torch.dtype
) -> Any:
    """Put the Qwen2.5-VL text encoder on ``device`` with its ``nn.Linear`` weights in ``precision``
    (``text_encoder_1_precision``), quantized on the CPU first so the device never holds the full-precision
    weights. Every linear layer is quantized, the vision tower's included: the encoder only runs forward, its
    output is averaged over no later layer the way the transformer's is, and SimpleTuner quantizes it whole too.
    The embedding table (an ``nn.Embedding``) stays in ``compute_dtype``."""
    device = torch.device(device)
    check_precision(precision, device, option="text_encoder_1_precision")
    text_encoder.requires_grad_(False)
    if precision == "no_change":
        _move(text_encoder, device, compute_dtype)
    elif precision in QUANTO:
        _move(text_encoder, torch.device("cpu"), compute_dtype)
        _quantize_quanto(text_encoder, precision, False, keep=[])
        text_encoder.to(device)
    else:
        _move(text_encoder, None, compute_dtype)
        _swap_bnb_linears(text_encoder, precision, compute_dtype, keep=[])
        text_encoder.to(device)  # bitsandbytes quantizes each weight as it moves
    log.info("text encoder %s on %s: %d quantized layers", precision, device, len(quantized_modules(text_encoder)))
    return text_encoder


def fits_to_quantize_on(
    module: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype, free_bytes: int | None = None
) -> bool:
    """Whether ``device`` has room for ``module``'s full-precision weights, which quantize_via=accelerator moves
    there before quanto quantizes them (the 20B transformer: ~41 GB in bf16, more than a 24 or 40 GB card has).
    When it has not, the caller quantizes on the CPU instead and says so: the same weights, a slower load, and no
    out-of-memory minutes into it. ``free_bytes`` (default: what CUDA reports free) is injectable for tests."""
    if device.type != "cuda":
        return True
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    needed = sum(
        p.numel() * (compute_dtype.itemsize if p.is_floating_point() else p.element_size())
        for p in module.parameters()
        if p.device.type != "cuda"
    )  # what is there already is in free_bytes
    margin = 2 * 2**30  # the CUDA context, the quantized copies of the largest layers while freeze() runs
    if needed + margin <= free_bytes:
        return True
    log.warning(
        "quantize_via=accelerator: the full-precision weights (%.1f GiB) do not fit the %.1f GiB free on %s; "
        "quantizing on the CPU instead (set quantize_via=cpu to skip this check)",
        needed / 2**30,
        free_bytes / 2**30,
        device,
    )
    return False


def _move(module: torch.nn.Module, device: torch.device | None, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, passing the dtype only when a weight needs casting: diffusers' ``to(dtype=)``
    logs a warning about fp32-kept modules on every call, even when Qwen-Image has none."""
    needs_cast = any(p.is_floating_point() and p.dtype != dtype for p in module.parameters())
    if needs_cast:
        module.to(device=device, dtype=dtype)
    elif device is not None:
        module.to(device)


# --------------------------------------------------------------------------------------------------- quanto
def pure_torch_quanto() -> None:
    """Keep optimum-quanto on its pure-torch kernels on every device (call before quantizing; idempotent).

    On a Linux host with CUDA, quanto registers CUDA kernels that live in an extension it compiles on first use
    (nvcc, ninja and g++, writing into its own site-packages folder; 79 s on an H200 host with CUDA 13 and 16
    cores, a crash where there is no toolkit): int4 and int2 weights are unpacked by it on every move to the GPU
    and in every backward, and float8 weights become ``MarlinF8QBytesTensor``, whose forward never adds the
    Linear's bias (every Qwen-Image and Qwen2.5-VL projection has one: the output is noise). Its CPU unpack is a
    C++ extension compiled the same way. So: every registered quanto extension is given, in place of the library
    it would compile, the one kernel the chosen weight classes call (``unpack``) in torch ops, and the Marlin
    (fp8) and AWQ (int4, fp16 scales) weight classes, which exist only in the CUDA extension, are never chosen.
    What is left is what the CPU tests run: dequantize-and-matmul for int8/fp8/int2, and PyTorch's built-in int4
    kernel (TinyGemm) for int4 with bf16 scales on CUDA 12.1+ and on the CPU. No compiler is needed anywhere, and
    the weights are the same bytes either way. (Registering other kernels for ``quanto::unpack`` instead is refused
    by torch 2.11, which does not let Python override a Python registration.)"""
    import optimum.quanto  # noqa: F401  (registers quanto's ops and its extensions first)
    from optimum.quanto.library.extensions import extension
    from optimum.quanto.tensor.weights import qbits, qbytes

    kernels = types.SimpleNamespace(unpack=unpack_bits)
    for ext in extension._extensions.values():  # quanto_cpp everywhere, quanto_cuda on Linux with CUDA
        ext._lib = kernels  # what Extension.lib returns instead of compiling
    if getattr(qbytes.is_extension_available, "_edittuner", False):
        return

    def without_cuda_extension(name: str, _available: Callable[[str], bool] = qbytes.is_extension_available) -> bool:
        return name != "quanto_cuda" and _available(name)

    without_cuda_extension.__dict__["_edittuner"] = True  # a function attribute, which mypy does not model
    qbytes.is_extension_available = without_cuda_extension
    qbits.is_extension_available = without_cuda_extension


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's ``unpack`` in torch ops (its "default" kernel, which its decorator does not hand back): byte ``j``
    of row block ``i`` holds value ``i`` of ``8 // bits`` in bits ``i*bits .. (i+1)*bits``; the blocks are
    concatenated along dim 0, as quanto's PackedTensor lays them out."""
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


def _quanto_types(precision: str) -> tuple[Any, Any]:
    """(weight qtype, activation qtype): quanto quantizes activations to int8 or float8 only."""
    from optimum import quanto

    weights = {
        "int8-quanto": quanto.qint8,
        "int4-quanto": quanto.qint4,
        "int2-quanto": quanto.qint2,
        "fp8-quanto": quanto.qfloat8,
    }[precision]
    return weights, (quanto.qfloat8 if precision == "fp8-quanto" else quanto.qint8)


def _quantize_quanto(
    transformer: Any, precision: str, quantize_activations: bool, keep: list[str] | None = None
) -> None:
    """quanto in place. Activations are quantized at quanto's default scale of 1 (there is no calibration data at
    load time; SimpleTuner does the same): fine for float8, coarse for int8, which rounds activations to integers
    (measured on the tiny model: velocity error 0.45% with fp8 activations, 7% with int8, 0.04% weights-only)."""
    from optimum.quanto import freeze, quantize

    pure_torch_quanto()
    weights, activations = _quanto_types(precision)
    keep = _keep_patterns() if keep is None else keep
    if quantize_activations:
        if activations.name == "qint8":
            log.warning(
                "quantize_activations with %s: int8 activations are not calibrated (scale 1) and lose "
                "precision; fp8-quanto quantizes activations to float8, which keeps it",
                precision,
            )
        quantize(transformer, weights=weights, activations=activations, exclude=keep + list(_FLOAT_ACTIVATIONS))
        already = set(quantized_modules(transformer))
        rest = [
            n
            for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and n not in already and not any(fnmatch(n, p) for p in keep)
        ]
        if rest:
            quantize(transformer, weights=weights, include=rest)
    else:
        quantize(transformer, weights=weights, exclude=keep)
    freeze(transformer)


# ------------------------------------------------------------------------------------------------ bitsandbytes
def _swap_bnb_linears(
    transformer: Any, precision: str, compute_dtype: torch.dtype, keep: list[str] | None = None
) -> None:
    """Replace every quantizable ``nn.Linear`` (not matching ``keep``, default KEEP_HIGH_PRECISION) by its
    bitsandbytes twin holding the same (not yet quantized) weights; the next ``.to(device)`` quantizes them."""
    # bnb.nn re-exports these without declaring it (no __all__): imported from where they are defined
    from bitsandbytes.nn.modules import Int8Params, Linear4bit, Params4bit

    keep = _keep_patterns() if keep is None else keep
    targets = [
        (n, m)
        for n, m in transformer.named_modules()  # exact type: never re-wrap a bnb layer
        if type(m) is torch.nn.Linear and not any(fnmatch(n, p) for p in keep)
    ]
    for name, linear in targets:
        # Int8Params quantizes only when moved *from* the CPU; Params4bit from anywhere. Start both on the CPU.
        weight = linear.weight.data.to("cpu")
        bias = linear.bias.data.to("cpu") if linear.bias is not None else None
        if precision == "nf4-bnb":
            new = Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            new.weight = Params4bit(weight, requires_grad=False, quant_type="nf4", module=new)
            # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights into an inference-only layout on
            # the first eval-mode forward, and every training forward after it fails (measured: RuntimeError in
            # matmul_4bit). A validation pass mid-training is exactly that sequence: keep the trainable layout.
            new.support_avx512bf16_for_cpu = False
        else:
            new = linear8bit_dequant()(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            new.weight = Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias, requires_grad=False)
        new.train(linear.training)
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name) if parent_name else transformer, child, new)
    transformer.is_loaded_in_4bit = precision == "nf4-bnb"
    transformer.is_loaded_in_8bit = precision == "int8-bnb"


@functools.cache
def linear8bit_dequant() -> type:
    """``bnb.nn.Linear8bitLt`` whose matmul is always the dequantized int8 weight times the input, in the input's
    dtype (bitsandbytes' ``MatMul8bitFp``), in training and in eval, on every device.

    Stock ``Linear8bitLt`` takes that path only for a training forward on the CPU or XPU. Everywhere else — every
    CUDA forward, and every eval forward — it takes ``MatMul8bitLt``, which casts the bf16 input to **fp16**
    (values above 65504 become inf; Qwen-Image's activations get there) and int8-quantizes it row by row, losing
    outlier channels unless ``threshold`` splits them off; and it logs a warning on every call (~840 per
    forward). So a LoRA trained on int8-bnb would train on another function on a GPU than the CPU tests measure,
    and preview through a third. This class keeps one function: the weights stay int8 in memory (the point of the
    precision); the dequantized copy of one Linear lives only for its matmul. ``threshold`` is still set to
    bitsandbytes' LLM.int8() default, 6.0, for any caller that reaches the stock kernel through ``state``."""
    from bitsandbytes.autograd._functions import MatMul8bitFp
    from bitsandbytes.nn.modules import Int8Params, Linear8bitLt

    class Linear8bitDequant(Linear8bitLt):
        weight: Int8Params  # as Linear8bitLt.__init__ sets it (nn.Linear declares a Tensor)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.state.is_training = self.training
            if self.weight.CB is not None:
                self.init_8bit_state()  # type: ignore[no-untyped-call]  # bitsandbytes leaves it unannotated
            if self.bias is not None and self.bias.dtype != x.dtype:
                self.bias.data = self.bias.data.to(x.dtype)
            # MatMul8bitFp.forward returns the product, a Tensor
            out: torch.Tensor = MatMul8bitFp.apply(x, self.weight, None, self.bias, self.state)
            if not self.state.has_fp16_weights and self.state.CB is not None:
                self.weight.data = self.state.CB
            return out

    return Linear8bitDequant


# ---------------------------------------------------------------------------------------------------- reports
def quantized_modules(model: torch.nn.Module) -> dict[str, str]:
    """Module name → how its weight is stored (``quanto:qint4``, ``bnb:nf4``, ``bnb:int8``, ``file:Q8_0`` for a
    layer kept in a transformer file's own type), for quantized layers
    only: what the trainer logs and the tests assert on."""
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is not None:
            out[name] = kind
    return out


def _from_quantized_file(model: torch.nn.Module) -> bool:
    return any(str(_kind(m)).startswith("file:") for m in model.modules())


def _kind(m: torch.nn.Module) -> str | None:
    cls = type(m)
    if cls.__module__ == "shared.model.frozen_linear":  # Fp8Linear, FrozenGGUFLinear: a file's own types
        from shared.model.frozen_linear import file_type

        return f"file:{file_type(m)}"
    if cls.__module__.startswith("optimum.quanto") and (qtype := getattr(m, "weight_qtype", None)) is not None:
        return f"quanto:{qtype.name}"
    if cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes"):
        return f"bnb:{cast('Params4bit', m.weight).quant_type}"  # a Linear4bit's weight (Module.__getattr__)
    if any(c.__name__ == "Linear8bitLt" and c.__module__.startswith("bitsandbytes") for c in cls.__mro__):
        return "bnb:int8"
    return None


def trainable_parameter_report(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements, for the "training 0.4% of 20.4B" log line. The trainable count is
    exact; ``total`` counts what each library reports: quanto weights their logical size, a bnb 4-bit weight its
    packed bytes (half the values), so ``total`` understates an nf4 model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
