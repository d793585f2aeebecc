"""Predict what a run needs on a GPU — memory per service, tokens, FLOPs, seconds per step — before it starts.

Legend: T tokens (T_img image stream: noisy target + references; T_txt text stream), d transformer width, L blocks,
r LoRA rank. Bytes are bytes; GiB = 2**30.

The model, service by service:

- trainer = base weights (bytes per weight by ``base_model_precision``; biases, ``KEEP_HIGH_PRECISION`` modules
  and non-Linear parameters stay in the compute dtype) + LoRA (fp32 weights + fp32 grads + AdamW state; EMA lives
  on the CPU) + activations + a fixed CUDA overhead.
- encoder = Qwen2.5-VL text encoder + VAE (compute dtype) + the larger of the VAE's encode working set (one batch
  of ``DatasetEncoder`` images at ~1 MP) and the text encoder's forward.
- eval = transformer at the run's precision + text encoder + VAE + the largest of: no-grad denoising step, text
  encoder forward, VAE decode.

Parameter counts are exact: the transformer is built on the meta device from its config.json (the bundled real
Qwen-Image-Edit config for a hub id) and walked Linear by Linear. The activation constants are measured on this
CPU by ``measure_activation_coefficients()`` with the real diffusers classes; everything else that is not
measured is listed in ``Plan.assumptions``. GPU timings (bench/gpu_step.py) are not taken yet.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared import errors
from shared.config import DEFAULT_TARGET_MODULES, RunConfig, parse_wxh
from shared.flavours import get_flavour
from shared.geometry import bucket_for_area, packed_size
from shared.quantize import BNB, QUANTO, keeps_high_precision

GiB = 2**30

# ----------------------------------------------------------------------------------------- the real model
# Qwen/Qwen-Image-Edit(-2509, -2511) transformer/config.json: used when the model is a hub id (not on disk).
REAL_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
# Qwen2.5-VL-7B (Qwen2_5_VLForConditionalGeneration) counted on the meta device from its config: 8,292,166,656
# parameters, 676,550,144 of them the vision tower; hidden 3584, 28 layers, MLP 18944, vocab 152064.
REAL_TEXT_ENCODER = {"params": 8_292_166_656, "hidden": 3584, "layers": 28, "intermediate": 18944,
                     "vocab": 152064, "vision_hidden": 1280, "vision_intermediate": 3420}
# AutoencoderKLQwenImage with its default (= real) config, counted on meta: 126,892,531 parameters.
REAL_VAE = {"params": 126_892_531, "base_dim": 96}

CAPTION_TOKENS = 64  # a typical edit instruction, in Qwen2.5 tokens
TEMPLATE_TOKENS = 64  # the edit template's system prefix: the text encoder reads it, the pipelines drop it
VL_PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14 px patches, 2x2 merged into one LM token
VL_PIXELS_PER_PATCH = 14 * 14

# -------------------------------------------------------------------------------- measured constants
# Measured by measure_activation_coefficients() (`python -m shared.planner --measure`, ~10 s; torch 2.13 CPU,
# diffusers 0.42.1, peft 0.21.2, optimum-quanto 0.2.7, bitsandbytes 0.50.2) on the real QwenImageTransformer2DModel
# at 2 heads x 128 (d = 256), joint_attention_dim 64, bf16, base frozen, with a rank-16 LoRA attached by
# shared.lora.attach_lora and cast to fp32 as Trainer.setup does.
# - Saved for backward: torch.autograd.graph.saved_tensors_hooks counts every storage once (parameters excluded) at
#   2 and 4 blocks and two token mixes (1024 image + 32 text tokens, 256 + 256); the per-block difference, over both
#   precisions (bf16, int8-quanto) and two LoRA target sets (attention image side; + text side and MLP), is fitted
#   by least squares to  d*T*(C_BLOCK [+ C_QUANTO]) + sum over targeted Linears of T_stream*(in*C_LORA_INPUT + 4r).
#   The fit is exact to 0.2%. What a block saves (CPU kernels): LayerNorm inputs, modulation products, the fp32 q/k
#   copies the RMSNorms make, RoPE products, SDPA's q/k/v/output + fp32 logsumexp per token and head (4/128 bytes
#   per unit width, inside C_BLOCK), GELU inputs (4d); per LoRA layer peft's fp32 copy of its bf16 input
#   (C_LORA_INPUT = 4: q, k and v each pay their own copy of the same input).
# - Peak: a TorchDispatchMode (LiveBytes) tracks every storage an op creates until it is freed, over forward and
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
# VAE (AutoencoderKLQwenImage, real layout at base_dim 16, bf16, 256x256, no grad, LiveBytes peak): bytes per pixel
# per unit of base_dim; it scales with both (checked at base_dim 32 and at 128 px).
VAE_ENCODE_BYTES = 20.8
VAE_DECODE_BYTES = 36.2

# ------------------------------------------------------------------------------------------ assumptions
CUDA_OVERHEAD = int(1.5 * GiB)  # CUDA context, cuBLAS/attention workspaces, caching-allocator slack
MFU_BF16 = 0.35
MFU_QUANTIZED = 0.25  # quanto dequantizes the weight for every matmul; bnb likewise
ATTENTION_BACKWARD = 2.0  # dQ, dK from dS and dV, dP from dO: 2x the forward (bench/gpu_step.py counts the same)
LORA_STATE_BYTES = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2}  # fp32 weight + fp32 grad + optimizer state

# name → (peak dense bf16 FLOP/s (SXM parts), total memory in bytes, about as torch.cuda.mem_get_info reports it)
GPUS: dict[str, tuple[float, int]] = {
    "H100": (989e12, 85_031_714_816),
    "H200": (989e12, 150_110_011_392),
    "A100": (312e12, 85_095_874_560),
    "L40S": (362e12, 48_305_799_168),
    "RTX4090": (165e12, 25_390_678_016),
    "RTX3090": (71e12, 25_447_170_048),
}

PRECISION_LADDER = ("no_change", "int8-quanto", "nf4-bnb", "int4-quanto")  # the recommendation's order
RESOLUTION_LADDER = (1024, 768, 512)

# ------------------------------------------------------------------------------------------------ sizes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(TiB|TB|GiB|GB|MiB|MB)\s*$", re.IGNORECASE)
_UNITS = {"tib": 2**40, "tb": 10**12, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}


def parse_size(text: str) -> int:
    """'24GiB' → 25769803776, '80GB' → 80000000000 (GiB/GB/MiB/MB/TiB/TB, any case); InvalidInput otherwise."""
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise errors.InvalidInput(f"GPU memory {text!r}: expected a size like '24GiB', '80GB' or '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def gpu_spec(name: str) -> tuple[str, float, int]:
    """(canonical name, peak bf16 FLOP/s, memory bytes) of a GPU named like 'H100', 'rtx 4090', 'NVIDIA L40S'."""
    key = re.sub(r"[\s_-]+", "", str(name).upper()).removeprefix("NVIDIA").removeprefix("GEFORCE")
    for cand in (key, "RTX" + key):
        if cand in GPUS:
            return cand, *GPUS[cand]
    for known in GPUS:  # a device name such as "NVIDIA H100 80GB HBM3"
        if known in key:
            return known, *GPUS[known]
    raise errors.InvalidInput(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)} (or give --gpu-memory)")


# ------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class LinearInfo:
    name: str
    in_features: int
    out_features: int
    bias: bool
    stream: str  # "image" (per image token), "text" (per text token) or "sample" (per sample: modulation, time)
    kept: bool  # in KEEP_HIGH_PRECISION: never quantized


@dataclass(frozen=True)
class TransformerCounts:
    """Exact parameter counts of a QwenImageTransformer2DModel config, Linear by Linear."""

    config: dict[str, Any]
    linears: tuple[LinearInfo, ...]
    other_params: int  # parameters outside Linears (RMSNorm weights)

    @property
    def layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.config["attention_head_dim"])

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def total(self) -> int:
        return self.other_params + sum(li.in_features * li.out_features + li.out_features * li.bias
                                       for li in self.linears)

    def weights(self, stream: str | None = None, kept: bool | None = None) -> int:
        """Linear weight elements (no biases), optionally of one stream and/or kept status."""
        return sum(li.in_features * li.out_features for li in self.linears
                   if (stream is None or li.stream == stream) and (kept is None or li.kept == kept))

    def breakdown(self) -> dict[str, int]:
        return {"image-stream Linear weights": self.weights("image", False),
                "text-stream Linear weights": self.weights("text", False),
                "modulation Linear weights": self.weights("sample", False),
                "kept high-precision (all params)": sum(li.in_features * li.out_features + li.out_features * li.bias
                                                        for li in self.linears if li.kept),
                "biases of quantizable Linears": sum(li.out_features for li in self.linears if li.bias and not li.kept),
                "other (norm weights)": self.other_params}


def _stream(name: str) -> str:
    if "_mod." in name or name.startswith(("time_text_embed", "norm_out")):
        return "sample"
    if "txt_" in name or "add_" in name:  # txt_in, txt_mlp, add_q/k/v_proj, to_add_out
        return "text"
    return "image"


def transformer_config(model_path: str) -> dict[str, Any]:
    """The transformer's config.json of a local model directory, or the bundled real one for a hub id."""
    from shared.models import _looks_like_hub_id

    root = Path(model_path).expanduser()
    path = root / "transformer" / "config.json"
    if not root.is_dir() and not _looks_like_hub_id(model_path):
        raise errors.InvalidInput(f"model directory {root} does not exist: the planner reads transformer/config.json "
                                  "from it (a hub id such as Qwen/Qwen-Image-Edit-2509 is planned with the real "
                                  "model's figures)")
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise errors.InvalidInput(f"{path}: cannot read the transformer config ({e})") from None
    return dict(REAL_TRANSFORMER_CONFIG)


@functools.lru_cache(maxsize=16)
def _counts(config_json: str) -> TransformerCounts:
    model = build_meta_transformer(json.loads(config_json))
    linears, in_linear = [], set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears.append(LinearInfo(name, m.in_features, m.out_features, m.bias is not None, _stream(name),
                                      keeps_high_precision(name)))
            in_linear.update(id(p) for p in m.parameters(recurse=False))
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_linear)
    return TransformerCounts(json.loads(config_json), tuple(linears), other)


def build_meta_transformer(config: dict[str, Any]) -> Any:
    """QwenImageTransformer2DModel from ``config`` on the meta device: shapes without memory."""
    from diffusers import QwenImageTransformer2DModel

    keys = set(inspect.signature(QwenImageTransformer2DModel.__init__).parameters) - {"self"}
    with torch.device("meta"):
        return QwenImageTransformer2DModel(**{k: v for k, v in config.items() if k in keys})


def counts_for_config(config: dict[str, Any]) -> TransformerCounts:
    return _counts(json.dumps(dict(config), sort_keys=True, default=list))


def transformer_counts(model_path: str) -> TransformerCounts:
    return counts_for_config(transformer_config(model_path))


def _safetensors_params(folder: Path) -> int | None:
    """Elements stored in a component folder's safetensors files (headers only), or None without files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def component_params(model_path: str) -> tuple[int, int, int]:
    """(text encoder params, VAE params, VAE base_dim): counted from a local directory's files, else the real ones."""
    root = Path(model_path).expanduser()
    te = _safetensors_params(root / "text_encoder") if root.is_dir() else None
    vae = _safetensors_params(root / "vae") if root.is_dir() else None
    base_dim = REAL_VAE["base_dim"]
    cfg = root / "vae" / "config.json"
    if cfg.is_file():
        base_dim = int(json.loads(cfg.read_text(encoding="utf-8")).get("base_dim", base_dim))
    return te or REAL_TEXT_ENCODER["params"], vae or REAL_VAE["params"], base_dim


# --------------------------------------------------------------------------------------- weight bytes
def dtype_bytes(mixed_precision: str) -> int:
    """Bytes of the compute dtype on the GPU: 'auto' is bf16 there."""
    return 4 if mixed_precision in ("no", "fp32") else 2


def linear_weight_bytes(precision: str, in_features: int, out_features: int, compute_bytes: int = 2) -> float:
    """Bytes a Linear's weight takes stored in ``precision`` (bias excluded; it stays in the compute dtype).
    Checked against real quantized layers in tests/test_planner.py."""
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
    quantized = sum(linear_weight_bytes(precision, li.in_features, li.out_features, compute_bytes)
                    for li in counts.linears if not li.kept)
    kept = sum((li.in_features * li.out_features + li.out_features * li.bias) * compute_bytes
               for li in counts.linears if li.kept)
    rest = (sum(li.out_features for li in counts.linears if li.bias and not li.kept) + counts.other_params)
    return {f"base weights ({precision})": int(quantized), "kept layers": kept,
            "biases + norms": rest * compute_bytes}


# --------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Tokens:
    """Per-sample sequence lengths of the transformer (and what the text encoder reads)."""

    target: int
    per_reference: int
    references: int
    text: int
    vl_image_tokens: int  # of the text tokens, how many are reference images seen by Qwen2.5-VL

    @property
    def image(self) -> int:
        return self.target + self.per_reference * self.references

    @property
    def total(self) -> int:
        return self.image + self.text


def _square_tokens(area: int) -> int:
    w, h = bucket_for_area(1, 1, area)
    return (w // 16) * (h // 16)


def _vl_tokens(area: int) -> int:
    return max(1, round(area / VL_PIXELS_PER_TOKEN))


def training_tokens(run: RunConfig) -> Tokens:
    """The largest sample any image dataset makes (square buckets at each dataset's target_area)."""
    t = run.train
    flav = get_flavour(t.model_flavour)
    vl_area = t.model_kwargs.vl_reference_area or flav.vl_ref_area
    best: Tokens | None = None
    for ds in run.data.image_datasets:
        target = _square_tokens(ds.target_area)
        n_refs = len(ds.conditioning_data)
        if t.conditioning_multidataset_sampling == "random" and t.model_flavour != "edit-v1":
            n_refs = min(n_refs, 1)
        if t.model_flavour == "edit-v1" or t.model_kwargs.match_target_res:
            per_ref = target
        else:
            w, h = packed_size(1.0, t.model_kwargs.reference_area)
            per_ref = (w // 16) * (h // 16)
        vl = n_refs * _vl_tokens(vl_area)
        cand = Tokens(target, per_ref, n_refs, CAPTION_TOKENS + vl, vl)
        if best is None or cand.total > best.total:
            best = cand
    assert best is not None, "a validated RunConfig has at least one image dataset"
    return best


def eval_tokens(run: RunConfig, train: Tokens) -> Tokens:
    """Tokens of one denoising step at validation_resolution (references at the flavour's VAE area)."""
    t = run.train
    w, h = t.validation_size
    target = (w // 16) * (h // 16)
    if t.model_kwargs.match_target_res:
        per_ref = target
    else:
        pw, ph = packed_size(1.0, get_flavour(t.model_flavour).vae_ref_area)
        per_ref = (pw // 16) * (ph // 16)
    return Tokens(target, per_ref, train.references, train.text, train.vl_image_tokens)


# -------------------------------------------------------------------------------------------- LoRA
def lora_targets(counts: TransformerCounts, target_modules: list[str]) -> list[LinearInfo]:
    """The Linears peft wraps for ``target_modules`` (a name matches itself or any ``.``-suffix); InvalidInput
    naming the valid choices when a target matches nothing, as the trainer would say later."""
    _check_targets(json.dumps(counts.config, sort_keys=True, default=list), tuple(target_modules))
    return [li for li in counts.linears if any(li.name == t or li.name.endswith("." + t) for t in target_modules)]


@functools.lru_cache(maxsize=64)
def _check_targets(config_json: str, target_modules: tuple[str, ...]) -> None:
    from shared.lora import check_target_modules

    check_target_modules(build_meta_transformer(json.loads(config_json)), target_modules)


def lora_params(targets: list[LinearInfo], rank: int) -> int:
    return sum(rank * (li.in_features + li.out_features) for li in targets)


# -------------------------------------------------------------------------------------- activations
def _per_stream(tokens: Tokens) -> dict[str, int]:
    return {"image": tokens.image, "text": tokens.text, "sample": 1}


def _kept_input_bytes(precision: str) -> float:
    """Per token per unit width per block: what a quantized base's matmul keeps of its input (nf4-bnb: nothing)."""
    return C_QUANTO if precision in QUANTO else C_INT8_BNB if precision == "int8-bnb" else 0.0


def block_saved_bytes(counts: TransformerCounts, tokens: Tokens, targets: list[LinearInfo], rank: int, *,
                      precision: str = "no_change", zero_cond: bool = False) -> float:
    """Bytes one block saves for backward (one sample, bf16 compute, fp32 LoRA), from the measured constants."""
    d = counts.width
    per_token = C_BLOCK + _kept_input_bytes(precision)
    saved = d * (tokens.image * (per_token + (C_ZERO_COND if zero_cond else 0.0)) + tokens.text * per_token)
    n = _per_stream(tokens)
    in_blocks = [li for li in targets if li.name.startswith("transformer_blocks.")]
    lora = sum(n[li.stream] * (li.in_features * C_LORA_INPUT + rank * 4) for li in in_blocks)
    return saved + lora / counts.layers


def training_activation_bytes(counts: TransformerCounts, tokens: Tokens, targets: list[LinearInfo], rank: int, *,
                              checkpointing: bool, precision: str = "no_change", zero_cond: bool = False,
                              batch: int = 1) -> dict[str, int]:
    """Saved-for-backward bytes and the backward working set of one micro-batch."""
    d, L = counts.width, counts.layers
    block = block_saved_bytes(counts, tokens, targets, rank, precision=precision, zero_cond=zero_cond)
    n = _per_stream(tokens)
    top = [li for li in targets if not li.name.startswith("transformer_blocks.")]
    outside = (tokens.total * d * (C_OUTSIDE_CKPT if checkpointing else C_OUTSIDE)
               + tokens.total * counts.head_dim * 4  # RoPE frequencies, complex64
               + sum(n[li.stream] * (li.in_features * C_LORA_INPUT + rank * 4) for li in top))
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


# ------------------------------------------------------------------------------------------------ FLOPs
def step_flops(counts: TransformerCounts, tokens: Tokens, targets: list[LinearInfo], rank: int, *,
               checkpointing: bool) -> dict[str, float]:
    """FLOPs of one sample's forward + backward. The base is frozen, so its Linears' backward computes input
    gradients only (1x forward); attention backward is ATTENTION_BACKWARD x forward; the LoRA trains (2x);
    checkpointing re-runs the forward."""
    n = _per_stream(tokens)
    linear = 2.0 * sum(li.in_features * li.out_features * n[li.stream] for li in counts.linears)
    attention = 4.0 * tokens.total**2 * counts.width * counts.layers
    lora = 2.0 * sum(rank * (li.in_features + li.out_features) * n[li.stream] for li in targets)
    forward = linear + attention + lora
    backward = linear + ATTENTION_BACKWARD * attention + 2 * lora
    return {"forward": forward, "backward": backward, "recompute": forward if checkpointing else 0.0}


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ServicePlan:
    name: str
    breakdown: dict[str, int]
    memory_bytes: int  # the GPU it is compared with

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.memory_bytes


@dataclass
class Plan:
    """What a run needs. ``fits`` and ``recommendation`` are about the trainer, the service that runs out."""

    model: str
    flavour: str
    precision: str
    checkpointing: bool
    lora_rank: int
    batch: int
    micro_batches: int  # gradient_accumulation_steps: one optimizer step runs this many forward/backward passes
    gpu: str
    gpu_memory_bytes: int
    services: dict[str, ServicePlan]
    tokens: Tokens
    eval_tokens: Tokens
    parameters: dict[str, int]
    flops_per_step: float  # hardware FLOPs: with checkpointing's recomputed forward
    model_flops_per_step: float  # forward + backward only: what bench/gpu_step.py divides by for its MFU
    seconds_per_step: float
    mfu: float
    fits: bool
    recommendation: list[str] = field(default_factory=list)
    recommended_bytes: int | None = None  # the trainer's prediction with the recommendation applied
    assumptions: list[str] = field(default_factory=list)

    @property
    def trainer(self) -> ServicePlan:
        return self.services["trainer"]


def _assumptions(gpu: str, mfu: float, compute_bytes: int) -> list[str]:
    fp32 = ["mixed_precision fp32: activations taken as twice the bf16 measurement (approximate)"]
    return (fp32 if compute_bytes == 4 else []) + [
        f"fixed CUDA overhead {fmt_gib(CUDA_OVERHEAD)} per service (context, workspaces, allocator slack): assumed",
        f"seconds/step = hardware FLOPs (with checkpointing's recompute) / ({gpu} peak bf16 x MFU {mfu:.2f}); the "
        "MFU is an assumption until bench/gpu_step.py measures it (it reports MFU on model FLOPs, without the "
        "recompute)",
        "activation constants measured on CPU kernels (saved tensors + peak live bytes); CUDA's attention kernels "
        "save the same q/k/v/output/logsumexp, so the same bytes are expected: not yet checked on a GPU",
        f"tokens per sample: caption ~{CAPTION_TOKENS} text tokens + {VL_PIXELS_PER_TOKEN} px per VL image token; "
        "square buckets at each dataset's area (other aspect ratios have about as many tokens)",
        "text encoder activations are an estimate (hidden states of every layer + all-position logits), not measured",
        "eval is planned at the run's base_model_precision; eval_svc loads the pipeline without quantizing today, "
        "so it needs the no_change weight figure until it does",
    ]


def plan_run(run: RunConfig, gpu_memory_bytes: int | None = None, gpu: str = "H100", *,
             recommend: bool = True) -> Plan:
    """Predict memory per service, tokens, FLOPs and seconds per step of ``run`` on ``gpu``; when the trainer does
    not fit ``gpu_memory_bytes`` (default: the GPU's memory), search for overrides that make it fit."""
    name, peak_flops, default_memory = gpu_spec(gpu)
    memory = int(gpu_memory_bytes) if gpu_memory_bytes is not None else default_memory
    t = run.train
    flav = get_flavour(t.model_flavour)
    cb = dtype_bytes(t.mixed_precision)
    counts = transformer_counts(t.model_path)
    targets = lora_targets(counts, list(t.lora_target_modules))
    tokens = training_tokens(run)
    zero_cond = bool(counts.config.get("zero_cond_t", flav.zero_cond_t))

    weights = transformer_weight_bytes(counts, t.base_model_precision, cb)
    n_lora = lora_params(targets, t.lora_rank)
    acts = training_activation_bytes(counts, tokens, targets, t.lora_rank, checkpointing=t.gradient_checkpointing,
                                     precision=t.base_model_precision, zero_cond=zero_cond,
                                     batch=t.train_batch_size)
    acts = {k: v * cb // 2 for k, v in acts.items()}  # measured in bf16; fp32 compute: about twice
    trainer = {**weights, f"LoRA {n_lora / 1e6:.1f}M params + grads + {t.optimizer}":
               n_lora * LORA_STATE_BYTES[t.optimizer], **acts, "CUDA overhead": CUDA_OVERHEAD}

    te_params, vae_params, base_dim = component_params(t.model_path)
    vl_area = t.model_kwargs.vl_reference_area or flav.vl_ref_area
    te_acts = text_encoder_activation_bytes(tokens, tokens.references, vl_area)
    batch_px = run.train.vae_batch_size * 256 * max(tokens.target, tokens.per_reference)  # a batch of the largest images
    encoder = {"text encoder": te_params * cb, "VAE": vae_params * cb,
               "working set (max of VAE encode, text encoder)": int(max(VAE_ENCODE_BYTES * base_dim * batch_px,
                                                                        te_acts)),
               "CUDA overhead": CUDA_OVERHEAD}
    ev_tokens = eval_tokens(run, tokens)
    vw, vh = t.validation_size
    ev = {**{f"transformer {k}": v for k, v in weights.items()}, "LoRA (compute dtype)": n_lora * cb,
          "text encoder": te_params * cb, "VAE": vae_params * cb,
          "working set (max of denoise step, text encoder, VAE decode)": int(max(
              inference_activation_bytes(counts, ev_tokens), te_acts, VAE_DECODE_BYTES * base_dim * vw * vh)),
          "CUDA overhead": CUDA_OVERHEAD}

    flops = step_flops(counts, tokens, targets, t.lora_rank, checkpointing=t.gradient_checkpointing)
    samples = t.train_batch_size * t.gradient_accumulation_steps
    per_step = sum(flops.values()) * samples
    mfu = MFU_BF16 if t.base_model_precision == "no_change" else MFU_QUANTIZED
    services = {"trainer": ServicePlan("trainer", trainer, memory), "encoder": ServicePlan("encoder", encoder, memory),
                "eval": ServicePlan("eval", ev, memory)}
    plan = Plan(model=t.model_path, flavour=t.model_flavour, precision=t.base_model_precision,
                checkpointing=t.gradient_checkpointing, lora_rank=t.lora_rank, batch=t.train_batch_size,
                micro_batches=t.gradient_accumulation_steps, gpu=name,
                gpu_memory_bytes=memory, services=services, tokens=tokens, eval_tokens=ev_tokens,
                parameters={"transformer": counts.total, "text encoder": te_params, "VAE": vae_params,
                            "LoRA": n_lora},
                flops_per_step=per_step, model_flops_per_step=(flops["forward"] + flops["backward"]) * samples,
                seconds_per_step=per_step / (peak_flops * mfu), mfu=mfu,
                fits=services["trainer"].fits, assumptions=_assumptions(name, mfu, cb))
    if recommend and not plan.fits:
        plan.recommendation, plan.recommended_bytes = recommend_overrides(run, memory, name)
    return plan


# ------------------------------------------------------------------------------------------ recommendation
def _with_resolution(run: RunConfig, side: int) -> RunConfig:
    """``run`` with every image and conditioning dataset at ``side``² pixels (and packed references too)."""
    data = dataclasses.replace(run.data, datasets=tuple(
        dataclasses.replace(d, resolution=float(side), resolution_type="pixel_area")
        if d.dataset_type in ("image", "conditioning") else d for d in run.data.datasets))
    train = run.train
    packed = train.model_flavour != "edit-v1" and not train.model_kwargs.match_target_res
    if packed and train.model_kwargs.reference_area > side * side:
        train = dataclasses.replace(train, model_kwargs=dataclasses.replace(train.model_kwargs,
                                                                            reference_area=side * side))
    return dataclasses.replace(run, train=train, data=data)


def _candidates(run: RunConfig) -> list[tuple[dict[str, Any], int | None]]:
    """(config overrides, dataset side or None) in preference order: checkpointing on; then a smaller precision;
    then a lower resolution; then rank 8."""
    t = run.train
    cur_bytes = linear_weight_bytes(t.base_model_precision, 3072, 3072)
    precisions = [t.base_model_precision] + [p for p in PRECISION_LADDER
                                             if p != t.base_model_precision
                                             and linear_weight_bytes(p, 3072, 3072) < cur_bytes]
    side = max(math.isqrt(ds.target_area) for ds in run.data.image_datasets)
    sides = [None] + [s for s in RESOLUTION_LADDER if s < side]
    ranks = [t.lora_rank] + ([8] if t.lora_rank > 8 else [])
    out = []
    for rank in ranks:
        for s in sides:
            for p in precisions:
                over: dict[str, Any] = {"gradient_checkpointing": True, "base_model_precision": p, "lora_rank": rank}
                out.append((over, s))
    return out


def recommend_overrides(run: RunConfig, memory: int, gpu: str = "H100") -> tuple[list[str], int | None]:
    """The first candidate (see ``_candidates``) whose trainer fits ``memory``, as the changes to make: config
    ``key=value`` overrides, and the dataset resolution as a multidatabackend.json edit. ([], None) if none fits."""
    t = run.train
    for over, side in _candidates(run):
        cand = run if side is None else _with_resolution(run, side)
        cand = dataclasses.replace(cand, train=dataclasses.replace(cand.train, **over))
        p = plan_run(cand, memory, gpu, recommend=False)
        if not p.fits:
            continue
        changes = [f"{k}={json.dumps(v).strip(chr(34))}" for k, v in over.items() if getattr(t, k) != v]
        if side is not None:
            if cand.train.model_kwargs.reference_area != t.model_kwargs.reference_area:
                changes.append(f"model_kwargs.reference_area={cand.train.model_kwargs.reference_area}")
            ids = ", ".join(d.id for d in run.data.datasets if d.dataset_type in ("image", "conditioning"))
            changes.append(f"multidatabackend.json: \"resolution\": {side} for {ids}")
        return changes, p.trainer.total
    return [], None


def apply_recommendation(run: RunConfig, recommendation: list[str]) -> RunConfig:
    """``run`` with a recommendation applied (what a user does by hand), so it can be planned again."""
    train, side = run.train, None
    for item in recommendation:
        if item.startswith("multidatabackend.json:"):
            side = int(re.search(r'"resolution": (\d+)', item).group(1))  # type: ignore[union-attr]
            continue
        key, _, value = item.partition("=")
        if key == "model_kwargs.reference_area":
            train = dataclasses.replace(train, model_kwargs=dataclasses.replace(train.model_kwargs,
                                                                                reference_area=int(value)))
        else:
            train = dataclasses.replace(train, **{key: json.loads(value) if value in ("true", "false") or
                                                  value.isdigit() else value})
    run = dataclasses.replace(run, train=train)
    return _with_resolution(run, side) if side is not None else run


# --------------------------------------------------------------------------------------------- report
def format_plan(plan: Plan) -> str:
    tk = plan.tokens
    lines = [
        f"plan: {plan.flavour} ({plan.model}), base {plan.precision}, gradient_checkpointing "
        f"{'on' if plan.checkpointing else 'off'}, LoRA rank {plan.lora_rank}, batch {plan.batch}",
        f"GPU: {plan.gpu} (timing), {fmt_gib(plan.gpu_memory_bytes)} to fit",
        "parameters: " + ", ".join(f"{k} {v / 1e9:.3f}B" if v >= 1e8 else f"{k} {v / 1e6:.2f}M"
                                   for k, v in plan.parameters.items()),
        f"tokens per sample: {tk.target} target + {tk.references} x {tk.per_reference} reference + {tk.text} text "
        f"= {tk.total} (eval step: {plan.eval_tokens.total})",
        "",
        f"{'service':<8} {'predicted':>10}  {'fits':<4}  breakdown",
    ]
    for s in plan.services.values():
        parts = ", ".join(f"{k} {fmt_gib(v)}" for k, v in s.breakdown.items())
        lines.append(f"{s.name:<8} {fmt_gib(s.total):>10}  {'yes' if s.fits else 'NO':<4}  {parts}")
    lines += ["", f"step: {plan.flops_per_step:.3g} FLOPs ({plan.micro_batches} micro-batch(es) of {plan.batch}), "
              f"about {plan.seconds_per_step:.3g} s per optimizer step on {plan.gpu} (assumed MFU {plan.mfu:.2f})"]
    if plan.fits:
        lines.append(f"the trainer fits {fmt_gib(plan.gpu_memory_bytes)}")
    elif plan.recommendation:
        lines.append(f"the trainer does NOT fit {fmt_gib(plan.gpu_memory_bytes)}; with these changes it needs about "
                     f"{fmt_gib(plan.recommended_bytes or 0)}:")
        lines += [f"  {r}" for r in plan.recommendation]
    else:
        lines.append(f"the trainer does NOT fit {fmt_gib(plan.gpu_memory_bytes)}, and no setting searched "
                     "(checkpointing, int8-quanto/nf4-bnb/int4-quanto, 768/512, rank 8) makes it fit")
    lines += ["assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- fit check
def check_fits(run: RunConfig, device: torch.device | str, *, total_bytes: int | None = None) -> None:
    """Raise ResourceExhausted when the trainer's prediction exceeds the memory of CUDA ``device`` (its total, from
    torch.cuda.mem_get_info unless ``total_bytes`` is given). No check on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    gpu = "H100"
    if total_bytes is None:
        total_bytes = torch.cuda.mem_get_info(device)[1]
        try:
            gpu = gpu_spec(torch.cuda.get_device_name(device))[0]
        except errors.InvalidInput:
            pass
    plan = plan_run(run, total_bytes, gpu)
    if plan.fits:
        return
    tr = plan.trainer
    parts = ", ".join(f"{k} {fmt_gib(v)}" for k, v in tr.breakdown.items())
    advice = ("try " + " ".join(plan.recommendation) + f" (predicted {fmt_gib(plan.recommended_bytes or 0)}); "
              if plan.recommendation else "no searched setting fits this GPU; ")
    raise errors.ResourceExhausted(
        f"the run will not fit on {device}: the trainer needs about {fmt_gib(tr.total)} of GPU memory ({parts}) but "
        f"{device} has {fmt_gib(total_bytes)} in total. {advice}or pass skip_fit_check=true to try anyway "
        "(see `edittuner plan` for the full prediction)")


# ------------------------------------------------------------------------------------------- measurement
class LiveBytes:
    """A TorchDispatchMode that tracks every storage an op creates until it is freed: ``peak`` live bytes.
    Storages of ``exclude`` (parameters, buffers) do not count."""

    def __new__(cls, exclude: list[torch.Tensor]):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class _Mode(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.skip = {p for t in exclude for p in _storage_ptrs(t)}
                self.refs: dict[int, tuple[Any, int]] = {}
                self.live = self.peak = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
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
    from shared.lora import attach_lora
    from shared.quantize import quantize_transformer

    quantize_transformer(model, precision, device="cpu", compute_dtype=torch.bfloat16)
    attach_lora(model, rank, float(rank), 0.0, targets, seed=0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def _probe_model(layers: int, targets: list[str], precision: str = "no_change", zero_cond: bool = False) -> Any:
    """The real transformer class, 2 heads x 128 (d = 256), joint_attention_dim 64, ``layers`` blocks."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(num_layers=layers, attention_head_dim=128, num_attention_heads=2,
                                    joint_attention_dim=64, axes_dims_rope=(16, 56, 56), zero_cond_t=zero_cond)
    return prepare_for_training(m, targets, precision)


def _probe_inputs(m: Any, img: int, txt: int) -> dict[str, Any]:
    side = math.isqrt(img)
    assert side * side == img, "probe token counts are squares"
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, img, m.config.in_channels, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(1, txt, m.config.joint_attention_dim, generator=g).bfloat16(),
                encoder_hidden_states_mask=torch.ones(1, txt, dtype=torch.bool),
                timestep=torch.tensor([0.5]).bfloat16(), img_shapes=[[(1, side, side)]], return_dict=False)


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
    mode = LiveBytes([*model.parameters(), *model.buffers()])
    with mode, torch.set_grad_enabled(train):
        out = model(**_probe_inputs(model, img, txt))[0]
        if train:
            out.float().square().mean().backward()
        del out
    model.zero_grad(set_to_none=True)
    return mode.peak


def measure_activation_coefficients() -> dict[str, float]:
    """Re-measure the module's activation constants on this machine's CPU (about 10 s). See the comment above
    C_BLOCK for the method; returns {constant name: value}."""
    import numpy as np

    from diffusers import AutoencoderKLQwenImage

    default = list(DEFAULT_TARGET_MODULES)
    extended = default + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mlp.net.2",
                          "txt_mlp.net.0.proj"]
    mixes = [(1024, 32), (256, 256)]  # (image tokens, text tokens)
    rank, d = 16, 256
    rows, ys, block, outside = [], [], {}, []
    for precision in ("no_change", "int8-quanto"):
        for targets in (default, extended):
            m2, m4 = (_probe_model(n, targets, precision) for n in (2, 4))
            one_block = counts_for_config({**dict(m4.config), "num_layers": 1})
            tg = [li for li in one_block.linears if any(li.name == t or li.name.endswith("." + t) for t in targets)]
            for img, txt in mixes:
                s2, s4 = measure_saved_bytes(m2, img, txt), measure_saved_bytes(m4, img, txt)
                per_block = (s4 - s2) / 2
                n = {"image": img, "text": txt, "sample": 1}
                rows.append([d * (img + txt), sum(n[li.stream] * li.in_features for li in tg),
                             d * (img + txt) * (precision != "no_change")])
                ys.append(per_block - sum(n[li.stream] * rank * 4 for li in tg))
                if precision == "no_change" and targets is default:
                    block[img, txt] = per_block
                    outside.append((s2 - 2 * per_block - (img + txt) * 128 * 4) / ((img + txt) * d))
    c_block, c_lora, c_quanto = np.linalg.lstsq(np.array(rows, float), np.array(ys, float), rcond=None)[0]
    m2, m4 = (_probe_model(n, default) for n in (2, 4))
    z2, z4 = (_probe_model(n, default, zero_cond=True) for n in (2, 4))
    zero_cond, ckpt, outside_ckpt, peak, peak_ckpt, infer = [], [], [], [], [], []
    for img, txt in mixes:
        z_block = (measure_saved_bytes(z4, img, txt) - measure_saved_bytes(z2, img, txt)) / 2
        zero_cond.append((z_block - block[img, txt]) / (img * d))
        c2, c4 = measure_saved_bytes(m2, img, txt, True), measure_saved_bytes(m4, img, txt, True)
        ckpt.append((c4 - c2) / 2 / (d * (img + txt)))
        outside_ckpt.append((c2 - (c4 - c2) - (img + txt) * 128 * 4) / ((img + txt) * d))
        for cp, out in ((False, peak), (True, peak_ckpt)):
            out.append((measure_peak_bytes(m2, img, txt, cp) - measure_saved_bytes(m2, img, txt, cp))
                       / block[img, txt])
        infer.append(max(measure_peak_bytes(m, img, txt, train=False) for m in (m2, m4)) / (d * (img + txt)))
    b2, b4 = (_probe_model(n, default, "int8-bnb") for n in (2, 4))
    img, txt = mixes[0]
    int8_bnb = ((measure_peak_bytes(b4, img, txt) - measure_peak_bytes(b2, img, txt))
                - (measure_peak_bytes(m4, img, txt) - measure_peak_bytes(m2, img, txt))) / 2 / (d * (img + txt))
    per_px = {}
    for what, x in (("encode", torch.randn(1, 3, 1, 256, 256)), ("decode", torch.randn(1, 16, 1, 32, 32))):
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(base_dim=16).to(torch.bfloat16).eval()  # a fresh one: no caches from before
        mode = LiveBytes([*vae.parameters(), *vae.buffers()])
        with mode, torch.no_grad():
            (vae.encode if what == "encode" else vae.decode)(x.bfloat16())
        per_px[what] = mode.peak / (16 * 256 * 256)
    return {"C_BLOCK": float(c_block), "C_LORA_INPUT": float(c_lora), "C_QUANTO": float(c_quanto),
            "C_INT8_BNB": float(int8_bnb),
            "C_ZERO_COND": float(np.mean(zero_cond)), "C_OUTSIDE": float(max(outside)),
            "C_CKPT_INPUT": float(np.mean(ckpt)), "C_OUTSIDE_CKPT": float(max(outside_ckpt)),
            "PEAK_EXTRA_BLOCKS": float(max(peak)), "PEAK_EXTRA_BLOCKS_CKPT": float(max(peak_ckpt)), "C_INFERENCE": float(max(infer)),
            "VAE_ENCODE_BYTES": per_px["encode"], "VAE_DECODE_BYTES": per_px["decode"]}


# ------------------------------------------------------------------------------------------ docs table
def docs_table(gpu: str = "H100") -> str:
    """The markdown table of docs/PLANNER.md: the real model (hub ids) at 512/768/1024, edit-v1 and edit-v2 with 3
    references, bf16/int8-quanto/nf4-bnb, with and without gradient checkpointing."""
    from shared.config import load_run_config_text

    head = ("| flavour | refs | res | precision | ckpt | tokens | trainer GiB (weights + LoRA / activations) | "
            "encoder GiB | eval GiB | s/step " + gpu + " (predicted) | measured |")
    lines = [head, "|" + "---|" * 11]
    for flavour, refs in (("edit-v1", 1), ("edit-v2", 3)):
        for res in (512, 768, 1024):
            ids = [f"ref{i}" for i in range(refs)]
            data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": res, "conditioning_data": ids}] + [
                {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": res}
                for i in ids]
            for precision in ("no_change", "int8-quanto", "nf4-bnb"):
                for ckpt in (False, True):
                    cfg = {"model_flavour": flavour, "base_model_precision": precision, "mixed_precision": "bf16",
                           "gradient_checkpointing": ckpt, "train_batch_size": 1, "gradient_accumulation_steps": 1,
                           "validation_resolution": f"{res}x{res}"}
                    run = load_run_config_text(json.dumps(cfg), json.dumps(data))
                    p = plan_run(run, gpu=gpu, recommend=False)
                    b = p.trainer.breakdown
                    acts = sum(v for k, v in b.items() if k in ("saved for backward", "backward working set"))
                    fixed = p.trainer.total - acts
                    lines.append(f"| {flavour} | {refs} | {res} | {'bf16' if precision == 'no_change' else precision}"
                                 f" | {'on' if ckpt else 'off'} | {p.tokens.total} | {p.trainer.total / GiB:.1f} "
                                 f"({fixed / GiB:.1f} / {acts / GiB:.1f}) | {p.services['encoder'].total / GiB:.1f}"
                                 f" | {p.services['eval'].total / GiB:.1f} | {p.seconds_per_step:.1f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--measure"]:
        for k, v in measure_activation_coefficients().items():
            print(f"{k} = {v:.3f}")
    else:
        print(docs_table(*(sys.argv[1:2] or ["H100"])))
