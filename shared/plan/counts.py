"""Exact parameter counts: the transformer built on the meta device from its config.json (the bundled real
Qwen-Image-Edit config for a hub id) and walked Linear by Linear; the text encoder and VAE from safetensors headers.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared import errors
from shared.model.quantize import keeps_high_precision

# ----------------------------------------------------------------------------------------- the real model
# Qwen/Qwen-Image-Edit(-2509, -2511) transformer/config.json: used when the model is a hub id (not on disk).
REAL_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
# Qwen2.5-VL-7B (Qwen2_5_VLForConditionalGeneration) counted on the meta device from its config: 8,292,166,656
# parameters, 676,550,144 of them the vision tower; hidden 3584, 28 layers, MLP 18944, vocab 152064.
REAL_TEXT_ENCODER = {
    "params": 8_292_166_656,
    "hidden": 3584,
    "layers": 28,
    "intermediate": 18944,
    "vocab": 152064,
    "vision_hidden": 1280,
    "vision_intermediate": 3420,
}
# AutoencoderKLQwenImage with its default (= real) config, counted on meta: 126,892,531 parameters.
REAL_VAE = {"params": 126_892_531, "base_dim": 96}


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
        return self.other_params + sum(
            li.in_features * li.out_features + li.out_features * li.bias for li in self.linears
        )

    def weights(self, stream: str | None = None, kept: bool | None = None) -> int:
        """Linear weight elements (no biases), optionally of one stream and/or kept status."""
        return sum(
            li.in_features * li.out_features
            for li in self.linears
            if (stream is None or li.stream == stream) and (kept is None or li.kept == kept)
        )

    def breakdown(self) -> dict[str, int]:
        return {
            "image-stream Linear weights": self.weights("image", False),
            "text-stream Linear weights": self.weights("text", False),
            "modulation Linear weights": self.weights("sample", False),
            "kept high-precision (all params)": sum(
                li.in_features * li.out_features + li.out_features * li.bias for li in self.linears if li.kept
            ),
            "biases of quantizable Linears": sum(li.out_features for li in self.linears if li.bias and not li.kept),
            "other (norm weights)": self.other_params,
        }


def _stream(name: str) -> str:
    if "_mod." in name or name.startswith(("time_text_embed", "norm_out")):
        return "sample"
    if "txt_" in name or "add_" in name:  # txt_in, txt_mlp, add_q/k/v_proj, to_add_out
        return "text"
    return "image"


def transformer_config(model_path: str) -> dict[str, Any]:
    """The transformer's config.json of the model (found as the loader finds it, EDITTUNER_MODEL_DIR included),
    or the bundled real one for a hub id with no local copy."""
    from shared.model.location import locate_model, looks_like_hub_id

    root = Path(locate_model(model_path).source).expanduser()
    path = root / "transformer" / "config.json"
    if not root.is_dir() and not looks_like_hub_id(model_path):
        raise errors.InvalidInput(
            f"model directory {root} does not exist: the planner reads transformer/config.json "
            "from it (a hub id such as Qwen/Qwen-Image-Edit-2509 is planned with the real "
            "model's figures)"
        )
    if path.is_file():
        try:
            config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return config
        except (OSError, ValueError) as e:
            raise errors.InvalidInput(f"{path}: cannot read the transformer config ({e})") from None
    return dict(REAL_TRANSFORMER_CONFIG)


@functools.lru_cache(maxsize=16)
def _counts(config_json: str) -> TransformerCounts:
    model = build_meta_transformer(json.loads(config_json))
    linears: list[LinearInfo] = []
    in_linear: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears.append(
                LinearInfo(
                    name, m.in_features, m.out_features, m.bias is not None, _stream(name), keeps_high_precision(name)
                )
            )
            in_linear.update(id(p) for p in m.parameters(recurse=False))
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_linear)
    return TransformerCounts(json.loads(config_json), tuple(linears), other)


def build_meta_transformer(config: dict[str, Any]) -> Any:
    """QwenImageTransformer2DModel from ``config`` on the meta device: shapes without memory."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

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
    """(text encoder params, VAE params, VAE base_dim): counted from a local copy's files, else the real ones."""
    from shared.model.location import locate_model

    root = Path(locate_model(model_path).source).expanduser()
    te = _safetensors_params(root / "text_encoder") if root.is_dir() else None
    vae = _safetensors_params(root / "vae") if root.is_dir() else None
    base_dim = REAL_VAE["base_dim"]
    cfg = root / "vae" / "config.json"
    if cfg.is_file():
        base_dim = int(json.loads(cfg.read_text(encoding="utf-8")).get("base_dim", base_dim))
    return te or REAL_TEXT_ENCODER["params"], vae or REAL_VAE["params"], base_dim


def text_encoder_embedding_params(model_path: str) -> int:
    """The token embedding table's elements (vocab x hidden, from text_encoder/config.json): the part of the text
    encoder ``text_encoder_1_precision`` leaves in the compute dtype (an ``nn.Embedding``, not a Linear)."""
    from shared.model.location import locate_model

    cfg = Path(locate_model(model_path).source).expanduser() / "text_encoder" / "config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text(encoding="utf-8"))
        text = d.get("text_config") or d
        if "vocab_size" in text and "hidden_size" in text:
            return int(text["vocab_size"]) * int(text["hidden_size"])
    return REAL_TEXT_ENCODER["vocab"] * REAL_TEXT_ENCODER["hidden"]


# -------------------------------------------------------------------------------------------- LoRA
def lora_targets(counts: TransformerCounts, target_modules: list[str]) -> list[LinearInfo]:
    """The Linears peft wraps for ``target_modules`` (a name matches itself or any ``.``-suffix); InvalidInput
    naming the valid choices when a target matches nothing, as the trainer would say later."""
    _check_targets(json.dumps(counts.config, sort_keys=True, default=list), tuple(target_modules))
    return [li for li in counts.linears if any(li.name == t or li.name.endswith("." + t) for t in target_modules)]


@functools.lru_cache(maxsize=64)
def _check_targets(config_json: str, target_modules: tuple[str, ...]) -> None:
    from shared.model.lora import check_target_modules

    check_target_modules(build_meta_transformer(json.loads(config_json)), target_modules)


def lora_params(targets: list[LinearInfo], rank: int) -> int:
    return sum(rank * (li.in_features + li.out_features) for li in targets)
