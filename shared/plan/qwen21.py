"""Qwen-Image-2.1's bytes: the single-stream blocks' activations, the previews' prefix KV cache, the Qwen3-VL text
encoder's forward and the RGBA 16x VAE.

Legend as in ``shared.plan.memory``: T the joint sequence's tokens (text, the references' latent tokens in their
image slots, the target last), d the width (4096), L blocks (32), r LoRA rank. Token counts are
``shared.plan.tokens.qwen21_tokens``'; FLOPs are ``shared.plan.flops.step_flops``' (attention over the pairs
``Tokens.attention_pairs`` counts).
"""

from __future__ import annotations

from shared.model.quantize import QUANTO
from shared.plan.counts import REAL_QWEN21_TEXT_ENCODER, LinearInfo, TransformerCounts
from shared.plan.memory import per_stream
from shared.plan.tokens import QWEN21_SYSTEM_TOKENS, QWEN21_TOKENS_PER_SLOT, Tokens

# -------------------------------------------------------------------------------- measured constants
# Measured by measure_qwen21_coefficients() (`python -m shared.plan.measure_qwen21`; torch 2.13 CPU, diffusers
# 0.42.1, peft 0.21.2, optimum-quanto 0.2.7, bitsandbytes 0.50.2) as shared.plan.memory's constants are, on the real
# QwenImage21Transformer2DModel at 2 heads x 128 (d = 256), context_in_dim 64, bf16, frozen, rank-16 fp32 LoRA, with
# the training forward's sequence (text, one reference's tokens in its slots, text, the target; 1184 and 544 tokens)
# and its default attention processor (one SDPA call per prefix run and one for the target). Saved for backward,
# per block (4 minus 2 blocks, over bf16/int8-quanto and the attention/attention+MLP LoRA targets), fitted to
# d*T*(C21_BLOCK + C21_MLP*mlp_ratio [+ C21_QUANTO]) + sum over targeted Linears of T*(in*C21_LORA_INPUT + 4r), the
# SwiGLU's share from mlp_ratio 3 (the released model's) against 2; exactly linear in it (checked at 1 to 4). What
# a block keeps: the LayerNorm inputs, the modulated inputs and per-token scale/gate rows (causal_condition picks
# the t = 0 row for text and references, so they are materialised per token), the fp32 q/k RMSNorm copies, RoPE
# products, SDPA's q/k/v/output + logsumexp per run and their concatenation; the SwiGLU's gate, proj and SiLU
# outputs, mlp_ratio*d wide each (C21_MLP).
C21_BLOCK = 32.3  # measured 32.35; with C21_MLP at mlp_ratio 3 50.2-50.3 at 1, 2 and 3 heads alike
C21_MLP = 6.0  # measured 6.00 per unit of mlp_ratio
C21_LORA_INPUT = 4.0  # peft's fp32 copy of each targeted Linear's bf16 input, as in the edit models
C21_QUANTO = 12.0  # quanto keeps each quantized Linear's bf16 input (at mlp_ratio 3: img_mlp.out's is 3d wide)
C21_INT8_BNB = 12.0  # measured 12.04: bnb int8 keeps its inputs too (peak per block vs bf16); nf4-bnb nothing extra
# Per token per unit width, once, outside the blocks (txt_in, img_in, the sequence's assembly, norm_out, the loss):
# 512 bytes per token at 1, 2 and 3 heads alike, RoPE's frequencies and nothing that scales with the width.
C21_OUTSIDE = 0.0
C21_CKPT_INPUT = 2.0  # gradient checkpointing: each block keeps its one bf16 input stream
C21_OUTSIDE_CKPT = 4.0  # measured 4.03/4.05: with checkpointing, norm_out's input and scale rows
PEAK21_EXTRA_BLOCKS = 0.25  # measured 0.251: peak - saved without checkpointing, in blocks
PEAK21_EXTRA_BLOCKS_CKPT = 1.22  # measured 1.216: with checkpointing (the recomputed block + its working set)
# No-grad forward (previews): peak live bytes per token per unit width, the larger of the attention's working set
# and the SwiGLU's, C21_INFERENCE_MLP + C21_MLP*mlp_ratio: 38.9 at mlp_ratio 3 (35.1 at 1 and 2, 44.9 at 4)
C21_INFERENCE_ATTN = 35.1  # measured 35.13
C21_INFERENCE_MLP = 20.9  # measured 20.87
# AutoencoderKLQwenImage21 (RGBA, z_dim 64, 16x) at base_dim 16 / decoder_base_dim 24 (the released 96/144 ratio),
# bf16, 256x256, no grad, live-bytes peak: bytes per pixel per unit of the encoder's and the decoder's base width.
VAE21_ENCODE_BYTES = 23.3  # measured 23.25
VAE21_DECODE_BYTES = 44.9  # measured 44.85


# -------------------------------------------------------------------------------------- activations
def _mlp_ratio(counts: TransformerCounts) -> float:
    return float(counts.config.get("mlp_ratio", 3))


def inference_bytes_per_token(counts: TransformerCounts) -> float:
    """A no-grad forward's peak bytes per token per unit width."""
    return max(C21_INFERENCE_ATTN, C21_INFERENCE_MLP + C21_MLP * _mlp_ratio(counts))


def _kept_input_bytes(precision: str) -> float:
    return C21_QUANTO if precision in QUANTO else C21_INT8_BNB if precision == "int8-bnb" else 0.0


def _lora_bytes(tokens: Tokens, targets: list[LinearInfo], rank: int, in_blocks: bool) -> float:
    n = per_stream(tokens)
    return sum(
        n[li.stream] * (li.in_features * C21_LORA_INPUT + rank * 4)
        for li in targets
        if li.name.startswith("transformer_blocks.") == in_blocks
    )


def block_saved_bytes(
    counts: TransformerCounts, tokens: Tokens, targets: list[LinearInfo], rank: int, precision: str = "no_change"
) -> float:
    """Bytes one single-stream block saves for backward (one sample, bf16 compute, fp32 LoRA)."""
    per_token = C21_BLOCK + C21_MLP * _mlp_ratio(counts) + _kept_input_bytes(precision)
    saved = counts.width * tokens.total * per_token
    return saved + _lora_bytes(tokens, targets, rank, True) / counts.layers


def training_activation_bytes(
    counts: TransformerCounts,
    tokens: Tokens,
    targets: list[LinearInfo],
    rank: int,
    *,
    checkpointing: bool,
    precision: str = "no_change",
    batch: int = 1,
) -> dict[str, int]:
    """Saved-for-backward bytes and the backward working set of one micro-batch of 2.1's joint sequence."""
    d, L, T = counts.width, counts.layers, tokens.total
    block = block_saved_bytes(counts, tokens, targets, rank, precision)
    outside = (
        T * d * (C21_OUTSIDE_CKPT if checkpointing else C21_OUTSIDE)
        + T * counts.head_dim * 4  # RoPE frequencies, complex64
        + _lora_bytes(tokens, targets, rank, False)
    )
    if checkpointing:
        saved = L * C21_CKPT_INPUT * d * T + outside
        extra = PEAK21_EXTRA_BLOCKS_CKPT * block
    else:
        saved = L * block + outside
        extra = PEAK21_EXTRA_BLOCKS * block
    return {"saved for backward": int(batch * saved), "backward working set": int(batch * extra)}


# ------------------------------------------------------------------------------------------ previews
def kv_cache_bytes(counts: TransformerCounts, tokens: Tokens, compute_bytes: int = 2, caches: int = 1) -> int:
    """The previews' prefix KV cache: one K and one V (post-RoPE, in the compute dtype) per block per token of the
    text + references prefix, for each of ``caches`` prompts (two with true CFG: the prompt's and the negative's,
    as QwenImage21Pipeline keeps ``cond_cache`` and ``neg_cache``)."""
    prefix = tokens.total - tokens.target
    return caches * counts.layers * 2 * prefix * counts.width * compute_bytes


def render_step_bytes(counts: TransformerCounts, tokens: Tokens, compute_bytes: int = 2, caches: int = 1) -> int:
    """A preview's denoising working set with the KV cache: the cache, plus the larger of the first step's no-grad
    forward over the whole sequence (which fills it) and a later step's over the target's tokens, whose attention
    concatenates the cached K/V with the target's (one block at a time)."""
    d, per_token = counts.width, inference_bytes_per_token(counts)
    extract = per_token * tokens.total * d
    cached = per_token * tokens.target * d + 2 * tokens.total * d * compute_bytes
    return kv_cache_bytes(counts, tokens, compute_bytes, caches) + int(max(extract, cached))


# ------------------------------------------------------------------------------------------ text encoder
def text_encoder_activation_bytes(tokens: Tokens) -> int:
    """Estimate (not measured) of Qwen3-VL-8B's no-grad forward as ``shared.encode.qwen21.prompt_embeddings`` runs
    it (the decoder without lm_head, the last layer's input captured by a hook): the input embeddings and the
    captured rows, the KV cache the decoder builds (use_cache), the three deepstack feature maps of the image slots,
    and the larger of one decoder layer's and the vision tower's working set (4 patches of 16 px per slot)."""
    te = REAL_QWEN21_TEXT_ENCODER
    n = tokens.vlm + QWEN21_SYSTEM_TOKENS
    rows = 2 * n * te["hidden"] * 2
    cache = te["layers"] * n * 2 * te["kv_width"] * 2
    deepstack = te["deepstack"] * tokens.vl_image_tokens * te["hidden"] * 2
    layer = n * (te["hidden"] * 2 * 6 + te["intermediate"] * 2 * 3)
    patches = tokens.vl_image_tokens * QWEN21_TOKENS_PER_SLOT
    vision = patches * (te["vision_hidden"] * 2 * 6 + te["vision_intermediate"] * 2 * 3)
    return int(rows + cache + deepstack + max(layer, vision))
