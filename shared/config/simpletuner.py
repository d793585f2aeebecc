"""SimpleTuner's option names, and what EditTuner does with each: the one registry the config reader, ``check``
and docs/SIMPLETUNER.md's option table all read.

A key of ``config.json`` or of a ``multidatabackend.json`` entry is

- **honoured**: a field of ``shared.config.schema`` under that name or one of its aliases (SimpleTuner's current
  and older names), or
- **mapped**: rewritten into such fields (``ema_cpu_only: true`` → ``ema_device: cpu``), or
- **no effect**: read and dropped because it changes nothing here (``hub_model_id``, ``compress_disk_cache``) —
  listed in one warning; with ``neutral`` values, any other value is refused, since that value would change the
  result, or
- **refused**: a feature EditTuner does not have, set to a value that would use it — an error naming the key and
  what to do.

Every other SimpleTuner option (``simpletuner_options.json``: the names, types and defaults of SimpleTuner's own
parser, with the commit they come from) is treated as *no effect* at SimpleTuner's default value and refused at
any other. A key that is neither ours nor SimpleTuner's is reported as unknown, with the closest name.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from shared.errors import Problem

Mapping = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    kind: str  # "mapped", "no effect", "refused"
    note: str
    neutral: tuple[Any, ...] = ()  # "no effect" / "refused": values that change nothing (others are refused)
    apply: Mapping | None = None  # "mapped": value → EditTuner keys


def _flag(target: str, value: Any) -> Mapping:
    return lambda v: {target: value} if _truthy(v) else {}


NO_HUB = "EditTuner does not upload; push output_dir yourself (`huggingface-cli upload`)"
NO_LYCORIS = "EditTuner trains standard LoRA adapters (peft); LyCORIS is not built"
NO_REFLEXFLOW = "ReflexFlow is not built (scheduled_sampling_reflexflow: false or unset); rollout runs without it"

TRAIN_RULES: dict[str, Rule] = {
    # ------------------------------------------------------------------------------------------------ mapped
    "ema_cpu_only": Rule("mapped", "true → ema_device cpu", apply=_flag("ema_device", "cpu")),
    "adam_bfloat16": Rule(
        "mapped", "true → optimizer adamw_bf16 (SimpleTuner's old flag)", apply=_flag("optimizer", "adamw_bf16")
    ),
    "use_8bit_adam": Rule(
        "mapped", "true → optimizer bnb-adamw8bit (SimpleTuner's old flag)", apply=_flag("optimizer", "bnb-adamw8bit")
    ),
    "use_prodigy_optimizer": Rule(
        "mapped", "true → optimizer prodigy (SimpleTuner's old flag)", apply=_flag("optimizer", "prodigy")
    ),
    "ignore_final_epochs": Rule("no effect", "the run's steps are computed exactly from num_train_epochs"),
    # ------------------------------------------------------------------------------------------- no effect
    "hub_model_id": Rule("no effect", NO_HUB),
    "push_to_hub": Rule("refused", NO_HUB, neutral=(False,)),
    "push_checkpoints_to_hub": Rule("refused", NO_HUB, neutral=(False,)),
    "model_card_safe_for_work": Rule("no effect", "no model card is published"),
    "model_card_note": Rule("no effect", "no model card is published"),
    "disable_benchmark": Rule("no effect", "previews always show the base model beside the LoRA"),
    "compress_disk_cache": Rule("no effect", "caches are safetensors files in the store"),
    "disable_bucket_pruning": Rule("no effect", "buckets are never pruned: every sample trains"),
    "aspect_bucket_rounding": Rule("no effect", "buckets are computed from each image's own aspect (multiples of 32)"),
    "strict_epoch_limit": Rule("no effect", "the run's steps are computed exactly from num_train_epochs"),
    "skip_file_discovery": Rule("no effect", "datasets are scanned on every check; caches are reused by content"),
    "vae_cache_ondemand": Rule("no effect", "latents are encoded before training either way; same values"),
    "vae_cache_preprocess": Rule("no effect", "latents are encoded before training either way; same values"),
    "fuse_qkv_projections": Rule(
        "no effect", "a speed option (needs flash-attn); the projections stay unfused, same result"
    ),
    "fused_qkv_projections": Rule(
        "no effect", "a speed option (needs flash-attn); the projections stay unfused, same result"
    ),
    "validation_prompt": Rule(
        "no effect",
        "edit previews use each preview sample's own instruction and references (num_eval_images, eval_dataset_id)",
    ),
    "validation_prompt_library": Rule(
        "refused", "previews use the samples' own instructions and references", neutral=(False, None, "")
    ),
    "user_prompt_library": Rule(
        "refused", "previews use the samples' own instructions and references", neutral=(None, "")
    ),
    "validation_lycoris_strength": Rule("no effect", NO_LYCORIS),
    "lora_type": Rule("refused", NO_LYCORIS, neutral=("standard",)),
    "lycoris_config": Rule("no effect", NO_LYCORIS),
    "base_model_default_dtype": Rule(
        "refused", "unquantized base weights are held in the compute dtype", neutral=("bf16",)
    ),
    "gradient_checkpointing_interval": Rule(
        "refused", "gradient_checkpointing checkpoints every block", neutral=(None, 1, 0)
    ),
    "data_backend_sampling": Rule(
        "refused", "image datasets are sampled in proportion to their samples", neutral=("auto-weighting",)
    ),
    "num_validation_images": Rule("refused", "one preview per sample and step", neutral=(1,)),
    "validation_disable": Rule(
        "mapped",
        "true → no previews (validation_step_interval past the run's end)",
        apply=_flag("validation_step_interval", 10**9),
    ),
    "validation_torch_compile": Rule("no effect", "the preview pipeline runs eagerly; same images"),
    "disable_tf32": Rule(
        "refused",
        "CUDA runs compute the fp32 LoRA matmuls in TF32 (their bf16 inputs carry no more precision than TF32 keeps)",
        neutral=(False,),
    ),
    "allow_tf32": Rule("no effect", "CUDA runs compute the fp32 LoRA matmuls in TF32 already"),
    "dataloader_prefetch": Rule("no effect", "the loader always prefetches"),
    "dataloader_prefetch_qlen": Rule("no effect", "the loader always prefetches"),
    "aws_config": Rule("no effect", "S3 datasets carry their own aws_* keys in multidatabackend.json"),
    "webhook_config": Rule(
        "refused", "progress goes to the gRPC Watch stream and Prometheus; no webhooks", neutral=(None, "")
    ),
    "tracker_image_layout": Rule("no effect", "previews are logged as one grid per sample"),
    "checkpoint_epoch_interval": Rule(
        "refused", "checkpoints are taken by step: use checkpoint_step_interval", neutral=(None, 0)
    ),
    "validation_epoch_interval": Rule(
        "refused", "previews are taken by step: use validation_step_interval", neutral=(None, 0)
    ),
    "checkpointing_rolling_steps": Rule(
        "refused", "use checkpoint_step_interval with checkpoints_total_limit", neutral=(None, 0)
    ),
    "checkpoints_rolling_total_limit": Rule("no effect", "only with checkpointing_rolling_steps"),
    "scheduled_sampling_reflexflow_alpha": Rule("refused", NO_REFLEXFLOW, neutral=(1.0,)),
    "scheduled_sampling_reflexflow_beta1": Rule("refused", NO_REFLEXFLOW, neutral=(10.0,)),
    "scheduled_sampling_reflexflow_beta2": Rule("refused", NO_REFLEXFLOW, neutral=(1.0,)),
}

_DATA_TYPES = {"local", "aws", "store"}

DATASET_RULES: dict[str, Rule] = {
    "metadata_backend": Rule("refused", "image sizes are read from the files themselves", neutral=("discovery", None)),
    "vae_cache_clear_each_epoch": Rule("no effect", "latents are encoded once; a random crop is drawn once per image"),
    "write_batch_size": Rule("no effect", "a write-speed option; same caches"),
    "text_encoder_batch_size": Rule("no effect", "a speed option; same embeddings"),
    "hash_filenames": Rule("no effect", "cache keys are content hashes"),
    "skip_file_discovery": Rule("no effect", "datasets are scanned on every check; caches are reused by content"),
    "preserve_data_backend_cache": Rule("no effect", "caches are reused by content"),
    "cache_file_suffix": Rule("no effect", "cache keys are content hashes"),
    "vae_cache_ondemand": Rule("no effect", "latents are encoded before training either way; same values"),
    "text_cache_ondemand": Rule("no effect", "embeddings are encoded before training either way; same values"),
    "probability": Rule(
        "refused",
        "image datasets are sampled in proportion to their samples; set repeats to weight a dataset",
        neutral=(1, 1.0, None, ""),
    ),
    "is_regularisation_data": Rule(
        "refused", "regularisation (prior preservation) data is not built", neutral=(False, None)
    ),
    "is_regularization_data": Rule(
        "refused", "regularisation (prior preservation) data is not built", neutral=(False, None)
    ),
    "conditioning": Rule(
        "refused",
        "SimpleTuner's generated conditioning pairs (superresolution, jpeg_artifacts, "
        "…) are not built: generate the reference images into a folder and add it as a "
        "conditioning dataset",
        neutral=(None, []),
    ),
    "max_num_samples": Rule(
        "refused", "every sample trains; move the ones to leave out to another folder", neutral=(None, 0)
    ),
    "start_epoch": Rule("refused", "every dataset trains from the first step", neutral=(None, 0, 1)),
    "start_step": Rule("refused", "every dataset trains from the first step", neutral=(None, 0)),
    "end_epoch": Rule("refused", "every dataset trains to the last step", neutral=(None, 0)),
    "end_step": Rule("refused", "every dataset trains to the last step", neutral=(None, 0)),
    "caption_filter_list": Rule("refused", "captions are used as written", neutral=(None, "")),
    "prepend_instance_prompt": Rule("refused", "captions are used as written", neutral=(False, None)),
    "only_instance_prompt": Rule("refused", "use caption_strategy instanceprompt", neutral=(False, None)),
    "disable_validation": Rule("no effect", "previews come from num_eval_images / eval_dataset_id"),
    "aspect_bucket_alignment": Rule("no effect", "buckets are multiples of 32"),
    "vae_cache_disable": Rule("refused", "training reads cached latents", neutral=(False, None)),
    "dataset_name": Rule("no effect", "only with type huggingface, which is refused"),
    "huggingface": Rule("no effect", "only with type huggingface, which is refused"),
}

VALUE_ALIASES = {  # SimpleTuner's other spellings of a value
    ("lr_scheduler", "cosine_with_warmup"): "cosine",
    ("caption_strategy", "instance_prompt"): "instanceprompt",
    ("crop_style", "centre"): "center",
    ("optimizer", "adamw8bit"): "bnb-adamw8bit",
}

ST_VALUE_NOTES = {  # values of honoured keys that SimpleTuner has and EditTuner refuses, with what to do
    ("type", "huggingface"): "Hugging Face datasets need the Hub; download the dataset into a folder and use type "
    "local (or `edittuner data push` it)",
    ("type", "csv"): "CSV datasets are not built; put the images and .txt captions in a folder (type local)",
    ("type", "webshart"): "webshart datasets are not built; use a folder (type local) or an S3 prefix (type aws)",
    ("crop_style", "face"): "face crops need a face detector, which is not built; use center, corner or random",
    ("dataset_type", "image_embeds"): "VAE latents go to each dataset's cache_dir_vae; remove this entry and set "
    "cache_dir_vae on the image dataset",
    ("conditioning_type", "segmentation"): "segmentation conditioning is not built; edit pairs are reference_strict "
    "or reference_loose",
    ("conditioning_type", "controlnet"): "ControlNet training is not built; edit pairs are reference_strict or "
    "reference_loose",
    ("model_flavour", "v1.0"): "v1.0 is the text-to-image Qwen-Image; EditTuner trains the edit models: edit-v1, "
    "edit-v2, edit-v3 or v2.1 (Qwen-Image-2.1, which also trains text-to-image)",
    ("model_flavour", "v2.0"): "v2.0 is the text-to-image Qwen-Image-2512; EditTuner trains the edit models: "
    "edit-v1, edit-v2, edit-v3 or v2.1 (Qwen-Image-2.1, which also trains text-to-image)",
    ("model_flavour", "edit-v2+"): "edit-v2+ (Qwen-Image-Edit-2509 with zero_cond_t) is not built; use edit-v2 "
    "(2509 as its pipeline runs it) or edit-v3 (2511)",
    ("caption_strategy", "parquet"): "parquet captions are not built; write the captions as .txt files beside "
    "the images (caption_strategy textfile)",
}


@functools.cache
def simpletuner_options() -> tuple[str, dict[str, tuple[str, Any, tuple[str, ...]]]]:
    """(source, name → (type, default, aliases)) of every option of SimpleTuner's parser."""
    raw = json.loads((resources.files("shared.config") / "simpletuner_options.json").read_text(encoding="utf-8"))
    return raw["source"], {k: (t, d, tuple(a)) for k, (t, d, a) in raw["options"].items()}


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(v)


def same_value(a: Any, b: Any) -> bool:
    """Equal as SimpleTuner would read them: 'false' == False == 0 == None for flags, '1e-4' == 0.0001."""
    if a == b:
        return True
    norm: list[object] = []
    for v in (a, b):
        if isinstance(v, str):
            t = v.strip().lower()
            if t in ("", "none", "null"):
                v = None
            elif t in ("true", "yes", "on"):
                v = True
            elif t in ("false", "no", "off"):
                v = False
            else:
                try:
                    v = float(t)
                except ValueError:
                    v = t
        norm.append(v)
    x, y = norm
    if x is None or y is None:
        return x is y or x in (False, 0, "", []) or y in (False, 0, "", [])
    if isinstance(x, (bool, int, float)) and isinstance(y, (bool, int, float)):
        return float(x) == float(y)
    return x == y


@dataclass
class Translated:
    """A raw JSON object with SimpleTuner's keys turned into EditTuner's, and what was dropped or refused."""

    raw: dict[str, Any]
    ignored: list[str] = dataclasses.field(default_factory=list)  # "where.key (why)"
    unknown: list[str] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)


def translate(
    raw: dict[str, Any], where: str, fields: set[str], rules: dict[str, Rule], *, simpletuner_level: bool
) -> Translated:
    """Sort each key of ``raw`` by the registry. ``fields``: EditTuner's names and aliases at this level;
    ``simpletuner_level``: whether SimpleTuner's parser options apply here (config.json, not dataset entries)."""
    out = Translated({})
    st_options = simpletuner_options()[1] if simpletuner_level else {}
    mapped: dict[str, Any] = {}
    for key, value in raw.items():
        if key in fields:
            out.raw[key] = value
            continue
        rule = rules.get(key)
        if rule is not None:
            if rule.kind == "mapped":
                mapped.update(rule.apply(value) if rule.apply else {})
            elif (rule.kind == "refused" and not rule.neutral) or (
                rule.neutral and not any(same_value(value, n) for n in rule.neutral)
            ):
                shown = ", ".join("null" if n is None else json.dumps(n) for n in rule.neutral)
                out.problems.append(
                    Problem(
                        f"{where}.{key}",
                        f"{json.dumps(value)[:60]} is not supported: "
                        f"{rule.note} (" + (f"accepted: {shown}, or " if shown else "") + "remove the key)",
                    )
                )
            else:
                out.ignored.append(f"{where}.{key}" + (f" ({rule.note})" if rule.note else ""))
            continue
        st = st_options.get(key)
        if st is not None:
            kind, default, _ = st
            if same_value(value, default):
                out.ignored.append(f"{where}.{key} (SimpleTuner's default; not an EditTuner option)")
            else:
                out.problems.append(
                    Problem(
                        f"{where}.{key}",
                        (
                            f"{json.dumps(value)[:60]} would change a SimpleTuner run, but EditTuner does not "
                            f"implement {key}; remove it (or set it to SimpleTuner's default, "
                            f"{'null' if default is None else json.dumps(default)}) — docs/SIMPLETUNER.md's option "
                            "table lists what is supported"
                        ),
                    )
                )
            continue
        hint = difflib.get_close_matches(key, sorted(fields), n=1)
        out.unknown.append(f"{where}.{key}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    for key, value in mapped.items():
        out.raw.setdefault(key, value)
    return out


def value_alias(key: str, value: Any) -> Any:
    return VALUE_ALIASES.get((key, value), value) if isinstance(value, str) else value


def value_problem(key: str, value: Any) -> str | None:
    """A SimpleTuner value of an honoured key that EditTuner refuses, with what to do (None: not such a value)."""
    if not isinstance(value, str):
        return None
    if key == "model_family" and value.strip().lower() != "qwen_image":
        return (
            "EditTuner trains Qwen-Image-Edit LoRAs: set model_family to qwen_image and model_flavour to edit-v1, "
            "edit-v2 or edit-v3 (the dataset pairing is the same as for other edit families)"
        )
    if key == "model_type" and value.strip().lower() == "full":
        return "EditTuner trains LoRA adapters only: set model_type to lora"
    return ST_VALUE_NOTES.get((key, value.strip().lower()))


# ------------------------------------------------------------------------------ the docs/SIMPLETUNER.md table
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"`{json.dumps(v) if not isinstance(v, str) else v}`" if v != "" else '`""`'


def _rows(cls: type, rules: dict[str, Rule], st: dict[str, tuple[str, Any, tuple[str, ...]]]) -> list[str]:
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "model_kwargs":
            continue
        names = " / ".join(f"`{n}`" for n in (f.name, *f.metadata.get("aliases", ())))
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        ours = (
            "required"
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            else _fmt(default)
        )
        theirs = _fmt(st[f.name][1]) if f.name in st else "(EditTuner's)"
        rows.append(f"| {names} | honoured | {ours} | {theirs} | {f.metadata.get('doc', '')} |")
    for name, rule in sorted(rules.items()):
        kind = rule.kind
        if rule.neutral and kind != "mapped":
            kind = "refused unless " + " or ".join(_fmt(n) for n in rule.neutral)
        theirs = _fmt(st[name][1]) if name in st else "–"
        rows.append(f"| `{name}` | {kind} | – | {theirs} | {rule.note} |")
    return rows


def option_table_markdown() -> str:
    """docs/SIMPLETUNER.md's table of config.json and multidatabackend.json keys, from the registry above."""
    source, st = simpletuner_options()
    from shared.config.schema import DatasetConfig, TrainConfig

    head = "| key | here | EditTuner default | SimpleTuner default | notes |\n|---|---|---|---|---|"
    covered = {n for f in dataclasses.fields(TrainConfig) for n in (f.name, *f.metadata.get("aliases", ()))}
    covered |= set(TRAIN_RULES)
    rest = len([n for n in st if n not in covered])
    return "\n".join(
        [
            "**config.json**",
            "",
            head,
            *_rows(TrainConfig, TRAIN_RULES, st),
            "",
            f"Every other SimpleTuner option ({rest} of the {len(st)} in its parser, {source.split(':')[0]}) changes "
            "nothing at SimpleTuner's default value (reported as such) and is refused at any other value.",
            "",
            "**multidatabackend.json entries**",
            "",
            head.replace("SimpleTuner default", "SimpleTuner"),
            *_rows(DatasetConfig, DATASET_RULES, {}),
            "",
            "Values SimpleTuner has and EditTuner refuses, with what to do instead: "
            + "; ".join(f"`{k}: {v}` ({note})" for (k, v), note in sorted(ST_VALUE_NOTES.items()))
            + ".",
        ]
    )


if __name__ == "__main__":
    print(option_table_markdown())
