"""A tiny random-weight Qwen-Image-2.1 of the real classes, saved in the real layout.

``QwenImage21Pipeline.save_pretrained`` writes it, so ``QwenImage21Pipeline.from_pretrained(DIR)`` loads it as it
loads the released model: ``transformer/`` (``QwenImage21Transformer2DModel``), ``vae/``
(``AutoencoderKLQwenImage21``, RGBA), ``text_encoder/`` (``Qwen3VLForConditionalGeneration``), ``processor/``
(``Qwen3VLProcessor`` with its chat template: the pipeline counts the system prompt's tokens with it) and
``scheduler/``. The sizes keep what the model's geometry rests on: the vision encoder's 16-pixel patches merged
2x2 (one image slot per 32 pixels, which is 2x2 latent tokens of the 16x VAE), the transformer unpatchified
(``patch_size=1``); everything else is as small as runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shared.model.loading import processor_without_video, quiet_progress_bars
from shared.model.tiny_model import build_tokenizer

TEXT_WIDTH = 16  # the tiny Qwen3-VL's hidden size == the transformer's context_in_dim
LATENT_CHANNELS = 8  # the tiny VAE's z_dim (the released model's is 64)
# Qwen3-VL's chat template, reduced to what the pipeline renders: roles, text and image placeholders.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'text' -%}{{- c['text'] -}}"
    "{%- elif c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tiny_qwen21(seed: int = 0) -> dict[str, Any]:
    """The five components ``QwenImage21Pipeline`` takes, tiny and seeded."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor_without_video()
    tokenizer = build_tokenizer()  # Qwen3-VL uses the same special tokens as Qwen2.5-VL
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=32 * 32,  # never upscale a tiny reference: its slots must match its latent tokens
        max_pixels=1024 * 1024,
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    tid = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    text_encoder = Qwen3VLForConditionalGeneration(
        Qwen3VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_WIDTH,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [1, 1, 2]},
                bos_token_id=tid("<|endoftext|>"),
                eos_token_id=tid("<|im_end|>"),
            ),
            vision_config=dict(
                depth=2,
                hidden_size=16,
                intermediate_size=16,
                num_heads=2,
                out_hidden_size=TEXT_WIDTH,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            ),
            image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"),
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=TEXT_WIDTH,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage21(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "processor": processor,
        "transformer": transformer,
    }


def save_tiny_qwen21(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and save it with ``QwenImage21Pipeline.save_pretrained`` (the hub layout)."""
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline  # not the dummy class

    out = Path(out_dir)
    quiet_progress_bars()
    QwenImage21Pipeline(**build_tiny_qwen21(seed)).save_pretrained(out)
    return out
