"""One transformer block per precision, measured on this device: quantized by the training code against the same
weights in bf16 (the block's update: relative error and cosine; every quantized Linear's bias at a zero input;
the weight classes the libraries chose), then a rank-16 fp32 LoRA with gradient checkpointing trained through it
(finite, non-zero gradients), timed, with the device's allocated and reserved peaks.

At real width (3072 wide, 24 heads of 128, text 3584) this is what a GPU host runs; on a CPU the small block (128
wide) is what the test suite runs. One block of the real class (``QwenImageTransformer2DModel`` with one layer,
and the input and output layers the trainer keeps in bf16 around it) has every Linear shape of the 60-block
model, so the kernel choices are the ones a real run makes. ``edittuner doctor`` and ``bench/gpu_step.py`` report
it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from shared.model.device import free_gpu_memory, reset_peak

GiB = 2**30
REAL_BLOCK = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)
SMALL_BLOCK = dict(
    REAL_BLOCK, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(8, 12, 12)
)
# (target and one reference of side x side latent patches, text tokens): real width, a 512 px pair and a caption
REAL_TOKENS, SMALL_TOKENS = (32, 256), (4, 16)
BLOCK_PRECISIONS = ("int8-quanto", "fp8-quanto", "int4-quanto", "int2-quanto", "nf4-bnb", "int8-bnb")
# Largest relative error of the block's update against bf16 that passes: about 2.5x what the CPU measures on the
# small block (int8-quanto 0.038, int8-bnb 0.034, fp8 0.081, int4 0.142, nf4 0.180, int2 0.581), under the ~1.0 of
# an update computed with wrong scales or layouts. int2's bound only catches garbage: it is that lossy.
MAX_REL_ERROR = {
    "int8-quanto": 0.10,
    "fp8-quanto": 0.20,
    "int4-quanto": 0.35,
    "int2-quanto": 0.95,
    "nf4-bnb": 0.45,
    "int8-bnb": 0.10,
}
# Weight classes that must not be in use: quanto's Marlin fp8 kernel never adds the Linear's bias.
WRONG_CLASSES = ("MarlinF8QBytesTensor",)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_transformer(cfg: dict[str, Any], device: torch.device, seed: int = 0) -> Any:
    """The real diffusers class from ``cfg``, initialised in bf16 directly where it will run (no fp32 copy)."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    with default_dtype(torch.bfloat16), device:
        return QwenImageTransformer2DModel(**cfg)


def block_inputs(cfg: dict[str, Any], side: int, text: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A target and one reference of ``side`` x ``side`` patches and ``text`` caption tokens, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    img = 2 * side * side
    return dict(
        hidden_states=torch.randn(1, img, cfg["in_channels"], generator=g).to(device, torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], generator=g).to(device, torch.bfloat16),
        encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.bool, device=device),
        timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        img_shapes=[[(1, side, side), (1, side, side)]],
        return_dict=False,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peaks(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {
        "allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
        "reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 3),
    }


def weight_classes(model: torch.nn.Module) -> list[str]:
    from shared.model.quantize import quantized_modules

    names = set(quantized_modules(model))
    return sorted({type(m.weight).__name__ for n, m in model.named_modules() if n in names})


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative error ||out - ref|| / ||ref||, cosine similarity), in fp32."""
    a, b = out.float().flatten(), ref.float().flatten()
    return float((a - b).norm() / b.norm()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def block_update(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """What the transformer block adds to its two residual streams (output minus input, image and text tokens
    concatenated): the block's own computation. The model's output is mostly the residual stream passing through
    (at random init the modulation gates are small), which would hide the block's error."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        names = ("hidden_states", "encoder_hidden_states")
        given = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
        txt_out, img_out = output
        seen["delta"] = torch.cat(
            [
                (img_out - given["hidden_states"]).float().flatten(),
                (txt_out - given["encoder_hidden_states"]).float().flatten(),
            ]
        )

    handle = model.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["delta"]


def biases_honoured(model: torch.nn.Module) -> tuple[int, int]:
    """(quantized Linears with a bias whose output at a zero input is that bias, quantized Linears with a bias):
    W·0 + b = b whatever the weights' format, so a kernel that drops the bias shows here exactly."""
    from shared.model.quantize import quantized_modules

    names = set(quantized_modules(model))
    good = total = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if name not in names or getattr(m, "bias", None) is None:
                continue
            total += 1
            out = m(torch.zeros(1, m.in_features, device=m.bias.device, dtype=torch.bfloat16)).float()
            bias = m.bias.float()
            good += bool((out[0] - bias).abs().max() <= 1e-2 * bias.abs().max() + 1e-3)
    return good, total


def lora_backward(model: Any, inputs: dict[str, Any], device: torch.device, steps: int) -> dict[str, Any]:
    """Attach a rank-16 fp32 LoRA (the default targets), turn on gradient checkpointing, and run ``steps`` timed
    forward+backward passes after one warm-up; the lora_B gradients of the last one."""
    from shared.config.schema import DEFAULT_TARGET_MODULES
    from shared.model.lora import attach_lora

    attach_lora(model, 16, 16.0, 0.0, DEFAULT_TARGET_MODULES, seed=0, dtype=torch.float32)
    model.enable_gradient_checkpointing()
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i in range(1 + steps):
        for p in params.values():
            p.grad = None
        if i == 1:
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
        out = model(**inputs)[0]
        out.float().square().mean().backward()
        del out
    sync(device)
    elapsed = (time.perf_counter() - t0) / steps
    grads_b = [p.grad for n, p in params.items() if "lora_B" in n]
    finite = all(g is not None and bool(torch.isfinite(g).all()) for g in grads_b)
    nonzero = sum(1 for g in grads_b if g is not None and bool(g.abs().sum() > 0))
    return {
        "fwd_bwd_s": round(elapsed, 4),
        "lora_b_tensors": len(grads_b),
        "lora_b_nonzero": nonzero,
        "finite": finite,
        **peaks(device),
    }


def probe_precision(
    precision: str, reference: Any, inputs: dict[str, Any], device: torch.device, steps: int
) -> tuple[dict[str, Any], list[str]]:
    """(figures, problems) of one precision against ``reference`` (the bf16 model on ``device``); no problems
    means the precision computes the same function within its bound."""
    from shared.model.quantize import check_precision, quantize_transformer

    check_precision(precision, device)
    ref_out = block_update(reference, inputs)
    model = copy.deepcopy(reference)
    t0 = time.perf_counter()
    quantize_transformer(model, precision, device=device, compute_dtype=torch.bfloat16)
    sync(device)
    quantize_s = time.perf_counter() - t0
    classes = weight_classes(model)
    rel, cos = compare(block_update(model, inputs), ref_out)
    bias_ok, biased = biases_honoured(model)
    train = lora_backward(model, inputs, device, steps)
    del model, ref_out
    free_gpu_memory()
    data = {
        "precision": precision,
        "rel_error": round(rel, 5),
        "cosine": round(cos, 6),
        "weight_classes": classes,
        "biases_honoured": bias_ok,
        "biased_linears": biased,
        "quantize_s": round(quantize_s, 3),
        **train,
    }
    problems = []
    if not math.isfinite(rel) or rel > MAX_REL_ERROR[precision]:
        problems.append(f"relative error {rel:.3g} above {MAX_REL_ERROR[precision]}")
    if bias_ok != biased:
        problems.append(f"{biased - bias_ok} of {biased} quantized Linears drop their bias")
    wrong = [c for c in classes if c in WRONG_CLASSES]
    if wrong:
        problems.append(f"weight class {', '.join(wrong)} in use (drops the Linear bias)")
    if not train["finite"] or train["lora_b_nonzero"] != train["lora_b_tensors"]:
        problems.append(
            f"LoRA gradients: {train['lora_b_nonzero']}/{train['lora_b_tensors']} non-zero, "
            f"{'finite' if train['finite'] else 'NOT finite'}"
        )
    return data, problems


def describe(data: dict[str, Any]) -> str:
    """One line of a probe's figures."""
    mem = (
        f", peak {data['allocated_gib']:.2f} GiB allocated / {data['reserved_gib']:.2f} reserved"
        if "allocated_gib" in data
        else ""
    )
    return (
        f"block update vs bf16: relative error {data['rel_error']:.4f}, cosine {data['cosine']:.5f}; biases "
        f"{data['biases_honoured']}/{data['biased_linears']}; weights {', '.join(data['weight_classes']) or 'none'}"
        f"; LoRA backward {data['lora_b_nonzero']}/{data['lora_b_tensors']} lora_B non-zero, "
        f"{data['fwd_bwd_s'] * 1000:.1f} ms fwd+bwd{mem}"
    )
