"""LoRA attach / checkpoint state / export, checked against diffusers itself.

The exported files are loaded by the real pipelines (``load_lora_weights``): the diffusers file changes the output
and, at adapter weight 0, gives back the base output exactly; the ComfyUI file, which diffusers reads through its
Qwen converter (``diffusion_model.`` keys, alpha / rank folded into the weights), gives exactly the diffusers file's
output. alpha (8) differs from rank (4), so a file whose alpha is lost or applied twice would change the output; the
ratio is a power of two, which is what makes "exactly" hold for two different factorizations of the same update.
A pipeline call costs ~3.5 s on one CPU thread, ~3 s of it the VAE encoding the reference the pipelines resize to
1 MP: four calls per flavour, the last three replaying the first one's (deterministic) encoding, 0.3-0.6 s each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as safetensors_load

from shared import errors
from shared.model import lora as L
from shared.model.loading import load_pipeline, load_transformer, pipeline_class

RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "img_mlp.net.2", "txt_mod.1"]
BLOCK_LINEARS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
]


def transformer_with_lora(model_dir: Path, flavour: str, seed: int = 0) -> Any:
    """The flavour's tiny transformer with a LoRA whose B is non-zero (seeded), so it changes the output."""
    tr = load_transformer(model_dir, flavour)
    L.attach_lora(tr, RANK, ALPHA, 0.0, TARGETS, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return tr


@pytest.fixture(scope="module")
def v1(tiny_models: Any) -> tuple[Path, Any, dict[str, torch.Tensor]]:
    d = tiny_models("edit-v1")
    tr = transformer_with_lora(d, "edit-v1")
    return d, tr, L.lora_state_dict(tr)


# ------------------------------------------------------------------------------------------------- attach
def test_attach_lora_freezes_the_base_and_trains_only_the_adapters(v1: Any) -> None:
    _, tr, sd = v1
    trainable = {n for n, p in tr.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    assert len(sd) == 2 * len(TARGETS) * len(tr.transformer_blocks)
    assert sd["transformer_blocks.1.txt_mod.1.lora_A.weight"].shape == (RANK, 64)
    assert sd["transformer_blocks.1.txt_mod.1.lora_B.weight"].shape == (384, RANK)
    assert tr.transformer_blocks[0].attn.to_q.scaling["default"] == ALPHA / RANK


def test_attach_lora_is_seeded_and_leaves_the_global_rng_alone(tiny_models: Any) -> None:
    d = tiny_models("edit-v1")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = (load_transformer(d, "edit-v1") for _ in range(3))
    for tr, seed in ((a, 7), (b, 7), (c, 8)):
        L.attach_lora(tr, RANK, ALPHA, 0.0, ["to_q"], seed=seed)
    assert torch.equal(torch.rand(3), expected_next)
    sa, sb, sc = (L.lora_state_dict(t) for t in (a, b, c))
    key = "transformer_blocks.0.attn.to_q.lora_A.weight"
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])
    assert not sa["transformer_blocks.0.attn.to_q.lora_B.weight"].any()  # B starts at zero: a no-op adapter


def test_unknown_target_module_lists_the_valid_names(tiny_models: Any) -> None:
    tr = load_transformer(tiny_models("edit-v1"), "edit-v1")
    with pytest.raises(errors.InvalidInput, match="'to_qq', 'img_norm1' name no Linear layer") as err:
        L.attach_lora(tr, RANK, ALPHA, 0.0, ["to_q", "to_qq", "img_norm1"], seed=0)
    assert set(L.target_choices(tr)[:14]) == set(BLOCK_LINEARS)
    for name in BLOCK_LINEARS + ["proj_out"]:
        assert name in str(err.value)
    assert not any("lora_" in n for n, _ in tr.named_parameters())  # checked before anything was added
    with pytest.raises(errors.InvalidInput, match="non-empty list"):
        L.attach_lora(tr, RANK, ALPHA, 0.0, [], seed=0)


# ------------------------------------------------------------------------------------------ checkpoint state
def test_lora_state_restores_exactly(v1: Any, tiny_models: Any) -> None:
    _, _, sd = v1
    fresh = load_transformer(tiny_models("edit-v1"), "edit-v1")
    L.attach_lora(fresh, RANK, ALPHA, 0.0, TARGETS, seed=99)
    L.load_lora_state_dict(fresh, sd)
    restored = L.lora_state_dict(fresh)
    assert restored.keys() == sd.keys() and all(torch.equal(restored[k], sd[k]) for k in sd)

    key = "transformer_blocks.0.attn.to_q.lora_A.weight"
    with pytest.raises(errors.InvalidInput, match=f"missing: {key}"):
        L.load_lora_state_dict(fresh, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(errors.InvalidInput, match="unexpected: transformer_blocks.0.attn.to_k_typo.lora_A.weight"):
        L.load_lora_state_dict(fresh, {**sd, "transformer_blocks.0.attn.to_k_typo.lora_A.weight": sd[key]})
    with pytest.raises(errors.InvalidInput, match=r"shape mismatch: .*\(8, 64\) vs \(4, 64\)"):
        L.load_lora_state_dict(fresh, {**sd, key: torch.zeros(8, 64)})


# --------------------------------------------------------------------------------------------------- export
def test_diffusers_file_is_what_save_lora_weights_writes(v1: Any, tmp_path: Path) -> None:
    from diffusers import QwenImageEditPipeline

    _, tr, sd = v1
    QwenImageEditPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=sd, transformer_lora_adapter_metadata=L.peft_adapter_config(sd, ALPHA, RANK)
    )
    theirs, theirs_meta = _read((tmp_path / L.DIFFUSERS_FILE).read_bytes())
    files = L.save_lora_files(sd, alpha=ALPHA, rank=RANK, fmt="diffusers", transformer=tr)
    ours, ours_meta = _read(files[L.DIFFUSERS_FILE])
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert min(ours).startswith("transformer.transformer_blocks.0.")
    # the adapter config as diffusers writes it (JSON, prefixed keys); load_lora_weights rebuilds the LoraConfig from it
    assert ours_meta["lora_adapter_metadata"] == theirs_meta["lora_adapter_metadata"]
    config = json.loads(theirs_meta["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == ALPHA and config["transformer.r"] == RANK


def test_file_metadata_dtype_and_layout(v1: Any) -> None:
    _, tr, sd = v1
    files = L.save_lora_files(
        sd,
        alpha=ALPHA,
        rank=RANK,
        fmt="both",
        transformer=tr,
        metadata={"edittuner.step": "12", "edittuner.flavour": "edit-v1", "n": 3},
    )
    assert sorted(files) == [L.DIFFUSERS_FILE, L.COMFYUI_FILE]
    for data in files.values():
        tensors, meta = _read(data)
        assert meta["edittuner.lora_rank"] == "4" and meta["edittuner.lora_alpha"] == "8.0"
        assert meta["edittuner.step"] == "12" and meta["n"] == "3"
        assert json.loads(meta["edittuner.target_modules"]) == L.lora_modules(sd)
        assert all(t.dtype == torch.float32 for t in tensors.values())
    comfy, comfy_meta = _read(files[L.COMFYUI_FILE])
    assert "lora_adapter_metadata" not in comfy_meta  # diffusers would apply alpha a second time
    assert comfy["diffusion_model.transformer_blocks.0.attn.to_out.0.alpha"].item() == ALPHA
    assert torch.equal(
        comfy["diffusion_model.transformer_blocks.0.attn.to_out.0.lora_B.weight"],
        sd["transformer_blocks.0.attn.to_out.0.lora_B.weight"],
    )
    half = L.save_lora_files(sd, alpha=ALPHA, rank=RANK, fmt="comfyui", transformer=tr, dtype=torch.bfloat16)
    tensors, _ = _read(half[L.COMFYUI_FILE])
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    with pytest.raises(errors.InvalidInput, match="lora_format 'kohya' is unknown"):
        L.save_lora_files(sd, alpha=ALPHA, rank=RANK, fmt="kohya", transformer=tr)


def _read(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    return safetensors_load(data), meta


def test_check_comfyui_keys(v1: Any) -> None:
    _, tr, sd = v1
    comfy = L.comfyui_lora_state(sd, ALPHA, RANK)
    assert L.check_comfyui_keys(comfy, tr) == []
    assert len(comfy) == 3 * len(TARGETS) * len(tr.transformer_blocks)
    a = comfy["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"]

    bad = {**comfy, "diffusion_model.transformer_blocks.0.attn.to_qq.lora_A.weight": a}
    assert L.check_comfyui_keys(bad, tr) == [
        "diffusion_model.transformer_blocks.0.attn.to_qq.lora_A.weight: the transformer has no module "
        "'transformer_blocks.0.attn.to_qq'"
    ]
    no_alpha = {k: v for k, v in comfy.items() if k != "diffusion_model.transformer_blocks.1.txt_mod.1.alpha"}
    assert L.check_comfyui_keys(no_alpha, tr) == ["diffusion_model.transformer_blocks.1.txt_mod.1: no alpha"]
    others = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,  # diffusers prefix in a ComfyUI file
        "diffusion_model.transformer_blocks.0.img_norm1.lora_A.weight": a,  # a LayerNorm
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": a,  # a suffix we do not write
        "diffusion_model.proj_out.lora_A.weight": torch.zeros(RANK, 65),
    }  # wrong width
    problems = L.check_comfyui_keys({**comfy, **others}, tr)
    assert [p.split(":")[0] for p in problems] == list(others)
    assert "is a LayerNorm, not a Linear layer" in problems[1] and "65 inputs, proj_out has 64" in problems[3]

    # the exporter refuses a state that would load partially, whatever the format
    with pytest.raises(errors.InvalidInput, match="would load partially: .*no module 'transformer_blocks.0.attn.nope'"):
        L.save_lora_files(
            {
                **sd,
                "transformer_blocks.0.attn.nope.lora_A.weight": a,
                "transformer_blocks.0.attn.nope.lora_B.weight": torch.zeros(64, RANK),
            },
            alpha=ALPHA,
            rank=RANK,
            fmt="diffusers",
            transformer=tr,
        )
    with pytest.raises(errors.InvalidInput, match="has only one of lora_A / lora_B"):
        L.save_lora_files(
            {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.0.attn.to_q.lora_B")},
            alpha=ALPHA,
            rank=RANK,
            fmt="comfyui",
            transformer=tr,
        )


# ------------------------------------------------------------------------------------------------ pipelines
def reuse_reference_encoding(pipe: Any) -> None:
    """Encode each distinct VAE input once per pipeline. Both pipelines resize the reference to 1 MP and encode it
    on every call (~3 s of a ~4 s call on a CPU); the encode is deterministic (``argmax``) and LoRA never touches
    the VAE, so replaying it changes no output, and makes three of the four calls per flavour cheap."""
    encode, cache = pipe.vae.encode, {}

    def cached(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        key = (tuple(x.shape), x.dtype, hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        if key not in cache:
            cache[key] = encode(x, *args, **kwargs)
        return cache[key]

    pipe.vae.encode = cached


def edit_kwargs() -> dict[str, Any]:
    """A 2-step, guidance-free 64x64 edit of a fixed random 32x32 image: the call the exported files are checked
    with on the tiny pipelines."""
    rng = np.random.RandomState(0)
    return dict(
        image=Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")),
        prompt="make the sky blue",
        height=64,
        width=64,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        output_type="np",
    )


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")  # two adapters: intended
@pytest.mark.parametrize("flavour", ["edit-v1", "edit-v2"])
def test_exported_files_load_into_the_flavours_pipeline(flavour: str, tiny_models: Any, tmp_path: Path) -> None:
    d = tiny_models(flavour)
    tr = transformer_with_lora(d, flavour)
    files = L.save_lora_files(L.lora_state_dict(tr), alpha=ALPHA, rank=RANK, fmt="both", transformer=tr)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pipe = load_pipeline(d, flavour)
    assert type(pipe).__name__ == pipeline_class(flavour).__name__
    reuse_reference_encoding(pipe)
    kwargs = edit_kwargs()

    def run() -> np.ndarray:
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    base = run()
    pipe.load_lora_weights(str(tmp_path), weight_name=L.DIFFUSERS_FILE, adapter_name="diffusers")
    pipe.load_lora_weights(str(tmp_path), weight_name=L.COMFYUI_FILE, adapter_name="comfyui")
    pipe.set_adapters(["diffusers"], [1.0])
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert to_q.scaling == {"diffusers": ALPHA / RANK, "comfyui": 1.0}  # alpha from metadata / folded into A
    with_diffusers = run()
    pipe.set_adapters(["comfyui"], [1.0])
    with_comfyui = run()
    pipe.set_adapters(["diffusers", "comfyui"], [0.0, 0.0])
    at_zero = run()

    assert np.abs(with_diffusers - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_array_equal(with_comfyui, with_diffusers)
    np.testing.assert_array_equal(at_zero, base)
