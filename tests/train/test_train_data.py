"""Training batches from the cache: deterministic order, one signature per batch, exact resume position."""

from __future__ import annotations

import pytest
import torch

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.cache import settings_for
from shared.encode.encoder import DatasetEncoder
from shared.errors import FailedPrecondition
from shared.store.local import LocalStore
from shared.train.loader import TrainLoader, epoch_batches, load_items


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("train-data")
    root = write_dataset(tmp / "data", n=7, references=2)
    cfg, _ = write_configs(tmp / "cfg", root, tiny_models("edit-v2"), "edit-v2", 2)
    store = LocalStore(tmp / "store")
    for extra in ([], ["conditioning_multidataset_sampling=random", "caption_dropout_probability=0.5"]):
        DatasetEncoder(load_run_config(cfg, overrides=extra), store).encode()
    return cfg, store


def items_for(cfg, store, *overrides):
    run = load_run_config(cfg, overrides=list(overrides))
    return load_items(store, run, settings_for(run))[:2]


def test_epoch_order_is_deterministic_complete_and_one_signature_per_batch(cached):
    cfg, store = cached
    items, _ = items_for(cfg, store)
    assert len(items) == 7
    b0 = epoch_batches(items, 2, seed=5, epoch=0)
    assert b0 == epoch_batches(items, 2, seed=5, epoch=0)
    assert b0 != epoch_batches(items, 2, seed=5, epoch=1)
    assert sorted(i for b in b0 for i in b) == list(range(7))
    assert all(len({items[i].signature for i in b}) == 1 for b in b0)
    assert {items[i].signature[0] for i in range(7)} == {(64, 64), (96, 64)}


def test_batches_stack_and_pad_captions_with_a_mask(cached):
    cfg, store = cached
    items, _ = items_for(cfg, store)
    loader = TrainLoader(items, store, batch_size=2, seed=0, prefetch=0)
    for _ in range(4):
        b = loader.next_batch()
        B = b.latents_BChw.shape[0]
        assert len(b.refs_BChw) == 2 and all(r.shape[0] == B for r in b.refs_BChw)
        lengths = []
        for k in b.keys:
            it = next(i for i in items if f"{i.dataset}/{i.key}" == k)
            lengths.append(store.get_tensors(it.text_object(None))[0]["prompt_embeds"].shape[0])
        assert b.prompt_mask_BL.sum(1).tolist() == lengths
        for row, n in enumerate(lengths):
            assert torch.all(b.prompt_embeds_BLD[row, n:] == 0)


def test_resume_position_gives_the_same_next_batches_with_and_without_prefetch(cached):
    cfg, store = cached
    items, _ = items_for(cfg, store)
    a = TrainLoader(items, store, batch_size=2, seed=3, prefetch=2)
    seen = [a.next_batch() for _ in range(5)]  # crosses into epoch 1 (4 batches per epoch)
    state = a.state_dict()
    rest_a = [a.next_batch() for _ in range(3)]
    a.close()
    b = TrainLoader(items, store, batch_size=2, seed=3, prefetch=0)
    b.load_state_dict(state)
    rest_b = [b.next_batch() for _ in range(3)]
    assert state == {"epoch": 1, "position": 1} and len(seen) == 5
    for x, y in zip(rest_a, rest_b, strict=True):
        assert x.keys == y.keys and torch.equal(x.latents_BChw, y.latents_BChw)
        assert torch.equal(x.prompt_embeds_BLD, y.prompt_embeds_BLD)


def test_random_sampling_uses_one_reference_and_its_own_caption_embedding(cached):
    cfg, store = cached
    items, null_ok = items_for(
        cfg, store, "conditioning_multidataset_sampling=random", "caption_dropout_probability=0.5"
    )
    assert null_ok
    loader = TrainLoader(
        items, store, batch_size=1, seed=1, prefetch=0, random_references=True, caption_dropout=0.5, null_available=True
    )
    dropped = 0
    for _ in range(7):
        b = loader.next_batch()
        assert len(b.refs_BChw) == 1
        it = next(i for i in items if f"{i.dataset}/{i.key}" == b.keys[0])
        ref_ok = [
            j for j in range(2) if torch.equal(store.get_tensors(it.references[j])[0]["latents"], b.refs_BChw[0][0])
        ]
        text = store.get_tensors(it.text_object(it.reference_datasets[ref_ok[0]]))[0]
        n = int(b.prompt_mask_BL.sum())
        if torch.equal(b.prompt_embeds_BLD[0, :n], text["null_embeds"]):
            dropped += 1
        else:
            assert torch.equal(b.prompt_embeds_BLD[0, :n], text["prompt_embeds"])
    assert 0 < dropped < 7


def test_training_without_a_cache_says_to_encode(tmp_path, cached):
    cfg, _ = cached
    with pytest.raises(FailedPrecondition) as e:
        items_for(cfg, LocalStore(tmp_path / "empty"))
    assert "edittuner encode" in str(e.value) and "'demo-images'" in str(e.value)
