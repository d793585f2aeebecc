"""Encode paired datasets into the store: VAE latents per image, caption embeddings per sample (layout and
keys in ``shared.encode.cache``; the tensor math in ``shared.encode.ops``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.data.pairing import PairedDataset, pair_datasets
from shared.data.sources import open_image
from shared.encode.cache import CACHE_FORMAT, Item, Manifests, is_cached, plan, settings_for, shard_of, write_index
from shared.errors import DatasetError, EditTunerError, FailedPrecondition, InvalidInput, Problem
from shared.model.device import free_gpu_memory, resolve_device, resolve_dtype
from shared.store.base import ObjectStore

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from shared.data.geometry import Placement

    # one encoded cache entry: its tensors, and the metadata written beside them (as strings)
    Encoded = tuple[dict[str, torch.Tensor], dict[str, object]]

log = logging.getLogger(__name__)


@dataclass
class EncodeStats:
    encoded: int = 0
    cached: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.encoded + self.cached + self.failed


def pipe_key(run: RunConfig) -> tuple[str, str, str, str, str]:
    """What identifies the models a ``DatasetEncoder`` of ``run`` loads: a service keeps them resident and hands
    them to the next job with the same key (a job at another ``text_encoder_1_precision`` needs another set)."""
    t = run.train
    device = resolve_device(t.device)
    return (
        t.model_path,
        t.model_flavour,
        str(device),
        str(resolve_dtype(t.mixed_precision, device)),
        t.text_encoder_1_precision,
    )


class DatasetEncoder:
    """Loads the VAE and text encoder lazily, encodes what the plan says is missing, writes caches."""

    def __init__(self, run: RunConfig, store: ObjectStore, pipe: Any = None, batch_size: int | None = None):
        self.run = run
        self.store = store
        self.device = resolve_device(run.train.device)
        self.dtype = resolve_dtype(run.train.mixed_precision, self.device)
        self.batch_size = batch_size or self._fitting_batch()
        self._pipe = pipe
        self.flavour = get_flavour(run.train.model_flavour)

    def _fitting_batch(self) -> int:
        """vae_batch_size, lowered on a GPU to what the planner predicts fits its memory."""
        from shared.plan.predict import device_memory, encode_batch_size

        want = self.run.train.vae_batch_size
        total = device_memory(self.device)
        if total is None or want == 1:
            return want
        try:
            fits = encode_batch_size(self.run, total)
        except EditTunerError as err:  # the planner cannot read this model: keep the configured batch
            log.warning("vae_batch_size %d kept: the planner could not plan the encoder (%s)", want, err)
            return want
        if fits < want:
            log.info(
                "vae_batch_size %d → %d: the planner predicts %d images of the largest size do not fit the "
                "%.1f GiB of %s beside the text encoder",
                want,
                fits,
                want,
                total / 2**30,
                self.device,
            )
        return fits

    @property
    def pipe(self) -> Any:
        from shared.model.loading import configure_vae, load_encoder_pipeline

        t = self.run.train
        if self._pipe is None:
            self._pipe = load_encoder_pipeline(
                t.model_path,
                t.model_flavour,
                device=self.device,
                dtype=self.dtype,
                text_encoder_precision=t.text_encoder_1_precision,
            )
        configure_vae(self._pipe.vae, tiling=t.vae_enable_tiling, slicing=t.vae_enable_slicing)
        return self._pipe

    def release(self) -> None:
        """Free the models (the trainer needs the GPU next)."""
        self._pipe = None
        free_gpu_memory()

    def prepare(self, shard: str | None = None) -> tuple[list[PairedDataset], list[Item], Manifests, list[str]]:
        paired, warnings = pair_datasets(self.run, self.store)
        items = plan(self.run, paired, settings_for(self.run))
        return paired, items, Manifests(self.store, shard), warnings

    def encode(self, progress: Callable[[EncodeStats, int], None] | None = None) -> EncodeStats:
        stats, _ = self.encode_with_index(progress)
        return stats

    def encode_with_index(
        self, progress: Callable[[EncodeStats, int], None] | None = None, shard: tuple[int, int] | None = None
    ) -> tuple[EncodeStats, list[str]]:
        """Encode every missing entry. Per-image failures are counted and named; with bad_image_policy 'fail'
        they raise a DatasetError at the end — after everything that did encode is safely in the store.

        ``shard`` (i, n): one of n encoder replicas, encoding only the entries ``shard_of`` gives it into its own
        shard manifests and writing no index; ``finalize`` merges the replicas' work and writes the index."""
        name = None if shard is None else f"{shard[0]}-of-{shard[1]}"
        if shard is not None and not 0 <= shard[0] < shard[1]:
            raise InvalidInput(f"shard {shard[0]} of {shard[1]}: expected 0 <= shard < shards")
        paired, items, manifests, _ = self.prepare(name)
        if shard is not None:
            items = [it for it in items if shard_of(it, shard[1]) == shard[0]]
        stats = EncodeStats()
        todo = []
        for it in items:
            if is_cached(it, manifests):
                stats.cached += 1
            else:
                todo.append(it)
        if progress:
            progress(stats, len(items))
        vae = [it for it in todo if it.kind == "vae"]
        text = [it for it in todo if it.kind == "text"]
        masks = [it for it in todo if it.kind == "mask"]
        by_size: dict[tuple[int, int], list[Item]] = {}
        for it in vae:
            by_size.setdefault(self._placement(it).final, []).append(it)
        batches = [
            group[i : i + self.batch_size] for group in by_size.values() for i in range(0, len(group), self.batch_size)
        ]
        try:
            for batch in batches:
                self._run(batch, self._encode_vae, manifests, stats)
                if progress:
                    progress(stats, len(items))
            for it in text:
                self._run([it], self._encode_text, manifests, stats)
                if progress:
                    progress(stats, len(items))
            for it in masks:  # pixels only: no model
                self._run([it], self._encode_mask, manifests, stats)
        finally:
            manifests.flush()
        if stats.failures and self.run.train.bad_image_policy == "fail":
            raise DatasetError([Problem("encode", f) for f in stats.failures], "encoding failed")
        if shard is not None:
            return stats, []
        settings = settings_for(self.run)
        index_keys = [
            write_index(self.store, self.run, ds, [i for i in items if i.dataset is ds], manifests, settings)
            for ds in paired
        ]
        return stats, index_keys

    def finalize(self, shards: int) -> list[str]:
        """After n replicas' ``encode_with_index(shard=(i, n))``: merge their manifests, check nothing is missing,
        write the index."""
        paired, items, manifests, _ = self.prepare()
        manifests.merge_shards({it.prefix for it in items})
        missing = [it for it in items if not is_cached(it, manifests)]
        if missing and self.run.train.bad_image_policy == "skip":  # the replicas skipped images they could not read
            log.warning(
                "%d of %d cache entries are missing after %d encoder replicas (skipped images); their "
                "samples are left out of the index",
                len(missing),
                len(items),
                shards,
            )
        elif missing:
            by = sorted({shard_of(it, shards) for it in missing})
            raise FailedPrecondition(
                f"{len(missing)} of {len(items)} cache entries are missing after {shards} "
                f"encoder replicas (those of shard(s) {', '.join(map(str, by))}, e.g. "
                f"{missing[0].object_key}); run the encode again: what is cached is kept"
            )
        settings = settings_for(self.run)
        return [
            write_index(self.store, self.run, ds, [i for i in items if i.dataset is ds], manifests, settings)
            for ds in paired
        ]

    # ---- internals
    def _run(
        self,
        batch: list[Item],
        fn: Callable[[list[Item]], list[Encoded]],
        manifests: Manifests,
        stats: EncodeStats,
    ) -> None:
        try:
            results = fn(batch)
        except InvalidInput as e:  # an image that scanned fine but fails now (changed on disk meanwhile)
            stats.failed += len(batch)
            stats.failures.append(str(e))
            return
        before = stats.encoded
        for it, (tensors, meta) in zip(batch, results, strict=True):
            meta = {"cache_key": it.cache_key, "format": CACHE_FORMAT, **meta}
            self.store.put_tensors(it.object_key, tensors, {k: str(v) for k, v in meta.items()})
            manifests.set(
                it.prefix,
                it.entry,
                {
                    "object": it.object_key,
                    "cache_key": it.cache_key,
                    "dataset": it.dataset.config.id,
                    "sample": it.sample.key,
                    "bucket": list(it.sample.bucket),
                    "shapes": {k: list(v.shape) for k, v in tensors.items()},
                    "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
                    "sources": it.sources,
                    "model": self.run.train.model_path,
                },
            )
            stats.encoded += 1
        if manifests.dirty and stats.encoded // 64 != before // 64:  # bound what a killed worker re-encodes
            manifests.flush()

    def _placement(self, it: Item) -> Placement:
        return it.sample.placement if it.ref_index is None else it.sample.references[it.ref_index].placement

    def _encode_mask(self, batch: list[Item]) -> list[Encoded]:
        """A loss mask as SimpleTuner reads it (its first channel, 0 to 1), placed as its target and averaged over
        each latent cell: (h, w) float32, the weight of the loss at each latent position."""
        import torch
        import torch.nn.functional as F

        [it] = batch
        mask = it.sample.mask
        assert mask is not None  # mask items exist only for samples with a mask
        src = it.dataset.sources[mask.image.dataset_id]
        img = open_image(
            src.read(mask.image.relpath), f"{src.label}/{mask.image.relpath}", self.run.train.max_image_pixels
        )
        placed = mask.placement.apply(img)
        w, h = placed.size
        scale = self.flavour.vae_scale
        pixels = torch.frombuffer(bytearray(placed.getchannel(0).tobytes()), dtype=torch.uint8).view(1, 1, h, w)
        grid = F.interpolate(pixels.float() / 255.0, size=(h // scale, w // scale), mode="area")[0, 0]
        return [
            ({"mask": grid.contiguous()}, {"width": w, "height": h, "placement": json.dumps(mask.placement.to_json())})
        ]

    def _image(self, it: Item, ref_index: int | None, region: bool = False) -> Image.Image:
        """The placed pixels; ``region``: a reference before its final resize, what the VL encoder is sized from
        (the pipelines size it from the image the user passes, at that image's aspect). Qwen-Image-2.1's are RGBA
        (an RGB image gets alpha 255, as its pipeline converts it)."""
        rec = it.sample.target if ref_index is None else it.sample.references[ref_index].image
        place = it.sample.placement if ref_index is None else it.sample.references[ref_index].placement
        src = it.dataset.sources[rec.dataset_id]
        mode = "RGBA" if self.flavour.joint_sequence else "RGB"
        img = open_image(src.read(rec.relpath), f"{src.label}/{rec.relpath}", self.run.train.max_image_pixels, mode)
        return place.region(img) if region else place.apply(img)

    def _encode_vae(self, batch: list[Item]) -> list[Encoded]:
        from shared.encode.ops import encode_vae_latents

        w, h = self._placement(batch[0]).final
        images = [self._image(it, it.ref_index) for it in batch]
        if self.flavour.joint_sequence:  # the RGBA 16x VAE, one image per encode as QwenImage21Pipeline encodes
            import torch

            from shared.encode.qwen21 import vae_latents

            latents_BChw = torch.stack(vae_latents(self.pipe.vae, images, [(w, h)] * len(images))).cpu()
        else:
            latents_BChw = encode_vae_latents(self.pipe.vae, self.pipe.image_processor, images, h, w).cpu()
        return [
            (
                {"latents": latents_BChw[i].contiguous()},
                {"width": w, "height": h, "placement": json.dumps(self._placement(it).to_json())},
            )
            for i, it in enumerate(batch)
        ]

    def _encode_text(self, batch: list[Item]) -> list[Encoded]:
        from shared.encode.ops import encode_null_prompt, encode_prompt

        [it] = batch
        idx = range(len(it.sample.references)) if it.ref_index is None else [it.ref_index]
        if self.flavour.joint_sequence:
            return [(self._qwen21_text(it, idx), {"caption": it.sample.caption})]
        refs = [[self._image(it, i, region=True) for i in idx]]
        vl_area = self.run.train.model_kwargs.vl_reference_area
        flavour = self.run.train.model_flavour
        embeds, mask = encode_prompt(self.pipe, flavour, [it.sample.caption], refs, vl_area)
        tensors = {"prompt_embeds": embeds[0].to(self.dtype).cpu(), "prompt_mask": mask[0].cpu()}
        if self.run.train.caption_dropout_probability > 0:
            n_embeds, n_mask = encode_null_prompt(self.pipe, flavour, refs, vl_area)
            tensors |= {"null_embeds": n_embeds[0].to(self.dtype).cpu(), "null_mask": n_mask[0].cpu()}
        if it.negative is not None:  # a preview sample: what the previews' true CFG needs, encoded once here
            g_embeds, g_mask = encode_null_prompt(self.pipe, flavour, refs, vl_area, null_caption=it.negative)
            tensors |= {"negative_embeds": g_embeds[0].to(self.dtype).cpu(), "negative_mask": g_mask[0].cpu()}
        return [(tensors, {"caption": it.sample.caption})]

    def _qwen21_text(self, it: Item, idx: Iterable[int]) -> dict[str, torch.Tensor]:
        """Qwen-Image-2.1's entry: the vision encoder sees each reference as placed for the VAE (its pipeline feeds
        both the same resized image), and each prompt's image-pad mask is kept beside its embeddings."""
        from shared.encode.qwen21 import prompt_tensors

        refs = [self._image(it, i) for i in idx]
        te, processor = self.pipe.text_encoder, self.pipe.processor
        tensors = prompt_tensors(te, processor, "prompt", it.sample.caption, refs, self.dtype)
        if self.run.train.caption_dropout_probability > 0:
            tensors |= prompt_tensors(te, processor, "null", "", refs, self.dtype)
        if it.negative is not None:
            tensors |= prompt_tensors(te, processor, "negative", it.negative, refs, self.dtype)
        return tensors


def encode_run(
    run: RunConfig,
    store: ObjectStore,
    progress: Callable[[EncodeStats, int], None] | None = None,
    pipe: Any = None,
) -> EncodeStats:
    """Encode a run's datasets into ``store`` (the core of encoder_svc and ``edittuner encode``)."""
    enc = DatasetEncoder(run, store, pipe=pipe)
    try:
        return enc.encode(progress)
    finally:
        enc.release()
