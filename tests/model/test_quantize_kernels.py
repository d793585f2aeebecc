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
    values = torch.randint(0, 2**bits, (64, 24), generator=g, dtype=torch.uint8)
    packed = PackedTensor.pack(values, bits)
    assert packed._data.shape[0] == 64 * bits // 8  # really packed: 8 // bits values a byte
    assert torch.equal(torch.ops.quanto.unpack(packed._data, bits), values)
    assert torch.equal(Q.unpack_bits(packed._data, bits), values)


def test_quanto_never_picks_its_extension_weight_classes_nor_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Linux CUDA host quanto registers "quanto_cuda", which enables the Marlin fp8 and AWQ int4 classes and
    compiles on first use: after pure_torch_quanto the check those classes pass through says no, and the
    extension's library is the torch-ops kernel, without a build."""
    from optimum.quanto.library.extensions import extension
    from optimum.quanto.tensor.weights import qbits, qbytes

    cuda = extension.Extension("quanto_cuda", "/nonexistent", ["unpack.cu"])  # as registered with CUDA available
    monkeypatch.setitem(extension._extensions, "quanto_cuda", cuda)
    Q.pure_torch_quanto()
    assert extension.is_extension_available("quanto_cuda")  # quanto's own answer
    assert not qbytes.is_extension_available("quanto_cuda")  # MarlinF8QBytesTensor's condition
    assert not qbits.is_extension_available("quanto_cuda")  # AWQWeightQBitsTensor's condition
    assert qbytes.is_extension_available("quanto_cpp") == extension.is_extension_available("quanto_cpp")
    for name in ("quanto_cuda", "quanto_cpp"):  # lib would run torch.utils.cpp_extension.load: no build
        assert extension.get_extension(name).lib.unpack is Q.unpack_bits
    Q.pure_torch_quanto()  # idempotent: the check is wrapped once
    assert not qbytes.is_extension_available("quanto_cuda")
    assert qbytes.is_extension_available.__defaults__[0] is not qbytes.is_extension_available


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
    assert (
        float((out - ref).norm() / ref.norm()) < {"fp8-quanto": 0.05, "int4-quanto": 0.1, "int2-quanto": 0.6}[precision]
    )


# ------------------------------------------------------------------------------------------------ int8-bnb
def _int8_pair() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The same weights as the project's int8-bnb layer and as stock Linear8bitLt (threshold 0), and an input with
    outlier channels as Qwen-Image's activations have."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    float_layer = torch.nn.Linear(512, 256).to(torch.bfloat16)
    ours = torch.nn.Sequential(torch.nn.Linear(512, 256)).to(torch.bfloat16)
    ours[0].load_state_dict(float_layer.state_dict())
    Q._swap_bnb_linears(ours, "int8-bnb", torch.bfloat16, keep=[])
    ours.to("cpu")
    stock = bnb.nn.Linear8bitLt(512, 256, has_fp16_weights=False, threshold=0.0)
    stock.weight = bnb.nn.Int8Params(float_layer.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    stock.bias = torch.nn.Parameter(float_layer.bias.data.clone(), requires_grad=False)
    stock = torch.nn.Sequential(stock).to("cpu")
    x = torch.randn(64, 512)
    x[:, :4] *= 60.0
    return ours, stock, x.to(torch.bfloat16)


def test_int8_bnb_is_dequantized_weight_times_input_in_eval_and_training(caplog: pytest.LogCaptureFixture) -> None:
    ours, stock, x = _int8_pair()
    layer = ours[0]
    assert isinstance(layer, __import__("bitsandbytes").nn.Linear8bitLt)  # peft's bnb LoRA layer still applies
    assert layer.state.threshold == 6.0
    assert Q.quantized_modules(ours) == {"0": "bnb:int8"}
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        for train in (True, False):
            ours.train(train)
            out = ours(x)
            w = layer.state.CB.to(torch.bfloat16).mul_(layer.state.SCB.unsqueeze(1).mul(1.0 / 127.0))  # as stored
            expected = torch.nn.functional.linear(x, w, layer.bias)
            assert torch.equal(out, expected), f"train={train}"
    assert not [r for r in caplog.records if "float16" in r.getMessage()]  # no per-call fp16 warning
    # stock bitsandbytes in eval mode takes the fp16, row-quantized input kernel: another function (the CUDA one)
    stock.eval()
    ours.eval()
    exact = torch.nn.functional.linear(
        x.float(), layer.state.CB.float() * (layer.state.SCB.float().unsqueeze(1) / 127), layer.bias.float()
    )
    err_ours = float((ours(x).float() - exact).norm() / exact.norm())
    err_stock = float((stock(x).float() - exact).norm() / exact.norm())
    assert err_ours < 0.01 < err_stock


def test_int8_bnb_backward_reaches_the_input() -> None:
    ours, _, x = _int8_pair()
    ours.train()
    x = x.float().requires_grad_(True)
    ours(x.to(torch.bfloat16)).float().sum().backward()
    layer = ours[0]
    w = layer.state.CB.float() * (layer.state.SCB.float().unsqueeze(1) / 127)
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------ loading peak
def test_accelerator_quantization_falls_back_to_the_cpu_when_the_weights_do_not_fit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))  # 2.1M params, fp32
    need = sum(p.numel() for p in model.parameters()) * 2  # bf16 bytes, what moves to the device
    margin = 2 * 2**30
    cuda = torch.device("cuda")
    assert Q.fits_to_quantize_on(model, cuda, torch.bfloat16, free_bytes=need + margin)
    with caplog.at_level(logging.WARNING, logger=Q.log.name):
        assert not Q.fits_to_quantize_on(model, cuda, torch.bfloat16, free_bytes=need + margin - 1)
    assert "quantizing on the CPU instead" in caplog.text
    assert Q.fits_to_quantize_on(model, torch.device("cpu"), torch.bfloat16, free_bytes=0)  # only a GPU is checked


def test_quantize_transformer_takes_the_cpu_route_when_told_it_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    moves: list[str] = []
    real_move = Q._move
    monkeypatch.setattr(Q, "fits_to_quantize_on", lambda *a, **k: False)
    monkeypatch.setattr(Q, "_move", lambda m, device, dtype: (moves.append(str(device)), real_move(m, device, dtype)))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    Q.quantize_transformer(model, "int8-quanto", device="cpu", compute_dtype=torch.bfloat16, quantize_via="accelerator")
    assert moves == ["cpu"] and Q.quantized_modules(model) == {"0": "quanto:qint8"}
