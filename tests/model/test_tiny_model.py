"""The tiny offline model: saved in the real hub layout, loadable by plain diffusers, runnable, reproducible.

Also the loader's contract (``shared.model.loading``) and the flavour registry,
since the tiny model is what exercises them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared import errors
from shared.config.flavours import FLAVOURS, get_flavour
from shared.model.device import resolve_dtype
from shared.model.loading import load_encoder_pipeline, load_pipeline, pipeline_class, processor_without_video
from shared.model.tiny_model import (
    SYSTEM_PREFIX_TOKENS,
    build_tokenizer,
    get_tiny_model,
    save_tiny_model,
    system_prefix_length,
)

pytestmark = pytest.mark.slow  # builds and runs every flavour's pipeline

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
EXPECTED_CLASS = {
    "edit-v1": "QwenImageEditPipeline",
    "edit-v2": "QwenImageEditPlusPipeline",
    "edit-v3": "QwenImageEditPlusPipeline",
    "v2.1": "QwenImage21Pipeline",
}
EDIT_FLAVOURS = sorted(n for n, f in FLAVOURS.items() if not f.joint_sequence)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root for the whole session, shared with the other test files that build tiny models."""
    return tmp_path_factory.getbasetemp() / "tiny-models"


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_saved_in_the_hub_layout(tiny_root: Path, flavour: str) -> None:
    model_dir = get_tiny_model(flavour, tiny_root)
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == EXPECTED_CLASS[flavour]
    wanted = SUBFOLDERS if flavour != "v2.1" else tuple(s for s in SUBFOLDERS if s != "tokenizer")
    assert get_flavour(flavour).components == wanted
    for sub in wanted:
        assert (model_dir / sub).is_dir(), sub
        assert sub in index, sub
    assert (model_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (model_dir / "text_encoder" / "model.safetensors").is_file()
    size_mb = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 20  # tiny means tiny: ~12 MB


@pytest.mark.parametrize(
    ("flavour", "n_refs"),
    [("edit-v1", 1), ("edit-v2", 2), ("edit-v3", 1)],
)
def test_plain_diffusers_loads_and_edits(tiny_root: Path, flavour: str, n_refs: int) -> None:
    """No EditTuner code between from_pretrained and the image, beyond dropping the video
    processor the edit pipelines never use."""
    model_dir = get_tiny_model(flavour, tiny_root)
    processor_without_video()
    pipe = pipeline_class(flavour).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == EXPECTED_CLASS[flavour]
    refs = [_noise_image(48 + 16 * i, 32, seed=i) for i in range(n_refs)]
    out = pipe(
        image=refs if n_refs > 1 else refs[0],
        prompt="make the sky blue",
        height=64,
        width=64,
        num_inference_steps=2,  # 1 step gives NaN sigmas with the real Qwen scheduler config
        true_cfg_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("flavour", EDIT_FLAVOURS)
def test_zero_cond_t_follows_the_flavour(tiny_root: Path, flavour: str) -> None:
    pipe = load_pipeline(get_tiny_model(flavour, tiny_root), flavour)
    assert pipe.transformer.config.zero_cond_t is (flavour == "edit-v3")
    assert pipe.transformer.zero_cond_t is get_flavour(flavour).zero_cond_t


def test_qwen21_keeps_its_own_conditioning(tiny_root: Path) -> None:
    """Qwen-Image-2.1 modulates text and references at t=0 by its config's causal_condition; loading leaves it so."""
    pipe = load_pipeline(get_tiny_model("v2.1", tiny_root), "v2.1")
    assert type(pipe.transformer).__name__ == "QwenImage21Transformer2DModel"
    assert pipe.transformer.config.causal_condition is True and "zero_cond_t" not in pipe.transformer.config


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = save_tiny_model(tmp_path / "a", "edit-v2", seed=3)
    b = save_tiny_model(tmp_path / "b", "edit-v2", seed=3)
    c = save_tiny_model(tmp_path / "c", "edit-v2", seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    weights = Path("transformer/diffusion_pytorch_model.safetensors")
    assert (a / weights).read_bytes() != (c / weights).read_bytes()


def test_tokenizer_system_prefix_is_64_tokens() -> None:
    """The pipelines drop the first 64 hidden states; real Qwen2.5 tokenizes the system prefix to exactly 64."""
    assert SYSTEM_PREFIX_TOKENS == 64
    assert system_prefix_length(build_tokenizer()) == 64


def test_get_tiny_model_builds_once(tiny_root: Path) -> None:
    first = get_tiny_model("edit-v1", tiny_root)
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert get_tiny_model("edit-v1", tiny_root) == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert not [p for p in tiny_root.iterdir() if p.name.startswith(".")]  # no staging directories left over


def test_encoder_pipeline_skips_the_transformer(tiny_root: Path) -> None:
    pipe = load_encoder_pipeline(get_tiny_model("edit-v2", tiny_root), "edit-v2")
    assert pipe.transformer is None
    assert pipe.vae is not None and pipe.text_encoder is not None and pipe.processor is not None


def test_load_pipeline_casts_dtype(tiny_root: Path) -> None:
    pipe = load_pipeline(get_tiny_model("edit-v1", tiny_root), "edit-v1", dtype=torch.bfloat16, components=("vae",))
    assert pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder is None


def test_missing_model_directory_is_invalid_input(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(errors.InvalidInput) as err:
        load_pipeline(missing, "edit-v1")
    assert str(missing) in str(err.value)
    assert "model_index.json" in str(err.value)


def test_directory_without_model_index_is_invalid_input(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    with pytest.raises(errors.InvalidInput, match="has no model_index.json"):
        load_pipeline(tmp_path, "edit-v2")


def test_directory_without_a_component_is_invalid_input(tiny_root: Path, tmp_path: Path) -> None:
    index = json.loads((get_tiny_model("edit-v2", tiny_root) / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(errors.InvalidInput, match=r"lacks transformer/, vae/"):
        load_pipeline(tmp_path, "edit-v2")


def test_weights_of_another_flavour_are_invalid_input(tiny_root: Path) -> None:
    with pytest.raises(errors.InvalidInput, match="QwenImageEditPipeline.*edit-v2"):
        load_pipeline(get_tiny_model("edit-v1", tiny_root), "edit-v2")


def test_patch_processor_is_idempotent() -> None:
    from transformers import Qwen2VLProcessor

    processor_without_video()
    once = Qwen2VLProcessor.get_attributes()
    processor_without_video()
    assert Qwen2VLProcessor.get_attributes() == once
    assert "image_processor" in once and "tokenizer" in once


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        (None, "cpu", torch.float32),
        ("auto", "cpu", torch.float32),
        ("bf16", "cpu", torch.bfloat16),  # asked for explicitly
        ("fp16", "cuda", torch.float16),
        ("fp32", "cuda", torch.float32),
        ("no", "cuda", torch.float32),
    ],
)
def test_resolve_dtype(name: str | None, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name, device) == expected


def test_resolve_dtype_rejects_unknown_names() -> None:
    with pytest.raises(errors.InvalidInput, match="fp8"):
        resolve_dtype("fp8", "cpu")


def test_flavour_registry() -> None:
    v1, v2, v3 = (get_flavour(n) for n in ("edit-v1", "edit-v2", "edit-v3"))
    assert (v1.default_model_id, v2.default_model_id, v3.default_model_id) == (
        "Qwen/Qwen-Image-Edit",
        "Qwen/Qwen-Image-Edit-2509",
        "Qwen/Qwen-Image-Edit-2511",
    )
    assert [(f.min_refs, f.max_refs) for f in (v1, v2, v3)] == [(1, 1), (1, 3), (1, 3)]
    assert [f.zero_cond_t for f in (v1, v2, v3)] == [False, False, True]
    assert [f.vl_ref_area for f in (v1, v2, v3)] == [1024 * 1024, 384 * 384, 384 * 384]
    assert {f.vae_ref_area for f in (v1, v2, v3)} == {1024 * 1024}


def test_flavour_constants_match_diffusers() -> None:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    assert get_flavour("edit-v2").vl_ref_area == plus.CONDITION_IMAGE_SIZE
    assert get_flavour("edit-v2").vae_ref_area == plus.VAE_IMAGE_SIZE


def test_unknown_flavour_lists_the_valid_ones() -> None:
    with pytest.raises(errors.InvalidInput, match="edit-v1, edit-v2, edit-v3"):
        get_flavour("edit-v9")


SIMULATED_TORCHVISION_HOST = """
import importlib, importlib.machinery, sys, types
import diffusers  # the libraries import first, as they would anyway
pu = importlib.import_module("transformers.processing_utils")
transformers = pu.transformers_module  # the module processing_utils resolves class names in
iu = importlib.import_module("transformers.utils.import_utils")
tu = importlib.import_module("transformers.utils")
ipa = importlib.import_module("transformers.models.auto.image_processing_auto")
vpa = importlib.import_module("transformers.models.auto.video_processing_auto")
vpu = importlib.import_module("transformers.video_processing_utils")
tv = types.ModuleType("torchvision")  # 1. `import torchvision` succeeds
tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
sys.modules["torchvision"] = tv
for m in (iu, tu, ipa, vpa):  # 2. transformers' call-time check (imported by name into each module) says yes
    m.is_torchvision_available = lambda: True
for name, value in (("VideoProcessorMixin", vpu.VideoProcessorMixin), ("BaseVideoProcessor", vpu.BaseVideoProcessor),
                    ("AutoVideoProcessor", vpa.AutoVideoProcessor),
                    ("VIDEO_PROCESSOR_MAPPING", vpa.VIDEO_PROCESSOR_MAPPING)):
    setattr(transformers, name, value)  # 3. what transformers exports only when torchvision imported with it
vpa.VIDEO_PROCESSOR_MAPPING_NAMES["qwen2_5_vl"]["torchvision"] = "Qwen2VLVideoProcessor"  # 4. the auto mapping's entry
from shared.model.loading import load_pipeline
from shared.model.tiny_model import save_tiny_model
for flavour in ("edit-v1", "edit-v2"):
    path = save_tiny_model(sys.argv[1] + "/" + flavour, flavour)
    pipe = load_pipeline(path, flavour)
    print(flavour, type(pipe.processor).__name__, hasattr(pipe.processor, "video_processor"))
"""


def test_tiny_model_writes_and_loads_where_torchvision_imports(tmp_path: Path) -> None:
    """GPU hosts with a CUDA torch usually have torchvision, which makes transformers want a video processor the
    tiny model never has: writing and loading must not depend on it. Simulated here as transformers sees such a host
    (torchvision importable, reported available, its video-processor classes and auto-mapping entry present); the
    code before the fix fails this exactly as a real host does: "Received a NoneType for argument video_processor"
    when writing, "Can't load video processor" when loading."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", SIMULATED_TORCHVISION_HOST, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["edit-v1 Qwen2VLProcessor False", "edit-v2 Qwen2VLProcessor False"]
