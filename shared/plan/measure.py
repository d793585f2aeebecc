"""Measure the planner's activation constants on this machine (``python -m shared.plan.measure``).

Counts what autograd saves for backward (saved-tensor hooks) and the peak of live storages (a TorchDispatchMode)
on the real diffusers classes at toy width; see the comment above ``shared.plan.memory.C_BLOCK`` for the fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import torch

from shared.config.schema import DEFAULT_TARGET_MODULES
from shared.plan.counts import counts_for_config


# ------------------------------------------------------------------------------------------- measurement
class PeakMode(Protocol):
    """What ``live_bytes`` returns: a mode to enter (``with``), then its ``peak`` live bytes."""

    peak: int

    def __enter__(self) -> Any: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> Any: ...


def live_bytes(exclude: list[torch.Tensor]) -> PeakMode:
    """A TorchDispatchMode that tracks every storage an op creates until it is freed: ``peak`` live bytes.
    Storages of ``exclude`` (parameters, buffers) do not count."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    # torch leaves TorchDispatchMode.__init__ unannotated (a super() call, not a call into torch: still an error)
    class _Mode(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.skip = {p for t in exclude for p in _storage_ptrs(t)}
            self.refs: dict[int, tuple[Any, int]] = {}
            self.live = self.peak = 0

        def __torch_dispatch__(
            self,
            func: Callable[..., Any],
            types: tuple[type, ...],
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for k in [k for k, (r, _) in self.refs.items() if r.expired()]:
                del self.refs[k]  # first: a new storage may reuse a freed one's address
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and type(t) is torch.Tensor:
                    s = t.untyped_storage()
                    if s.data_ptr() not in self.refs and s.data_ptr() not in self.skip:
                        self.refs[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
            self.live = sum(nb for _, nb in self.refs.values())
            self.peak = max(self.peak, self.live)
            return out

    return _Mode()


def _storage_ptrs(t: torch.Tensor) -> list[int]:
    """Data pointers of a tensor's storage(s); a quantized wrapper tensor (quanto) has several inner ones."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [p for n in names for p in _storage_ptrs(getattr(t, n))]
    try:
        return [t.untyped_storage().data_ptr()]
    except (RuntimeError, NotImplementedError):
        return []


def prepare_for_training(model: Any, targets: list[str], precision: str = "no_change", rank: int = 16) -> Any:
    """``model`` as Trainer.setup leaves it, on the CPU: bf16 base in ``precision``, frozen, fp32 LoRA adapters."""
    from shared.model.lora import attach_lora
    from shared.model.quantize import quantize_transformer

    quantize_transformer(model, precision, device="cpu", compute_dtype=torch.bfloat16)
    attach_lora(model, rank, float(rank), 0.0, targets, seed=0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def _probe_model(
    layers: int, targets: list[str], precision: str = "no_change", zero_cond: bool = False, heads: int = 2
) -> Any:
    """The real transformer class, ``heads`` x 128 (d = 256 by default), joint_attention_dim 64, ``layers`` blocks."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(
        num_layers=layers,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=64,
        axes_dims_rope=(16, 56, 56),
        zero_cond_t=zero_cond,
    )
    return prepare_for_training(m, targets, precision)


def _probe_inputs(m: Any, img: int, txt: int) -> dict[str, Any]:
    side = math.isqrt(img)
    assert side * side == img, "probe token counts are squares"
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, img, m.config.in_channels, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, txt, m.config.joint_attention_dim, generator=g).bfloat16(),
        encoder_hidden_states_mask=torch.ones(1, txt, dtype=torch.bool),
        timestep=torch.tensor([0.5]).bfloat16(),
        img_shapes=[[(1, side, side)]],
        return_dict=False,
    )


def measure_saved_bytes(model: Any, img: int, txt: int, checkpointing: bool = False) -> int:
    """Bytes autograd saves for backward in one forward of ``model`` (each storage once, parameters excluded)."""
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    skip = {p for t in [*model.parameters(), *model.buffers()] for p in _storage_ptrs(t)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptrs = _storage_ptrs(t)
        if ptrs and not any(p in skip for p in ptrs) and type(t) is torch.Tensor:
            saved[ptrs[0]] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**_probe_inputs(model, img, txt))[0]
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def measure_peak_bytes(model: Any, img: int, txt: int, checkpointing: bool = False, train: bool = True) -> int:
    """Peak live bytes (parameters and buffers excluded) over one forward (+ backward when ``train``)."""
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    mode = live_bytes([*model.parameters(), *model.buffers()])
    with mode, torch.set_grad_enabled(train):
        out = model(**_probe_inputs(model, img, txt))[0]
        if train:
            out.float().square().mean().backward()
        del out
    model.zero_grad(set_to_none=True)
    return mode.peak


def measure_activation_coefficients(
    mixes: tuple[tuple[int, int], ...] = ((1024, 32), (256, 256)), vae_side: int = 256, heads: int = 2
) -> dict[str, float]:
    """Re-measure the module's activation constants on this machine's CPU (the probes compute in bf16: about
    4 minutes on a 2-core CPU without bf16 matmul instructions). ``mixes`` are the (image, text) token counts probed,
    ``heads`` the probe's width in heads of 128;
    see the comment above ``shared.plan.memory.C_BLOCK`` for the method. Returns {constant name: value}."""
    import numpy as np
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage

    default = list(DEFAULT_TARGET_MODULES)
    extended = default + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mlp.net.2", "txt_mlp.net.0.proj"]
    rank, d = 16, 128 * heads
    rows, ys, block, outside = [], [], {}, []
    for precision in ("no_change", "int8-quanto"):
        for targets in (default, extended):
            m2, m4 = (_probe_model(n, targets, precision, heads=heads) for n in (2, 4))
            one_block = counts_for_config({**dict(m4.config), "num_layers": 1})
            tg = [li for li in one_block.linears if any(li.name == t or li.name.endswith("." + t) for t in targets)]
            for img, txt in mixes:
                s2, s4 = measure_saved_bytes(m2, img, txt), measure_saved_bytes(m4, img, txt)
                per_block = (s4 - s2) / 2
                n = {"image": img, "text": txt, "sample": 1}
                rows.append(
                    [
                        d * (img + txt),
                        sum(n[li.stream] * li.in_features for li in tg),
                        d * (img + txt) * (precision != "no_change"),
                    ]
                )
                ys.append(per_block - sum(n[li.stream] * rank * 4 for li in tg))
                if precision == "no_change" and targets is default:
                    block[img, txt] = per_block
                    outside.append((s2 - 2 * per_block - (img + txt) * 128 * 4) / ((img + txt) * d))
    c_block, c_lora, c_quanto = np.linalg.lstsq(np.array(rows, float), np.array(ys, float), rcond=None)[0]
    m2, m4 = (_probe_model(n, default, heads=heads) for n in (2, 4))
    z2, z4 = (_probe_model(n, default, zero_cond=True, heads=heads) for n in (2, 4))
    zero_cond, ckpt, outside_ckpt, infer = [], [], [], []
    peak: list[float] = []
    peak_ckpt: list[float] = []
    for img, txt in mixes:
        z_block = (measure_saved_bytes(z4, img, txt) - measure_saved_bytes(z2, img, txt)) / 2
        zero_cond.append((z_block - block[img, txt]) / (img * d))
        c2, c4 = measure_saved_bytes(m2, img, txt, True), measure_saved_bytes(m4, img, txt, True)
        ckpt.append((c4 - c2) / 2 / (d * (img + txt)))
        outside_ckpt.append((c2 - (c4 - c2) - (img + txt) * 128 * 4) / ((img + txt) * d))
        for cp, out in ((False, peak), (True, peak_ckpt)):
            out.append((measure_peak_bytes(m2, img, txt, cp) - measure_saved_bytes(m2, img, txt, cp)) / block[img, txt])
        infer.append(max(measure_peak_bytes(m, img, txt, train=False) for m in (m2, m4)) / (d * (img + txt)))
    b2, b4 = (_probe_model(n, default, "int8-bnb", heads=heads) for n in (2, 4))
    img, txt = mixes[0]
    int8_bnb = (
        (
            (measure_peak_bytes(b4, img, txt) - measure_peak_bytes(b2, img, txt))
            - (measure_peak_bytes(m4, img, txt) - measure_peak_bytes(m2, img, txt))
        )
        / 2
        / (d * (img + txt))
    )
    per_px = {}
    for what, x in (
        ("encode", torch.randn(1, 3, 1, vae_side, vae_side)),
        ("decode", torch.randn(1, 16, 1, vae_side // 8, vae_side // 8)),
    ):
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(base_dim=16).to(torch.bfloat16).eval()  # a fresh one: no caches from before
        mode = live_bytes([*vae.parameters(), *vae.buffers()])
        with mode, torch.no_grad():
            (vae.encode if what == "encode" else vae.decode)(x.bfloat16())
        per_px[what] = mode.peak / (16 * vae_side * vae_side)
    return {
        "C_BLOCK": float(c_block),
        "C_LORA_INPUT": float(c_lora),
        "C_QUANTO": float(c_quanto),
        "C_INT8_BNB": float(int8_bnb),
        "C_ZERO_COND": float(np.mean(zero_cond)),
        "C_OUTSIDE": float(max(outside)),
        "C_CKPT_INPUT": float(np.mean(ckpt)),
        "C_OUTSIDE_CKPT": float(max(outside_ckpt)),
        "PEAK_EXTRA_BLOCKS": float(max(peak)),
        "PEAK_EXTRA_BLOCKS_CKPT": float(max(peak_ckpt)),
        "C_INFERENCE": float(max(infer)),
        "VAE_ENCODE_BYTES": per_px["encode"],
        "VAE_DECODE_BYTES": per_px["decode"],
    }


if __name__ == "__main__":
    for k, v in measure_activation_coefficients().items():
        print(f"{k} = {v:.3f}")
