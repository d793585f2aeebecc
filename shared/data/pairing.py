"""Paired datasets: discover images, read captions, pair targets with references, place them in buckets.

A sample is one edit: a target image (the ``image`` dataset), its caption (the edit instruction) and one
reference per conditioning dataset, paired by relative path and file stem ("they share the same file names";
the extension may differ). Everything that would make training fail later — a reference missing for a target,
an empty folder, an unreadable image, a missing caption file — is found here, before any encoding, and reported
all at once with the dataset and file names.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from PIL import Image

from shared.config.flavours import get_flavour
from shared.config.schema import DataConfig, DatasetConfig, RunConfig, TrainConfig
from shared.data.geometry import (
    Placement,
    aspect_mismatch,
    bucket_for_area,
    bucket_for_short_side,
    cover_crop,
    pipeline_size,
    strict_reference,
    strict_reference_at_area,
    whole_image,
)
from shared.data.sources import IMAGE_EXTENSIONS, ImageSource, open_image, open_source
from shared.errors import DatasetError, InvalidInput, Problem

if TYPE_CHECKING:
    from shared.store.base import ObjectStore

MAX_LISTED = 10  # files named per problem before "... and N more"


# ------------------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class ImageRecord:
    dataset_id: str
    relpath: str
    size: tuple[int, int]
    sha256: str  # of the file's bytes, taken while scanning: cache keys need it, and S3 sources cost a read

    @property
    def key(self) -> str:
        return str(PurePosixPath(self.relpath).with_suffix(""))


@dataclass(frozen=True)
class Reference:
    dataset_id: str
    image: ImageRecord
    placement: Placement


@dataclass(frozen=True)
class Sample:
    dataset_id: str
    key: str
    target: ImageRecord
    caption: str
    placement: Placement
    references: tuple[Reference, ...]
    mask: Reference | None = None  # the loss mask (conditioning_type mask), placed exactly as the target

    @property
    def bucket(self) -> tuple[int, int]:
        return self.placement.size


@dataclass
class PairedDataset:
    config: DatasetConfig
    role: str  # "train" or "eval"
    samples: list[Sample]
    sources: dict[str, ImageSource]
    skipped: list[str] = field(default_factory=list)
    filtered: list[tuple[str, str]] = field(default_factory=list)  # (file, why): left out by a size rule

    def buckets(self) -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for s in self.samples:
            out[s.bucket] = out.get(s.bucket, 0) + 1
        return dict(sorted(out.items()))


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


# -------------------------------------------------------------------------------------------------- scan
@dataclass
class _Scan:
    records: dict[str, ImageRecord]
    files: set[str]
    bad: dict[str, str]  # key -> message


def _scan(ds: DatasetConfig, src: ImageSource, where: str, max_pixels: int, problems: list[Problem]) -> _Scan:
    files = set(src.list_files())
    by_key: dict[str, list[str]] = {}
    for rel in sorted(files):
        if PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS and not PurePosixPath(rel).name.startswith("."):
            by_key.setdefault(str(PurePosixPath(rel).with_suffix("")), []).append(rel)
    records: dict[str, ImageRecord] = {}
    bad: dict[str, str] = {}
    for key, rels in by_key.items():
        if len(rels) > 1:
            problems.append(
                Problem(
                    where, f"{', '.join(rels)} share the stem {key!r}; pairing is by name, so keep only one of them"
                )
            )
            continue
        data = src.read(rels[0])
        try:
            # a full decode: truncated files are found now, before any encoding, not half-way through a run
            size = open_image(data, f"{src.label}/{rels[0]}", max_pixels).size
        except InvalidInput as e:
            bad[key] = str(e)
            continue
        records[key] = ImageRecord(ds.id, rels[0], size, hashlib.sha256(data).hexdigest())
    if not records and not bad:
        problems.append(
            Problem(where, f"{src.label} contains no images ({', '.join(IMAGE_EXTENSIONS)}); check instance_data_dir")
        )
    return _Scan(records, files, bad)


def read_caption(ds: DatasetConfig, src: ImageSource, rec: ImageRecord, files: set[str]) -> str | None:
    """The caption per caption_strategy; None when a textfile caption is missing."""
    if ds.caption_strategy == "instanceprompt":
        return ds.instance_prompt or ""
    if ds.caption_strategy == "filename":
        return PurePosixPath(rec.relpath).stem.replace("_", " ").strip()
    txt = rec.key + ".txt"
    if txt not in files:
        return None
    return src.read(txt).decode("utf-8", errors="replace").strip()


# ------------------------------------------------------------------------------------------------ placement
def _unit_area(ds: DatasetConfig, value: float) -> float:
    """A size option in the dataset's unit as a pixel area: pixel and pixel_area count an edge, area megapixels."""
    return value * 1_000_000 if ds.resolution_type == "area" else value * value


def _rng(ds: DatasetConfig, key: str) -> random.Random:
    """Random crops are drawn once per image, from its dataset and name: the latents are cached, so the same
    crop trains every epoch (and a re-encode draws it again)."""
    return random.Random(hashlib.sha256(f"{ds.id}/{key}".encode()).digest())


def _bucket(ds: DatasetConfig, aspect: float) -> tuple[int, int]:
    if ds.resolution_type == "pixel":
        short = int(ds.resolution or 1024)
        return bucket_for_short_side(max(1, round(aspect * 1000)), 1000, short)
    return bucket_for_area(max(1, round(aspect * 1000)), 1000, ds.target_area)


def _crop_aspect(ds: DatasetConfig, size: tuple[int, int], key: str) -> float:
    """crop_aspect square, closest or random: the bucket's aspect."""
    aspect = size[0] / size[1]
    if ds.crop_aspect == "square":
        return 1.0
    buckets = [
        (float(b["aspect_bucket"]), float(b.get("weight", 1.0))) if isinstance(b, dict) else (float(b), 1.0)
        for b in ds.crop_aspect_buckets
    ]
    if ds.crop_aspect == "closest":
        return min(buckets, key=lambda b: abs(math.log(b[0] / aspect)))[0]
    return _rng(ds, key + "#aspect").choices([b[0] for b in buckets], [b[1] for b in buckets])[0]


def target_placement(ds: DatasetConfig, size: tuple[int, int], key: str) -> Placement:
    """Where a target goes: its bucket (the image's own aspect, or the crop_aspect one with ``crop``) and the crop
    box, placed per crop_style; with ``crop`` and maximum_image_size/target_downsample_size the image is first
    sized to target_downsample_size and the bucket cut out of that, as SimpleTuner does."""
    if ds.crop and ds.crop_aspect != "preserve":
        bucket = _bucket(ds, _crop_aspect(ds, size, key))
    elif ds.resolution_type == "pixel":
        bucket = bucket_for_short_side(*size, int(ds.resolution or 1024))
    else:
        bucket = bucket_for_area(*size, ds.target_area)
    scale = None
    if ds.crop and ds.maximum_image_size and ds.target_downsample_size:
        w, h = size
        scale = (
            ds.target_downsample_size / min(w, h)
            if ds.resolution_type == "pixel"
            else math.sqrt(_unit_area(ds, ds.target_downsample_size) / (w * h))
        )
    at = (0.5, 0.5)
    if ds.crop and ds.crop_style == "corner":
        at = (0.0, 0.0)
    elif ds.crop and ds.crop_style == "random":
        rng = _rng(ds, key)
        at = (rng.random(), rng.random())
    return cover_crop(size, bucket, scale=scale, at=at)


def size_rule(ds: DatasetConfig, size: tuple[int, int]) -> str | None:
    """Why an image of ``size`` is left out of an image dataset (None: it is kept): SimpleTuner's
    minimum_image_size (pixel: the shorter side; area, pixel_area: the area, and with square crops each side) and
    minimum/maximum_aspect_ratio."""
    w, h = size
    if ds.minimum_image_size:
        if ds.resolution_type == "pixel":
            if min(w, h) < ds.minimum_image_size:
                return f"{w}x{h} has a side under minimum_image_size {ds.minimum_image_size:g}"
        else:
            area = _unit_area(ds, ds.minimum_image_size)
            if w * h < area:
                return f"{w}x{h} is under minimum_image_size {ds.minimum_image_size:g} ({area / 1e6:.2f} MP)"
            if ds.crop and ds.crop_aspect == "square" and min(w, h) < math.floor(math.sqrt(area)):
                return f"{w}x{h} has a side under {math.floor(math.sqrt(area))} (minimum_image_size, square crop)"
    if ds.minimum_aspect_ratio and w / h < ds.minimum_aspect_ratio:
        return f"{w}x{h} is narrower than minimum_aspect_ratio {ds.minimum_aspect_ratio:g}"
    if ds.maximum_aspect_ratio and w / h > ds.maximum_aspect_ratio:
        return f"{w}x{h} is wider than maximum_aspect_ratio {ds.maximum_aspect_ratio:g}"
    return None


def reference_placement(
    train: TrainConfig, ref_ds: DatasetConfig, target: Placement, ref_size: tuple[int, int]
) -> Placement:
    """Where a reference goes: as the flavour's pipeline sizes it at inference, so the adapter trains on what it
    will see. Every flavour: ~``reference_area`` pixels (1 MP, the pipelines' VAE size) at the reference's own
    aspect — the whole image (``reference_loose``), or cropped like its target first (``reference_strict``: the
    same fraction of the image, so a pixel-aligned pair stays aligned). edit-v2/v3 with ``match_target_res``:
    the target's size instead (strict: its bucket and crop; loose: its area at the reference's aspect)."""
    area = train.model_kwargs.reference_area
    if get_flavour(train.model_flavour).sizes_references_to_target and train.model_kwargs.match_target_res:
        if ref_ds.conditioning_type == "reference_strict":
            return strict_reference(target, ref_size)
        tw, th = target.size
        return cover_crop(ref_size, bucket_for_area(*ref_size, tw * th))
    if ref_ds.conditioning_type == "reference_strict":
        return strict_reference_at_area(target, ref_size, area)
    return whole_image(ref_size, pipeline_size(area, ref_size[0] / ref_size[1]))


ASPECT_TOLERANCE = 0.02  # reference_strict pairs further apart than this (2%) are named in a warning


# --------------------------------------------------------------------------------------------------- pairing
def pair_datasets(run: RunConfig, store: ObjectStore | None = None) -> tuple[list[PairedDataset], list[str]]:
    """Scan and pair every image dataset with its references. Returns the paired datasets (training and eval)
    and warnings; raises one DatasetError listing every problem found. ``store`` holds uploaded datasets."""
    train, data = run.train, run.data
    problems: list[Problem] = []
    warnings: list[str] = []
    scans: dict[str, _Scan] = {}
    sources: dict[str, ImageSource] = {}
    for ds in data.datasets:
        if ds.dataset_type not in ("image", "conditioning"):
            continue
        where = _where(data, ds)
        try:
            sources[ds.id] = open_source(ds, where, store)
        except DatasetError as e:
            problems.extend(e.problems)
            continue
        scans[ds.id] = _scan(ds, sources[ds.id], where, train.max_image_pixels, problems)
    out = []
    for ds in data.image_datasets:
        if ds.id not in scans or any(r not in scans for r in ds.conditioning_data):
            continue
        out.append(_pair_one(run, ds, scans, sources, problems, warnings))
    if problems:
        raise DatasetError(problems)
    return out, warnings


def _where(data: DataConfig, ds: DatasetConfig) -> str:
    return f"dataset {ds.id!r} ({data.source})"


def _pair_one(
    run: RunConfig,
    ds: DatasetConfig,
    scans: dict[str, _Scan],
    sources: dict[str, ImageSource],
    problems: list[Problem],
    warnings: list[str],
) -> PairedDataset:
    train, data = run.train, run.data
    main = scans[ds.id]
    filtered = {k: (rec.relpath, why) for k, rec in main.records.items() if (why := size_rule(ds, rec.size))}
    refs = data.references_of(ds)
    mask = data.mask_of(ds)
    paired = [*refs, *([mask] if mask is not None else [])]  # every dataset paired by name with the targets
    skip = train.bad_image_policy == "skip"
    bad = dict(main.bad)
    for r in paired:
        bad.update({k: m for k, m in scans[r.id].bad.items() if k in main.records or k in main.bad})
    for r in paired:
        rscan = scans[r.id]
        what = "loss mask" if r is mask else "reference"
        missing = [
            main.records[k].relpath
            for k in main.records
            if k not in rscan.records and k not in rscan.bad and k not in filtered
        ]
        if missing:
            problems.append(
                Problem(
                    _where(data, r),
                    f"has no {what} for {len(missing)} of {len(main.records)} images of {ds.id!r}: "
                    f"{_names(missing)}. Every {what} dataset needs a file with the same name (relative path "
                    "and stem; the extension may differ) for every edit image, or training fails with "
                    '"Control tensor list length does not match batch size". '
                    f"Add the missing files to {sources[r.id].label} or remove those images.",
                )
            )
        orphans = [rec.relpath for k, rec in rscan.records.items() if k not in main.records and k not in main.bad]
        if orphans:
            warnings.append(
                f"{_where(data, r)}: {len(orphans)} {what}(s) with no edit image in {ds.id!r} are "
                f"unused: {_names(orphans)}"
            )
    for key, msg in sorted(bad.items()):
        if skip:
            warnings.append(f"skipping sample {key!r} of {ds.id!r}: {msg}")
        else:
            problems.append(Problem(_where(data, ds) if key in main.bad else "reference image", msg))
    if bad and not skip:
        problems.append(
            Problem(
                _where(data, ds),
                "unreadable images found; fix or remove them, or set bad_image_policy to 'skip' to train without them",
            )
        )
    samples = []
    missing_captions = []
    unaligned: dict[str, list[str]] = {}
    for key, rec in sorted(main.records.items()):
        if key in bad or key in filtered or any(key not in scans[r.id].records for r in paired):
            continue
        caption = read_caption(ds, sources[ds.id], rec, main.files)
        if caption is None:
            missing_captions.append(rec.relpath)
            continue
        tp = target_placement(ds, rec.size, key)
        references = tuple(
            Reference(r.id, scans[r.id].records[key], reference_placement(train, r, tp, scans[r.id].records[key].size))
            for r in refs
        )
        for r in refs:
            ref_rec = scans[r.id].records[key]
            if r.conditioning_type == "reference_strict" and aspect_mismatch(rec.size, ref_rec.size) > ASPECT_TOLERANCE:
                unaligned.setdefault(r.id, []).append(
                    f"{rec.relpath} {rec.size[0]}x{rec.size[1]} / {ref_rec.relpath} {ref_rec.size[0]}x{ref_rec.size[1]}"
                )
        loss_mask = None
        if mask is not None:  # the target's resize and crop: the mask covers the pixels the target's latents do
            mask_rec = scans[mask.id].records[key]
            loss_mask = Reference(mask.id, mask_rec, strict_reference(tp, mask_rec.size))
        samples.append(Sample(ds.id, key, rec, caption, tp, references, loss_mask))
    for rid, pairs in unaligned.items():
        warnings.append(
            f"{_where(data, data.get(rid))}: {len(pairs)} reference_strict pair(s) whose aspect ratios "
            f"differ by more than {ASPECT_TOLERANCE:.0%} from their target's: {_names(pairs)}. Each "
            "reference is cropped like its target and kept at its own aspect (not stretched); if these "
            "references are not pixel-aligned with their targets, use reference_loose"
        )
    if missing_captions:
        problems.append(
            Problem(
                _where(data, ds),
                f"caption_strategy 'textfile' but no .txt caption beside "
                f"{len(missing_captions)} image(s): {_names(missing_captions)}; "
                "add <name>.txt files or use caption_strategy 'filename' or "
                "'instanceprompt'",
            )
        )
    role = "eval" if train.eval_dataset_id == ds.id else "train"
    srcs = {ds.id: sources[ds.id], **{r.id: sources[r.id] for r in paired}}
    if filtered:
        warnings.append(
            f"{_where(data, ds)}: {len(filtered)} image(s) left out by its size rules "
            "(minimum_image_size, minimum/maximum_aspect_ratio); `edittuner check --verbose` names them"
        )
    return PairedDataset(
        ds, role, samples, srcs, skipped=sorted(bad) if skip else [], filtered=sorted(filtered.values())
    )


def load_sample_images(ds: PairedDataset, sample: Sample, max_pixels: int) -> tuple[Image.Image, list[Image.Image]]:
    """Decode a sample's target and references and apply their placements (the exact pixels to encode)."""
    target, refs, _ = load_sample(ds, sample, max_pixels)
    return target, refs


def load_sample(
    ds: PairedDataset, sample: Sample, max_pixels: int
) -> tuple[Image.Image, list[Image.Image], list[Image.Image]]:
    """(target, references at their VAE size, references before that final resize): the last are what a user
    would pass the pipeline, which sizes them for the VL encoder from their own aspect."""

    def decode(rec: ImageRecord) -> Image.Image:
        src = ds.sources[rec.dataset_id]
        return open_image(src.read(rec.relpath), f"{src.label}/{rec.relpath}", max_pixels)

    target = sample.placement.apply(decode(sample.target))
    images = [decode(r.image) for r in sample.references]
    return (
        target,
        [r.placement.apply(img) for r, img in zip(sample.references, images, strict=True)],
        [r.placement.region(img) for r, img in zip(sample.references, images, strict=True)],
    )
