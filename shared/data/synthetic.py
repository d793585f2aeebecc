"""A generated paired dataset for demos and tests: no download, deterministic from a seed.

Each sample is a small scene of coloured shapes (the reference), the same scene with one edit applied (the
target) and the edit instruction as its caption. With several references, reference 2 and 3 are further views
(a colour swatch and a mirrored copy), so that every reference carries information about the target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shared.config.flavours import get_flavour

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
}
EDITS = ("recolor", "invert", "flip", "remove")


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str, tuple[int, ...]]:
    w, h = size
    bg = tuple(int(x) for x in rng.integers(180, 250, 3))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    box = [int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))]
    box += [box[0] + int(rng.integers(w // 4, w // 2)), box[1] + int(rng.integers(h // 4, h // 2))]
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=COLOURS[name])
    return img, name, tuple(box)


def make_pair(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, Image.Image, str]:
    """(reference, target, caption) for one random edit."""
    ref, colour, box = _scene(rng, size)
    edit = EDITS[int(rng.integers(len(EDITS)))]
    if edit == "recolor":
        new = [c for c in COLOURS if c != colour][int(rng.integers(len(COLOURS) - 1))]
        tgt = ref.copy()
        ImageDraw.Draw(tgt).rectangle(box, fill=COLOURS[new])
        caption = f"make the {colour} shape a {new} square"
    elif edit == "invert":
        tgt = Image.fromarray(255 - np.asarray(ref))
        caption = "invert the colors"
    elif edit == "flip":
        tgt = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        caption = "mirror the image horizontally"
    else:
        tgt = Image.new("RGB", ref.size, ref.getpixel((0, 0)))
        caption = f"remove the {colour} shape"
    return ref, tgt, caption


_MORE_REFERENCES = (
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_90,
)


def write_dataset(
    root: str | Path,
    n: int = 8,
    references: int = 1,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64)),
) -> Path:
    """Write ``images/`` (targets + .txt captions) and ``reference_a/``, ``reference_b/`` … under ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    ref_dirs = [root / f"reference_{chr(ord('a') + i)}" for i in range(references)]
    for d in [root / "images", *ref_dirs]:
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = sizes[i % len(sizes)]
        ref, tgt, caption = make_pair(rng, size)
        name = f"{i:04d}"
        tgt.save(root / "images" / f"{name}.png")
        (root / "images" / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        extra = [
            ref,
            Image.new("RGB", size, tgt.resize((1, 1)).getpixel((0, 0))),
            ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            *(ref.transpose(t) for t in _MORE_REFERENCES),  # up to ten, for Qwen-Image-2.1
            ref.convert("L").convert("RGB"),
            tgt.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            tgt.transpose(Image.Transpose.ROTATE_180),
        ]
        for d, img in zip(ref_dirs, extra, strict=False):
            img.save(d / f"{name}.png")
    return root


# The demo's one edit: every shape turns red. Scenes hold one to three large shapes in other colours, so the
# reference (what an identity edit returns) and the target differ enough for the LoRA's gain to be measured.
DEMO_CAPTION = "make the shapes red"


def recolor_scene(
    rng: np.random.Generator, size: tuple[int, int], extent: tuple[float, float] = (0.25, 0.5)
) -> tuple[Image.Image, Image.Image]:
    """(reference, target) of the demo edit: a plain background with 1-3 shapes, then the same shapes in red.
    Each shape's sides are ``extent`` (min, max) of the image's."""
    w, h = size
    bg = tuple(int(x) for x in rng.integers(170, 250, 3))
    ref, tgt = Image.new("RGB", size, bg), Image.new("RGB", size, bg)
    others = [c for c in COLOURS if c != "red"]
    for _ in range(int(rng.integers(1, 4))):
        colour = COLOURS[others[int(rng.integers(len(others)))]]
        sw, sh = (int(rng.integers(int(n * extent[0]), int(n * extent[1]) + 1)) for n in (w, h))
        x0, y0 = int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))
        box = [x0, y0, x0 + sw - 1, y0 + sh - 1]
        ellipse = rng.random() < 0.5
        for img, fill in ((ref, colour), (tgt, COLOURS["red"])):
            (ImageDraw.Draw(img).ellipse if ellipse else ImageDraw.Draw(img).rectangle)(box, fill=fill)
    return ref, tgt


def write_edit_dataset(
    root: str | Path,
    n: int = 24,
    seed: int = 0,
    size: tuple[int, int] = (64, 64),
    extent: tuple[float, float] = (0.25, 0.5),
) -> Path:
    """The demo's dataset: ``images/`` (targets, every caption ``DEMO_CAPTION``) and ``reference_a/``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in (root / "images", root / "reference_a"):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ref, tgt = recolor_scene(rng, size, extent)
        tgt.save(root / "images" / f"{i:04d}.png")
        (root / "images" / f"{i:04d}.txt").write_text(DEMO_CAPTION + "\n", encoding="utf-8")
        ref.save(root / "reference_a" / f"{i:04d}.png")
    return root


def write_configs(
    out: str | Path,
    data_root: str | Path,
    model_dir: str | Path,
    flavour: str,
    references: int,
    resolution: int = 80,
    **train_overrides: object,
) -> tuple[Path, Path]:
    """SimpleTuner-style config.json + multidatabackend.json for a generated dataset and a tiny model."""
    out, data_root = Path(out), Path(data_root)
    out.mkdir(parents=True, exist_ok=True)
    refs = [f"demo-reference-{chr(ord('a') + i)}" for i in range(references)]
    datasets: list[dict[str, object]] = [
        {
            "id": "demo-images",
            "type": "local",
            "instance_data_dir": str(data_root / "images"),
            "caption_strategy": "textfile",
            "resolution": resolution,
            "conditioning_data": refs,
            "cache_dir_vae": "cache/vae/demo-images",
        }
    ]
    caption_cache = get_flavour(flavour).caption_embeds_in_conditioning_cache
    if caption_cache:
        datasets[0]["conditioning_image_embeds"] = "demo-ref-embeds"
    for rid in refs:
        datasets.append(
            {
                "id": rid,
                "type": "local",
                "dataset_type": "conditioning",
                "instance_data_dir": str(data_root / rid.replace("demo-reference-", "reference_")),
                "conditioning_type": "reference_strict",
                "resolution": resolution,
                "cache_dir_vae": f"cache/vae/{rid}",
            }
        )
    if caption_cache:
        datasets.append(
            {
                "id": "demo-ref-embeds",
                "type": "local",
                "dataset_type": "conditioning_image_embeds",
                "cache_dir": "cache/conditioning_image_embeds/demo",
            }
        )
    data_path = out / "multidatabackend.json"
    data_path.write_text(json.dumps(datasets, indent=2) + "\n", encoding="utf-8")
    config = {
        "model_type": "lora",
        "model_family": "qwen_image",
        "model_flavour": flavour,
        "pretrained_model_name_or_path": str(model_dir),
        "train_batch_size": 1,
        "mixed_precision": "no",
        "base_model_precision": "no_change",
        "device": "cpu",
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 2,
        # references at the targets' size (edit-v2/v3) or area (edit-v1): tiny on a CPU, unlike the 1 MP
        # the pipelines give them
        "model_kwargs": {"reference_area": resolution * resolution}
        if get_flavour(flavour).joint_sequence  # Qwen-Image-2.1 sizes references by reference_area alone
        else {
            "match_target_res": True,
            "reference_area": resolution * resolution,
            "vl_reference_area": 64 * 64,
        },
        "data_backend_config": str(data_path),
        **train_overrides,
    }
    config_path = out / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config_path, data_path
