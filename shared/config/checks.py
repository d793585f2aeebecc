"""Checks across the entries of ``multidatabackend.json`` and the training config: ids, references, flavour
limits, the paths a dataset needs, caches two datasets would share. Problems are collected, never raised one by one.
"""

from __future__ import annotations

from shared.config.flavours import FLAVOURS
from shared.config.schema import DataConfig, DatasetConfig, TrainConfig
from shared.config.validation_adapters import adapter_runs
from shared.errors import InvalidInput, Problem


def _where(data: DataConfig, d: DatasetConfig, key: str = "") -> str:
    i = data.datasets.index(d)
    return f"{data.source}: $[{i}]{'.' + key if key else ''} (id {d.id!r})"


def _refused(value: object) -> bool:
    """Whether ``build`` refused a required field's value: it leaves the field None, whatever its type says, so
    that the checks across entries still run (they skip it; its problem is reported already)."""
    return value is None


def check_datasets(train: TrainConfig, data: DataConfig, cfg_label: str) -> tuple[list[Problem], list[str]]:
    """Cross-entry checks: ids, references, flavour limits, paths a dataset needs."""
    problems: list[Problem] = []
    warnings: list[str] = []
    ids = [d.id for d in data.datasets if d.id is not None]
    by_id = {d.id: d for d in data.datasets}
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(
            Problem(f"{data.source}: id {dup!r}", "the same id is used by several datasets; ids must be unique")
        )
    images = data.image_datasets
    if not images:
        problems.append(
            Problem(data.source, "no dataset with dataset_type 'image' (the edited/target images); add one")
        )
    referenced: set[str] = set()
    flav = FLAVOURS.get(train.model_flavour) if train.model_flavour else None  # None: reported by the schema
    limit = flav.max_refs if flav is not None else 3
    one_reference = flav is not None and not flav.multi_reference  # edit-v1's pipeline takes one image
    for d in data.datasets:
        if _refused(d.id):
            continue
        if d.dataset_type in ("image", "conditioning"):
            if d.type == "local" and not d.instance_data_dir:
                problems.append(
                    Problem(
                        _where(data, d, "instance_data_dir"),
                        "is required for a local dataset: the folder holding its images",
                    )
                )
            if d.type == "aws" and not d.aws_bucket_name:
                problems.append(Problem(_where(data, d, "aws_bucket_name"), "is required for type 'aws'"))
            if d.type == "store" and not d.store_upload:
                problems.append(
                    Problem(
                        _where(data, d, "store_upload"),
                        "is required for type 'store': the upload name `edittuner data push` printed",
                    )
                )
        problems.extend(_size_rules(data, d))
        if d.dataset_type == "conditioning" and d.conditioning_type == "reference_loose" and d.crop:
            warnings.append(
                f"{_where(data, d, 'crop')}: reference_loose images are not cropped: each is fed whole, "
                "at ~reference_area of its own aspect, as the pipelines feed references"
            )
        if d.dataset_type == "image" and d.caption_strategy is None:
            problems.append(
                Problem(
                    _where(data, d, "caption_strategy"),
                    "is null, but the edit images need their "
                    "instructions: use textfile, filename or instanceprompt (null is for reference "
                    "datasets)",
                )
            )
        if (
            d.dataset_type == "conditioning"
            and d.caption_strategy not in (None, "filename")
            and train.conditioning_multidataset_sampling == "random"
        ):
            problems.append(
                Problem(
                    _where(data, d, "caption_strategy"),
                    (
                        f"{d.caption_strategy!r}: SimpleTuner would train on this reference dataset's captions "
                        "instead of the edit instructions (random conditioning sampling); EditTuner always trains on "
                        "the image dataset's captions. Set it to null, or move the captions to the image dataset"
                    ),
                )
            )
        if d.caption_strategy == "instanceprompt" and not d.instance_prompt:
            problems.append(
                Problem(_where(data, d, "instance_prompt"), "is required with caption_strategy 'instanceprompt'")
            )
        if d.dataset_type != "image":
            continue
        refs = d.conditioning_data
        for j, rid in enumerate(refs):
            referenced.add(rid)
            r = by_id.get(rid)
            if r is None:
                problems.append(
                    Problem(
                        _where(data, d, f"conditioning_data[{j}]"),
                        f"names no dataset: {rid!r}; ids are " + ", ".join(map(repr, ids)),
                    )
                )
            elif r.dataset_type != "conditioning":
                problems.append(
                    Problem(
                        _where(data, d, f"conditioning_data[{j}]"),
                        f"{rid!r} has dataset_type {r.dataset_type!r}; reference datasets need "
                        '"dataset_type": "conditioning"',
                    )
                )
        masks = [r for r in refs if r in by_id and by_id[r].conditioning_type == "mask"]
        if len(masks) > 1:
            problems.append(
                Problem(
                    _where(data, d, "conditioning_data"),
                    f"{len(masks)} loss-mask datasets listed ({', '.join(map(repr, masks))}); masked loss takes one",
                )
            )
        refs = [r for r in refs if r not in masks]
        if not refs and not (flav is not None and flav.text_to_image):
            problems.append(
                Problem(
                    _where(data, d, "conditioning_data"),
                    f"{train.model_flavour} trains on pairs: list the reference dataset id(s) here",
                )
            )
        elif (
            train.model_flavour
            and len(refs) > limit
            and (one_reference or train.conditioning_multidataset_sampling == "combined")
        ):
            why = (
                f"{train.model_flavour} takes exactly one reference image per sample"
                if one_reference
                else f"{train.model_flavour} takes at most {limit} references per sample and with "
                "conditioning_multidataset_sampling 'combined' every reference dataset feeds every sample"
            )
            problems.append(
                Problem(
                    _where(data, d, "conditioning_data"),
                    f"{len(refs)} reference datasets listed, but {why}; remove some"
                    + ("" if one_reference else " or set conditioning_multidataset_sampling to 'random'"),
                )
            )
        if d.conditioning_image_embeds is not None:
            referenced.add(d.conditioning_image_embeds)
            e = by_id.get(d.conditioning_image_embeds)
            if e is None or e.dataset_type != "conditioning_image_embeds":
                problems.append(
                    Problem(
                        _where(data, d, "conditioning_image_embeds"),
                        f"cache not found: {d.conditioning_image_embeds!r} "
                        + ("names no dataset" if e is None else f"is a {e.dataset_type!r} dataset")
                        + '; add an entry with "dataset_type": "conditioning_image_embeds" and that id, or remove '
                        "the key to use the default cache/conditioning_image_embeds/<dataset id>",
                    )
                )
            elif flav is not None and not flav.caption_embeds_in_conditioning_cache:
                users = ", ".join(n for n, f in FLAVOURS.items() if f.caption_embeds_in_conditioning_cache)
                warnings.append(
                    f"{_where(data, d, 'conditioning_image_embeds')}: only {users} uses conditioning "
                    "image embeds; ignored for " + flav.name
                )
    for d in data.datasets:
        if d.id is not None and d.dataset_type == "conditioning" and d.id not in referenced:
            warnings.append(
                f"{_where(data, d)}: conditioning dataset is not referenced by any image dataset's "
                "conditioning_data; it is unused"
            )
    problems.extend(_text_embeds(data))
    owners: dict[str, str] = {}
    for d in data.datasets:
        if d.id is None or d.dataset_type not in ("image", "conditioning"):
            continue
        other = owners.setdefault(d.vae_cache_prefix, d.id)
        if other != d.id:
            problems.append(
                Problem(
                    _where(data, d, "cache_dir_vae"),
                    f"{d.vae_cache_prefix!r} is also the VAE cache of {other!r}; two datasets with "
                    "the same file names would overwrite each other's latents: give each its own "
                    "cache_dir_vae",
                )
            )
    if flav is not None and flav.caption_embeds_in_conditioning_cache:
        text_owner: dict[str, str] = {}
        for d in images:
            if d.conditioning_image_embeds is not None and d.conditioning_image_embeds not in by_id:
                continue  # reported above as "cache not found"
            other = text_owner.setdefault(data.text_cache_prefix(d, flav.name), d.id)
            if other != d.id:
                problems.append(
                    Problem(
                        _where(data, d, "conditioning_image_embeds"),
                        f"{d.conditioning_image_embeds!r} already holds the embeds of {other!r}; "
                        "give each image dataset its own conditioning_image_embeds entry",
                    )
                )
    try:
        adapter_runs(train)  # the files are read where the renders run (a server's, under its model folders)
    except InvalidInput as err:
        problems.append(Problem(f"{cfg_label}: $.validation_adapter_config", str(err)))
    if flav is not None and flav.joint_sequence:
        kwargs = train.model_kwargs
        for key, on in (
            ("vl_reference_area", kwargs.vl_reference_area is not None),
            ("match_target_res", kwargs.match_target_res),
        ):
            if on:
                warnings.append(
                    f"{cfg_label}: $.model_kwargs.{key}: ignored for {flav.name}, whose pipeline puts every reference "
                    "at the output area of its own aspect (model_kwargs.reference_area) and shows the vision encoder "
                    "the image the VAE encodes"
                )
    if train.lora_format == "diffusers" and train.lora_alpha is not None and train.lora_alpha != train.lora_rank:
        warnings.append(
            f"{cfg_label}: $.lora_format: lora_alpha {train.lora_alpha:g} != lora_rank {train.lora_rank}: "
            "ComfyUI ignores the alpha stored in a diffusers-format file and would apply the LoRA at "
            "the wrong strength; set lora_format to 'both' to also get a ComfyUI file"
        )
    if train.eval_dataset_id is not None:
        e = by_id.get(train.eval_dataset_id)
        if e is None or e.dataset_type != "image":
            problems.append(
                Problem(
                    f"{cfg_label}: $.eval_dataset_id",
                    f"{train.eval_dataset_id!r} names no image dataset in {data.source}; image "
                    "datasets: " + ", ".join(repr(x.id) for x in images),
                )
            )
    return problems, warnings


def _size_rules(data: DataConfig, d: DatasetConfig) -> list[Problem]:
    out = []
    if (d.maximum_image_size is None) != (d.target_downsample_size is None) and d.dataset_type == "image":
        given = "maximum_image_size" if d.maximum_image_size is not None else "target_downsample_size"
        out.append(
            Problem(
                _where(data, d, given),
                "maximum_image_size and target_downsample_size go together (images "
                "larger than the first are downsampled to the second): set both, or neither",
            )
        )
    if d.crop and d.crop_aspect in ("closest", "random") and not d.crop_aspect_buckets:
        out.append(
            Problem(
                _where(data, d, "crop_aspect_buckets"),
                f"is required with crop_aspect {d.crop_aspect!r}: a list of width/height ratios like [0.75, 1.0, 1.33]",
            )
        )
    for i, b in enumerate(d.crop_aspect_buckets):
        aspect = b.get("aspect_bucket") if isinstance(b, dict) else b
        weight = b.get("weight", 1.0) if isinstance(b, dict) else 1.0
        if (
            isinstance(aspect, bool)
            or not isinstance(aspect, (int, float))
            or aspect <= 0
            or isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or weight < 0
        ):
            out.append(
                Problem(
                    _where(data, d, f"crop_aspect_buckets[{i}]"),
                    f'{b!r}: expected a positive width/height ratio, or {{"aspect_bucket": ratio, "weight": w}}',
                )
            )
    if d.resolution_type == "area":
        for key in ("minimum_image_size", "maximum_image_size", "target_downsample_size"):
            v = getattr(d, key)
            if v is not None and v > 20:
                out.append(
                    Problem(
                        _where(data, d, key),
                        f"{v:g} megapixels (resolution_type 'area' counts in "
                        "megapixels); did you mean resolution_type 'pixel_area', where sizes are in "
                        "pixels?",
                    )
                )
    return out


def _text_embeds(data: DataConfig) -> list[Problem]:
    """SimpleTuner's text_embeds entries: at most one ``default``; an image dataset's ``text_embeds`` names one."""
    out = []
    entries = [d for d in data.datasets if d.dataset_type == "text_embeds"]
    defaults = [d for d in entries if d.default]
    if len(defaults) > 1:
        out.append(
            Problem(
                _where(data, defaults[1], "default"),
                "only one text_embeds entry can be the default; other ids: " + ", ".join(repr(d.id) for d in defaults),
            )
        )
    by_id = {d.id: d for d in entries}
    for d in data.image_datasets:
        if d.text_embeds is not None and d.text_embeds not in by_id:
            out.append(
                Problem(
                    _where(data, d, "text_embeds"),
                    f"{d.text_embeds!r} names no text_embeds entry"
                    + ("; text_embeds entries: " + ", ".join(map(repr, by_id)) if by_id else ""),
                )
            )
    return out


def check_schedule(train: TrainConfig, cfg_label: str) -> list[Problem]:
    """The lr schedule's own rules, before any model loads (schedule-free optimizers keep the lr constant)."""
    from shared.config.optimizers import OPTIMIZERS

    spec = OPTIMIZERS.get(train.optimizer)
    if spec is None or spec.schedule_free:
        return []
    if train.lr_scheduler == "sine" and train.lr_warmup_steps <= 0:
        return [
            Problem(
                f"{cfg_label}: $.lr_warmup_steps",
                "lr_scheduler sine takes its period from lr_warmup_steps (SimpleTuner's rule): set lr_warmup_steps > 0",
            )
        ]
    if train.lr_scheduler == "polynomial" and train.lr_end > train.learning_rate:
        return [
            Problem(
                f"{cfg_label}: $.lr_end",
                f"{train.lr_end:g} exceeds learning_rate "
                f"({train.learning_rate:g}): the polynomial schedule decays from learning_rate to lr_end",
            )
        ]
    return []


def check_rollout(train: TrainConfig, cfg_label: str) -> list[str]:
    """Scheduled sampling's warnings (its values are checked field by field): a setting that rolls nothing out,
    and SimpleTuner's ReflexFlow default, which EditTuner does not have."""
    if train.scheduled_sampling_max_step_offset <= 0:
        return []
    out = []
    ramp = train.scheduled_sampling_ramp_steps > 0
    if (
        max(
            (train.scheduled_sampling_prob_start, train.scheduled_sampling_prob_end)
            if ramp
            else (train.scheduled_sampling_probability,)
        )
        <= 0
    ):
        key = "scheduled_sampling_prob_end" if ramp else "scheduled_sampling_probability"
        out.append(
            f"{cfg_label}: $.{key}: is 0, so no sample is rolled out (SimpleTuner's default); set it "
            "above 0 to use scheduled_sampling_max_step_offset"
        )
    if train.scheduled_sampling_reflexflow is None:
        out.append(
            f"{cfg_label}: $.scheduled_sampling_reflexflow: unset; SimpleTuner turns ReflexFlow on for "
            "flow-matching rollouts, EditTuner does not have it and rolls out without it (set it to false "
            "to say so)"
        )
    return out


def check_processes(train: TrainConfig, cfg_label: str) -> list[Problem]:
    """num_processes / num_machines: what torchrun needs to start, and a global batch that splits over them."""
    out = []
    if train.machine_rank >= train.num_machines:
        out.append(
            Problem(
                f"{cfg_label}: $.machine_rank",
                f"{train.machine_rank} with num_machines "
                f"{train.num_machines}: machines are numbered 0 to {train.num_machines - 1}",
            )
        )
    if train.num_machines > 1 and not train.main_process_ip:
        out.append(
            Problem(
                f"{cfg_label}: $.main_process_ip",
                "is required with num_machines > 1: the address "
                "of machine 0, where the others meet (its main_process_port must be reachable)",
            )
        )
    if train.num_processes != "auto":  # auto: the trainer checks once it knows how many GPUs it sees
        problem = accumulation_split_problem(
            train.gradient_accumulation_steps, int(train.num_processes) * train.num_machines
        )
        if problem:
            out.append(Problem(f"{cfg_label}: $.gradient_accumulation_steps", problem))
    return out


def accumulation_split_problem(accumulation: int, world: int) -> str | None:
    """Why ``accumulation`` micro-batches per step cannot be shared by ``world`` processes (None: they can)."""
    if accumulation % world == 0:
        return None
    ok = -(-accumulation // world) * world
    return (
        f"{accumulation} does not split over {world} processes (each computes an equal share of a step's "
        f"micro-batches, so the global batch does not change with the number of processes): use {ok}, or a "
        "number of processes that divides it"
    )
