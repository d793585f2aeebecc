"""Every base_model_precision trains a LoRA on the tiny transformer, on the CPU.

For each precision: the quantized layers really hold low-bit weights (storage dtype and byte count), the entry
and exit layers stay float, the forward output moves away from fp32 by a bounded relative error, and ~8 AdamW
steps on one fixed sample (fixed noise and sigma: an overfit) lower the loss while gradients reach only LoRA
parameters and the quantized base stays bit-identical. Relative-error bounds are about 3x what was measured
(int8-quanto 0.0004, int4-quanto 0.0060, int2-quanto 0.035, fp8-quanto 0.0024, nf4-bnb 0.0090, int8-bnb 0.0008);
the 8-step overfit went from 2.476 to 2.309 (+-0.003) at every precision, int2-quanto 2.472 -> 2.285.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch

from shared import errors
from shared.model import quantize as Q
from shared.model.flow import EditBatch, flow_matching_loss, predict_velocity
from shared.model.latents import pack_latents
from shared.model.loading import load_transformer
from shared.model.lora import attach_lora

DEVICE = torch.device("cpu")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.net.2"]
STEPS = 8


# precision -> (quantized_modules kind, storage dtype, bits per weight, max relative error of the velocity)
EXPECTED: dict[str, tuple[str, torch.dtype, int, float]] = {
    "int8-quanto": ("quanto:qint8", torch.int8, 8, 0.0015),
    "int4-quanto": ("quanto:qint4", torch.uint8, 4, 0.02),
    "int2-quanto": ("quanto:qint2", torch.uint8, 2, 0.1),
    "fp8-quanto": ("quanto:qfloat8_e4m3fn", torch.float8_e4m3fn, 8, 0.008),
    "nf4-bnb": ("bnb:nf4", torch.uint8, 4, 0.03),
    "int8-bnb": ("bnb:int8", torch.int8, 8, 0.003),
}


@pytest.fixture(scope="module")
def fp32_transformer(tiny_models: Any) -> Any:
    return load_transformer(tiny_models("edit-v1"), "edit-v1").eval()


@pytest.fixture(scope="module")
def batch() -> tuple[EditBatch, torch.Tensor, torch.Tensor]:
    """One fixed sample: a 16x8x8 target, one 16x8x8 reference, 7 prompt tokens of width 32, fixed noise/sigma."""
    g = torch.Generator().manual_seed(0)
    edit = EditBatch(
        latents_BChw=torch.randn(1, 16, 8, 8, generator=g),
        refs_BChw=[torch.randn(1, 16, 8, 8, generator=g)],
        prompt_embeds_BLD=torch.randn(1, 7, 32, generator=g),
        prompt_mask_BL=torch.ones(1, 7, dtype=torch.long),
        keys=["fixed"],
    )
    return edit, torch.randn(1, 16, 64, generator=g), torch.tensor([0.7])


@torch.no_grad()
def velocity(transformer: Any, batch: tuple[EditBatch, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The prediction of the target's velocity for the fixed sample (the loss's input)."""
    edit, noise, sigma = batch
    x0 = pack_latents(edit.latents_BChw)
    noisy = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    return predict_velocity(transformer, edit, noisy, sigma, torch.float32)


def base_state(transformer: Any) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor as stored (quantized data, scales, bnb quant state), copied, under its name before a
    LoRA wrapped its layer. (A bnb 4-bit layer's state_dict also undoes an inference repacking of its weight.)"""
    return {
        k.replace(".base_layer.", "."): v.detach().clone()
        for k, v in transformer.state_dict().items()
        if "lora_" not in k and isinstance(v, torch.Tensor)
    }


def overfit(transformer: Any, batch: tuple[EditBatch, torch.Tensor, torch.Tensor], steps: int = STEPS) -> list[float]:
    """AdamW on the LoRA parameters, always the same sample/noise/sigma; returns the loss before each step."""
    edit, noise, sigma = batch
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = flow_matching_loss(transformer, edit, noise, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_really_quantized(transformer: Any, precision: str) -> None:
    kind, storage, bits, _ = EXPECTED[precision]
    kinds = Q.quantized_modules(transformer)
    assert set(kinds.values()) == {kind}
    # every block Linear is quantized (14 per block), the entry/exit layers are not
    assert len(kinds) == 14 * len(transformer.transformer_blocks)
    assert not [n for n in kinds if Q.keeps_high_precision(n)]
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"):
        assert type(transformer.get_submodule(name)) is torch.nn.Linear, name
    for name in kinds:
        module = transformer.get_submodule(name)
        sd = module.state_dict()  # the weight's own storage: bnb "weight", quanto "weight._data" (int4/2: packed)
        stored = next(sd[k] for k in ("weight._data._data", "weight._data", "weight") if k in sd)
        assert stored.dtype == storage, (name, stored.dtype)
        stored_bytes = stored.numel() * stored.element_size()
        assert stored_bytes == module.in_features * module.out_features * bits // 8, name


@pytest.mark.parametrize("precision", Q.PRECISIONS)
def test_precision_trains_lora_on_a_frozen_base(precision: str, fp32_transformer: Any, batch: Any) -> None:
    tr = copy.deepcopy(fp32_transformer)
    Q.quantize_transformer(tr, precision, device=DEVICE, compute_dtype=torch.float32)
    assert not any(p.requires_grad for p in tr.parameters())
    if precision == "no_change":
        assert Q.quantized_modules(tr) == {}
    else:
        assert_really_quantized(tr, precision)

    before = base_state(tr)
    # An eval-mode forward, then training, as a validation pass does: on AVX512-BF16 CPUs this used to repack nf4
    # weights into a layout that training forwards fail on (nothing may call state_dict() in between: it unpacks).
    ref, out = velocity(fp32_transformer, batch), velocity(tr.eval(), batch)
    rel = ((out - ref).norm() / ref.norm()).item()
    if precision == "no_change":
        assert rel < 1e-5  # not 0: a copy's buffers align differently and CPU kernels round accordingly (~1e-7)
    else:
        assert 1e-4 < rel < EXPECTED[precision][3], rel

    attach_lora(tr, rank=4, alpha=4.0, dropout=0.0, target_modules=TARGETS, seed=0)
    if precision.endswith("-bnb"):  # is_loaded_in_4bit/8bit made peft pick its bitsandbytes LoRA layer
        assert type(tr.transformer_blocks[0].attn.to_q).__module__ == "peft.tuners.lora.bnb"
    losses = overfit(tr, batch)
    print(f"{precision}: rel. error {rel:.4f}, loss {losses[0]:.4f} -> {losses[-1]:.4f}")  # shown with -s

    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    grads = {n for n, p in tr.named_parameters() if p.grad is not None}
    lora = {n for n, p in tr.named_parameters() if "lora_" in n}
    assert grads == lora  # every adapter got a gradient, nothing else did
    after = base_state(tr)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb", "int8-bnb"])
def test_quantize_via_cpu_equals_via_accelerator(precision: str, fp32_transformer: Any, batch: Any) -> None:
    """On a CPU both paths quantize the same weights on the same device: the same bytes, so the same output (up
    to the ~1e-7 that two copies of a model differ by on a CPU: buffer alignment picks the kernel path)."""
    a = Q.quantize_transformer(
        copy.deepcopy(fp32_transformer), precision, device=DEVICE, compute_dtype=torch.float32, quantize_via="cpu"
    )
    b = Q.quantize_transformer(
        copy.deepcopy(fp32_transformer),
        precision,
        device=DEVICE,
        compute_dtype=torch.float32,
        quantize_via="accelerator",
    )
    sa, sb = base_state(a), base_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(velocity(a, batch), velocity(b, batch), atol=1e-5, rtol=1e-5)


def test_quanto_activations_are_quantized_except_modulation(fp32_transformer: Any, batch: Any) -> None:
    tr = Q.quantize_transformer(
        copy.deepcopy(fp32_transformer),
        "int8-quanto",
        device=DEVICE,
        compute_dtype=torch.float32,
        quantize_activations=True,
    )
    acts = {n: getattr(m.activation_qtype, "name", None) for n, m in tr.named_modules() if n in Q.quantized_modules(tr)}
    assert acts["transformer_blocks.0.attn.to_q"] == "qint8"
    assert acts["transformer_blocks.0.img_mlp.net.2"] == "qint8"
    assert acts["transformer_blocks.0.img_mod.1"] is None  # its output is chunked: must stay a plain tensor
    weights_only = Q.quantize_transformer(
        copy.deepcopy(fp32_transformer), "int8-quanto", device=DEVICE, compute_dtype=torch.float32
    )
    assert not torch.equal(velocity(tr, batch), velocity(weights_only, batch))
    attach_lora(tr, rank=4, alpha=4.0, dropout=0.0, target_modules=TARGETS, seed=0)
    losses = overfit(tr, batch, steps=5)
    assert losses[-1] < losses[0], losses


def test_bf16_compute_dtype_keeps_kept_layers_in_bf16(fp32_transformer: Any) -> None:
    tr = Q.quantize_transformer(
        copy.deepcopy(fp32_transformer), "int8-quanto", device=DEVICE, compute_dtype=torch.bfloat16
    )
    assert tr.proj_out.weight.dtype == torch.bfloat16
    assert tr.transformer_blocks[0].attn.to_q.weight._scale.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "precision, kwargs, needle",
    [
        ("int3-quanto", {}, "unknown: expected one of no_change, int8-quanto"),
        ("nf4-bnb", {"quantize_activations": True}, "quantize_activations only applies to the quanto precisions"),
        ("no_change", {"quantize_activations": True}, "quantize_activations only applies"),
        ("int8-quanto", {"quantize_via": "disk"}, "quantize_via 'disk' is unknown"),
        ("nf4-bnb", {"device": "mps"}, "bitsandbytes does not run on mps"),
    ],
)
def test_bad_combinations_are_invalid_input(precision: str, kwargs: dict[str, Any], needle: str) -> None:
    args = {"device": DEVICE, "compute_dtype": torch.float32, **kwargs}
    with pytest.raises(errors.InvalidInput, match=needle):
        Q.quantize_transformer(torch.nn.Linear(4, 4), precision, **args)


def test_missing_library_is_invalid_input(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Q.importlib.util.find_spec
    monkeypatch.setattr(Q.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(errors.InvalidInput, match="needs the bitsandbytes package.*pip install bitsandbytes"):
        Q.check_precision("int8-bnb", DEVICE)
    Q.check_precision("int8-quanto", DEVICE)  # the other library is unaffected


def test_fp8_needs_a_device_with_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Q.float8_supported("cpu")
    monkeypatch.setattr(Q, "float8_supported", lambda device: False)
    with pytest.raises(errors.InvalidInput, match="cannot hold float8 tensors; use int8-quanto"):
        Q.check_precision("fp8-quanto", DEVICE)


def test_trainable_parameter_report(fp32_transformer: Any) -> None:
    tr = copy.deepcopy(fp32_transformer)
    total = sum(p.numel() for p in tr.parameters())
    attach_lora(tr, rank=4, alpha=4.0, dropout=0.0, target_modules=["to_q"], seed=0)
    # per block: A 4x64 + B 64x4
    assert Q.trainable_parameter_report(tr) == (2 * (4 * 64 + 64 * 4), total + 2 * (4 * 64 + 64 * 4))
