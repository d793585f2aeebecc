"""Validation previews and metrics of a run's LoRA: what the eval service renders every validation interval.

For each evaluation sample: the base model's edit (adapters off) and the LoRA's edit (adapters on) of the sample's
references, rendered with our own sampler at the references' *training* sizes (``shared.evaluate.sampling``),
composed into one PNG grid ``reference(s) | base | LoRA | target``, and scored by PSNR against the target, base and
LoRA alike so the improvement is visible. Beside the images, a held-out flow-matching loss on the *cached* tensors
at fixed sigmas with fixed noise: the same number for the same weights, so a curve over steps moves only when the
LoRA does. Everything lands under ``<prefix>/step-<N>/`` in the store: one ``<sample key>.png`` per sample and
``metrics.json``.

Works on any pipeline whose transformer carries a peft adapter: the training transformer itself (``add_adapter``)
or a pipeline that loaded an exported file (``load_lora_weights``); both go through diffusers' PeftAdapterMixin.

Legend: B batch, C latent channels, h/w latent size, L tokens, D text width; W/H the validation size in pixels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.config.schema import RunConfig
from shared.data.geometry import cover_crop, pipeline_size
from shared.data.pairing import PairedDataset, Sample, load_sample
from shared.encode.cache import eval_candidates, holdout
from shared.errors import FailedPrecondition, ResourceExhausted, clear_frames
from shared.evaluate.adapter_runs import adapter_runs, attached, effect_retention, profile, run_means
from shared.evaluate.full_precision import FULL_LABEL, full_means, rendering_on
from shared.evaluate.grid import compose_grid, png_bytes
from shared.evaluate.render_pair import RenderSettings, render_pair
from shared.model.flow import EditBatch, flow_matching_loss
from shared.store.base import ObjectStore

HELDOUT_SIGMAS: tuple[float, ...] = (0.25, 0.5, 0.75)
PSNR_CAP_DB = 100.0  # identical images: report a finite number (JSON has no infinity)


# ----------------------------------------------------------------------------------------- eval samples
def select_eval_samples(
    run: RunConfig, paired: Sequence[PairedDataset], cached: set[tuple[str, str]] | None = None
) -> list[tuple[PairedDataset, Sample]]:
    """The samples previews are rendered for, the same at every step: the first ``num_eval_images`` of
    ``eval_dataset_id`` when the config names one; else the samples ``shared.encode.cache.holdout`` keeps out of
    training, or (on a tiny dataset, or with ``holdout_eval_images`` off) the first training samples. ``cached``:
    the (dataset, key) pairs the cache index holds — the loader decides on those, so must this. The rule is
    ``shared.encode.cache.eval_candidates``, which the encoder shares (it caches these samples' negative prompt)."""
    return eval_candidates(run, paired, cached)


@dataclass
class EvalSet:
    samples: list[tuple[PairedDataset, Sample]]
    entries: list[dict[str, Any]]  # their training-index entries: the held-out loss is scored on them
    label: str  # "eval dataset", "held out of training" or "training samples": what the metrics are on
    # (dataset, key) → the cache object holding every embedding a preview of the sample needs (see
    # shared.encode.cache: the caption's and, for true CFG, the negative prompt's)
    conditioning: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def needs_text_encoder(self) -> bool:
        """Whether some preview sample's embeddings are not cached, so rendering needs the text encoder."""
        return any((ds.config.id, s.key) not in self.conditioning for ds, s in self.samples)


def eval_set(run: RunConfig, paired: Sequence[PairedDataset], store: ObjectStore, index_keys: Sequence[str]) -> EvalSet:
    """The evaluation samples and their index entries, from the cache indexes ``index_keys`` (missing ones are
    skipped: that dataset has nothing cached to score)."""
    docs = [store.get_json(k) for k in index_keys if store.exists(k)]
    cached = {(doc["dataset"], e["key"]) for doc in docs for e in doc["samples"]}
    samples = select_eval_samples(run, paired, cached)
    train_keys = [
        (ds.config.id, s.key)
        for ds in paired
        if ds.role == "train"
        for s in ds.samples
        if (ds.config.id, s.key) in cached
    ]
    _, label = holdout(run, train_keys)
    entries = index_entries(store, [k for k in index_keys if store.exists(k)], samples)
    return EvalSet(samples, entries, label, cached_conditioning_keys(run, store, docs, samples))


def cached_conditioning_keys(
    run: RunConfig,
    store: ObjectStore,
    index_docs: Sequence[dict[str, Any]],
    samples: Sequence[tuple[PairedDataset, Sample]],
) -> dict[tuple[str, str], str]:
    """The text cache objects that hold all a preview of each sample needs (the caption conditioned on all its
    references, and with true CFG the negative prompt): samples without one are left out."""
    wanted = {"prompt_embeds", "negative_embeds"} if run.train.validation_guidance > 1 else {"prompt_embeds"}
    texts = {(doc["dataset"], e["key"]): e["text"].get("") for doc in index_docs for e in doc["samples"]}
    found: dict[tuple[str, str], str] = {}
    for ds, s in samples:
        key = texts.get((ds.config.id, s.key))
        if key and store.exists(key) and wanted <= set(store.get_tensors(key)[0]):
            found[(ds.config.id, s.key)] = key
    return found


def index_entries(
    store: ObjectStore, index_keys: Sequence[str], samples: Sequence[tuple[PairedDataset, Sample]]
) -> list[dict[str, Any]]:
    """The training-index entries (see ``shared.encode.cache.write_index``) of ``samples``, in their order; a sample
    the index lacks (failed to encode) is left out, since there is no cached tensor to score it on."""
    by_id: dict[tuple[str, str], dict[str, Any]] = {}
    for key in index_keys:
        doc = store.get_json(key)
        by_id.update({(doc["dataset"], e["key"]): e for e in doc["samples"]})
    return [by_id[(ds.config.id, s.key)] for ds, s in samples if (ds.config.id, s.key) in by_id]


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Dropout (lora_dropout) off while rendering, so previews are a function of the weights and the seed."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ------------------------------------------------------------------------------------------ image metrics
def psnr(image: Image.Image, reference: Image.Image) -> float:
    """PSNR in dB of two RGB images of the same size, on 8-bit values; capped at ``PSNR_CAP_DB`` when equal."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    b = np.asarray(reference.convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR of images of different sizes: {image.size} vs {reference.size}")
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def target_at(target: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The target at an output's size, what the output is scored against: resized to cover and centre-cropped,
    never stretched (the output has the target's aspect, up to the rounding of its sides to 32)."""
    return target if target.size == size else cover_crop(target.size, size).apply(target)


# ------------------------------------------------------------------------------------------ held-out loss
@dataclass(frozen=True)
class HeldoutLoss:
    per_sigma: dict[str, float]  # "0.25" → mean loss over the samples at that sigma
    mean: float
    samples: int


def _entry_batch(store: ObjectStore, entry: dict[str, Any]) -> EditBatch:
    """An index entry's cached tensors as a batch of one. With per-reference caption embeddings
    (conditioning_multidataset_sampling=random) the first reference dataset's embedding and latents are used:
    fixed, so the loss stays comparable across steps."""
    target = store.get_tensors(entry["target"])[0]["latents"]
    refs = [store.get_tensors(k)[0]["latents"] for k in entry["references"]]
    text_objects = entry["text"]
    if "" in text_objects:
        text_key = text_objects[""]
    else:
        i = next(i for i, d in enumerate(entry["reference_datasets"]) if d in text_objects)
        text_key, refs = text_objects[entry["reference_datasets"][i]], [refs[i]]
    text = store.get_tensors(text_key)[0]
    pad = text.get("prompt_image_pad_mask")  # Qwen-Image-2.1's entries have it
    return EditBatch(
        latents_BChw=target[None].float(),
        refs_BChw=[r[None].float() for r in refs],
        prompt_embeds_BLD=text["prompt_embeds"][None],
        prompt_mask_BL=text["prompt_mask"][None],
        keys=[entry["key"]],
        text_all_valid=bool(text["prompt_mask"].all()),
        image_pad_mask_BL=None if pad is None else pad[None].bool(),
    )


@torch.no_grad()
def heldout_loss(
    transformer: torch.nn.Module,
    store: ObjectStore,
    entries: Sequence[dict[str, Any]],
    *,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype,
    sigmas: Sequence[float] = HELDOUT_SIGMAS,
) -> HeldoutLoss:
    """Flow-matching loss of the transformer as it is (adapters as set) on cached samples, at fixed sigmas with
    noise drawn from ``seed`` + the sample's position: deterministic, so two calls on the same weights agree."""
    if not entries:
        raise ValueError("held-out loss needs at least one index entry")
    totals = {s: 0.0 for s in sigmas}
    with eval_mode(transformer):
        for j, entry in enumerate(entries):
            batch = _entry_batch(store, entry).to(device)
            g = torch.Generator("cpu").manual_seed(seed + j)
            noise_BLC = torch.randn(1, *batch.token_shape(), generator=g)
            for s in sigmas:
                sigma_B = torch.tensor([s], device=device)
                totals[s] += float(flow_matching_loss(transformer, batch, noise_BLC.to(device), sigma_B, dtype))
    per_sigma = {f"{s:g}": totals[s] / len(entries) for s in sigmas}
    return HeldoutLoss(per_sigma, sum(per_sigma.values()) / len(per_sigma), len(entries))


# ---------------------------------------------------------------------------------------------- rendering
@dataclass
class SamplePreview:
    dataset_id: str
    key: str
    caption: str
    seed: int
    grid_key: str
    psnr_lora: float
    psnr_base: float
    base: Image.Image = field(repr=False)
    lora: Image.Image = field(repr=False)
    target: Image.Image = field(repr=False)  # at the validation size: what both PSNRs compare against
    # per adapter run: label, psnr_base (the adapters alone), psnr_lora (with the LoRA), retention (comparison)
    adapters: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset_id,
            "key": self.key,
            "caption": self.caption,
            "seed": self.seed,
            "grid": self.grid_key,
            "psnr_lora": self.psnr_lora,
            "psnr_base": self.psnr_base,
            "width": self.lora.width,
            "height": self.lora.height,
            "adapters": self.adapters,
        }


@dataclass
class ValidationResult:
    step: int
    samples: list[SamplePreview]
    psnr_lora: float | None  # mean over samples, dB; None without samples
    psnr_base: float | None
    heldout: HeldoutLoss | None
    seconds: float
    metrics_key: str
    settings: dict[str, Any]  # how the previews were rendered: a reader of metrics.json needs no config
    adapters: list[dict[str, Any]] = field(default_factory=list)  # per adapter run: its profile and means

    @property
    def keys(self) -> list[str]:
        """Every object written: the grids, then metrics.json."""
        return [s.grid_key for s in self.samples] + [self.metrics_key]

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "psnr_lora": self.psnr_lora,
            "psnr_base": self.psnr_base,
            "samples": [s.to_json() for s in self.samples],
            "heldout_loss": self.heldout.per_sigma if self.heldout else None,
            "heldout_loss_mean": self.heldout.mean if self.heldout else None,
            "seconds": self.seconds,
            "settings": self.settings,
            "adapters": self.adapters,
        }


def _grid_name(ds: PairedDataset, sample: Sample, used: set[str]) -> str:
    """``<sample key with / replaced>.png``; the dataset id joins the name only if two samples share a key."""
    name = sample.key.replace("/", "__")
    if name in used:
        name = f"{ds.config.id}__{name}"
    used.add(name)
    return f"{name}.png"


def output_size(validation_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """A preview's size: the sample's target aspect at the area of ``validation_resolution`` (the pipelines' own
    rule for an output size, ``calculate_dimensions``), so a 4:3 sample is rendered 4:3, not square."""
    return pipeline_size(validation_size[0] * validation_size[1], target[0] / target[1])


def render_sample(
    pipe: Any,
    run: RunConfig,
    ds: PairedDataset,
    sample: Sample,
    *,
    index: int,
    store: ObjectStore,
    folder: str,
    used_names: set[str],
    step: int | None = None,
    text_key: str | None = None,
    full: Any = None,
) -> SamplePreview:
    """Render, grid, store and score one evaluation sample (the ``index``-th: its seed offset); ``text_key``: the
    cache object of its embeddings (``EvalSet.conditioning``), which spares the text encoder; ``full``: the
    full-precision transformer (``shared.evaluate.full_precision``) the pair is rendered on as well."""
    cfg = RenderSettings.of(run)
    target, refs, regions = load_sample(ds, sample, run.train.max_image_pixels)  # the pixels training saw
    seed = cfg.seed + index
    size = output_size(cfg.size, target.size)
    text = store.get_tensors(text_key)[0] if text_key is not None else None
    if text is None and getattr(pipe, "text_encoder", None) is None:
        raise FailedPrecondition(
            f"preview sample {ds.config.id}/{sample.key}: its caption embeddings are not "
            "cached and the pipeline has no text encoder; encode the run's datasets again"
        )
    target_v = target_at(target, size)
    runs = adapter_runs(run.train)
    comparison = not runs or run.train.validation_adapter_mode == "comparison"
    cells, labels, scores = [], [], []
    base = lora = None
    if comparison:
        base, lora = render_pair(pipe, cfg, sample.caption, refs, seed, size, vl_refs=regions, text=text)
        cells, labels = [base, lora], ["base", "LoRA"]
    for r in runs:  # each adapter run from the same seed and references, with its own profile
        rb, rl = render_pair(pipe, profile(cfg, r), sample.caption, refs, seed, size, vl_refs=regions, text=text)
        cells += [rb, rl]
        labels += [r.label, f"{r.label} + LoRA"]
        kept = effect_retention(base, lora, rb, rl) if base is not None and lora is not None else None
        scores.append(
            {"label": r.label, "psnr_base": psnr(rb, target_v), "psnr_lora": psnr(rl, target_v), "retention": kept}
        )
        if base is None:  # adapter_only: the first run is the preview's base and LoRA
            base, lora = rb, rl
    assert base is not None and lora is not None
    if full is not None:  # the same pair on the unquantized transformer, holding the same LoRA
        with rendering_on(pipe, full):
            fb, fl = render_pair(pipe, cfg, sample.caption, refs, seed, size, vl_refs=regions, text=text)
        cells += [fb, fl]
        labels += ["full base", "full + LoRA"]
        scores.append(
            {
                "label": FULL_LABEL,
                "psnr_base": psnr(fb, target_v),
                "psnr_lora": psnr(fl, target_v),
                "retention": effect_retention(base, lora, fb, fl),
            }
        )
    psnr_base, psnr_lora = psnr(base, target_v), psnr(lora, target_v)
    title = (
        f"{'step ' + str(step) + ' · ' if step is not None else ''}{ds.config.id}/{sample.key} · PSNR base "
        f"{psnr_base:.2f} dB, LoRA {psnr_lora:.2f} dB"
    ) + "".join(f" · {a['label']} kept {a['retention']:.2f}" for a in scores if a["retention"] is not None)
    ref_labels = [f"ref {i + 1}" for i in range(len(refs))]
    grid = compose_grid(
        [*refs, *cells, target_v], [*ref_labels, *labels, "target"], size, title=title, thumbnails=len(refs)
    )
    grid_key = f"{folder}/{_grid_name(ds, sample, used_names)}"
    store.put_bytes(grid_key, png_bytes(grid), content_type="image/png")
    return SamplePreview(
        ds.config.id, sample.key, sample.caption, seed, grid_key, psnr_lora, psnr_base, base, lora, target_v, scores
    )


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def validation_settings(pipe: Any, run: RunConfig, failures: int) -> tuple[RunConfig, list[str]]:
    """The run as its next validation renders it after ``failures`` renders that ran out of GPU memory (the
    planner's smaller settings, ``smaller_validation``) and the changes made; the pipeline's VAE tiling and slicing
    set to them."""
    from shared.model.loading import configure_vae
    from shared.plan.recommend import smaller_validation

    vrun, changes = smaller_validation(run, failures)
    configure_vae(pipe.vae, tiling=vrun.train.vae_enable_tiling, slicing=vrun.train.vae_enable_slicing)
    return vrun, changes


def out_of_memory(
    err: torch.OutOfMemoryError,
    run: RunConfig,
    failures: int,
    changes: list[str],
    what: str,
    next_one: str,
    detail: str = "",
) -> ResourceExhausted:
    """After rendering ``what`` with ``changes`` ran out of GPU memory (``err``; ``failures`` counts it): the
    memory freed, and the error saying what ``next_one`` renders with. The render's tensors live on in ``err``'s
    frames, so those are cleared first: freeing before that gives nothing back, and the error raised ``from err``
    would keep them until the job's record goes."""
    from shared.model.device import free_gpu_memory
    from shared.plan.recommend import smaller_validation

    clear_frames(err)
    free_gpu_memory()
    _, smaller = smaller_validation(run, failures)
    return ResourceExhausted(
        f"out of GPU memory rendering {what}{' with ' + ', '.join(changes) if changes else ''}; "
        f"{next_one} renders with {', '.join(smaller) or 'the same settings'}{detail}"
    )


def render_validation(
    pipe: Any,
    run: RunConfig,
    samples: Sequence[tuple[PairedDataset, Sample]],
    *,
    step: int,
    store: ObjectStore,
    prefix: str,
    loss_index: Sequence[dict[str, Any]] | None = None,
    eval_label: str = "",
    conditioning: dict[tuple[str, str], str] | None = None,
    full: Any = None,
) -> ValidationResult:
    """Previews, PSNRs and (given ``loss_index``, the samples' training-index entries) the held-out loss of the
    pipeline's transformer with its LoRA, written under ``<prefix>/step-<step>/``. ``conditioning``
    (``EvalSet.conditioning``): samples whose embeddings are cached are rendered without the text encoder."""
    start = time.perf_counter()
    folder = f"{prefix.rstrip('/')}/step-{step}"
    transformer = pipe.transformer
    cfg = RenderSettings.of(run)
    used: set[str] = set()
    runs = adapter_runs(run.train)
    with eval_mode(transformer), attached(transformer, runs), eval_mode(full) if full is not None else nullcontext():
        previews = [
            render_sample(
                pipe,
                run,
                ds,
                s,
                index=i,
                store=store,
                folder=folder,
                used_names=used,
                step=step,
                text_key=(conditioning or {}).get((ds.config.id, s.key)),
                full=full,
            )
            for i, (ds, s) in enumerate(samples)
        ]
        heldout = None
        if loss_index:
            heldout = heldout_loss(
                transformer, store, loss_index, seed=cfg.seed, device=transformer.device, dtype=transformer.dtype
            )
    result = ValidationResult(
        step,
        previews,
        _mean([p.psnr_lora for p in previews]),
        _mean([p.psnr_base for p in previews]),
        heldout,
        time.perf_counter() - start,
        f"{folder}/metrics.json",
        {
            **cfg.to_json(),
            "eval_samples": eval_label,
            **({"adapter_mode": run.train.validation_adapter_mode} if runs else {}),
        },
        [run_means(r, [p.adapters[i] for p in previews], profile(cfg, r).scheduler) for i, r in enumerate(runs)]
        + ([full_means([p.adapters[len(runs)] for p in previews])] if full is not None else []),
    )
    store.put_json(result.metrics_key, result.to_json())
    return result
