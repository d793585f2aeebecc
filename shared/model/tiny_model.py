"""A tiny random-weight Qwen-Image-Edit of the real classes, saved in the real Hugging Face repo layout.

Tests and the demo cannot download the 20B-parameter weights, so they build this instead (~12 MB, about a second):
the same diffusers/transformers classes with tiny configs, saved by the flavour's own pipeline class, so that the
production loading code (``shared.model.loading.load_pipeline``) is exactly what runs against it. The recipe and the
constraints behind every config value are in ``shared/notes/qwen-edit-offline.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from shared.config.flavours import get_flavour
from shared.model.loading import pipeline_class, processor_without_video, quiet_progress_bars

# The system prompt of both edit templates; the pipelines drop the hidden states of everything up to and including
# "<|im_start|>user\n" (64 tokens with the real Qwen2.5 tokenizer), so the tiny tokenizer must agree.
EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
SYSTEM_PREFIX = f"<|im_start|>system\n{EDIT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
SYSTEM_PREFIX_TOKENS = 64

# Qwen2's special tokens in their real order (their ids follow the BPE vocabulary, as in the real tokenizer).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

TEXT_WIDTH = 32  # the tiny text encoder's hidden size == the transformer's joint_attention_dim
TRAINED_VAE_BASE_DIM = 8  # the trained tiny model's VAE (shared.train.tiny): a quarter of the compute of 16

_tiny_lock = threading.Lock()


def build_tokenizer() -> Any:
    """A byte-level BPE trained in-process with Qwen2's pre-tokenizer, wrapped as a real ``Qwen2Tokenizer``.

    Training is deterministic for a fixed corpus, so the vocabulary (and thus every saved file) is reproducible.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    corpus = [
        EDIT_SYSTEM_PROMPT,
        "system\nuser\nassistant\n",
        "Picture 1: Picture 2: Picture 3: ",
        "make the sky blue, add a red hat, remove the dog, turn it into a watercolor painting 0123456789",
    ] * 50
    bpe = Tokenizer(tok_models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=2000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe_model = json.loads(bpe.to_str())["model"]
    vocab = dict(bpe_model["vocab"])
    vocab.update({tok: len(bpe_model["vocab"]) + i for i, tok in enumerate(SPECIAL_TOKENS)})
    return Qwen2Tokenizer(
        vocab=vocab,
        # the slow-path constructor wants tuples, not lists; transformers annotates list[str] and a str unk_token
        merges=[tuple(m) for m in bpe_model["merges"]],  # type: ignore[misc]
        unk_token=None,  # type: ignore[arg-type]
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=131072,
    )


def system_prefix_length(tokenizer: Any) -> int:
    """How many tokens the edit templates' system prefix takes; the pipelines assume 64."""
    return len(tokenizer(SYSTEM_PREFIX).input_ids)


def _build_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(  # Qwen2.5-VL's preprocessor_config values
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _build_text_encoder(tokenizer: Any, seed: int) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tid = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,  # head_dim 16, so mrope_section must sum to 8
            bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"),
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_WIDTH,
            fullatt_block_indexes=[1],
        ),
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_components(flavour: str, seed: int = 0, vae_base_dim: int = 16) -> dict[str, Any]:
    """The six pipeline components of a tiny edit model of ``flavour``, random weights drawn from ``seed``
    (``vae_base_dim`` 8 for the trained tiny model: a quarter of the VAE's compute).

    Each model is seeded on its own so that changing one config does not shift the others' weights.
    """
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    flav = get_flavour(flavour)
    processor_without_video()
    tokenizer = build_tokenizer()
    n_prefix = system_prefix_length(tokenizer)
    if n_prefix != SYSTEM_PREFIX_TOKENS:
        raise AssertionError(f"tiny tokenizer splits the system prefix into {n_prefix} tokens, pipelines drop 64")
    processor = _build_processor(tokenizer)
    text_encoder = _build_text_encoder(tokenizer, seed)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 4 x z_dim: 2x2-packed latents
        out_channels=16,  # z_dim
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),  # must sum to attention_head_dim, each even
        zero_cond_t=flav.zero_cond_t,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(  # the default latents_mean/std are the real model's
        base_dim=vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image* scheduler_config.json
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        scheduler=scheduler,
    )


def tiny_weights_dir() -> Path:
    """The trained tiny model's VAE and transformer weights, shipped with the package (``shared.train.tiny``)."""
    return Path(__file__).resolve().parent / "tiny_weights"


def load_trained_weights(components: dict[str, Any], weights: Path | None = None) -> dict[str, Any]:
    """Put the trained VAE and transformer weights (and the VAE's latent statistics) into tiny components."""
    from safetensors.torch import load_file

    weights = weights or tiny_weights_dir()
    doc = json.loads((weights / "recipe.json").read_text(encoding="utf-8"))
    for name in ("vae", "transformer"):
        state = {k: v.float() for k, v in load_file(str(weights / f"{name}.safetensors")).items()}
        components[name].load_state_dict(state, strict=True)
    components["vae"].register_to_config(**doc["vae_config"])
    return components


def save_tiny_model(out_dir: str | Path, flavour: str, seed: int = 0, trained: bool = False) -> Path:
    """Build a tiny model and save it with the flavour's real pipeline class (``save_pretrained``: the hub layout).

    ``trained``: with the shipped trained VAE and transformer (edit-v1 and edit-v2 share them; edit-v3's
    zero_cond_t modulation was not trained), the text side as in the random model.
    """
    out = Path(out_dir)
    quiet_progress_bars()
    if get_flavour(flavour).joint_sequence:
        if trained:
            raise ValueError(f"the trained tiny model exists for edit-v1 and edit-v2, not {flavour}")
        from shared.model.tiny_qwen21 import save_tiny_qwen21  # it builds on this module's tokenizer

        return save_tiny_qwen21(out, seed)
    if trained and get_flavour(flavour).zero_cond_t:
        raise ValueError(f"the trained tiny model exists for edit-v1 and edit-v2, not {flavour}")
    comps = build_tiny_components(flavour, seed, vae_base_dim=TRAINED_VAE_BASE_DIM if trained else 16)
    if trained:
        load_trained_weights(comps)
    pipe = pipeline_class(flavour)(**comps)
    pipe.save_pretrained(out)
    return out


def get_tiny_model(flavour: str, root: str | Path, seed: int = 0) -> Path:
    """The directory of the tiny ``flavour`` model under ``root``, built on first use and reused afterwards.

    Meant for session-scoped test fixtures: several test files (or test processes) share one root without
    rebuilding. The model is saved beside its final name and renamed into place, so a reader never sees half a
    model; a process that loses the rename race keeps the winner's (identical) copy.
    """
    out = Path(root) / f"tiny-{get_flavour(flavour).name}-seed{seed}"
    with _tiny_lock:
        if (out / "model_index.json").is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            save_tiny_model(staging, flavour, seed)
            os.rename(staging, out)
        except OSError:
            if not (out / "model_index.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out
