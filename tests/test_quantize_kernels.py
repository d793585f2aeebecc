"""The kernels the quantized base runs through are the ones the CPU tests measure, on every device.

On a CUDA host optimum-quanto would take its JIT-compiled extension (int4/int2 unpack; fp8 as
``MarlinF8QBytesTensor``, whose forward drops the Linear's bias) and bitsandbytes' int8 layer would cast its
input to fp16 (``MatMul8bitLt``). These tests hold the rerouting with the CUDA facts simulated where the CPU has
no such path: quanto's CUDA extension registered as it is on a Linux CUDA host, the int8 layer in eval mode
(where stock bitsandbytes takes its fp16 kernel on the CPU too), and the device's free memory injected.
"""

from __future__ import annotations

import logging

import pytest
import torch

from shared.model import quantize as Q


# ------------------------------------------------------------------------------------------------ quanto
@pytest.mark.parametrize("bits", [2, 4])
def test_quanto_unpack_is_pure_torch_and_inverts_its_packing(bits: int) -> None:
    """quanto's PackedTensor packs with torch ops; ``quanto::unpack`` (rerouted) must give back every value."""
    from optimum.quanto.tensor.packed import PackedTensor

    Q.pure_torch_quanto()
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2 ** bits, (64, 24), generator=g, dtype=torch.uint8)
    packed = PackedTensor.pack(values, bits)
    assert packed._data.shape[0] == 64 * bits // 8  # really packed: 8 // bits values a byte
    assert torch.equal(torch.ops.quanto.unpack(packed._data, bits), values)
    assert torch.equal(Q.unpack_bits(packed._data, bits), values)


def test_quanto_never_picks_its_extension_weight_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Linux CUDA host quanto registers "quanto_cuda", which enables the Marlin fp8 and AWQ int4 classes:
    after pure_torch_quanto the check those classes pass through says no, whatever is registered."""
    from optimum.quanto.library.extensions import extension
    from optimum.quanto.tensor.weights import qbits, qbytes

    Q.pure_torch_quanto()
    monkeypatch.setitem(extension._extensions, "quanto_cuda", object())  # as registered with CUDA available
    assert extension.is_extension_available("quanto_cuda")  # quanto's own answer
    assert not qbytes.is_extension_available("quanto_cuda")  # MarlinF8QBytesTensor's condition
    assert not qbits.is_extension_available("quanto_cuda")  # AWQWeightQBitsTensor's condition
    assert qbytes.is_extension_available("quanto_cpp") == extension.is_extension_available("quanto_cpp")


@pytest.mark.parametrize("precision", ["int4-quanto", "int2-quanto", "fp8-quanto"])
def test_quantized_linear_keeps_its_bias_and_values(precision: str) -> None:
    """A quantized Linear on the rerouted kernels: W·0 + b = b exactly in the layout, and close to the float layer."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 128)).to(torch.bfloat16)
    with torch.no_grad():
        base[0].bias.normal_(0, 1.0)
    with torch.no_grad():
        ref = base[0](torch.ones(3, 256, dtype=torch.bfloat16)).float()
    Q._quantize_quanto(base, precision, False, keep=[])
    layer = base[0]
    assert type(layer.weight).__name__ != "MarlinF8QBytesTensor"
    zero = layer(torch.zeros(1, 256, dtype=torch.bfloat16)).float()[0]
    assert torch.allclose(zero, layer.bias.float(), atol=1e-2)
    with torch.no_grad():
        out = layer(torch.ones(3, 256, dtype=torch.bfloat16)).float()
    assert float((out - ref).norm() / ref.norm()) < {"fp8-quanto": 0.05, "int4-quanto": 0.1, "int2-quanto": 0.6}[
        precision]
