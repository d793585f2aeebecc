"""The encoder's memory options: the text encoder at ``text_encoder_1_precision`` and the VAE's tiling/slicing.

Tolerances are measured on the tiny random-weight model (width 32, so every quantization block is a whole row):
int8-quanto gives a per-token cosine similarity of 0.9999 to the unquantized embeddings (relative error 0.9%),
nf4-bnb 0.974 at worst (relative error 13%); a different caption on the same reference is much further away
than either. The real 7B encoder's error is not measured here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.encode.ops import encode_prompt, encode_vae_latents
from shared.errors import ConfigError
from shared.model.loading import configure_vae, load_encoder_pipeline
from shared.model.quantize import quantized_modules
from shared.store.local import LocalStore

# precision → (least per-token cosine similarity, largest relative error ‖e - e0‖ / ‖e0‖), with headroom over
# what the tiny model measures (see the module docstring)
TOLERANCE = {"int8-quanto": (0.999, 0.02), "nf4-bnb": (0.95, 0.2)}
KIND = {"int8-quanto": "quanto:qint8", "nf4-bnb": "bnb:nf4"}


def noise(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def unquantized(tiny_models):
    return load_encoder_pipeline(tiny_models("edit-v2"), "edit-v2")


def _cos_rel(e: torch.Tensor, e0: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(e, e0, dim=-1).min().item()
    return cos, ((e - e0).norm() / e0.norm()).item()


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
def test_quantized_text_encoder_embeds_close_to_unquantized(tiny_models, unquantized, precision):
    pipe = load_encoder_pipeline(tiny_models("edit-v2"), "edit-v2", text_encoder_precision=precision)
    kinds = set(quantized_modules(pipe.text_encoder).values())
    assert kinds == {KIND[precision]}
    assert quantized_modules(pipe.vae) == {}  # only the text encoder is quantized
    refs = [[noise(64, 0)]]
    e0, m0 = encode_prompt(unquantized, "edit-v2", ["make the sky red"], refs)
    e, m = encode_prompt(pipe, "edit-v2", ["make the sky red"], refs)
    assert torch.equal(m, m0) and e.dtype == torch.float32
    cos, rel = _cos_rel(e[0], e0[0])
    least_cos, most_rel = TOLERANCE[precision]
    assert cos >= least_cos and rel <= most_rel, (cos, rel)
    other, _ = encode_prompt(unquantized, "edit-v2", ["turn the cat into a dog"], refs)
    n = min(other.shape[1], e0.shape[1])
    assert _cos_rel(other[0, :n], e0[0, :n])[1] > 2 * rel  # the error is small next to a caption's difference


def test_unknown_text_encoder_precision_is_refused_by_name(tmp_path, tiny_models):
    root = write_dataset(tmp_path / "data", n=1, references=1)
    cfg, _ = write_configs(
        tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1, text_encoder_1_precision="int8-torchao"
    )
    with pytest.raises(ConfigError, match="text_encoder_1_precision"):
        load_run_config(cfg)


def _encode(cfg: Path, store: LocalStore, *overrides: str):
    enc = DatasetEncoder(load_run_config(cfg, overrides=list(overrides)), store)
    try:
        return enc.encode()
    finally:
        enc.release()


def test_text_cache_keys_follow_the_precision(tmp_path, tiny_models):
    """Embeddings encoded at one precision are never reused at another: the text entries re-encode, the latents
    (same VAE) stay cached; back at no_change the keys are those of a cache encoded before the option existed."""
    root = write_dataset(tmp_path / "data", n=2, references=1)
    cfg, _ = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1)
    store = LocalStore(tmp_path / "store")
    first = _encode(cfg, store)
    assert (first.encoded, first.cached) == (6, 0)  # 2 targets, 2 references, 2 captions
    before = store.get_json("cache/text/demo-images/manifest.json")["entries"]["0000"]["cache_key"]
    quantized = _encode(cfg, store, "text_encoder_1_precision=int8-quanto")
    assert (quantized.encoded, quantized.cached) == (2, 4)
    again = _encode(cfg, store, "text_encoder_1_precision=int8-quanto")
    assert (again.encoded, again.cached) == (0, 6)
    back = _encode(cfg, store)
    assert (back.encoded, back.cached) == (2, 4)
    assert store.get_json("cache/text/demo-images/manifest.json")["entries"]["0000"]["cache_key"] == before


def test_vae_tiling_gives_close_latents_and_its_own_cache_keys(tmp_path, tiny_models, unquantized):
    """Tiles engage above 256 pixels: a 384x384 image is encoded in four blended tiles. Measured on the tiny VAE:
    relative error 0.8%, largest element error 0.036 on latents of magnitude up to 1.2."""
    vae, proc = unquantized.vae, unquantized.image_processor
    images = [noise(384, 1), noise(384, 2)]
    try:
        untiled = encode_vae_latents(vae, proc, images, 384, 384)
        configure_vae(vae, tiling=True, slicing=False)
        tiled = encode_vae_latents(vae, proc, images, 384, 384)
        configure_vae(vae, tiling=False, slicing=True)
        sliced = encode_vae_latents(vae, proc, images, 384, 384)
    finally:
        configure_vae(vae, tiling=False, slicing=False)
    assert not torch.equal(tiled, untiled)  # the tiles did engage
    assert ((tiled - untiled).norm() / untiled.norm()).item() <= 0.02
    torch.testing.assert_close(sliced, untiled, atol=1e-5, rtol=1e-5)  # one image at a time: the same latents

    root = write_dataset(tmp_path / "data", n=2, references=1)
    cfg, _ = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1)
    store = LocalStore(tmp_path / "store")
    _encode(cfg, store)
    tiled_run = _encode(cfg, store, "vae_enable_tiling=true")
    assert (tiled_run.encoded, tiled_run.cached) == (4, 2)  # the latents, not the captions
    assert _encode(cfg, store, "vae_enable_tiling=true", "vae_enable_slicing=true").encoded == 0  # slicing: same
