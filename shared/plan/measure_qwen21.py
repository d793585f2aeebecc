"""Measure the planner's Qwen-Image-2.1 constants on this machine (``python -m shared.plan.measure_qwen21``).

The method of ``shared.plan.measure`` (saved-tensor hooks for what autograd keeps, a TorchDispatchMode for the peak
of live storages) on the real ``QwenImage21Transformer2DModel`` at toy width, with the sequence the training forward
(``shared.model.flow_qwen21``) builds: text, one reference's latent tokens in its image slots, more text, the noisy
target last; and the RGBA ``AutoencoderKLQwenImage21`` at a small base width. See the comment above
``shared.plan.qwen21.C21_BLOCK`` for what is fitted.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.plan.counts import counts_for_config
from shared.plan.measure import live_bytes, prepare_for_training

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # shared.config.schema.DEFAULT_TARGET_MODULES
MLP_TARGETS = ["img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"]
# (text before the reference, reference side, text after it, target side) in tokens and latent tokens: an
# image-heavy and a text-heavy sequence (1184 and 544 tokens)
MIXES: tuple[tuple[int, int, int, int], ...] = ((16, 24, 16, 24), (128, 12, 128, 12))


def probe_model(
    layers: int, targets: list[str], precision: str = "no_change", heads: int = 2, mlp_ratio: int = 3
) -> Any:
    """The real 2.1 transformer, ``heads`` x 128 wide, context_in_dim 64, ``layers`` blocks, as Trainer.setup
    leaves it (bf16 base in ``precision``, frozen, fp32 rank-16 LoRA on ``targets``)."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    m = QwenImage21Transformer2DModel(
        num_layers=layers, attention_head_dim=128, num_attention_heads=heads, context_in_dim=64, mlp_ratio=mlp_ratio
    )
    return prepare_for_training(m, targets, precision)


def mix_tokens(mix: tuple[int, int, int, int]) -> int:
    """The joint sequence's length of a probe mix."""
    before, ref, after, target = mix
    return before + ref * ref + after + target * target


def probe_inputs(m: Any, mix: tuple[int, int, int, int]) -> dict[str, Any]:
    """The transformer's arguments for one sample laid out as ``mix``: what ``predict_velocity_qwen21`` passes."""
    before, ref, after, target = mix
    g = torch.Generator().manual_seed(0)
    slots = ref * ref // 4
    text_len = before + slots + after
    mask = torch.zeros(text_len + target * target // 4, dtype=torch.bool)
    mask[before : before + slots] = True
    mask[text_len:] = True
    return dict(
        hidden_states=torch.randn(1, ref * ref + target * target, m.config.in_channels, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, text_len, m.config.context_in_dim, generator=g).bfloat16(),
        timestep=torch.tensor([0.5]).bfloat16(),
        img_shapes=[[(1, ref, ref), (1, target, target)]],
        img_mask=mask[None],
        return_dict=False,
    )


def saved_bytes(model: Any, mix: tuple[int, int, int, int], checkpointing: bool = False) -> int:
    """Bytes autograd saves for backward in one forward (each storage once, parameters excluded)."""
    from shared.plan.measure import _storage_ptrs

    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    skip = {p for t in [*model.parameters(), *model.buffers()] for p in _storage_ptrs(t)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptrs = _storage_ptrs(t)
        if ptrs and not any(p in skip for p in ptrs) and type(t) is torch.Tensor:
            saved[ptrs[0]] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**probe_inputs(model, mix))[0]
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def peak_bytes(model: Any, mix: tuple[int, int, int, int], checkpointing: bool = False, train: bool = True) -> int:
    """Peak live bytes (parameters and buffers excluded) over one forward (+ backward when ``train``)."""
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    mode = live_bytes([*model.parameters(), *model.buffers()])
    with mode, torch.set_grad_enabled(train):
        out = model(**probe_inputs(model, mix))[0]
        if train:
            out.float().square().mean().backward()
        del out
    model.zero_grad(set_to_none=True)
    return mode.peak


def _targets_of(model: Any, targets: list[str]) -> list[Any]:
    one_block = counts_for_config({**dict(model.config), "num_layers": 1}, "QwenImage21Transformer2DModel")
    return [li for li in one_block.linears if any(li.name == t or li.name.endswith("." + t) for t in targets)]


def measure_qwen21_coefficients(heads: int = 2, vae_side: int = 256, quick: bool = False) -> dict[str, float]:
    """Re-measure ``shared.plan.qwen21``'s constants on this CPU (bf16 probes at mlp_ratio 3, the released
    model's, and 2 for the SwiGLU's share; ``quick``: the bf16 base and the first mix only, for the width-scaled
    block constants). Returns {constant name: value}."""
    import numpy as np

    rank, d = 16, 128 * heads
    extended = DEFAULT_TARGETS + MLP_TARGETS
    mixes = MIXES[:1] if quick else MIXES
    rows, ys, block = [], [], {}
    outside: list[float] = []
    for precision in ("no_change",) if quick else ("no_change", "int8-quanto"):
        for targets in (DEFAULT_TARGETS, extended):
            m2, m4 = (probe_model(n, targets, precision, heads) for n in (2, 4))
            tg = _targets_of(m4, targets)
            for mix in mixes:
                t = mix_tokens(mix)
                s2, s4 = saved_bytes(m2, mix), saved_bytes(m4, mix)
                per_block = (s4 - s2) / 2
                rows.append([d * t, t * sum(li.in_features for li in tg), d * t * (precision != "no_change")])
                ys.append(per_block - t * sum(rank * 4 for _ in tg))
                if precision == "no_change" and targets is DEFAULT_TARGETS:
                    block[mix] = per_block
                    outside.append((s2 - 2 * per_block - t * 128 * 4) / (t * d))
    fit = np.linalg.lstsq(np.array(rows, float), np.array(ys, float), rcond=None)[0]
    m2, m4 = (probe_model(n, DEFAULT_TARGETS, heads=heads) for n in (2, 4))
    r2, r4 = (probe_model(n, DEFAULT_TARGETS, heads=heads, mlp_ratio=2) for n in (2, 4))  # the SwiGLU's share
    ckpt, outside_ckpt, peak, peak_ckpt, mlp, infer, infer_attn = [], [], [], [], [], [], []
    for mix in mixes:
        t = mix_tokens(mix)
        c2, c4 = saved_bytes(m2, mix, True), saved_bytes(m4, mix, True)
        ckpt.append((c4 - c2) / 2 / (d * t))
        outside_ckpt.append((c2 - (c4 - c2) - t * 128 * 4) / (t * d))
        peak.append((peak_bytes(m2, mix) - saved_bytes(m2, mix)) / block[mix])
        peak_ckpt.append((peak_bytes(m2, mix, True) - c2) / block[mix])
        mlp.append((block[mix] - (saved_bytes(r4, mix) - saved_bytes(r2, mix)) / 2) / (d * t))
        infer.append(max(peak_bytes(m, mix, train=False) for m in (m2, m4)) / (d * t))
        infer_attn.append(max(peak_bytes(m, mix, train=False) for m in (r2, r4)) / (d * t))
    c_mlp = float(np.mean(mlp))
    out = {
        "C21_BLOCK": float(fit[0]) - 3 * c_mlp,
        "C21_MLP": c_mlp,
        "C21_CKPT_INPUT": float(np.mean(ckpt)),
        "PEAK21_EXTRA_BLOCKS": float(max(peak)),
        "PEAK21_EXTRA_BLOCKS_CKPT": float(max(peak_ckpt)),
        "C21_OUTSIDE": float(max(outside)),
        "C21_OUTSIDE_CKPT": float(max(outside_ckpt)),
        "C21_INFERENCE_ATTN": float(max(infer_attn)),
        "C21_INFERENCE_MLP": float(max(infer)) - 3 * c_mlp,
    }
    if not quick:
        out |= {"C21_LORA_INPUT": float(fit[1]), "C21_QUANTO": float(fit[2])}
        b2, b4 = (probe_model(n, DEFAULT_TARGETS, "int8-bnb", heads) for n in (2, 4))
        mix = mixes[0]
        bnb = (peak_bytes(b4, mix) - peak_bytes(b2, mix)) - (peak_bytes(m4, mix) - peak_bytes(m2, mix))
        out["C21_INT8_BNB"] = float(bnb / 2 / (d * mix_tokens(mix)))
    return out | vae_coefficients(vae_side)


def vae_coefficients(side: int = 256, base_dim: int = 16) -> dict[str, float]:
    """``AutoencoderKLQwenImage21``'s no-grad peak in bf16 per pixel per unit of width: the encoder's ``base_dim``
    for an RGBA encode, the decoder's ``decoder_base_dim`` (1.5x, as released) for a decode."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21

    dec_dim = base_dim * 3 // 2
    per_px = {}
    for what, x, width in (
        ("encode", torch.randn(1, 4, 1, side, side), base_dim),
        ("decode", torch.randn(1, 64, 1, side // 16, side // 16), dec_dim),
    ):
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage21(base_dim=base_dim, decoder_base_dim=dec_dim).to(torch.bfloat16).eval()
        mode = live_bytes([*vae.parameters(), *vae.buffers()])
        with mode, torch.no_grad():
            (vae.encode if what == "encode" else vae.decode)(x.bfloat16())
        per_px[what] = mode.peak / (width * side * side)
    return {"VAE21_ENCODE_BYTES": per_px["encode"], "VAE21_DECODE_BYTES": per_px["decode"]}


if __name__ == "__main__":
    for k, v in measure_qwen21_coefficients().items():
        print(f"{k} = {v:.3f}")
    print(f"(probe sequences of {' and '.join(str(mix_tokens(m)) for m in MIXES)} tokens, one sample each)")
