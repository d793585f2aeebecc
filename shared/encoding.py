"""Encode paired datasets into the store: VAE latents per image, caption embeddings per sample.

What is cached, and where (prefixes come from the config):

- ``<cache_dir_vae of the image's dataset>/<sample key>.safetensors``: ``latents`` (16, h, w) normalised VAE
  latents of the placed (bucketed, cropped) image, for targets and references alike.
- ``<text prefix>/<sample key>.safetensors``: ``prompt_embeds`` (L, D) and ``prompt_mask`` (L,) of the caption
  conditioned on the sample's reference(s) through the flavour's edit template; plus ``null_embeds`` /
  ``null_mask`` (the empty caption with the same references) when caption dropout is on. For edit-v1 the text
  prefix is the conditioning_image_embeds cache. With ``conditioning_multidataset_sampling=random`` there is one
  file per reference dataset: ``<text prefix>/<sample key>/<reference dataset id>.safetensors``.
- ``<prefix>/manifest.json`` per cache prefix: sample key → object, cache key, bucket, shapes, dtypes, sources.
- ``cache/index/<dataset id>/<settings digest>.json``: what training reads — per sample its caption, bucket and
  the objects of its target latents, reference latents (in conditioning_data order) and caption embedding(s).
  The digest covers the model, flavour and dataset entry, so differently configured runs never share an index.

Each entry's *cache key* hashes everything that changes its tensors (image bytes, placement, caption, model
fingerprint, dtype, flavour, reference area). An entry whose key is unchanged and whose object exists is not
encoded again, so a second encode of an unchanged dataset encodes nothing and a changed caption re-encodes
exactly one text entry.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from shared.config import RunConfig
from shared.datasets import PairedDataset, Sample, open_image, pair_datasets
from shared.errors import DatasetError, InvalidInput, NotFound, Problem
from shared.flavours import get_flavour
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

CACHE_FORMAT = "edittuner.cache.v1"
MANIFEST = "manifest.json"
_SAMPLED = 1 << 20  # bytes hashed from the start, middle and end of a large weight file


# ------------------------------------------------------------------------------------------- fingerprints
def _file_fingerprint(path: Path) -> str:
    """sha256 of a small file; of size + header + three sampled MiB for a large one (weights of 16 GB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        if size <= 4 * _SAMPLED:
            h.update(f.read())
        else:
            for offset in (0, size // 2, size - _SAMPLED):
                f.seek(offset)
                h.update(f.read(_SAMPLED))
    return h.hexdigest()


def model_fingerprint(source: str, components: Iterable[str]) -> str:
    """Identifies the weights a cache was made with: content of a local model's component folders, or the
    hub id plus the locally cached snapshot's revision when there is one."""
    path = Path(source).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not cached locally: the id is all we know, the loader will fetch it
            return "hub:" + source
    h = hashlib.sha256()
    for comp in sorted(components):
        for f in sorted((path / comp).rglob("*")) if (path / comp).is_dir() else []:
            if f.is_file():
                h.update(f"{comp}/{f.relative_to(path / comp).as_posix()}".encode())
                h.update(_file_fingerprint(f).encode())
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Item:
    """One cache entry to produce: a VAE latent of one image, or the caption embedding of one sample."""

    kind: str  # "vae" or "text"
    prefix: str
    entry: str  # the manifest key: sample key, or "<sample key>/<reference dataset id>" (random sampling)
    cache_key: str
    dataset: PairedDataset
    sample: Sample
    ref_index: int | None  # vae: None = the target, i = reference i; text: the chosen reference (random)
    sources: dict[str, str]  # relpath → sha256 of the bytes

    @property
    def object_key(self) -> str:
        return f"{self.prefix}/{self.entry}.safetensors"


@dataclass
class EncodeStats:
    encoded: int = 0
    cached: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.encoded + self.cached + self.failed


@dataclass(frozen=True)
class EncodeSettings:
    """What, beyond the images, decides the tensors: part of every cache key."""

    flavour: str
    model: str
    model_fp: str
    dtype: str
    vl_area: int
    with_null: bool
    random_refs: bool


def settings_for(run: RunConfig, dtype: torch.dtype) -> EncodeSettings:
    t = run.train
    flav = get_flavour(t.model_flavour)
    return EncodeSettings(
        flavour=flav.name, model=t.model_path,
        model_fp=model_fingerprint(t.model_path, ("vae", "text_encoder", "tokenizer", "processor")),
        dtype=str(dtype).removeprefix("torch."), vl_area=t.model_kwargs.vl_reference_area or flav.vl_ref_area,
        with_null=t.caption_dropout_probability > 0, random_refs=t.conditioning_multidataset_sampling == "random")


def plan(run: RunConfig, paired: list[PairedDataset], settings: EncodeSettings) -> list[Item]:
    """Every cache entry the datasets need, with its cache key (source hashes come from the scan)."""
    items: list[Item] = []
    base = dataclasses.asdict(settings)
    users: dict[str, int] = {}
    for d in run.data.image_datasets:
        for rid in d.conditioning_data:
            users[rid] = users.get(rid, 0) + 1
    for ds in paired:
        text_prefix = run.data.text_cache_prefix(ds.config, settings.flavour)
        refs_cfg = run.data.references_of(ds.config)
        for s in ds.samples:
            t_sha = s.target.sha256
            vae_common = {"model_fp": settings.model_fp, "dtype": settings.dtype, "format": CACHE_FORMAT}
            items.append(Item("vae", ds.config.vae_cache_prefix, s.key,
                              _digest({**vae_common, "src": t_sha, "place": s.placement.to_json()}),
                              ds, s, None, {s.target.relpath: t_sha}))
            ref_shas = []
            for i, (r, rcfg) in enumerate(zip(s.references, refs_cfg)):
                r_sha = r.image.sha256
                ref_shas.append((r_sha, r.placement.to_json()))
                # a reference dataset shared by several image datasets is placed per image dataset
                entry = s.key if users.get(rcfg.id, 0) <= 1 else f"{ds.config.id}/{s.key}"
                items.append(Item("vae", rcfg.vae_cache_prefix, entry,
                                  _digest({**vae_common, "src": r_sha, "place": r.placement.to_json()}),
                                  ds, s, i, {r.image.relpath: r_sha}))
            choices = list(range(len(s.references))) if settings.random_refs else [None]
            for choice in choices:
                used = ref_shas if choice is None else [ref_shas[choice]]
                entry = s.key if choice is None else f"{s.key}/{s.references[choice].dataset_id}"
                items.append(Item("text", text_prefix, entry,
                                  _digest({**base, "caption": s.caption, "refs": used, "format": CACHE_FORMAT}),
                                  ds, s, choice, {s.target.relpath: t_sha}))
    return items


# -------------------------------------------------------------------------------------------- manifests
class Manifests:
    """The per-prefix manifest.json files, loaded lazily and written back as they change."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self.docs: dict[str, dict[str, Any]] = {}
        self.dirty: set[str] = set()

    def doc(self, prefix: str) -> dict[str, Any]:
        if prefix not in self.docs:
            try:
                d = self.store.get_json(f"{prefix}/{MANIFEST}")
            except NotFound:
                d = None
            if not isinstance(d, dict) or d.get("format") != CACHE_FORMAT:
                d = {"format": CACHE_FORMAT, "entries": {}}
            self.docs[prefix] = d
        return self.docs[prefix]

    def entry(self, prefix: str, entry: str) -> dict[str, Any] | None:
        return self.doc(prefix)["entries"].get(entry)

    def set(self, prefix: str, entry: str, value: dict[str, Any]) -> None:
        self.doc(prefix)["entries"][entry] = value
        self.dirty.add(prefix)

    def flush(self) -> None:
        for prefix in sorted(self.dirty):
            self.store.put_json(f"{prefix}/{MANIFEST}", self.docs[prefix])
        self.dirty.clear()


def is_cached(item: Item, manifests: Manifests) -> bool:
    e = manifests.entry(item.prefix, item.entry)
    return e is not None and e.get("cache_key") == item.cache_key and manifests.store.exists(item.object_key)


def cache_status(items: list[Item], manifests: Manifests) -> dict[str, tuple[int, int]]:
    """kind → (cached, total)."""
    out: dict[str, tuple[int, int]] = {}
    for it in items:
        c, t = out.get(it.kind, (0, 0))
        out[it.kind] = (c + is_cached(it, manifests), t + 1)
    return out


# ------------------------------------------------------------------------------------------------ index
INDEX_FORMAT = "edittuner.index.v1"


def index_key(run: RunConfig, dataset_id: str, settings: EncodeSettings) -> str:
    entry = dataclasses.asdict(run.data.get(dataset_id))
    entry.pop("aws_secret_access_key", None)
    refs = [dataclasses.asdict(r) | {"aws_secret_access_key": None} for r in
            run.data.references_of(run.data.get(dataset_id))]
    digest = _digest({"settings": dataclasses.asdict(settings), "dataset": entry, "refs": refs,
                      "match_target_res": run.train.model_kwargs.match_target_res,
                      "reference_area": run.train.model_kwargs.reference_area, "format": INDEX_FORMAT})
    return f"cache/index/{dataset_id}/{digest[:32]}.json"


def write_index(store: ObjectStore, run: RunConfig, ds: PairedDataset, items: list[Item], manifests: Manifests,
                settings: EncodeSettings) -> str:
    """Record, for training, every sample whose entries are all cached (a failed one is left out)."""
    by_sample: dict[str, list[Item]] = {}
    for it in items:
        by_sample.setdefault(it.sample.key, []).append(it)
    samples = []
    for s in ds.samples:
        its = by_sample.get(s.key, [])
        if not its or not all(is_cached(it, manifests) for it in its):
            continue
        vae = {it.ref_index: it.object_key for it in its if it.kind == "vae"}
        text = {("" if it.ref_index is None else s.references[it.ref_index].dataset_id): it.object_key
                for it in its if it.kind == "text"}
        samples.append({"key": s.key, "caption": s.caption, "bucket": list(s.bucket),
                        "reference_sizes": [list(r.placement.final) for r in s.references],
                        "target": vae[None], "references": [vae[i] for i in range(len(s.references))],
                        "reference_datasets": [r.dataset_id for r in s.references], "text": text})
    key = index_key(run, ds.config.id, settings)
    store.put_json(key, {"format": INDEX_FORMAT, "dataset": ds.config.id, "role": ds.role,
                         "flavour": settings.flavour, "model": settings.model, "model_fp": settings.model_fp,
                         "null_embeds": settings.with_null, "random_references": settings.random_refs,
                         "repeats": ds.config.repeats, "samples": samples})
    return key


# --------------------------------------------------------------------------------------------- encoding
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {name!r}: CUDA is not available on this host; set device to 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidInput(f"device {name!r}: this host has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return dev


class DatasetEncoder:
    """Loads the VAE and text encoder lazily, encodes what the plan says is missing, writes caches."""

    def __init__(self, run: RunConfig, store: ObjectStore, pipe: Any = None, batch_size: int | None = None):
        from shared.models import resolve_dtype

        self.run = run
        self.store = store
        self.device = resolve_device(run.train.device)
        self.dtype = resolve_dtype(run.train.mixed_precision, self.device)
        self.batch_size = batch_size or run.train.vae_batch_size
        self._pipe = pipe

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            from shared.models import load_encoder_pipeline

            self._pipe = load_encoder_pipeline(self.run.train.model_path, self.run.train.model_flavour,
                                               device=self.device, dtype=self.dtype)
        return self._pipe

    @property
    def pipe_key(self) -> tuple[str, str, str, str]:
        """What identifies the loaded models: a service reuses them across jobs with the same key."""
        t = self.run.train
        return (t.model_path, t.model_flavour, str(self.device), str(self.dtype))

    def release(self) -> None:
        """Free the models (the trainer needs the GPU next)."""
        self._pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def prepare(self) -> tuple[list[PairedDataset], list[Item], Manifests, list[str]]:
        paired, warnings = pair_datasets(self.run)
        items = plan(self.run, paired, settings_for(self.run, self.dtype))
        return paired, items, Manifests(self.store), warnings

    def encode(self, progress: Callable[[EncodeStats, int], None] | None = None) -> EncodeStats:
        stats, _ = self.encode_with_index(progress)
        return stats

    def encode_with_index(self, progress: Callable[[EncodeStats, int], None] | None = None
                          ) -> tuple[EncodeStats, list[str]]:
        """Encode every missing entry. Per-image failures are counted and named; with bad_image_policy 'fail'
        they raise a DatasetError at the end — after everything that did encode is safely in the store."""
        paired, items, manifests, _ = self.prepare()
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
        by_size: dict[tuple[int, int], list[Item]] = {}
        for it in vae:
            by_size.setdefault(self._placement(it).final, []).append(it)
        batches = [group[i:i + self.batch_size] for group in by_size.values()
                   for i in range(0, len(group), self.batch_size)]
        try:
            for batch in batches:
                self._run(batch, self._encode_vae, manifests, stats)
                if progress:
                    progress(stats, len(items))
            for it in text:
                self._run([it], self._encode_text, manifests, stats)
                if progress:
                    progress(stats, len(items))
        finally:
            manifests.flush()
        if stats.failures and self.run.train.bad_image_policy == "fail":
            raise DatasetError([Problem("encode", f) for f in stats.failures], "encoding failed")
        settings = settings_for(self.run, self.dtype)
        index_keys = [write_index(self.store, self.run, ds, [i for i in items if i.dataset is ds], manifests,
                                  settings) for ds in paired]
        return stats, index_keys

    # ---- internals
    def _run(self, batch: list[Item], fn: Callable[[list[Item]], list[tuple[dict, dict]]], manifests: Manifests,
             stats: EncodeStats) -> None:
        try:
            results = fn(batch)
        except InvalidInput as e:  # an image that scanned fine but fails now (changed on disk meanwhile)
            stats.failed += len(batch)
            stats.failures.append(str(e))
            return
        before = stats.encoded
        for it, (tensors, meta) in zip(batch, results):
            meta = {"cache_key": it.cache_key, "format": CACHE_FORMAT, **meta}
            self.store.put_tensors(it.object_key, tensors, {k: str(v) for k, v in meta.items()})
            manifests.set(it.prefix, it.entry, {
                "object": it.object_key, "cache_key": it.cache_key, "dataset": it.dataset.config.id,
                "sample": it.sample.key, "bucket": list(it.sample.bucket),
                "shapes": {k: list(v.shape) for k, v in tensors.items()},
                "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
                "sources": it.sources, "model": self.run.train.model_path})
            stats.encoded += 1
        if manifests.dirty and stats.encoded // 64 != before // 64:  # bound what a killed worker re-encodes
            manifests.flush()

    def _placement(self, it: Item):
        return it.sample.placement if it.ref_index is None else it.sample.references[it.ref_index].placement

    def _image(self, it: Item, ref_index: int | None):
        rec = it.sample.target if ref_index is None else it.sample.references[ref_index].image
        place = it.sample.placement if ref_index is None else it.sample.references[ref_index].placement
        src = it.dataset.sources[rec.dataset_id]
        img = open_image(src.read(rec.relpath), f"{src.label}/{rec.relpath}", self.run.train.max_image_pixels)
        return place.apply(img)

    def _encode_vae(self, batch: list[Item]) -> list[tuple[dict, dict]]:
        from shared.encode_ops import encode_vae_latents

        w, h = self._placement(batch[0]).final
        images = [self._image(it, it.ref_index) for it in batch]
        latents_BChw = encode_vae_latents(self.pipe.vae, self.pipe.image_processor, images, h, w).cpu()
        return [({"latents": latents_BChw[i].contiguous()},
                 {"width": w, "height": h, "placement": json.dumps(self._placement(it).to_json())})
                for i, it in enumerate(batch)]

    def _encode_text(self, batch: list[Item]) -> list[tuple[dict, dict]]:
        from shared.encode_ops import encode_null_prompt, encode_prompt

        [it] = batch
        idx = range(len(it.sample.references)) if it.ref_index is None else [it.ref_index]
        refs = [[self._image(it, i) for i in idx]]
        vl_area = self.run.train.model_kwargs.vl_reference_area
        flavour = self.run.train.model_flavour
        embeds, mask = encode_prompt(self.pipe, flavour, [it.sample.caption], refs, vl_area)
        tensors = {"prompt_embeds": embeds[0].to(self.dtype).cpu(), "prompt_mask": mask[0].cpu()}
        if self.run.train.caption_dropout_probability > 0:
            n_embeds, n_mask = encode_null_prompt(self.pipe, flavour, refs, vl_area)
            tensors |= {"null_embeds": n_embeds[0].to(self.dtype).cpu(), "null_mask": n_mask[0].cpu()}
        return [(tensors, {"caption": it.sample.caption})]


def encode_run(run: RunConfig, store: ObjectStore, progress=None, pipe: Any = None) -> EncodeStats:
    """Encode a run's datasets into ``store`` (the core of encoder_svc and ``edittuner encode``)."""
    enc = DatasetEncoder(run, store, pipe=pipe)
    try:
        return enc.encode(progress)
    finally:
        enc.release()
