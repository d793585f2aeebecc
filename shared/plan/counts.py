"""Exact parameter counts: the transformer built on the meta device from its config.json (for a hub id the bundled
real Qwen-Image-Edit config, or QwenImage21Transformer2DModel's defaults, which are the released Qwen-Image-2.1) and
walked Linear by Linear; the text encoder and VAE from safetensors headers, or the real models' counts.
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
from shared.model.single_file import transformer_class_named

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

# Qwen-Image-2.1 (flavour v2.1). Its transformer is QwenImage21Transformer2DModel with the class's defaults (diffusers
# 0.42.1 documents them as the released model's; counted on meta: 7,115,124,736). Its text encoder is Qwen3-VL-8B
# (Qwen3VLForConditionalGeneration). transformers' Qwen3VLConfig defaults are not that model (intermediate 22016,
# 32 layers, 32 KV heads, vision out_hidden_size 3584); Qwen/Qwen3-VL-8B-Instruct's config.json changes these
# fields of them, the rest (vision depth 27, width 1152, MLP 4304, 16 heads, 16-px patches merged 2x2, deepstack
# layers 8/16/24; text head_dim 128, vocab 151936) being the defaults of transformers 5.24's configuration_qwen3_vl:
QWEN3_VL_8B_CONFIG: dict[str, Any] = {
    "text_config": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
    },
    "vision_config": {"out_hidden_size": 4096},  # the merger projects into the 4096-wide text model
    "tie_word_embeddings": False,  # its lm_head is its own matrix
}
# QWEN3_VL_8B_CONFIG counted on meta (tests/plan/test_plan_qwen21.py): 8,767,123,696 parameters (the published
# "8.77B"), 576,388,336 of them the vision tower; lm_head and the token embedding 622,329,856 each.
REAL_QWEN21_TEXT_ENCODER = {
    "params": 8_767_123_696,
    "hidden": 4096,
    "layers": 36,
    "kv_width": 8 * 128,  # num_key_value_heads x head_dim: what a KV cache holds per token, K and V each
    "intermediate": 12288,
    "vocab": 151936,
    "vision_params": 576_388_336,
    "vision_hidden": 1152,
    "vision_intermediate": 4304,
    "deepstack": 3,  # deepstack_visual_indexes (8, 16, 24): three more merged feature maps beside the image slots
}
# AutoencoderKLQwenImage21 with its default (= released, RGBA, z_dim 64, 16x) config, counted on meta: 337,740,404
# parameters (encoder 78,675,680 at base_dim 96, decoder 259,044,052 at decoder_base_dim 144).
REAL_QWEN21_VAE = {"params": 337_740_404, "base_dim": 96, "decoder_base_dim": 144}


# ------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class LinearInfo:
    name: str
    in_features: int
    out_features: int
    bias: bool
    # "image" (per image token), "text" (per text token), "sample" (per sample: modulation, time) or "joint" (every
    # token of Qwen-Image-2.1's single sequence)
    stream: str
    kept: bool  # in KEEP_HIGH_PRECISION: never quantized


@dataclass(frozen=True)
class TransformerCounts:
    """Exact parameter counts of a transformer config (QwenImageTransformer2DModel or, ``joint``, the single-stream
    QwenImage21Transformer2DModel), Linear by Linear. ``config``: as read (2.1's on top of its class's defaults)."""

    config: dict[str, Any]
    linears: tuple[LinearInfo, ...]
    other_params: int  # parameters outside Linears (RMSNorm weights)
    class_name: str = "QwenImageTransformer2DModel"

    @property
    def joint(self) -> bool:
        """One joint sequence (Qwen-Image-2.1): every block Linear runs on every token."""
        return self.class_name == QWEN21_CLASS

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


QWEN21_CLASS = "QwenImage21Transformer2DModel"


def _stream(name: str, joint: bool = False) -> str:
    """Which tokens a Linear runs on: "image", "text", "sample" (once per sample: modulation, time) or, in the
    single-stream model, "joint" (every token of the sequence: the blocks and proj_out)."""
    if joint:
        if name.startswith(("modulation", "time_text_embed", "norm_out")):
            return "sample"
        if name.startswith("txt_in"):  # the VLM's rows: text and the references' image slots
            return "text"
        return "image" if name.startswith("img_in") else "joint"
    if "_mod." in name or name.startswith(("time_text_embed", "norm_out")):
        return "sample"
    if "txt_" in name or "add_" in name:  # txt_in, txt_mlp, add_q/k/v_proj, to_add_out
        return "text"
    return "image"


def class_defaults(class_name: str) -> dict[str, Any]:
    """The constructor's default arguments of a transformer class (QwenImage21Transformer2DModel's are the released
    model's config)."""
    params = inspect.signature(transformer_class_named(class_name).__init__).parameters
    return {
        k: list(p.default) if isinstance(p.default, tuple) else p.default
        for k, p in params.items()
        if k != "self" and p.default is not inspect.Parameter.empty
    }


def transformer_class_name(flavour: str | None) -> str:
    from shared.config.flavours import get_flavour

    return get_flavour(flavour).transformer_class_name if flavour else "QwenImageTransformer2DModel"


def transformer_config(model_path: str, flavour: str | None = None) -> dict[str, Any]:
    """The transformer's config.json of the model (found as the loader finds it, EDITTUNER_MODEL_DIR included),
    or for a hub id with no local copy the bundled real one (``flavour`` v2.1: its class's defaults)."""
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
    if transformer_class_name(flavour) == QWEN21_CLASS:
        return {"_class_name": QWEN21_CLASS}
    return dict(REAL_TRANSFORMER_CONFIG)


@functools.lru_cache(maxsize=16)
def _counts(config_json: str, class_name: str) -> TransformerCounts:
    joint = class_name == QWEN21_CLASS
    config = json.loads(config_json)
    if joint:  # the class's defaults are the released model's: a config names only what differs
        config = class_defaults(class_name) | config
    model = build_meta_transformer(config, class_name)
    linears: list[LinearInfo] = []
    in_linear: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            stream = _stream(name, joint)
            linears.append(
                LinearInfo(name, m.in_features, m.out_features, m.bias is not None, stream, keeps_high_precision(name))
            )
            in_linear.update(id(p) for p in m.parameters(recurse=False))
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_linear)
    return TransformerCounts(config, tuple(linears), other, class_name)


def _known(config: dict[str, Any], class_name: str) -> dict[str, Any]:
    keys = set(inspect.signature(transformer_class_named(class_name).__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in keys}


def build_meta_transformer(config: dict[str, Any], class_name: str = "QwenImageTransformer2DModel") -> Any:
    """The transformer class ``class_name`` from ``config`` on the meta device: shapes without memory."""
    with torch.device("meta"):
        return transformer_class_named(class_name)(**_known(config, class_name))


def counts_for_config(config: dict[str, Any], class_name: str | None = None) -> TransformerCounts:
    """Counts of ``config``; the class is ``class_name``, else the config's ``_class_name`` (diffusers writes it into
    config.json), else QwenImageTransformer2DModel."""
    name = class_name or str(config.get("_class_name") or "QwenImageTransformer2DModel")
    return _counts(json.dumps(dict(config), sort_keys=True, default=list), name)


def transformer_counts(model_path: str, flavour: str | None = None) -> TransformerCounts:
    """Counts of the model's transformer; ``flavour`` names the class when the config does not."""
    config = transformer_config(model_path, flavour)
    return counts_for_config(config, config.get("_class_name") or transformer_class_name(flavour))


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


def _joint(flavour: str | None) -> bool:
    return transformer_class_name(flavour) == QWEN21_CLASS


def component_params(model_path: str, flavour: str | None = None) -> tuple[int, int, int]:
    """(text encoder params, VAE params, VAE base_dim): counted from a local copy's files, else the real ones of
    ``flavour``'s model (Qwen-Image-Edit's by default)."""
    from shared.model.location import locate_model

    te_real, vae_real = (
        (REAL_QWEN21_TEXT_ENCODER, REAL_QWEN21_VAE) if _joint(flavour) else (REAL_TEXT_ENCODER, REAL_VAE)
    )
    root = Path(locate_model(model_path).source).expanduser()
    te = _safetensors_params(root / "text_encoder") if root.is_dir() else None
    vae = _safetensors_params(root / "vae") if root.is_dir() else None
    base_dim = vae_config(model_path).get("base_dim", vae_real["base_dim"])
    return te or te_real["params"], vae or vae_real["params"], int(base_dim)


def vae_config(model_path: str) -> dict[str, Any]:
    """vae/config.json of a local copy ({} without one)."""
    from shared.model.location import locate_model

    cfg = Path(locate_model(model_path).source).expanduser() / "vae" / "config.json"
    if not cfg.is_file():
        return {}
    config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
    return config


def text_encoder_embedding_params(model_path: str, flavour: str | None = None) -> int:
    """The token embedding table's elements (vocab x hidden, from text_encoder/config.json): the part of the text
    encoder ``text_encoder_1_precision`` leaves in the compute dtype (an ``nn.Embedding``, not a Linear)."""
    from shared.model.location import locate_model

    cfg = Path(locate_model(model_path).source).expanduser() / "text_encoder" / "config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text(encoding="utf-8"))
        text = d.get("text_config") or d
        if "vocab_size" in text and "hidden_size" in text:
            return int(text["vocab_size"]) * int(text["hidden_size"])
    te = REAL_QWEN21_TEXT_ENCODER if _joint(flavour) else REAL_TEXT_ENCODER
    return te["vocab"] * te["hidden"]


# -------------------------------------------------------------------------------------------- LoRA
def lora_targets(counts: TransformerCounts, target_modules: list[str]) -> list[LinearInfo]:
    """The Linears peft wraps for ``target_modules`` (a name matches itself or any ``.``-suffix); InvalidInput
    naming the valid choices when a target matches nothing, as the trainer would say later."""
    _check_targets(json.dumps(counts.config, sort_keys=True, default=list), counts.class_name, tuple(target_modules))
    return [li for li in counts.linears if any(li.name == t or li.name.endswith("." + t) for t in target_modules)]


@functools.lru_cache(maxsize=64)
def _check_targets(config_json: str, class_name: str, target_modules: tuple[str, ...]) -> None:
    from shared.model.lora import check_target_modules

    check_target_modules(build_meta_transformer(json.loads(config_json), class_name), target_modules)


def lora_params(targets: list[LinearInfo], rank: int) -> int:
    return sum(rank * (li.in_features + li.out_features) for li in targets)
