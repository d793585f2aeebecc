"""The typed configuration: what ``config.json`` and each ``multidatabackend.json`` entry may say.

Frozen dataclasses built by ``shared.config.typed.build``; each field carries its type, default, value check and
doc line. Cross-entry rules live in ``shared.config.checks``, reading the files in ``shared.config.loading``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from shared.config.flavours import FLAVOURS, get_flavour
from shared.config.optimizers import check_optimizer
from shared.config.typed import field, non_negative, positive, probability
from shared.errors import InvalidInput
from shared.store.keys import validate_key

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
PRESET_PREFIX = "qwen_image."


# ----------------------------------------------------------------------------------------------- resolution
_WXH = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_wxh(value: Any) -> tuple[int, int] | str:
    """'1024x768' → (1024, 768); 1024 or '1024' → (1024, 1024); otherwise an error message.
    Sides must be multiples of 16 (VAE 8x times the 2x2 patch)."""
    if isinstance(value, bool):
        return f"expected 'WIDTHxHEIGHT' like '1024x1024', got {value!r}"
    if isinstance(value, int):
        w = h = value
    elif isinstance(value, str) and value.strip().isdigit():
        w = h = int(value)
    elif isinstance(value, str) and (m := _WXH.match(value)):
        w, h = int(m.group(1)), int(m.group(2))
    else:
        return f"expected 'WIDTHxHEIGHT' like '1024x1024', got {value!r}"
    if w < 16 or h < 16 or w % 16 or h % 16:
        return f"{w}x{h}: both sides must be multiples of 16 and at least 16 (e.g. '1024x1024', '768x1344')"
    return (w, h)


def is_single_file(value: str | None) -> bool:
    """Whether ``pretrained_transformer_model_name_or_path`` names a single transformer file (GGUF, safetensors)
    rather than a folder: ``shared.model.single_file`` loads it."""
    return bool(value) and str(value).lower().endswith((".gguf", ".safetensors"))


def _check_wxh(v: str) -> str | None:
    r = parse_wxh(v)
    return r if isinstance(r, str) else None


def _check_device(v: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        return None
    return f"expected auto, cpu, cuda or cuda:N, got {v!r}"


def _check_beta(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v}"


def _check_dataset_id(v: str) -> str | None:
    """An id names store folders (cache/vae/<id>/...): one key segment, no '/' or '..'."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
        return None
    return (
        f"{v[:80]!r} is not a usable dataset id: use 1 to 100 letters, digits, '.', '_' or '-', starting with "
        "a letter or digit (it names the dataset's cache folders)"
    )


def _check_cache_dir(v: str) -> str | None:
    """A cache directory becomes a store prefix: it must be a valid key once its '.' and empty segments go."""
    prefix = _prefix(v)
    if not prefix:
        return f"{v!r} names no folder; give one like 'cache/vae/my-dataset'"
    try:
        validate_key(prefix)
    except InvalidInput as err:
        return f"{v!r} cannot be a cache folder in the store ({str(err).split(': ', 1)[-1]})"
    return None


def _check_resume(v: str) -> str | None:
    if v == "latest" or re.fullmatch(r"(step-)?\d+", v) or v in ("none", ""):
        return None
    return f"expected 'latest', a step number or 'step-N', got {v!r}"


REPORT_TO = ("tensorboard", "wandb")
_REFUSED_TRACKERS = {
    "comet_ml": "comet_ml needs its cloud service",
    "swanlab": "swanlab needs its cloud service",
    "simpletuner": "SimpleTuner's own HTML report",
    "custom-tracker": "SimpleTuner's plugin trackers",
}


def report_targets(value: str) -> list[str]:
    """'all' → every tracker; 'none' → []; 'tensorboard,wandb' → both."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return list(REPORT_TO)
    return names


def _check_report_to(v: str) -> str | None:
    for name in report_targets(v):
        if name in _REFUSED_TRACKERS:
            return (
                f"{name!r} is not supported ({_REFUSED_TRACKERS[name]}); use tensorboard or wandb (offline "
                "runs that `wandb sync` uploads later), or none"
            )
        if name not in REPORT_TO:
            return f"{name!r} is not a tracker; use none, tensorboard, wandb, all, or a comma-separated list"
    return None


def _check_num_processes(v: str) -> str | None:
    if v == "auto" or (v.isdigit() and int(v) >= 1):
        return None
    return f"{v!r}: expected a number of processes (1 or more) or auto (every GPU this host's trainer can see)"


def _check_port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"{v}: expected a TCP port, 1-65535"


def _check_solver_order(v: int) -> str | None:
    return None if 1 <= v <= 3 else f"{v}: the rollout solvers take order 1, 2 or 3 (euler is always 1)"


def _check_reflexflow(v: bool) -> str | None:
    if not v:
        return None
    return (
        "ReflexFlow (its anti-drift regulariser and exposure-bias loss weights) is not built: set false for "
        "plain rollout, or remove the key"
    )


# --------------------------------------------------------------------------------------------- train config
@dataclass(frozen=True)
class ModelKwargs:
    match_target_res: bool = field(
        False, doc="edit-v2/v3: references take the target's resolution instead of being packed to ~1 MP"
    )
    reference_area: int = field(
        1024 * 1024, check=positive, doc="pixel area references are packed to for the VAE (edit-v2/v3 default 1 MP)"
    )
    vl_reference_area: int | None = field(
        None,
        check=positive,
        doc="pixel area the Qwen2.5-VL encoder sees references at "
        "(default: the pipeline's, 1 MP edit-v1, 384² edit-v2/v3; v2.1's sees the VAE's image, this does not apply)",
    )


@dataclass(frozen=True)
class TrainConfig:
    model_flavour: Literal["edit-v1", "edit-v2", "edit-v3", "v2.1"] = field(
        doc="which model: Qwen-Image-Edit (edit-v1, edit-v2 2509, edit-v3 2511) or Qwen-Image-2.1 (v2.1)"
    )
    model_type: Literal["lora"] = field("lora", doc="only LoRA training is supported")
    model_family: Literal["qwen_image"] = field("qwen_image")
    pretrained_model_name_or_path: str | None = field(None, doc="local HF-layout dir or hub id; default per flavour")
    pretrained_transformer_model_name_or_path: str | None = field(
        None,
        doc="the transformer from a .gguf, a ComfyUI single-file .safetensors (bf16, fp8, fp8_scaled) or another "
        "folder; the VAE, text encoder and the transformer's config.json from pretrained_model_name_or_path",
    )
    pretrained_transformer_subfolder: str | None = field(
        "transformer", doc="with a folder in pretrained_transformer_model_name_or_path: its subfolder (none: itself)"
    )
    data_backend_config: str | None = field(None, doc="path of multidatabackend.json")
    output_dir: str = field("output/models")
    # batch and schedule
    train_batch_size: int = field(1, check=positive)
    gradient_accumulation_steps: int = field(1, check=positive)
    max_train_steps: int = field(
        1000, check=non_negative, doc="optimizer steps; 0: num_train_epochs decides (1000 when neither is set)"
    )
    num_train_epochs: int = field(0, check=non_negative, doc="passes over the data, when max_train_steps is 0")
    learning_rate: float = field(1e-4, check=positive)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "sine"
    ] = field("constant")
    lr_warmup_steps: int = field(0, check=non_negative)
    lr_end: float = field(4e-7, check=non_negative, doc="polynomial: the final learning rate")
    lr_power: float = field(0.8, check=positive, doc="polynomial: the decay's power")
    lr_num_cycles: int = field(1, check=positive, doc="cosine_with_restarts: hard restarts over the run")
    optimizer: str = field("adamw", check=check_optimizer, doc="SimpleTuner's optimizer names (see the table)")
    optimizer_config: str | None = field(
        None, doc="extra optimizer arguments as SimpleTuner writes them: 'weight_decay=0.0,eps=1e-6'"
    )
    optimizer_beta1: float | None = field(
        None, check=_check_beta, doc="with optimizer_beta2: the betas for any optimizer that takes them"
    )
    optimizer_beta2: float | None = field(None, check=_check_beta)
    adam_beta1: float = field(0.9, check=_check_beta)
    adam_beta2: float = field(0.999, check=_check_beta)
    adam_weight_decay: float = field(1e-2, check=non_negative)
    adam_epsilon: float = field(1e-8, check=positive)
    max_grad_norm: float = field(1.0, check=non_negative, doc="0: no clipping")
    grad_clip_method: Literal["norm", "value"] = field(
        "norm",
        doc="norm: scale the gradients' global norm down to "
        "max_grad_norm; value: clamp each gradient "
        "element to ±max_grad_norm (SimpleTuner's default)",
    )
    seed: int = field(42)
    # precision and memory
    mixed_precision: Literal["auto", "bf16", "fp16", "no", "fp32"] = field(
        "auto", doc="auto: bf16 on CUDA, fp32 on CPU; an explicit bf16/fp16 is used on either"
    )
    gradient_checkpointing: bool = field(False)
    compile_transformer: bool = field(
        False,
        doc="torch.compile the repeated transformer blocks (regional "
        "compilation; the first steps pay the compile time)",
    )
    base_model_precision: Literal[
        "no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "nf4-bnb", "int8-bnb"
    ] = field("no_change")
    quantize_via: Literal["cpu", "accelerator"] = field("accelerator")
    quantize_activations: bool = field(False)
    text_encoder_1_precision: Literal[
        "no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "nf4-bnb"
    ] = field(
        "no_change",
        doc="the text encoder's weights while encoding (SimpleTuner's values that quanto and bitsandbytes apply)",
    )
    device: str = field("auto", check=_check_device, doc="auto, cpu, cuda or cuda:N")
    skip_fit_check: bool = field(
        False, doc="start even when the planner (edittuner plan) predicts the trainer will not fit the GPU's memory"
    )
    # several processes (accelerate's names): torchrun data parallel over the LoRA, see shared.train.distributed
    num_processes: str = field(
        "1",
        check=_check_num_processes,
        doc="training processes per machine: one per GPU (auto: every GPU the trainer sees); on a CPU, gloo processes",
    )
    num_machines: int = field(1, check=positive, doc="machines in the run; each runs num_processes")
    machine_rank: int = field(0, check=non_negative, doc="this machine's place, 0 to num_machines - 1")
    main_process_ip: str = field("", doc="with num_machines > 1: the address of machine 0 (the c10d rendezvous)")
    main_process_port: int = field(29500, check=_check_port, doc="with num_machines > 1: machine 0's rendezvous port")
    # flow matching
    flow_schedule_shift: float = field(3.0, check=positive, doc="static sigma shift s' = shift*s / (1 + (shift-1)*s)")
    flow_schedule_auto_shift: bool = field(
        False,
        doc="shift each batch's sigmas by its image sequence length, as "
        "the Qwen scheduler shifts inference (replaces the static shift)",
    )
    caption_dropout_probability: float = field(0.0, check=probability)
    masked_loss_probability: float = field(
        1.0, check=probability, doc="share of micro-batches whose loss is weighted by their conditioning_type mask"
    )
    # scheduled sampling (rollout), SimpleTuner's names: see shared.model.rollout
    scheduled_sampling_max_step_offset: int = field(
        0,
        check=non_negative,
        doc="a rolled-out sample starts up to this many inference steps before its training sigma (0: off)",
    )
    scheduled_sampling_probability: float = field(
        0.0, check=probability, doc="share of samples rolled out (without a ramp)"
    )
    scheduled_sampling_ramp_steps: int = field(
        0, check=non_negative, doc="> 0: the share ramps from prob_start to prob_end over this many steps"
    )
    scheduled_sampling_start_step: int = field(0, check=non_negative, doc="the step the ramp starts at")
    scheduled_sampling_prob_start: float = field(0.0, check=probability)
    scheduled_sampling_prob_end: float = field(0.5, check=probability)
    scheduled_sampling_ramp_shape: Literal["linear", "cosine"] = field("linear")
    scheduled_sampling_strategy: Literal["uniform", "biased_early", "biased_late"] = field(
        "uniform", doc="how the rollout length is drawn: uniform, biased_early (shorter), biased_late (longer)"
    )
    scheduled_sampling_sampler: Literal["unipc", "euler", "dpm"] = field(
        "unipc", doc="the rollout's solver: diffusers' UniPC, flow-match Euler or DPM-Solver++ multistep"
    )
    scheduled_sampling_order: int = field(2, check=_check_solver_order, doc="unipc/dpm solver order, 1-3 (euler: 1)")
    scheduled_sampling_reflexflow: bool | None = field(
        None,
        check=_check_reflexflow,
        doc="false or unset only: ReflexFlow is not built (SimpleTuner turns it on when unset; a warning says so)",
    )
    # dataset defaults (SimpleTuner's top-level options: each dataset without its own value takes these)
    resolution: float | None = field(None, check=positive, doc="default of each dataset's resolution (1024)")
    resolution_type: Literal["pixel", "area", "pixel_area"] | None = field(
        None, doc="default of each dataset's resolution_type"
    )
    minimum_image_size: float | None = field(None, check=non_negative, doc="default of each dataset's")
    maximum_image_size: float | None = field(None, check=non_negative, doc="default of each dataset's")
    target_downsample_size: float | None = field(None, check=non_negative, doc="default of each dataset's")
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] | None = field(
        None, doc="default of each image dataset's caption_strategy (filename)"
    )
    conditioning_multidataset_sampling: Literal["combined", "random"] = field("combined")
    model_kwargs: ModelKwargs = field(ModelKwargs())
    # LoRA
    lora_rank: int = field(16, check=positive)
    lora_alpha: float | None = field(None, check=positive, doc="default: lora_rank")
    lora_dropout: float = field(0.0, check=probability)
    lora_target_modules: list[str] = field(list(DEFAULT_TARGET_MODULES))
    lora_format: Literal["diffusers", "comfyui", "both"] = field("diffusers")
    init_lora: str | None = field(
        None, doc="a LoRA file or folder the trained adapter starts from (same rank and target modules)"
    )
    init_lora_step: int | None = field(
        None, check=non_negative, doc="the step the run counts from (default: the file's global_step metadata, else 0)"
    )
    assistant_lora_path: str | None = field(
        None, doc="a frozen LoRA active in training (a distilled or adapter-carrying base), never in the export"
    )
    assistant_lora_strength: float = field(1.0, check=non_negative, doc="its strength in training")
    assistant_lora_inference_strength: float = field(0.0, check=non_negative, doc="its strength in previews (0: off)")
    disable_assistant_lora: bool = field(False, doc="leave assistant_lora_path out")
    use_ema: bool = field(False)
    ema_decay: float = field(0.995, check=probability)
    ema_device: Literal["cpu", "accelerator"] = field(
        "cpu", doc="where the EMA lives: cpu (no GPU memory, one batched copy a step) or the training device"
    )
    # checkpoints
    checkpoint_step_interval: int = field(500, check=positive, aliases=("checkpointing_steps",))
    checkpoints_total_limit: int | None = field(
        None, check=non_negative, aliases=("save_total_limit",), doc="committed checkpoints kept (0 or unset: all)"
    )
    resume_from_checkpoint: str | None = field(None, check=_check_resume)
    # trackers
    report_to: str = field(
        "none", check=_check_report_to, doc="none, tensorboard, wandb (offline), all, or a comma-separated list"
    )
    tracker_project_name: str = field("edittuner")
    tracker_run_name: str | None = field(None, doc="default: the run id")
    logging_dir: str = field("logs", doc="tracker files, under output_dir unless absolute")
    # validation
    validation_step_interval: int = field(100, check=positive, aliases=("validation_steps",))
    validation_resolution: str = field("1024x1024", check=_check_wxh)
    validation_guidance: float = field(4.0, check=positive)
    validation_guidance_rescale: float = field(
        0.0, check=probability, doc="blend of the guided prediction rescaled to the conditional one's std (0: off)"
    )
    validation_num_inference_steps: int = field(
        30, check=lambda v: None if v >= 2 else "must be at least 2 (one step gives NaN sigmas with the Qwen scheduler)"
    )
    validation_negative_prompt: str = field(" ")
    validation_adapter_path: str | None = field(
        None, doc="a LoRA file or folder the previews also render with (frozen beside the trained one, never fused)"
    )
    validation_adapter_name: str | None = field(None, doc="its label in previews (default: the file's name)")
    validation_adapter_strength: float = field(1.0, check=positive)
    validation_adapter_mode: Literal["adapter_only", "comparison", "none"] = field(
        "adapter_only",
        doc="adapter_only: previews with the adapter; comparison: beside the normal ones, with effect retention",
    )
    validation_adapter_config: Any = field(
        None, doc="several adapter runs: a list of {label, path or paths, strength, steps, guidance, scheduler}"
    )
    validation_adapter_steps: int | None = field(
        None, check=positive, doc="the adapter runs' steps (a few-step LoRA's 4 or 8; default the previews')"
    )
    validation_adapter_guidance: float | None = field(
        None, check=positive, doc="the adapter runs' guidance (a few-step LoRA's 1; default validation_guidance)"
    )
    validation_on_full_precision: bool = field(
        False,
        doc="with a quantized base (a GGUF or fp8 transformer file, or base_model_precision): previews also render "
        "on the model folder's unquantized transformer, held beside it, with the LoRA and its effect retention",
    )
    validation_seed: int | None = field(None)
    eval_dataset_id: str | None = field(None)
    num_eval_images: int = field(4, check=positive)
    holdout_eval_images: bool = field(
        True,
        doc="without eval_dataset_id: keep the num_eval_images preview samples "
        "out of training, so previews and held-out loss are honest (not on "
        "datasets under twice that size: there the metrics say 'training "
        "samples')",
    )
    vae_batch_size: int = field(
        4,
        check=positive,
        doc="images per VAE encode batch (same size only); lower it when the encoder runs out of memory",
    )
    vae_enable_tiling: bool = field(
        False,
        doc="encode images above 256 pixels in blended tiles (less memory; "
        "latents close to, not equal to, untiled ones)",
    )
    vae_enable_slicing: bool = field(False, doc="encode a batch one image at a time (less memory, same latents)")
    # dataset hygiene
    bad_image_policy: Literal["fail", "skip"] = field(
        "fail", doc="corrupt/oversized images: fail the run or skip them with a warning"
    )
    max_image_pixels: int = field(
        89_478_485, check=positive, doc="images above this many pixels are refused (decompression-bomb guard)"
    )

    @property
    def model_path(self) -> str:
        return self.pretrained_model_name_or_path or FLAVOURS[self.model_flavour].default_model_id

    @property
    def assistant_lora(self) -> str | None:
        """The assistant LoRA's path, unless disable_assistant_lora."""
        return None if self.disable_assistant_lora else self.assistant_lora_path

    @property
    def full_precision_previews(self) -> bool:
        """validation_on_full_precision where it shows something new: the base is quantized (a transformer file,
        or base_model_precision)."""
        quantized = self.base_model_precision != "no_change" or is_single_file(
            self.pretrained_transformer_model_name_or_path
        )
        return self.validation_on_full_precision and quantized

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def validation_size(self) -> tuple[int, int]:
        wh = parse_wxh(self.validation_resolution)
        assert isinstance(wh, tuple)
        return wh


# ------------------------------------------------------------------------------------------ dataset entries
@dataclass(frozen=True)
class DatasetConfig:
    id: str = field(check=_check_dataset_id, doc="unique dataset id")
    type: Literal["local", "aws", "store"] = field(
        "local",
        doc="local folder, SimpleTuner's aws (S3) prefix, or store: a dataset uploaded with `edittuner data push`",
    )
    dataset_type: Literal["image", "conditioning", "conditioning_image_embeds", "text_embeds"] = field(
        "image",
        doc="absent: conditioning when the entry has a conditioning_type or another entry's "
        "conditioning_data names it, else image",
    )
    instance_data_dir: str | None = field(None)
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] | None = field(
        "filename", doc="null on reference datasets (their captions are not used)"
    )
    instance_prompt: str | None = field(None)
    resolution: float | None = field(None, check=positive, doc="pixels, megapixels or pixel area per resolution_type")
    resolution_type: Literal["pixel", "area", "pixel_area"] = field("pixel_area")
    minimum_image_size: float | None = field(
        None, check=non_negative, doc="smaller images are left out (in resolution_type's unit)"
    )
    maximum_image_size: float | None = field(
        None, check=non_negative, doc="larger images are first downsampled to target_downsample_size"
    )
    target_downsample_size: float | None = field(None, check=non_negative)
    minimum_aspect_ratio: float | None = field(
        None, check=positive, doc="images of a smaller width/height are left out"
    )
    maximum_aspect_ratio: float | None = field(None, check=positive)
    crop: bool = field(
        False,
        doc="false: each image keeps its aspect (a bucket of its own aspect); true: cropped "
        "per crop_aspect and crop_style",
    )
    crop_style: Literal["center", "corner", "random"] = field(
        "center", doc="where the crop box sits; random: drawn once per image"
    )
    crop_aspect: Literal["square", "preserve", "closest", "random"] = field("square")
    crop_aspect_buckets: list[Any] = field(
        [], doc="aspect ratios for crop_aspect closest/random: numbers, or {aspect_bucket, weight} objects"
    )
    conditioning_data: list[str] = field([])
    source_dataset_id: str | None = field(None, doc="a conditioning dataset's image dataset")
    text_embeds: str | None = field(None, doc="an image dataset's text_embeds entry (default: the one marked default)")
    default: bool = field(False, doc="text_embeds entries: the one caption embeddings go to")
    conditioning_image_embeds: str | None = field(None)
    conditioning_type: Literal["reference_strict", "reference_loose", "mask"] = field(
        "reference_strict", doc="mask: a loss mask of the edit region for masked loss (not a reference)"
    )
    cache_dir_vae: str | None = field(None, check=_check_cache_dir)
    cache_dir: str | None = field(None, check=_check_cache_dir)
    disabled: bool = field(False, aliases=("disable",))
    repeats: int = field(0, check=non_negative)
    store_upload: str | None = field(None, doc="type store: the upload's name (`edittuner data push` prints it)")
    # type=aws (SimpleTuner's names)
    aws_bucket_name: str | None = field(None)
    aws_data_prefix: str = field("")
    aws_endpoint_url: str | None = field(None)
    aws_region_name: str | None = field(None)
    aws_access_key_id: str | None = field(None)
    aws_secret_access_key: str | None = field(None)

    @property
    def target_area(self) -> int:
        """Bucket area in pixels for this dataset's resolution and resolution_type."""
        res = self.resolution if self.resolution is not None else 1024
        if self.resolution_type == "area":
            return int(round(res * 1_000_000))
        return int(round(res * res))

    @property
    def vae_cache_prefix(self) -> str:
        return _prefix(self.cache_dir_vae or f"cache/vae/{self.id}")

    @property
    def aws_fields(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "aws_bucket_name",
                "aws_endpoint_url",
                "aws_region_name",
                "aws_access_key_id",
                "aws_secret_access_key",
            )
        }


def _prefix(path: str) -> str:
    """A config cache directory ('cache/vae/x', './cache/x/', '/abs/cache/x') as a store key prefix."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


@dataclass(frozen=True)
class DataConfig:
    """The parsed multidatabackend.json: every enabled entry, in file order."""

    source: str
    datasets: tuple[DatasetConfig, ...]

    def get(self, dataset_id: str) -> DatasetConfig:
        for d in self.datasets:
            if d.id == dataset_id:
                return d
        raise KeyError(dataset_id)

    @property
    def image_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.dataset_type == "image"]

    def references_of(self, d: DatasetConfig) -> list[DatasetConfig]:
        """The reference datasets of image dataset ``d``, in order (its conditioning_data but the loss mask)."""
        return [r for r in (self.get(i) for i in d.conditioning_data) if r.conditioning_type != "mask"]

    def mask_of(self, d: DatasetConfig) -> DatasetConfig | None:
        """The ``conditioning_type: mask`` dataset of image dataset ``d`` (masked loss), if it lists one."""
        masks = [r for r in (self.get(i) for i in d.conditioning_data) if r.conditioning_type == "mask"]
        return masks[0] if masks else None

    def text_cache_prefix(self, d: DatasetConfig, flavour: str) -> str:
        """Where caption embeddings of image dataset ``d`` go: for edit-v1 (whose flavour keeps them in a
        conditioning cache) the conditioning_image_embeds entry's cache_dir (default
        cache/conditioning_image_embeds/<id>); else cache/text/<id>."""
        if get_flavour(flavour).caption_embeds_in_conditioning_cache:
            if d.conditioning_image_embeds:
                e = self.get(d.conditioning_image_embeds)
                return _prefix(e.cache_dir or f"cache/conditioning_image_embeds/{e.id}")
            return f"cache/conditioning_image_embeds/{d.id}"
        entry = self.text_embeds_of(d)
        if entry is not None:  # SimpleTuner's text_embeds entry: one folder per image dataset inside its cache_dir
            return f"{_prefix(entry.cache_dir or f'cache/text/{entry.id}')}/{d.id}"
        return f"cache/text/{d.id}"

    def text_embeds_of(self, d: DatasetConfig) -> DatasetConfig | None:
        """The text_embeds entry an image dataset's caption embeddings go to: the one it names, else the default
        (else the only one), else None."""
        entries = [e for e in self.datasets if e.dataset_type == "text_embeds"]
        if d.text_embeds is not None:
            return next((e for e in entries if e.id == d.text_embeds), None)
        return next((e for e in entries if e.default), entries[0] if len(entries) == 1 else None)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: the training config, the datasets, and what was ignored."""

    train: TrainConfig
    data: DataConfig
    config_source: str
    warnings: tuple[str, ...] = ()
