"""Bytes: base weights per precision, LoRA state, activations saved for backward and working sets.

Legend: T tokens (T_img image stream: noisy target + references; T_txt text stream), d transformer width, L blocks,
r LoRA rank. GiB = 2**30. The activation constants are measured (``shared.plan.measure``), not guessed.
"""

from __future__ import annotations

from shared import errors
from shared.config.optimizers import OPTIMIZERS
from shared.model.quantize import QUANTO
from shared.plan.counts import REAL_TEXT_ENCODER, LinearInfo, TransformerCounts
from shared.plan.gpus import GiB
from shared.plan.tokens import TEMPLATE_TOKENS, VL_PIXELS_PER_PATCH, Tokens

# -------------------------------------------------------------------------------- measured constants
# Measured by measure_activation_coefficients() (`python -m shared.plan.measure`; torch 2.13 CPU,
# diffusers 0.42.1, peft 0.21.2, optimum-quanto 0.2.7, bitsandbytes 0.50.2) on the real QwenImageTransformer2DModel
# at 2 heads x 128 (d = 256), joint_attention_dim 64, bf16, base frozen, with a rank-16 LoRA attached by
# shared.model.lora.attach_lora and cast to fp32 as Trainer.setup does.
# - Saved for backward: torch.autograd.graph.saved_tensors_hooks counts every storage once (parameters excluded) at
#   2 and 4 blocks and two token mixes (1024 image + 32 text tokens, 256 + 256); the per-block difference, over both
#   precisions (bf16, int8-quanto) and two LoRA target sets (attention image side; + text side and MLP), is fitted
#   by least squares to  d*T*(C_BLOCK [+ C_QUANTO]) + sum over targeted Linears of T_stream*(in*C_LORA_INPUT + 4r).
#   The fit is exact to 0.2%. What a block saves (CPU kernels): LayerNorm inputs, modulation products, the fp32 q/k
#   copies the RMSNorms make, RoPE products, SDPA's q/k/v/output + fp32 logsumexp per token and head (4/128 bytes
#   per unit width, inside C_BLOCK), GELU inputs (4d); per LoRA layer peft's fp32 copy of its bf16 input
#   (C_LORA_INPUT = 4: q, k and v each pay their own copy of the same input).
# - Peak: a TorchDispatchMode (live_bytes) tracks every storage an op creates until it is freed, over forward and
#   backward; the peak minus the saved bytes is expressed in blocks (largest over the mixes). The same tracker
#   finds what hooks cannot see: bnb's int8 matmul keeps its input as a ctx attribute.
C_BLOCK = 32.2  # bytes per token per unit width per block, either stream
C_LORA_INPUT = 4.0  # bytes per token per input feature of every LoRA-targeted Linear
C_QUANTO = 12.0  # quanto's QLinear autograd function saves its bf16 input even for a frozen weight
C_INT8_BNB = 12.1  # bnb int8 keeps its input too (peak per block vs bf16); nf4-bnb keeps nothing extra
C_ZERO_COND = 8.0  # edit-v3 (zero_cond_t): torch.where materialises shift/scale/gate per image token
C_OUTSIDE = 8.0  # per token per unit width, once: norm_out, the loss (largest of the two mixes)
C_CKPT_INPUT = 2.0  # gradient checkpointing: each block keeps only its two input streams, bf16
C_OUTSIDE_CKPT = 0.0  # ... and outside the blocks nothing but RoPE's frequencies (measured -0.04)
PEAK_EXTRA_BLOCKS = 0.4  # no checkpointing: one block's backward working set (+ the loss's tensors)
PEAK_EXTRA_BLOCKS_CKPT = 1.8  # checkpointing: the block being recomputed + its backward working set
C_INFERENCE = 44.6  # no-grad forward (eval): peak live bytes per token per unit width, at 2 and 4 blocks alike
# VAE (AutoencoderKLQwenImage, real layout at base_dim 16, bf16, 256x256, no grad, live_bytes peak): bytes per pixel
# per unit of base_dim; it scales with both (checked at base_dim 32 and at 128 px).
VAE_ENCODE_BYTES = 20.8
VAE_DECODE_BYTES = 36.2

# ------------------------------------------------------------------------------------------ assumptions
CUDA_OVERHEAD = int(1.5 * GiB)  # CUDA context, cuBLAS/attention workspaces, caching-allocator slack
VAE_TILE_PIXELS = 256 * 256  # vae_enable_tiling: diffusers' tile_sample_min_height/width for AutoencoderKLQwenImage


# Per trained LoRA parameter: weight + gradient (fp32, bf16 for adamw_bf16) + the optimizer's state, from the table
# of optimizers (e.g. AdamW 4 + 4 + 8, 8-bit AdamW 4 + 4 + 2, Lion 4 + 4 + 4, Prodigy 4 + 4 + 16).
LORA_STATE_BYTES = {name: spec.bytes_per_param for name, spec in OPTIMIZERS.items()}


# --------------------------------------------------------------------------------------- weight bytes
def dtype_bytes(mixed_precision: str) -> int:
    """Bytes of the compute dtype on the GPU: 'auto' is bf16 there."""
    return 4 if mixed_precision in ("no", "fp32") else 2


def linear_weight_bytes(precision: str, in_features: int, out_features: int, compute_bytes: int = 2) -> float:
    """Bytes a Linear's weight takes stored in ``precision`` (bias excluded; it stays in the compute dtype).
    Checked against real quantized layers in tests/plan/test_planner.py."""
    n = in_features * out_features
    if precision == "no_change":
        return n * compute_bytes
    if precision in ("int8-quanto", "fp8-quanto"):
        return n + out_features * compute_bytes  # per-output-channel scale
    if precision in ("int4-quanto", "int2-quanto"):
        bits = 4 if precision == "int4-quanto" else 2
        return n * bits / 8 + n / 128 * 2 * compute_bytes  # group size 128: a scale and a shift per group
    if precision == "nf4-bnb":
        # uint8 absmax per 64 weights (double quantization), fp32 absmax per 256 blocks, ~1.1 kB of code tables
        return n / 2 + n / 64 + n / (64 * 256) * 4 + 1100
    if precision == "int8-bnb":
        return n + out_features * 4  # fp32 row scale (SCB)
    raise errors.InvalidInput(f"base_model_precision {precision!r} is unknown")


def transformer_weight_bytes(counts: TransformerCounts, precision: str, compute_bytes: int = 2) -> dict[str, int]:
    quantized = sum(
        linear_weight_bytes(precision, li.in_features, li.out_features, compute_bytes)
        for li in counts.linears
        if not li.kept
    )
    kept = sum(
        (li.in_features * li.out_features + li.out_features * li.bias) * compute_bytes
        for li in counts.linears
        if li.kept
    )
    rest = sum(li.out_features for li in counts.linears if li.bias and not li.kept) + counts.other_params
    return {f"base weights ({precision})": int(quantized), "kept layers": kept, "biases + norms": rest * compute_bytes}


def text_encoder_weight_bytes(
    params: int, embedding: int, precision: str, compute_bytes: int = 2, hidden: int = REAL_TEXT_ENCODER["hidden"]
) -> int:
    """The text encoder at ``text_encoder_1_precision``: every parameter but the token embedding is taken as a
    Linear weight of width ``hidden`` (biases and norms, <0.1%, are counted with them)."""
    if precision == "no_change":
        return params * compute_bytes
    linear = max(0, params - embedding)
    return int(
        linear_weight_bytes(precision, hidden, max(1, linear // hidden), compute_bytes) + embedding * compute_bytes
    )


def vae_working_bytes(
    bytes_per_pixel: float, base_dim: int, images: int, pixels: int, *, tiling: bool, slicing: bool
) -> int:
    """The VAE's encode or decode working set for a batch of ``images`` of ``pixels`` each: slicing runs one image
    at a time, tiling one tile of ``VAE_TILE_PIXELS`` at a time (the full-size input and output, a few MB, are
    not counted)."""
    n = 1 if slicing else images
    px = min(pixels, VAE_TILE_PIXELS) if tiling else pixels
    return int(bytes_per_pixel * base_dim * n * px)


# -------------------------------------------------------------------------------------- activations
def per_stream(tokens: Tokens) -> dict[str, int]:
    """Tokens each stream of Linears runs on: image, text (the VL encoder's rows), once per sample, and the whole
    sequence (Qwen-Image-2.1's single-stream blocks)."""
    return {"image": tokens.image, "text": tokens.vlm, "sample": 1, "joint": tokens.total}


def _kept_input_bytes(precision: str) -> float:
    """Per token per unit width per block: what a quantized base's matmul keeps of its input (nf4-bnb: nothing)."""
    return C_QUANTO if precision in QUANTO else C_INT8_BNB if precision == "int8-bnb" else 0.0


def block_saved_bytes(
    counts: TransformerCounts,
    tokens: Tokens,
    targets: list[LinearInfo],
    rank: int,
    *,
    precision: str = "no_change",
    zero_cond: bool = False,
) -> float:
    """Bytes one block saves for backward (one sample, bf16 compute, fp32 LoRA), from the measured constants."""
    d = counts.width
    per_token = C_BLOCK + _kept_input_bytes(precision)
    saved = d * (tokens.image * (per_token + (C_ZERO_COND if zero_cond else 0.0)) + tokens.text * per_token)
    n = per_stream(tokens)
    in_blocks = [li for li in targets if li.name.startswith("transformer_blocks.")]
    lora = sum(n[li.stream] * (li.in_features * C_LORA_INPUT + rank * 4) for li in in_blocks)
    return saved + lora / counts.layers


def training_activation_bytes(
    counts: TransformerCounts,
    tokens: Tokens,
    targets: list[LinearInfo],
    rank: int,
    *,
    checkpointing: bool,
    precision: str = "no_change",
    zero_cond: bool = False,
    batch: int = 1,
) -> dict[str, int]:
    """Saved-for-backward bytes and the backward working set of one micro-batch."""
    d, L = counts.width, counts.layers
    block = block_saved_bytes(counts, tokens, targets, rank, precision=precision, zero_cond=zero_cond)
    n = per_stream(tokens)
    top = [li for li in targets if not li.name.startswith("transformer_blocks.")]
    outside = (
        tokens.total * d * (C_OUTSIDE_CKPT if checkpointing else C_OUTSIDE)
        + tokens.total * counts.head_dim * 4  # RoPE frequencies, complex64
        + sum(n[li.stream] * (li.in_features * C_LORA_INPUT + rank * 4) for li in top)
    )
    if checkpointing:
        saved = L * C_CKPT_INPUT * d * tokens.total + outside
        extra = PEAK_EXTRA_BLOCKS_CKPT * block
    else:
        saved = L * block + outside
        extra = PEAK_EXTRA_BLOCKS * block
    return {"saved for backward": int(batch * saved), "backward working set": int(batch * extra)}


def inference_activation_bytes(counts: TransformerCounts, tokens: Tokens) -> int:
    return int(C_INFERENCE * tokens.total * counts.width)


def text_encoder_activation_bytes(tokens: Tokens, references: int, vl_area: int) -> int:
    """Estimate (not measured): Qwen2.5-VL's forward keeps every layer's hidden states (output_hidden_states) and
    the logits of every position; on top, one layer's working set, and the vision tower's for the references."""
    te = REAL_TEXT_ENCODER
    n = tokens.text + TEMPLATE_TOKENS
    hidden = (te["layers"] + 1) * n * te["hidden"] * 2
    logits = n * te["vocab"] * 2
    layer = n * (te["hidden"] * 2 * 6 + te["intermediate"] * 2 * 3)
    patches = references * max(1, vl_area // VL_PIXELS_PER_PATCH)
    vision = patches * (te["vision_hidden"] * 2 * 6 + te["vision_intermediate"] * 2 * 3)
    return int(hidden + logits + max(layer, vision))
