"""Sequence lengths per sample: target, references and text tokens as the transformer and the text encoder see them."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.data.geometry import bucket_for_area, pipeline_size

CAPTION_TOKENS = 64  # a typical edit instruction, in Qwen2.5 tokens
TEMPLATE_TOKENS = 64  # the edit template's system prefix: the text encoder reads it, the pipelines drop it
VL_PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14 px patches, 2x2 merged into one LM token
VL_PIXELS_PER_PATCH = 14 * 14


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
        if t.conditioning_multidataset_sampling == "random" and flav.multi_reference:
            n_refs = min(n_refs, 1)
        if flav.sizes_references_to_target and t.model_kwargs.match_target_res:
            per_ref = target
        else:  # every flavour: references at ~reference_area (1 MP) as the pipelines size them
            w, h = pipeline_size(t.model_kwargs.reference_area, 1.0)
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
    if get_flavour(t.model_flavour).sizes_references_to_target and t.model_kwargs.match_target_res:
        per_ref = target
    else:
        pw, ph = pipeline_size(t.model_kwargs.reference_area, 1.0)
        per_ref = (pw // 16) * (ph // 16)
    return Tokens(target, per_ref, train.references, train.text, train.vl_image_tokens)
