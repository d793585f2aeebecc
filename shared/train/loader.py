"""Training batches from the cache: a deterministic, resumable order and a prefetching reader.

Samples come from the training index that encoding wrote (``cache/index/<dataset>/<digest>.json``); training
never encodes. Batches hold samples of one *signature* (target bucket and reference sizes), so tensors stack
without padding; only the caption embeddings are padded, with their mask.

The order of epoch e is a pure function of (seed, e): shuffle within each signature, cut into batches, shuffle
the batches. The loader's whole state is (epoch, position), so a checkpoint restores it exactly. Per-batch
choices (which reference dataset under ``random`` sampling, caption dropout) are drawn from a generator seeded
by (seed, epoch, position) for the same reason.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from shared.config.schema import RunConfig
from shared.encode.cache import EVAL_DATASET, INDEX_FORMAT, EncodeSettings, holdout, index_key
from shared.errors import FailedPrecondition, NotFound
from shared.model.flow import EditBatch
from shared.store.base import ObjectStore

if TYPE_CHECKING:
    # What the prefetch thread queues: a batch with its (epoch, position), or the error that stopped the thread.
    Prefetched = tuple[int, int, EditBatch] | tuple[Literal["error"], BaseException, None]


@dataclass(frozen=True)
class TrainItem:
    key: str
    dataset: str
    caption: str
    target: str
    references: tuple[str, ...]
    reference_datasets: tuple[str, ...]
    text: tuple[tuple[str, str], ...]  # ("" | reference dataset id, object key)
    signature: tuple[Any, ...]
    mask: str | None = None  # the loss mask's object (masked loss)

    def text_object(self, reference_dataset: str | None) -> str:
        wanted = reference_dataset or ""
        for k, v in self.text:
            if k == wanted:
                return v
        raise KeyError(wanted)


def load_items(
    store: ObjectStore,
    run: RunConfig,
    settings: EncodeSettings | None,
    role: str = "train",
    index_keys: dict[str, str] | None = None,
) -> tuple[list[TrainItem], bool, str]:
    """The index entries of every image dataset with ``role``; (items, null embeddings available, how previews
    are labelled: see ``holdout``, whose held-out samples are left out of training here).
    ``index_keys`` (dataset id → index key), as the encoder that wrote them reported, spare computing the keys
    here — from a host that need not have the encoder's model files."""
    docs: list[tuple[str, dict[str, Any]]] = []
    null_ok = True
    for ds in run.data.image_datasets:
        is_eval = run.train.eval_dataset_id == ds.id
        if (role == "eval") != is_eval:
            continue
        if index_keys is not None and ds.id in index_keys:
            key = index_keys[ds.id]
        elif settings is not None:
            key = index_key(run, ds.id, settings)
        else:
            raise FailedPrecondition(f"dataset {ds.id!r} has no cache index: encode it first")
        try:
            doc = store.get_json(key)
        except NotFound:
            raise FailedPrecondition(
                f"dataset {ds.id!r} has no cache for this configuration ({key} is missing in {store.describe()}); "
                "run `edittuner encode` with the same config first"
            ) from None
        if doc.get("format") != INDEX_FORMAT:
            raise FailedPrecondition(f"{key}: unknown cache index format {doc.get('format')!r}; encode again")
        null_ok = null_ok and bool(doc.get("null_embeds"))
        docs.append((ds.id, doc))
    held, label = (
        holdout(run, [(d, s["key"]) for d, doc in docs for s in doc["samples"]])
        if role == "train"
        else ([], EVAL_DATASET)
    )
    items: list[TrainItem] = []
    for dataset_id, doc in docs:
        for _ in range(1 + int(doc.get("repeats", 0)) if role == "train" else 1):
            for s in doc["samples"]:
                if (dataset_id, s["key"]) in held:
                    continue
                sig = (tuple(s["bucket"]), tuple(tuple(r) for r in s["reference_sizes"]))
                items.append(
                    TrainItem(
                        s["key"],
                        dataset_id,
                        s["caption"],
                        s["target"],
                        tuple(s["references"]),
                        tuple(s["reference_datasets"]),
                        tuple(sorted(s["text"].items())),
                        sig,
                        s.get("mask"),
                    )
                )
    if role == "train" and not items:
        raise FailedPrecondition("no training samples in the cache: every dataset is empty or failed to encode")
    return items, null_ok, label


def epoch_batches(items: list[TrainItem], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches of one epoch; each batch within one signature."""
    rng = np.random.default_rng([seed, epoch])
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.signature, []).append(i)
    batches = []
    for sig in sorted(groups, key=repr):
        idx = groups[sig]
        order = [idx[j] for j in rng.permutation(len(idx))]
        batches += [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


class TrainLoader:
    """Yields EditBatches in the deterministic order, loading ahead on a thread so steps do not wait on the store.

    ``wait_seconds`` accumulates the time ``next_batch`` spent waiting for data (the stall).
    """

    def __init__(
        self,
        items: list[TrainItem],
        store: ObjectStore,
        *,
        batch_size: int,
        seed: int,
        caption_dropout: float = 0.0,
        random_references: bool = False,
        null_available: bool = False,
        prefetch: int = 4,
        pin_memory: bool = False,
    ):
        self.items, self.store = items, store
        self.batch_size, self.seed = batch_size, seed
        self.caption_dropout, self.random_references = caption_dropout, random_references
        if caption_dropout > 0 and not null_available:
            raise FailedPrecondition(
                "caption_dropout_probability > 0 but the cache has no null embeddings; "
                "encode again with the same config"
            )
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.epoch, self.position = 0, 0
        self._order: dict[int, list[list[int]]] = {}
        self.wait_seconds = 0.0
        self._queue: queue.Queue[Prefetched] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- order and state
    def batches_of(self, epoch: int) -> list[list[int]]:
        order = self._order.get(epoch)
        if order is None:
            order = epoch_batches(self.items, self.batch_size, self.seed, epoch)
            # the consumer and the prefetch thread may sit in different epochs: keep the two newest
            self._order = {e: o for e, o in self._order.items() if e >= epoch - 1} | {epoch: order}
        return order

    def _advance(self, epoch: int, position: int) -> tuple[int, int]:
        position += 1
        if position >= len(self.batches_of(epoch)):
            return epoch + 1, 0
        return epoch, position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= len(self.batches_of(epoch)):
            raise FailedPrecondition(
                f"the checkpoint's data position (epoch {epoch}, batch {position}) is past the end of this dataset's "
                f"{len(self.batches_of(epoch))} batches: the dataset or train_batch_size changed since the "
                "checkpoint; resume with the data it was trained on, or start a new run"
            )
        self.epoch, self.position = epoch, position

    # ---- loading
    def load(self, epoch: int, position: int) -> EditBatch:
        """The batch at (epoch, position), read from the store."""
        idx = self.batches_of(epoch)[position]
        rng = np.random.default_rng([self.seed, epoch, position, 7])
        batch_items = [self.items[i] for i in idx]
        n_refs = len(batch_items[0].references)
        choice = int(rng.integers(n_refs)) if self.random_references else None
        dropped = rng.random(len(batch_items)) < self.caption_dropout
        latents, refs, embeds, masks, pads = [], [], [], [], []
        for it, drop in zip(batch_items, dropped, strict=True):
            latents.append(self.store.get_tensors(it.target)[0]["latents"])
            slots = range(n_refs) if choice is None else [choice]
            refs.append([self.store.get_tensors(it.references[j])[0]["latents"] for j in slots])
            text = self.store.get_tensors(it.text_object(None if choice is None else it.reference_datasets[choice]))[0]
            which = "null" if drop else "prompt"
            embeds.append(text[f"{which}_embeds"])
            masks.append(text[f"{which}_mask"])
            pads.append(text.get(f"{which}_image_pad_mask"))  # Qwen-Image-2.1's entries have it
        L = max(e.shape[0] for e in embeds)
        embeds_BLD = torch.zeros(len(embeds), L, embeds[0].shape[1], dtype=embeds[0].dtype)
        mask_BL = torch.zeros(len(embeds), L, dtype=torch.long)
        pad_BL = torch.zeros(len(embeds), L, dtype=torch.bool)
        for b, (e, m, p) in enumerate(zip(embeds, masks, pads, strict=True)):
            embeds_BLD[b, : e.shape[0]] = e
            mask_BL[b, : e.shape[0]] = m
            if p is not None:
                pad_BL[b, : e.shape[0]] = p.bool()
        batch = EditBatch(
            torch.stack(latents),
            [torch.stack([r[j] for r in refs]) for j in range(len(refs[0]))],
            embeds_BLD,
            mask_BL,
            [f"{it.dataset}/{it.key}" for it in batch_items],
            text_all_valid=bool(mask_BL.all()),
            image_pad_mask_BL=pad_BL if pads[0] is not None else None,
            loss_mask_Bhw=self._masks(batch_items, tuple(latents[0].shape[-2:])),
        )
        return batch.pin_memory() if self.pin_memory else batch

    def _masks(self, batch_items: list[TrainItem], hw: tuple[int, ...]) -> torch.Tensor | None:
        """The batch's loss masks (B, h, w); a sample without one weighs every position 1; None: no masks."""
        if all(it.mask is None for it in batch_items):
            return None
        return torch.stack(
            [
                torch.ones(hw) if it.mask is None else self.store.get_tensors(it.mask)[0]["mask"].float()
                for it in batch_items
            ]
        )

    def _producer(self, epoch: int, position: int, out: queue.Queue[Prefetched], stop: threading.Event) -> None:
        """Each thread has its own queue and stop flag: a slow thread left over from close() can never feed
        batches of an old position into a new loader."""
        try:
            while not stop.is_set():
                item: Any = (epoch, position, self.load(epoch, position))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                epoch, position = self._advance(epoch, position)
        except BaseException as e:  # noqa: BLE001 - surfaced to the consumer, not lost on the thread
            out.put(("error", e, None))

    def next_batch(self) -> EditBatch:
        if self.prefetch <= 0:
            batch = self.load(self.epoch, self.position)
        else:
            if self._thread is None:
                self._stop = threading.Event()
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(
                    target=self._producer,
                    args=(self.epoch, self.position, self._queue, self._stop),
                    daemon=True,
                    name="train-prefetch",
                )
                self._thread.start()
            assert self._queue is not None  # made with the thread
            t0 = time.perf_counter()
            got = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if got[0] == "error":
                raise got[1]
            batch = got[2]
        self.epoch, self.position = self._advance(self.epoch, self.position)
        return batch

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        self._thread, self._queue = None, None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches_of(self.epoch))
