"""Sequence lengths per sample: target, references and text tokens as the transformer and the text encoder see them."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config.flavours import get_flavour
from shared.config.schema import DatasetConfig, RunConfig
from shared.data.geometry import bucket_for_area, pipeline_size

CAPTION_TOKENS = 64  # a typical edit instruction, in Qwen2.5 tokens
TEMPLATE_TOKENS = 64  # the edit template's system prefix: the text encoder reads it, the pipelines drop it
VL_PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14 px patches, 2x2 merged into one LM token
VL_PIXELS_PER_PATCH = 14 * 14

# Qwen-Image-2.1's prompt (QwenImage21Pipeline's template, after the system prefix it drops), in Qwen3 tokens. The
# special tokens and "user"/"assistant"/"\n" are one token each; the rest is estimated, as no Qwen3 tokenizer ships
# here: "<imageN>" ~4 BPE tokens, the system message ~13.
QWEN21_USER_TOKENS = 3  # <|im_start|> user \n
QWEN21_TAIL_TOKENS = 5  # <|im_end|> \n <|im_start|> assistant \n
QWEN21_REFERENCE_TEXT_TOKENS = 6  # per reference: " <imageN>" (~4) <|vision_start|> ... <|vision_end|>
QWEN21_SYSTEM_TOKENS = 13  # dropped before the transformer; the text encoder reads them
QWEN21_SLOT_PIXELS = 32 * 32  # one <|image_pad|> slot: Qwen3-VL's 16-px patches merged 2x2
QWEN21_TOKENS_PER_SLOT = 4  # each slot becomes 2x2 latent tokens of the 16x VAE in the joint sequence


# --------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Tokens:
    """Per-sample sequence lengths of the transformer (and what the text encoder reads)."""

    target: int
    per_reference: int
    references: int
    text: int
    # of the text tokens, how many are reference images seen by Qwen2.5-VL; ``joint`` (Qwen-Image-2.1): the
    # references' image slots of the VLM's sequence, which are not text tokens: each holds 4 latent tokens
    vl_image_tokens: int
    joint: bool = False  # one sequence: text with each reference's tokens in its slots, the target last

    @property
    def image(self) -> int:
        return self.target + self.per_reference * self.references

    @property
    def total(self) -> int:
        """The transformer's tokens per sample (the joint sequence's length for Qwen-Image-2.1)."""
        return self.image + self.text

    @property
    def vlm(self) -> int:
        """The rows the VL encoder returns, which the transformer reads (``txt_in``): 2.1's text and slots."""
        return self.text + self.vl_image_tokens if self.joint else self.text

    def prefix_segments(self) -> list[tuple[int, bool]]:
        """2.1's sequence before the target as (length, is text) runs: the blocks the block-causal mask and the
        default attention processor (``QwenImage21AttnProcessor``) split it into."""
        n = self.references
        if n == 0:
            return [(self.text, True)]
        first = QWEN21_USER_TOKENS + QWEN21_REFERENCE_TEXT_TOKENS - 1  # "<image1><|vision_start|>"
        between = QWEN21_REFERENCE_TEXT_TOKENS  # "<|vision_end|> <imageN><|vision_start|>"
        last = self.text - first - between * (n - 1)  # "<|vision_end|>", the caption, the tail
        middle = [(between, True), (self.per_reference, False)] * (n - 1)
        return [(first, True), (self.per_reference, False), *middle, (last, True)]

    def attention_pairs(self) -> int:
        """(query, key) pairs one attention computes per head: T² for the edit models' full attention; for 2.1,
        what ``QwenImage21AttnProcessor`` hands SDPA: each prefix run against the keys up to its end, the target
        against every key (a text run's causal triangle is masked, not skipped, so it counts)."""
        if not self.joint:
            return self.total**2
        pairs, end = 0, 0
        for length, _ in self.prefix_segments():
            end += length
            pairs += length * end
        return pairs + self.target * self.total


def _square_tokens(area: int) -> int:
    w, h = bucket_for_area(1, 1, area)
    return (w // 16) * (h // 16)


def _vl_tokens(area: int) -> int:
    return max(1, round(area / VL_PIXELS_PER_TOKEN))


def training_tokens(run: RunConfig) -> Tokens:
    """The largest sample any image dataset makes (square buckets at each dataset's target_area)."""
    t = run.train
    flav = get_flavour(t.model_flavour)
    if flav.joint_sequence:
        return max((qwen21_tokens(run, ds.target_area, n) for ds, n in _ref_counts(run)), key=lambda x: x.total)
    vl_area = t.model_kwargs.vl_reference_area or flav.vl_ref_area
    best: Tokens | None = None
    for ds in run.data.image_datasets:
        target = _square_tokens(ds.target_area)
        n_refs = len(run.data.references_of(ds))  # the loss mask (masked loss) is no reference
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
    if train.joint:
        return qwen21_tokens(run, w * h, train.references, target)
    if get_flavour(t.model_flavour).sizes_references_to_target and t.model_kwargs.match_target_res:
        per_ref = target
    else:
        pw, ph = pipeline_size(t.model_kwargs.reference_area, 1.0)
        per_ref = (pw // 16) * (ph // 16)
    return Tokens(target, per_ref, train.references, train.text, train.vl_image_tokens)


# ------------------------------------------------------------------------------------------ Qwen-Image-2.1
def _ref_counts(run: RunConfig) -> list[tuple[DatasetConfig, int]]:
    """Each image dataset with the references a sample of it carries (one with random sampling)."""
    t = run.train
    out = []
    for ds in run.data.image_datasets:
        n = len(run.data.references_of(ds))
        if t.conditioning_multidataset_sampling == "random" and get_flavour(t.model_flavour).multi_reference:
            n = min(n, 1)
        out.append((ds, n))
    return out


def qwen21_tokens(run: RunConfig, target_area: int, references: int, target: int | None = None) -> Tokens:
    """One Qwen-Image-2.1 sample: the square target at ``target_area`` (``target`` tokens if given) as 16x latent
    tokens without patchify, ``references`` references at ``reference_area`` of their aspect (square: the
    pipeline's size, (W/32)(H/32) image slots, 4 latent tokens each), the prompt's text around them."""
    if target is None:
        target = _square_tokens(target_area)
    w, h = pipeline_size(run.train.model_kwargs.reference_area, 1.0)
    slots = w * h // QWEN21_SLOT_PIXELS  # sides are multiples of 32
    text = QWEN21_USER_TOKENS + CAPTION_TOKENS + QWEN21_TAIL_TOKENS + references * QWEN21_REFERENCE_TEXT_TOKENS
    return Tokens(target, slots * QWEN21_TOKENS_PER_SLOT, references, text, references * slots, joint=True)
