"""SimpleTuner-style configuration: ``config.json`` + ``multidatabackend.json`` → typed, validated objects.

Parsed once at the edge (CLI, gRPC request) into frozen dataclasses; nothing downstream sees a dict. All
problems are collected and raised together as one ConfigError, each with its file and JSON path. Keys EditTuner
does not use are returned as warnings (reported once by the caller), never dropped silently and never fatal.

Keys may be written with SimpleTuner's ``--`` prefix (``"--model_type": "lora"``). ``key=value`` overrides
(``learning_rate=1e-4``, ``model_kwargs.match_target_res=true``) are applied to the config file before parsing.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

from shared import jsonc
from shared.errors import ConfigError, Problem
from shared.flavours import FLAVOURS
from shared.typed import build, field, non_negative, positive, probability

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


def _check_wxh(v: str) -> str | None:
    r = parse_wxh(v)
    return r if isinstance(r, str) else None


def _check_device(v: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        return None
    return f"expected auto, cpu, cuda or cuda:N, got {v!r}"


def _check_beta(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v}"


def _check_resume(v: str) -> str | None:
    if v == "latest" or re.fullmatch(r"(step-)?\d+", v) or v in ("none", ""):
        return None
    return f"expected 'latest', a step number or 'step-N', got {v!r}"


# --------------------------------------------------------------------------------------------- train config
@dataclass(frozen=True)
class ModelKwargs:
    match_target_res: bool = field(False, doc="edit-v2/v3: references take the target's resolution instead of "
                                              "being packed to ~1 MP")
    reference_area: int = field(1024 * 1024, check=positive,
                                doc="pixel area references are packed to for the VAE (edit-v2/v3 default 1 MP)")
    vl_reference_area: Optional[int] = field(None, check=positive,
                                             doc="pixel area the Qwen2.5-VL encoder sees references at "
                                                 "(default: the pipeline's, 1 MP edit-v1, 384² edit-v2/v3)")


@dataclass(frozen=True)
class TrainConfig:
    model_flavour: Literal["edit-v1", "edit-v2", "edit-v3"] = field(doc="which Qwen-Image-Edit model")
    model_type: Literal["lora"] = field("lora", doc="only LoRA training is supported")
    model_family: Literal["qwen_image"] = field("qwen_image")
    pretrained_model_name_or_path: Optional[str] = field(None, doc="local HF-layout dir or hub id; default per "
                                                                   "flavour")
    data_backend_config: Optional[str] = field(None, doc="path of multidatabackend.json")
    output_dir: str = field("output/models")
    # batch and schedule
    train_batch_size: int = field(1, check=positive)
    gradient_accumulation_steps: int = field(1, check=positive)
    max_train_steps: int = field(1000, check=positive)
    learning_rate: float = field(1e-4, check=positive)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"] = field("constant")
    lr_warmup_steps: int = field(0, check=non_negative)
    optimizer: Literal["adamw", "adamw8bit"] = field("adamw")
    adam_beta1: float = field(0.9, check=_check_beta)
    adam_beta2: float = field(0.999, check=_check_beta)
    adam_weight_decay: float = field(1e-2, check=non_negative)
    adam_epsilon: float = field(1e-8, check=positive)
    max_grad_norm: float = field(1.0, check=non_negative)
    seed: int = field(42)
    # precision and memory
    mixed_precision: Literal["auto", "bf16", "fp16", "no", "fp32"] = field(
        "auto", doc="auto: bf16 on CUDA, fp32 on CPU; an explicit bf16/fp16 is used on either")
    gradient_checkpointing: bool = field(False)
    compile_transformer: bool = field(False, doc="torch.compile the repeated transformer blocks (regional "
                                                 "compilation; the first steps pay the compile time)")
    base_model_precision: Literal["no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto",
                                  "nf4-bnb", "int8-bnb"] = field("no_change")
    quantize_via: Literal["cpu", "accelerator"] = field("accelerator")
    quantize_activations: bool = field(False)
    device: str = field("auto", check=_check_device, doc="auto, cpu, cuda or cuda:N")
    skip_fit_check: bool = field(False, doc="start even when the planner (edittuner plan) predicts the trainer will "
                                            "not fit the GPU's memory")
    # flow matching
    flow_schedule_shift: float = field(3.0, check=positive)
    caption_dropout_probability: float = field(0.0, check=probability)
    conditioning_multidataset_sampling: Literal["combined", "random"] = field("combined")
    model_kwargs: ModelKwargs = field(ModelKwargs())
    # LoRA
    lora_rank: int = field(16, check=positive)
    lora_alpha: Optional[float] = field(None, check=positive, doc="default: lora_rank")
    lora_dropout: float = field(0.0, check=probability)
    lora_target_modules: list[str] = field(list(DEFAULT_TARGET_MODULES))
    lora_format: Literal["diffusers", "comfyui", "both"] = field("diffusers")
    use_ema: bool = field(False)
    ema_decay: float = field(0.995, check=probability)
    # checkpoints
    checkpointing_steps: int = field(500, check=positive)
    checkpoints_total_limit: Optional[int] = field(None, check=positive)
    resume_from_checkpoint: Optional[str] = field(None, check=_check_resume)
    # validation
    validation_step_interval: int = field(100, check=positive, aliases=("validation_steps",))
    validation_resolution: str = field("1024x1024", check=_check_wxh)
    validation_guidance: float = field(4.0, check=positive)
    validation_num_inference_steps: int = field(30, check=lambda v: None if v >= 2 else
                                                "must be at least 2 (one step gives NaN sigmas with the Qwen "
                                                "scheduler)")
    validation_negative_prompt: str = field(" ")
    validation_seed: Optional[int] = field(None)
    eval_dataset_id: Optional[str] = field(None)
    num_eval_images: int = field(4, check=positive)
    vae_batch_size: int = field(4, check=positive, doc="images per VAE encode batch (same size only); lower it "
                                                       "when the encoder runs out of memory")
    # dataset hygiene
    bad_image_policy: Literal["fail", "skip"] = field("fail", doc="corrupt/oversized images: fail the run or "
                                                                  "skip them with a warning")
    max_image_pixels: int = field(89_478_485, check=positive, doc="images above this many pixels are refused "
                                                                   "(decompression-bomb guard)")

    @property
    def model_path(self) -> str:
        return self.pretrained_model_name_or_path or FLAVOURS[self.model_flavour].default_model_id

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
    id: str = field(doc="unique dataset id")
    type: Literal["local", "aws"] = field("local")
    dataset_type: Literal["image", "conditioning", "conditioning_image_embeds", "text_embeds"] = field("image")
    instance_data_dir: Optional[str] = field(None)
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] = field("filename")
    instance_prompt: Optional[str] = field(None)
    resolution: Optional[float] = field(None, check=positive, doc="pixels, megapixels or pixel area per "
                                                                  "resolution_type")
    resolution_type: Literal["pixel", "area", "pixel_area"] = field("pixel_area")
    conditioning_data: list[str] = field([])
    conditioning_image_embeds: Optional[str] = field(None)
    conditioning_type: Literal["reference_strict", "reference_loose"] = field("reference_strict")
    cache_dir_vae: Optional[str] = field(None)
    cache_dir: Optional[str] = field(None)
    disabled: bool = field(False)
    repeats: int = field(0, check=non_negative)
    crop_style: Literal["center"] = field("center")
    # type=aws (SimpleTuner's names)
    aws_bucket_name: Optional[str] = field(None)
    aws_data_prefix: str = field("")
    aws_endpoint_url: Optional[str] = field(None)
    aws_region_name: Optional[str] = field(None)
    aws_access_key_id: Optional[str] = field(None)
    aws_secret_access_key: Optional[str] = field(None)

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
        return {k: getattr(self, k) for k in ("aws_bucket_name", "aws_endpoint_url", "aws_region_name",
                                              "aws_access_key_id", "aws_secret_access_key")}


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
        return [self.get(i) for i in d.conditioning_data]

    def text_cache_prefix(self, d: DatasetConfig, flavour: str) -> str:
        """Where caption embeddings of image dataset ``d`` go: for edit-v1 the conditioning_image_embeds
        entry's cache_dir (default cache/conditioning_image_embeds/<id>); else cache/text/<id>."""
        if flavour == "edit-v1":
            if d.conditioning_image_embeds:
                e = self.get(d.conditioning_image_embeds)
                return _prefix(e.cache_dir or f"cache/conditioning_image_embeds/{e.id}")
            return f"cache/conditioning_image_embeds/{d.id}"
        return f"cache/text/{d.id}"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: the training config, the datasets, and what was ignored."""

    train: TrainConfig
    data: DataConfig
    config_source: str
    warnings: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------- loading
def _strip_dashes(raw: dict[str, Any]) -> dict[str, Any]:
    return {(k[2:] if isinstance(k, str) and k.startswith("--") else k): v for k, v in raw.items()}


def parse_override(arg: str) -> tuple[list[str], Any]:
    """'a.b=value' → (['a', 'b'], value); the value is JSON when it parses as JSON, else the raw string."""
    if "=" not in arg:
        raise ConfigError([Problem(arg, "overrides are written key=value, e.g. learning_rate=1e-4")])
    key, _, text = arg.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError([Problem(arg, "empty key in key=value override")])
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for arg in overrides:
        path, value = parse_override(arg)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([Problem(arg, f"{part} is not an object; cannot set {'.'.join(path)}")])
        node[path[-1]] = value
    return out


def preset_names() -> list[str]:
    root = resources.files("shared") / "presets"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def preset_dir(name: str) -> Path:
    """The bundled preset directory for ``example=NAME``."""
    names = preset_names()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError([Problem(f"example={name}", "no such preset" + (f" (did you mean {hint[0]!r}?)" if hint
                                   else "") + "; available: " + ", ".join(names))])
    return Path(str(resources.files("shared") / "presets" / name))


def _parse_train(raw: Any, source: str, problems: list[Problem], ignored: list[str]) -> TrainConfig:
    if not isinstance(raw, dict):
        problems.append(Problem(source, "config.json must be a JSON object of option: value"))
        raw = {}
    raw = _strip_dashes(raw)
    mk_raw = raw.pop("model_kwargs", {}) or {}
    mk = ModelKwargs()
    if isinstance(mk_raw, dict):
        mk = build(ModelKwargs, mk_raw, f"{source}: $.model_kwargs", problems, ignored)
    else:
        problems.append(Problem(f"{source}: $.model_kwargs", "expected an object like {\"match_target_res\": true}"))
    cfg = build(TrainConfig, raw, f"{source}: $", problems, ignored)
    return dataclasses.replace(cfg, model_kwargs=mk)


def _parse_data(raw: Any, source: str, problems: list[Problem], ignored: list[str]) -> DataConfig:
    if not isinstance(raw, list):
        problems.append(Problem(source, "multidatabackend.json must be a JSON list of dataset objects"))
        return DataConfig(source, ())
    out = []
    for i, entry in enumerate(raw):
        where = f"{source}: $[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(where, "each dataset must be a JSON object"))
            continue
        d = build(DatasetConfig, _strip_dashes(entry), where, problems, ignored)
        if not d.disabled:
            out.append(d)
    return DataConfig(source, tuple(out))


def _where(data: DataConfig, d: DatasetConfig, key: str = "") -> str:
    i = data.datasets.index(d)
    return f"{data.source}: $[{i}]{'.' + key if key else ''} (id {d.id!r})"


def _check_data(train: TrainConfig, data: DataConfig, cfg_label: str) -> tuple[list[Problem], list[str]]:
    """Cross-entry checks: ids, references, flavour limits, paths a dataset needs."""
    problems: list[Problem] = []
    warnings: list[str] = []
    ids = [d.id for d in data.datasets if d.id is not None]
    by_id = {d.id: d for d in data.datasets}
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(Problem(f"{data.source}: id {dup!r}", "the same id is used by several datasets; ids must "
                                "be unique"))
    images = data.image_datasets
    if not images:
        problems.append(Problem(data.source, "no dataset with dataset_type 'image' (the edited/target images); "
                                "add one"))
    referenced: set[str] = set()
    limit = FLAVOURS[train.model_flavour].max_refs if train.model_flavour in FLAVOURS else 3
    for d in data.datasets:
        if d.id is None:
            continue
        if d.dataset_type in ("image", "conditioning"):
            if d.type == "local" and not d.instance_data_dir:
                problems.append(Problem(_where(data, d, "instance_data_dir"), "is required for a local dataset: "
                                        "the folder holding its images"))
            if d.type == "aws" and not d.aws_bucket_name:
                problems.append(Problem(_where(data, d, "aws_bucket_name"), "is required for type 'aws'"))
        if d.caption_strategy == "instanceprompt" and not d.instance_prompt:
            problems.append(Problem(_where(data, d, "instance_prompt"), "is required with caption_strategy "
                                    "'instanceprompt'"))
        if d.dataset_type != "image":
            continue
        refs = d.conditioning_data
        for j, rid in enumerate(refs):
            referenced.add(rid)
            r = by_id.get(rid)
            if r is None:
                problems.append(Problem(_where(data, d, f"conditioning_data[{j}]"),
                                        f"names no dataset: {rid!r}; ids are " + ", ".join(map(repr, ids))))
            elif r.dataset_type != "conditioning":
                problems.append(Problem(_where(data, d, f"conditioning_data[{j}]"),
                                        f"{rid!r} has dataset_type {r.dataset_type!r}; reference datasets need "
                                        "\"dataset_type\": \"conditioning\""))
        if not refs:
            problems.append(Problem(_where(data, d, "conditioning_data"),
                                    f"{train.model_flavour} trains on pairs: list the reference dataset id(s) here"))
        elif train.model_flavour and len(refs) > limit and (train.model_flavour == "edit-v1"
                                    or train.conditioning_multidataset_sampling == "combined"):
            why = ("edit-v1 takes exactly one reference image per sample" if train.model_flavour == "edit-v1" else
                   f"{train.model_flavour} takes at most {limit} references per sample and with "
                   "conditioning_multidataset_sampling 'combined' every reference dataset feeds every sample")
            problems.append(Problem(_where(data, d, "conditioning_data"),
                                    f"{len(refs)} reference datasets listed, but {why}; remove some"
                                    + ("" if train.model_flavour == "edit-v1" else
                                       " or set conditioning_multidataset_sampling to 'random'")))
        if d.conditioning_image_embeds is not None:
            referenced.add(d.conditioning_image_embeds)
            e = by_id.get(d.conditioning_image_embeds)
            if e is None or e.dataset_type != "conditioning_image_embeds":
                problems.append(Problem(
                    _where(data, d, "conditioning_image_embeds"),
                    f"cache not found: {d.conditioning_image_embeds!r} " + (
                        "names no dataset" if e is None else f"is a {e.dataset_type!r} dataset")
                    + "; add an entry with \"dataset_type\": \"conditioning_image_embeds\" and that id, or remove "
                    "the key to use the default cache/conditioning_image_embeds/<dataset id>"))
            elif train.model_flavour not in ("edit-v1", None):
                warnings.append(f"{_where(data, d, 'conditioning_image_embeds')}: only edit-v1 uses conditioning "
                                "image embeds; ignored for " + train.model_flavour)
    for d in data.datasets:
        if d.id is not None and d.dataset_type == "conditioning" and d.id not in referenced:
            warnings.append(f"{_where(data, d)}: conditioning dataset is not referenced by any image dataset's "
                            "conditioning_data; it is unused")
    owners: dict[str, str] = {}
    for d in data.datasets:
        if d.id is None or d.dataset_type not in ("image", "conditioning"):
            continue
        other = owners.setdefault(d.vae_cache_prefix, d.id)
        if other != d.id:
            problems.append(Problem(_where(data, d, "cache_dir_vae"),
                                    f"{d.vae_cache_prefix!r} is also the VAE cache of {other!r}; two datasets with "
                                    "the same file names would overwrite each other's latents: give each its own "
                                    "cache_dir_vae"))
    if train.model_flavour == "edit-v1":
        text_owner: dict[str, str] = {}
        for d in images:
            if d.conditioning_image_embeds is not None and d.conditioning_image_embeds not in by_id:
                continue  # reported above as "cache not found"
            other = text_owner.setdefault(data.text_cache_prefix(d, "edit-v1"), d.id)
            if other != d.id:
                problems.append(Problem(_where(data, d, "conditioning_image_embeds"),
                                        f"{d.conditioning_image_embeds!r} already holds the embeds of {other!r}; "
                                        "give each image dataset its own conditioning_image_embeds entry"))
    if train.lora_format == "diffusers" and train.lora_alpha is not None and train.lora_alpha != train.lora_rank:
        warnings.append(f"{cfg_label}: $.lora_format: lora_alpha {train.lora_alpha:g} != lora_rank {train.lora_rank}: "
                        "ComfyUI ignores the alpha stored in a diffusers-format file and would apply the LoRA at "
                        "the wrong strength; set lora_format to 'both' to also get a ComfyUI file")
    if train.eval_dataset_id is not None:
        e = by_id.get(train.eval_dataset_id)
        if e is None or e.dataset_type != "image":
            problems.append(Problem(f"{cfg_label}: $.eval_dataset_id",
                                    f"{train.eval_dataset_id!r} names no image dataset in {data.source}; image "
                                    "datasets: " + ", ".join(repr(x.id) for x in images)))
    return problems, warnings


def _locate_data_config(train_raw: dict[str, Any], config_path: Path | None) -> str | None:
    value = train_raw.get("data_backend_config") or train_raw.get("--data_backend_config")
    if not isinstance(value, str):
        return None
    p = Path(value)
    if p.is_absolute() or p.exists() or config_path is None:
        return value
    here = config_path.resolve().parent
    for base in (here, *here.parents):  # 'config/…' relative to a project root
        if (base / p).exists():
            return str(base / p)
    return value


def load_run_config(config: str | Path | None = None, data: str | Path | None = None,
                    overrides: list[str] | tuple[str, ...] = (), example: str | None = None) -> RunConfig:
    """Read, override and validate both files; raises one ConfigError listing every problem."""
    overrides = list(overrides)
    for o in overrides:
        parse_override(o)  # syntax first: a typo in an override is reported before any file is read
    examples = [o.partition("=")[2] for o in overrides if o.startswith("example=")]
    overrides = [o for o in overrides if not o.startswith("example=")]
    example = example or (examples[-1] if examples else None)
    if example is not None:
        pdir = preset_dir(example)
        config = config or pdir / "config.json"
        data = data or pdir / "multidatabackend.json"
    if config is None:
        raise ConfigError([Problem("--config", "give --config path/to/config.json (or example=NAME for a "
                                   "bundled preset: " + ", ".join(preset_names()) + ")")])
    config_path = Path(config)
    cfg_label = str(config_path)
    train_raw = jsonc.load(config_path)
    if isinstance(train_raw, dict):
        train_raw = apply_overrides(_strip_dashes(train_raw), overrides)
    problems: list[Problem] = []
    ignored: list[str] = []
    train = _parse_train(train_raw, cfg_label, problems, ignored)

    data_label = str(data) if data is not None else (
        _locate_data_config(train_raw, config_path) if isinstance(train_raw, dict) else None)
    if data_label is None:
        problems.append(Problem(f"{cfg_label}: $.data_backend_config", "no dataset file: pass --data "
                                "multidatabackend.json or set data_backend_config"))
        raise ConfigError(problems)
    try:
        data_raw = jsonc.load(data_label)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    return _finish(train, data_raw, cfg_label, data_label, problems, ignored)


def _finish(train: TrainConfig, data_raw: Any, cfg_label: str, data_label: str, problems: list[Problem],
            ignored: list[str]) -> RunConfig:
    dcfg = _parse_data(data_raw, data_label, problems, ignored)
    cross, warnings = _check_data(train, dcfg, cfg_label)
    problems.extend(cross)
    if problems:
        raise ConfigError(problems)
    if ignored:
        warnings.insert(0, "ignoring keys EditTuner does not use: " + ", ".join(ignored))
    if train.data_backend_config != data_label:
        train = dataclasses.replace(train, data_backend_config=data_label)
    return RunConfig(train=train, data=dcfg, config_source=cfg_label, warnings=tuple(warnings))


@dataclass(frozen=True)
class ConfigFiles:
    """A run's two files as text, as a client sends them to a service."""

    config_text: str
    data_text: str
    overrides: tuple[str, ...]
    config_name: str
    data_name: str


def read_config_files(config: str | Path | None = None, data: str | Path | None = None,
                      overrides: list[str] | tuple[str, ...] = ()) -> ConfigFiles:
    """Find and read the files as ``load_run_config`` would (presets, data_backend_config), validating them
    here first so that a client reports bad input before anything is sent."""
    run = load_run_config(config, data, overrides)
    rest = tuple(o for o in overrides if not o.startswith("example="))
    return ConfigFiles(Path(run.config_source).read_text(encoding="utf-8"),
                       Path(run.data.source).read_text(encoding="utf-8"), rest, run.config_source, run.data.source)


def load_run_config_text(config_text: str, data_text: str, overrides: list[str] | tuple[str, ...] = (), *,
                         config_name: str = "config.json", data_name: str = "multidatabackend.json") -> RunConfig:
    """The same as ``load_run_config`` for files that arrived as text (a gRPC request): the names are only
    used in messages, so a user still reads 'config.json:3:7' for their own file."""
    overrides = [o for o in overrides if not o.startswith("example=")]
    for o in overrides:
        parse_override(o)
    problems: list[Problem] = []
    ignored: list[str] = []
    train_raw: Any = None
    data_raw: Any = None
    for text, name in ((config_text, config_name), (data_text, data_name)):
        try:
            parsed = jsonc.loads(text, name)
        except ConfigError as e:
            problems.extend(e.problems)
            parsed = None
        if name == config_name:
            train_raw = parsed
        else:
            data_raw = parsed
    if problems:
        raise ConfigError(problems)
    if isinstance(train_raw, dict):
        train_raw = apply_overrides(_strip_dashes(train_raw), overrides)
    train = _parse_train(train_raw, config_name, problems, ignored)
    return _finish(train, data_raw, config_name, data_name, problems, ignored)
