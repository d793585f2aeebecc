"""Linear layers whose frozen weight stays in the bytes of a community model file: GGUF blocks (``GGUFLinear``,
diffusers' dequantization kernels) and ComfyUI fp8 (``Fp8Linear``, per-tensor scale).

Both compute ``x @ dequant(W).T + b`` in their ``compute_dtype`` and keep what autograd saves small: the stock
``GGUFLinear`` hands the dequantized weight to ``F.linear``, and autograd then saves it (as ``W.t()``) in every such
layer whose input needs a gradient — every Linear after the first LoRA layer, LoRA-wrapped or not, a full
compute-dtype copy of most of the model held until backward. ``_FrozenWeightLinear`` saves nothing: backward
dequantizes the weight again (one more elementwise pass per layer and step; measured by ``bench/frozen_linear.py``).

The weights are ``uint8`` tensors (GGUF blocks, or the fp8 bytes viewed as ``uint8``), so a ``module.to(dtype)``
never casts them; peft wraps both classes with its generic LoRA ``Linear`` and creates the adapter in
``compute_dtype`` (``tuners_utils._get_base_layer_device_and_dtype`` reads that attribute).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

FP8_DTYPES: dict[str, torch.dtype] = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


class _FrozenWeightLinear(torch.autograd.Function):
    """``F.linear(x, weight_of(x.dtype), bias)`` with a frozen weight that is rebuilt in backward, not saved."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, weight_of: Callable[[torch.dtype], torch.Tensor]
    ) -> torch.Tensor:
        ctx.weight_of = weight_of  # the module's resident packed weight, not a copy
        return F.linear(x, weight_of(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_x = grad @ ctx.weight_of(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None


def frozen_linear(
    x: torch.Tensor, bias: torch.Tensor | None, weight_of: Callable[[torch.dtype], torch.Tensor]
) -> torch.Tensor:
    out: torch.Tensor = _FrozenWeightLinear.apply(x, bias, weight_of)  # type: ignore[no-untyped-call]
    return out


def _gguf_linear_class() -> Any:
    from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

    class FrozenGGUFLinear(GGUFLinear):
        """diffusers' ``GGUFLinear`` whose forward casts its input to ``compute_dtype`` (the stock one fails on a
        float32 input into a bf16 layer) and saves no dequantized weight for backward."""

        compute_dtype: torch.dtype

        def weight_of(self, dtype: torch.dtype) -> torch.Tensor:
            w: torch.Tensor = dequantize_gguf_tensor(self.weight)
            return w.to(dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.compute_dtype)
            bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
            return frozen_linear(x, bias, self.weight_of)

    return FrozenGGUFLinear


_GGUF_LINEAR: Any = None  # FrozenGGUFLinear, made on first use (diffusers imports late)


def gguf_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int, compute_dtype: torch.dtype
) -> torch.nn.Linear:
    """A frozen GGUF Linear over ``weight`` (a diffusers ``GGUFParameter``: the file's blocks)."""
    global _GGUF_LINEAR
    if _GGUF_LINEAR is None:
        _GGUF_LINEAR = _gguf_linear_class()
    layer: Any = _GGUF_LINEAR(  # GGUFLinear's signature: (in, out, bias, compute_dtype, device)
        in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype, device="meta"
    )
    layer.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, requires_grad=False)
    layer.weight.requires_grad_(False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    out: torch.nn.Linear = layer
    return out


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear over an fp8 weight and its per-tensor scale (1 for a plain ``*_fp8_e4m3fn`` file): the weight
    is ``float(W8) * scale``, as ComfyUI dequantizes it (``comfy.ops``: ``weight.to(dtype) * scale_weight``)."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        self.fp8_dtype = weight.dtype
        self.scale = float(scale)
        self.compute_dtype = compute_dtype
        self.weight = torch.nn.Parameter(weight.view(torch.uint8), requires_grad=False)
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    def weight_of(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.view(self.fp8_dtype).float() * self.scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return frozen_linear(x, bias, self.weight_of)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {str(self.fp8_dtype).removeprefix('torch.')}, scale={self.scale:.4g}"


def file_type(m: torch.nn.Module) -> str:
    """The file type a frozen Linear of this module keeps its weight in (``Q8_0``, ``float8_e4m3fn``)."""
    if isinstance(m, Fp8Linear):
        return str(m.fp8_dtype).removeprefix("torch.")
    weight: Any = m.weight  # a GGUFParameter
    return str(weight.quant_type.name)
