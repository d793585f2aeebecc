"""The cache's layout and keys: what is cached where, when an entry is still valid, and the training index.

What is cached, and where (prefixes come from the config):

- ``<cache_dir_vae of the image's dataset>/<sample key>.safetensors``: ``latents`` (16, h, w) normalised VAE
  latents of the placed (bucketed, cropped) image, for targets and references alike.
- ``<text prefix>/<sample key>.safetensors``: ``prompt_embeds`` (L, D) and ``prompt_mask`` (L,) of the caption
  conditioned on the sample's reference(s) through the flavour's edit template; plus ``null_embeds`` /
  ``null_mask`` (the empty caption with the same references) when caption dropout is on. For edit-v1 the text
  prefix is the conditioning_image_embeds cache. With ``conditioning_multidataset_sampling=random`` there is one
  file per reference dataset: ``<text prefix>/<sample key>/<reference dataset id>.safetensors``. A preview sample's
  entry (``eval_candidates``) also holds ``negative_embeds`` / ``negative_mask``, the previews' negative prompt
  with the same references, when previews use true CFG (``validation_guidance`` > 1): previews then need no text
  encoder (not with random sampling, whose entries see one reference each while previews see them all).
- ``<prefix>/manifest.json`` per cache prefix: sample key → object, cache key, bucket, shapes, dtypes, sources.
- ``cache/index/<dataset id>/<settings digest>.json``: what training reads — per sample its caption, bucket and
  the objects of its target latents, reference latents (in conditioning_data order) and caption embedding(s).
  The digest covers the model, flavour and dataset entry, so differently configured runs never share an index.

Each entry's *cache key* hashes everything that changes its tensors (image bytes, placement, caption, model
fingerprint, dtype, flavour, reference area, and the text encoder's precision and the VAE's tiling where they are
not the defaults). An entry whose key is unchanged and whose object exists is not
encoded again, so a second encode of an unchanged dataset encodes nothing and a changed caption re-encodes
exactly one text entry.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.data.pairing import PairedDataset, Sample
from shared.errors import NotFound
from shared.model.fingerprint import model_fingerprint
from shared.store.base import ObjectStore

CACHE_FORMAT = "edittuner.cache.v1"
MANIFEST = "manifest.json"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Item:
    """One cache entry to produce: a VAE latent of one image, or the caption embedding of one sample."""

    kind: str  # "vae", "text" or "mask" (a loss mask at the latent grid)
    prefix: str
    entry: str  # the manifest key: sample key, or "<sample key>/<reference dataset id>" (random sampling)
    cache_key: str
    dataset: PairedDataset
    sample: Sample
    ref_index: int | None  # vae: None = the target, i = reference i; text: the chosen reference (random)
    sources: dict[str, str]  # relpath → sha256 of the bytes
    negative: str | None = None  # text of a preview sample: also encode this negative prompt (previews' true CFG)

    @property
    def object_key(self) -> str:
        return f"{self.prefix}/{self.entry}.safetensors"


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
    text_precision: str = "no_change"  # text_encoder_1_precision: quantized weights give other embeddings
    vae_tiling: bool = False  # tiled encoding gives latents close to, not equal to, untiled ones
    negative_prompt: str | None = None  # previews' negative prompt when they use true CFG: preview samples only


def settings_for(run: RunConfig) -> EncodeSettings:
    """The encode settings of ``run``: the same on every host for the same config and model files (the precision
    as configured, not what "auto" resolved to; the model by its content, not its folder)."""
    t = run.train
    flav = get_flavour(t.model_flavour)
    return EncodeSettings(
        flavour=flav.name,
        model=t.model_path,
        model_fp=model_fingerprint(t.model_path, ("vae", "text_encoder", "tokenizer", "processor")),
        dtype=t.mixed_precision,
        vl_area=t.model_kwargs.vl_reference_area or flav.vl_ref_area,
        with_null=t.caption_dropout_probability > 0,
        random_refs=t.conditioning_multidataset_sampling == "random",
        text_precision=t.text_encoder_1_precision,
        vae_tiling=t.vae_enable_tiling,
        negative_prompt=t.validation_negative_prompt if t.validation_guidance > 1 else None,
    )


# Settings whose default leaves the keys as they were before the setting existed: caches encoded then stay valid.
_KEYED_UNLESS_DEFAULT = {"text_precision": "no_change", "vae_tiling": False}


def _keyed(settings: EncodeSettings) -> dict[str, Any]:
    """The settings that decide the text tensors: all but ``model``, the name the model goes by on this host,
    ``vae_tiling``, which only the latents depend on, and ``negative_prompt``, which only preview samples' do."""
    return {
        k: v
        for k, v in dataclasses.asdict(settings).items()
        if k not in ("model", "vae_tiling", "negative_prompt") and _KEYED_UNLESS_DEFAULT.get(k, object()) != v
    }


def plan(run: RunConfig, paired: list[PairedDataset], settings: EncodeSettings) -> list[Item]:
    """Every cache entry the datasets need, with its cache key (source hashes come from the scan)."""
    items: list[Item] = []
    base = _keyed(settings)
    flav = get_flavour(settings.flavour)
    users: dict[str, int] = {}
    for d in run.data.image_datasets:
        for rid in d.conditioning_data:
            users[rid] = users.get(rid, 0) + 1
    # previews render their samples from the cache, negative prompt included (eval_svc needs no text encoder)
    previewed = set() if settings.random_refs else {(ds.config.id, s.key) for ds, s in eval_candidates(run, paired)}
    for ds in paired:
        text_prefix = run.data.text_cache_prefix(ds.config, settings.flavour)
        refs_cfg = run.data.references_of(ds.config)
        for s in ds.samples:
            t_sha = s.target.sha256
            vae_common: dict[str, str | bool] = {
                "model_fp": settings.model_fp,
                "dtype": settings.dtype,
                "format": CACHE_FORMAT,
            }
            if settings.vae_tiling:
                vae_common["tiling"] = True
            items.append(
                Item(
                    "vae",
                    ds.config.vae_cache_prefix,
                    s.key,
                    _digest({**vae_common, "src": t_sha, "place": s.placement.to_json()}),
                    ds,
                    s,
                    None,
                    {s.target.relpath: t_sha},
                )
            )
            ref_shas = []
            for i, (r, rcfg) in enumerate(zip(s.references, refs_cfg, strict=True)):
                r_sha = r.image.sha256
                ref_shas.append((r_sha, r.placement.to_json()))
                # a reference dataset shared by several image datasets is placed per image dataset
                entry = s.key if users.get(rcfg.id, 0) <= 1 else f"{ds.config.id}/{s.key}"
                items.append(
                    Item(
                        "vae",
                        rcfg.vae_cache_prefix,
                        entry,
                        _digest({**vae_common, "src": r_sha, "place": r.placement.to_json()}),
                        ds,
                        s,
                        i,
                        {r.image.relpath: r_sha},
                    )
                )
            if s.mask is not None:  # the loss mask, averaged over each latent cell of the target
                m_sha = s.mask.image.sha256
                mcfg = run.data.get(s.mask.dataset_id)
                m_entry = s.key if users.get(mcfg.id, 0) <= 1 else f"{ds.config.id}/{s.key}"
                m_key = {
                    "src": m_sha,
                    "place": s.mask.placement.to_json(),
                    "scale": flav.vae_scale,
                    "format": CACHE_FORMAT,
                }
                items.append(
                    Item(
                        "mask",
                        mcfg.vae_cache_prefix,
                        m_entry,
                        _digest(m_key),
                        ds,
                        s,
                        None,
                        {s.mask.image.relpath: m_sha},
                    )
                )
            choices = list(range(len(s.references))) if settings.random_refs else [None]
            negative = settings.negative_prompt if (ds.config.id, s.key) in previewed else None
            for choice in choices:
                used = ref_shas if choice is None else [ref_shas[choice]]
                entry = s.key if choice is None else f"{s.key}/{s.references[choice].dataset_id}"
                keyed = {**base, "caption": s.caption, "refs": used, "format": CACHE_FORMAT}
                if negative is not None:
                    keyed["negative"] = negative
                items.append(
                    Item("text", text_prefix, entry, _digest(keyed), ds, s, choice, {s.target.relpath: t_sha}, negative)
                )
    return items


# -------------------------------------------------------------------------------------------- manifests
def shard_of(item: Item, shards: int) -> int:
    """The encoder replica an entry belongs to: a stable hash of its manifest place, the same on every host."""
    digest = hashlib.sha256(f"{item.prefix}/{item.entry}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_manifest(prefix: str, shard: str) -> str:
    return f"{prefix}/manifest.shard-{shard}.json"


class ManifestDoc(TypedDict):
    """A prefix's ``manifest.json`` (or a replica's shard file): sample key → its entry's record."""

    format: str
    entries: dict[str, dict[str, Any]]


class Manifests:
    """The per-prefix manifest.json files, loaded lazily and written back as they change.

    With ``shard`` (an encoder replica's ``i-of-n``) new entries go to the replica's own
    ``manifest.shard-i-of-n.json`` beside the shared manifest, which it only reads: replicas never rewrite the
    same object. ``merge_shards`` (the finalize step) folds every shard file into the manifest."""

    def __init__(self, store: ObjectStore, shard: str | None = None):
        self.store = store
        self.shard = shard
        self.docs: dict[str, ManifestDoc] = {}
        self.own: dict[str, ManifestDoc] = {}
        self.dirty: set[str] = set()

    def doc(self, prefix: str) -> ManifestDoc:
        if prefix not in self.docs:
            try:
                d = self.store.get_json(f"{prefix}/{MANIFEST}")
            except NotFound:
                d = None
            if not isinstance(d, dict) or d.get("format") != CACHE_FORMAT:
                d = {"format": CACHE_FORMAT, "entries": {}}
            self.docs[prefix] = cast(ManifestDoc, d)  # JSON of the manifest format (checked), or a new one
        return self.docs[prefix]

    def _own(self, prefix: str) -> ManifestDoc:
        if self.shard is None:
            return self.doc(prefix)
        if prefix not in self.own:
            try:
                d = self.store.get_json(shard_manifest(prefix, self.shard))
            except NotFound:
                d = None
            self.own[prefix] = (
                cast(ManifestDoc, d)  # JSON of the manifest format (checked)
                if isinstance(d, dict) and d.get("format") == CACHE_FORMAT
                else {"format": CACHE_FORMAT, "entries": {}}
            )
        return self.own[prefix]

    def entry(self, prefix: str, entry: str) -> dict[str, Any] | None:
        if self.shard is not None and entry in self._own(prefix)["entries"]:
            return self._own(prefix)["entries"][entry]
        return self.doc(prefix)["entries"].get(entry)

    def set(self, prefix: str, entry: str, value: dict[str, Any]) -> None:
        self._own(prefix)["entries"][entry] = value
        self.dirty.add(prefix)

    def flush(self) -> None:
        for prefix in sorted(self.dirty):
            if self.shard is None:
                self.store.put_json(f"{prefix}/{MANIFEST}", self.docs[prefix])
            else:
                self.store.put_json(shard_manifest(prefix, self.shard), self.own[prefix])
        self.dirty.clear()

    def merge_shards(self, prefixes: builtins.set[str]) -> int:  # builtins: ``set`` here is the method above
        """Fold the replicas' shard manifests into each prefix's manifest (written before the shard files are
        removed, so a crash in between loses nothing); returns the number of entries merged."""
        merged = 0
        for prefix in sorted(prefixes):
            keys = [
                k
                for k in self.store.list(prefix)
                if k.rsplit("/", 1)[0] == prefix
                and k.rsplit("/", 1)[1].startswith("manifest.shard-")
                and k.endswith(".json")
            ]
            for key in keys:
                d = self.store.get_json(key)
                if isinstance(d, dict) and d.get("format") == CACHE_FORMAT:
                    self.doc(prefix)["entries"].update(d["entries"])
                    merged += len(d["entries"])
                    self.dirty.add(prefix)
            self.flush()
            for key in keys:
                self.store.delete(key)
        return merged


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
    refs = [
        dataclasses.asdict(r) | {"aws_secret_access_key": None}
        for r in run.data.references_of(run.data.get(dataset_id))
    ]
    keyed = _keyed(settings) | ({"vae_tiling": True} if settings.vae_tiling else {})
    digest = _digest(
        {
            "settings": keyed,
            "dataset": entry,
            "refs": refs,
            "match_target_res": run.train.model_kwargs.match_target_res,
            "reference_area": run.train.model_kwargs.reference_area,
            "format": INDEX_FORMAT,
        }
    )
    return f"cache/index/{dataset_id}/{digest[:32]}.json"


def write_index(
    store: ObjectStore,
    run: RunConfig,
    ds: PairedDataset,
    items: list[Item],
    manifests: Manifests,
    settings: EncodeSettings,
) -> str:
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
        text = {
            ("" if it.ref_index is None else s.references[it.ref_index].dataset_id): it.object_key
            for it in its
            if it.kind == "text"
        }
        masks = [it.object_key for it in its if it.kind == "mask"]
        samples.append(
            {
                "mask": masks[0] if masks else None,
                "key": s.key,
                "caption": s.caption,
                "bucket": list(s.bucket),
                "reference_sizes": [list(r.placement.final) for r in s.references],
                "target": vae[None],
                "references": [vae[i] for i in range(len(s.references))],
                "reference_datasets": [r.dataset_id for r in s.references],
                "text": text,
            }
        )
    key = index_key(run, ds.config.id, settings)
    store.put_json(
        key,
        {
            "format": INDEX_FORMAT,
            "dataset": ds.config.id,
            "role": ds.role,
            "flavour": settings.flavour,
            "model": settings.model,
            "model_fp": settings.model_fp,
            "null_embeds": settings.with_null,
            "random_references": settings.random_refs,
            "repeats": ds.config.repeats,
            "samples": samples,
        },
    )
    return key


# ------------------------------------------------------------------------------------------- evaluation
EVAL_DATASET, HELD_OUT, TRAINING_SAMPLES = "eval dataset", "held out of training", "training samples"


def eval_candidates(
    run: RunConfig, paired: Sequence[PairedDataset], cached: set[tuple[str, str]] | None = None
) -> list[tuple[PairedDataset, Sample]]:
    """The samples previews are rendered for, the same at every step: the first ``num_eval_images`` of
    ``eval_dataset_id`` when the config names one; else the samples ``holdout`` keeps out of training, or (on a
    tiny dataset, or with ``holdout_eval_images`` off) the first training samples. ``cached``: the (dataset, key)
    pairs the cache index holds — the loader decides on those, so must this; the encoder, before anything is
    cached, passes None."""
    n = run.train.num_eval_images
    eval_id = run.train.eval_dataset_id
    pool = [ds for ds in paired if (ds.config.id == eval_id if eval_id is not None else ds.role == "train")]
    candidates = [(ds, s) for ds in pool for s in ds.samples if cached is None or (ds.config.id, s.key) in cached]
    if eval_id is not None:
        return candidates[:n]
    held, _ = holdout(run, [(ds.config.id, s.key) for ds, s in candidates])
    return [c for c in candidates if (c[0].config.id, c[1].key) in held] if held else candidates[:n]


def holdout(run: RunConfig, train_keys: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """Which cached training samples (``train_keys``: (dataset, key) in dataset then key order) are kept out of
    training for evaluation, and how previews must label theirs. The one rule the loader and the previews share.

    With ``eval_dataset_id`` nothing is held out (the eval dataset is). Otherwise the first ``num_eval_images``,
    unless ``holdout_eval_images`` is off or the datasets hold fewer than twice as many samples: then previews
    show training samples and say so."""
    t = run.train
    if t.eval_dataset_id is not None:
        return [], EVAL_DATASET
    n = t.num_eval_images
    if not t.holdout_eval_images or len(train_keys) < 2 * n:
        return [], TRAINING_SAMPLES
    return train_keys[:n], HELD_OUT
