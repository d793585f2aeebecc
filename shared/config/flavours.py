"""The Qwen image-editing model flavours EditTuner trains, and what differs between them.

Everything flavour-specific (which pipeline and transformer classes, which components the model folder has, how
many references, at what size the text encoder sees them, whether reference tokens are modulated at t=0, whether
``match_target_res`` applies, where caption embeddings are cached, how the transformer's sequence is laid out) is
read from here, so a new flavour is one registry entry. Code asks a ``Flavour`` (``get_flavour``), never compares a
flavour's name.

Two transformer layouts exist. The Qwen-Image-Edit models (edit-v1..v3) are dual-stream: the noisy target's 2x2
patchified tokens come first and the references' after, the text is a separate stream. Qwen-Image-2.1 (``v2.1``) is
one joint sequence: the prompt's tokens with each reference's latent tokens in its ``<|image_pad|>`` slots, the
noisy target's tokens last, latents flattened without patchify (``joint_sequence``).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import errors

# The Plus pipeline's module constants (diffusers pipeline_qwenimage_edit_plus: CONDITION_IMAGE_SIZE,
# VAE_IMAGE_SIZE). The edit-v1 pipeline uses 1024*1024 for both the VL encoder and the VAE.
CONDITION_IMAGE_SIZE = 384 * 384
VAE_IMAGE_SIZE = 1024 * 1024
# Qwen-Image-2.1's ``output_resolution`` default (1024): references and the output at 1024² pixels of their aspect
QWEN21_AREA = 1024 * 1024
EDIT_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
# QwenImage21Pipeline's: the Qwen3-VL processor holds the tokenizer, there is no tokenizer/ folder
QWEN21_COMPONENTS = ("transformer", "vae", "text_encoder", "processor", "scheduler")


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
    # Qwen-Image-2.1's layout: references inside the prompt's sequence, the target last, RGBA latents of a 16x VAE
    # flattened without patchify, the vision encoder seeing the VAE's image (see the module's docstring)
    joint_sequence: bool = False
    transformer_class_name: str = "QwenImageTransformer2DModel"
    # the pipeline's components, as save_pretrained lays them out (one subfolder each)
    components: tuple[str, ...] = EDIT_COMPONENTS
    # what ComfyUI's LoRA loader (comfy/lora.py) maps for the model: the edit models' ``diffusion_model.<module>``;
    # Qwen-Image-2.1's bare module names, the one form it maps for every weight, img_mlp.gate_layer / img_mlp.proj
    # included (it fuses them into img_mlp.gate_up and patches each half; a ``diffusion_model.`` name for them
    # is not loaded)
    comfyui_lora_prefix: str = "diffusion_model."
    preset_name: str = ""  # the bundled preset ``edittuner init`` starts from (default qwen_image.<name>-lora)

    @property
    def preset(self) -> str:
        """The bundled preset of this flavour's settings; ``<preset>-tiny`` is its CPU-sized twin."""
        return self.preset_name or f"qwen_image.{self.name}-lora"

    @property
    def encoder_components(self) -> tuple[str, ...]:
        """What encoding reads: the VAE and the vision-language text encoder with its tokenizer/processor."""
        return tuple(c for c in self.components if c not in ("transformer", "scheduler"))

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell on each side: the edit models' VAE 8, Qwen-Image-2.1's 16."""
        return 16 if self.joint_sequence else 8

    @property
    def text_to_image(self) -> bool:
        """Whether a dataset without references trains (text-to-image, as the pipeline renders without images)."""
        return self.min_refs == 0

    @property
    def multi_reference(self) -> bool:
        """True for the flavours whose pipeline takes a list of references (one template slot per image)."""
        return self.max_refs > 1

    @property
    def sizes_references_to_target(self) -> bool:
        """Whether ``model_kwargs.match_target_res`` applies: the Plus pipeline can size each reference as its
        target; the edit-v1 pipeline always sizes its one reference at ~1 MP, and Qwen-Image-2.1's puts every
        reference at the output area of its own aspect."""
        return self.multi_reference and not self.joint_sequence

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
        Flavour(
            name="v2.1",
            default_model_id="Qwen/Qwen-Image-2.1",
            pipeline_class_name="QwenImage21Pipeline",
            min_refs=0,  # a dataset without references trains text-to-image
            max_refs=10,
            zero_cond_t=False,  # causal_condition (the model's own config) modulates text and references at t=0
            vl_ref_area=QWEN21_AREA,  # the vision encoder sees the VAE's image: the placed reference itself
            vae_ref_area=QWEN21_AREA,
            joint_sequence=True,
            transformer_class_name="QwenImage21Transformer2DModel",
            components=QWEN21_COMPONENTS,
            comfyui_lora_prefix="",
            preset_name="qwen_image.v2.1-edit-lora",
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
