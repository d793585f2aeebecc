"""The tiny Qwen-Image-2.1 (real classes, real layout) and where its pipeline puts references.

``QwenImage21Pipeline.from_pretrained`` loads what ``save_tiny_qwen21`` writes and edits with it; the sizes
``shared.data.geometry.qwen21_sizes`` gives are the ones the pipeline hands its transformer (read from the
transformer's own ``img_shapes`` argument), for random reference sizes and every count from 1 to 10.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from shared.data.geometry import QWEN21_MAX_REFERENCES, qwen21_sizes
from shared.errors import InvalidInput
from shared.model.loading import processor_without_video
from shared.model.tiny_qwen21 import save_tiny_qwen21


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers import QwenImage21Pipeline

    root = save_tiny_qwen21(tmp_path_factory.mktemp("qi21") / "model")
    assert sorted(p.name for p in root.iterdir()) == [
        "model_index.json",
        "processor",
        "scheduler",
        "text_encoder",
        "transformer",
        "vae",
    ]
    processor_without_video()
    return QwenImage21Pipeline.from_pretrained(root)


def _images(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        pixels = (torch.rand(h, w, 4, generator=g) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(pixels, "RGBA")
        out.append(img if i % 2 else img.convert("RGB"))  # the pipeline takes both; it makes RGBA of each
    return out


def _seen(pipe: Any, images: list[Image.Image], resolution: int) -> tuple[list[tuple[int, int]], Any]:
    """The (width, height) in pixels of every image block the transformer was given, and the output."""
    shapes: list[Any] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shapes.append(kwargs["img_shapes"])

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = pipe(
            "make it red",
            image=images,
            num_inference_steps=1,
            output_resolution=resolution,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    finally:
        handle.remove()
    return [(w * 16, h * 16) for _, h, w in shapes[0][0]], out


def test_the_tiny_model_loads_with_the_real_pipeline_and_edits_with_five_references(pipe: Any) -> None:
    images = _images([(96, 64), (64, 64), (64, 128), (80, 48), (128, 64)], seed=1)
    seen, out = _seen(pipe, images, 64)
    assert len(seen) == 6  # five references, then the target: every reference reached the transformer
    refs, target = qwen21_sizes([im.size for im in images], 64)
    assert seen == [*refs, target] and out.size == target and out.mode == "RGBA"


@pytest.mark.parametrize("count", [1, 2, 3, 7, QWEN21_MAX_REFERENCES])
def test_reference_sizes_are_the_pipelines_for_random_sizes(pipe: Any, count: int) -> None:
    rng = random.Random(count)
    sizes = [(rng.randrange(24, 400), rng.randrange(24, 400)) for _ in range(count)]
    resolution = rng.choice([64, 96])
    seen, out = _seen(pipe, _images(sizes, seed=count), resolution)
    refs, target = qwen21_sizes(sizes, resolution)
    assert seen == [*refs, target], (sizes, resolution)
    assert out.size == target


def test_more_than_ten_references_or_none_are_refused_by_name() -> None:
    with pytest.raises(InvalidInput, match=r"conditioning_data: Qwen-Image-2.1 takes 1 to 10 reference images .* 11"):
        qwen21_sizes([(64, 64)] * 11, where="conditioning_data")
    with pytest.raises(InvalidInput, match="got 0"):
        qwen21_sizes([])
    with pytest.raises(InvalidInput, match=r"references\[1\]: a 4000x10 reference"):
        qwen21_sizes([(64, 64), (4000, 10)], 64)


def test_the_layout_names_the_real_classes(pipe: Any, tmp_path: Path) -> None:
    import json

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert index["transformer"] == ["diffusers", "QwenImage21Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage21"]
    assert index["text_encoder"] == ["transformers", "Qwen3VLForConditionalGeneration"]
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]
