"""The Qwen-Image-Edit model flavours EditTuner trains, and what differs between them.

Everything flavour-specific (which pipeline class, how many references, at what size the text encoder sees them,
whether reference tokens are modulated at t=0, whether ``match_target_res`` applies, where caption embeddings are
cached) is read from here, so a new flavour is one registry entry. Code asks a ``Flavour`` (``get_flavour``), never
compares a flavour's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import errors

# The Plus pipeline's module constants (diffusers pipeline_qwenimage_edit_plus: CONDITION_IMAGE_SIZE,
# VAE_IMAGE_SIZE). The edit-v1 pipeline uses 1024*1024 for both the VL encoder and the VAE.
CONDITION_IMAGE_SIZE = 384 * 384
VAE_IMAGE_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Flavour:
    """One model family member: its default weights and the conditioning rules its pipeline applies."""

    name: str
    default_model_id: str
    pipeline_class_name: str
    min_refs: int
    max_refs: int
    zero_cond_t: bool
    vl_ref_area: int  # pixel area references are resized to before the Qwen2.5-VL text encoder sees them
    vae_ref_area: int  # pixel area references are resized to before the VAE encodes them
    # SimpleTuner keeps this flavour's caption embeddings (conditioned on the reference) in a
    # ``conditioning_image_embeds`` dataset's cache, not in a ``text_embeds`` one
    caption_embeds_in_conditioning_cache: bool = False
    # the tiny model with trained weights (``edittuner make-tiny-model --trained``, the demo) exists for it
    tiny_trained: bool = False

    @property
    def multi_reference(self) -> bool:
        """True for the "Picture N:" template flavours, which accept a list of references."""
        return self.pipeline_class_name == "QwenImageEditPlusPipeline"

    @property
    def sizes_references_to_target(self) -> bool:
        """Whether ``model_kwargs.match_target_res`` applies: the Plus pipeline can size each reference as its
        target; the edit-v1 pipeline always sizes its one reference at ~1 MP."""
        return self.multi_reference

    def check_ref_count(self, n_refs: int, where: str = "references") -> None:
        """Raise InvalidInput when ``n_refs`` references are outside what this flavour's model was trained with."""
        if not self.min_refs <= n_refs <= self.max_refs:
            wanted = str(self.min_refs) if self.min_refs == self.max_refs else f"{self.min_refs} to {self.max_refs}"
            raise errors.InvalidInput(
                f"{where}: flavour {self.name} takes {wanted} reference image(s) per sample, got {n_refs}"
            )


FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in (
        Flavour(
            name="edit-v1",
            default_model_id="Qwen/Qwen-Image-Edit",
            pipeline_class_name="QwenImageEditPipeline",
            min_refs=1,
            max_refs=1,
            zero_cond_t=False,
            vl_ref_area=1024 * 1024,  # v1 resizes its one reference to 1 MP for the VL encoder and the VAE alike
            vae_ref_area=VAE_IMAGE_SIZE,
            caption_embeds_in_conditioning_cache=True,
            tiny_trained=True,
        ),
        Flavour(
            name="edit-v2",
            default_model_id="Qwen/Qwen-Image-Edit-2509",
            pipeline_class_name="QwenImageEditPlusPipeline",
            min_refs=1,
            max_refs=3,
            zero_cond_t=False,
            vl_ref_area=CONDITION_IMAGE_SIZE,
            vae_ref_area=VAE_IMAGE_SIZE,
            tiny_trained=True,
        ),
        Flavour(
            name="edit-v3",
            default_model_id="Qwen/Qwen-Image-Edit-2511",
            pipeline_class_name="QwenImageEditPlusPipeline",
            min_refs=1,
            max_refs=3,
            zero_cond_t=True,
            vl_ref_area=CONDITION_IMAGE_SIZE,
            vae_ref_area=VAE_IMAGE_SIZE,
        ),
    )
}


def get_flavour(name: str | Flavour) -> Flavour:
    """Look a flavour up by name; an unknown name is the user's error, so say which names exist."""
    if isinstance(name, Flavour):
        return name
    try:
        return FLAVOURS[name]
    except (KeyError, TypeError):
        raise errors.InvalidInput(
            f"unknown model flavour {name!r}: expected one of {', '.join(sorted(FLAVOURS))}"
        ) from None
