"""Encoder replicas on disjoint shards: two processes encode one dataset at the same time, each into its own
shard manifests; the finalize step merges them and writes the index. The union is what one encoder writes, and
no entry is encoded twice."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.cache import Manifests, shard_of
from shared.encode.encoder import DatasetEncoder
from shared.store.local import LocalStore

pytestmark = pytest.mark.slow  # runs two encoders as processes

CLI = [sys.executable, "-c", "import sys; from shared.cli.main import main; sys.exit(main(sys.argv[1:]))"]


def _tensors(store: LocalStore, keys: list[str]) -> dict:
    return {k: store.get_tensors(k)[0] for k in keys}


def test_two_replicas_encode_what_one_encoder_does_each_entry_once(tmp_path, tiny_models):
    data = write_dataset(tmp_path / "data", n=6, references=2)
    # one image per VAE batch: a batch's composition (which replica encodes which images) would otherwise change
    # the last bits of the convolutions
    cfg, _ = write_configs(tmp_path / "cfg", data, tiny_models("edit-v2"), "edit-v2", 2, vae_batch_size=1)
    run = load_run_config(cfg)
    one = LocalStore(tmp_path / "one")
    stats, (index_one,) = DatasetEncoder(run, one).encode_with_index()
    total = stats.encoded

    shared_store = tmp_path / "replicas"
    base = [*CLI, "encode", "--in-process", "--quiet", "--config", str(cfg), "--store", str(shared_store)]
    procs = [
        subprocess.Popen([*base, f"--shard={i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    encoded = [int(re.search(r"encoded (\d+), cached (\d+)", o[0]).group(1)) for o in outs]
    assert sum(encoded) == total and all(e > 0 for e in encoded), (encoded, total)  # each entry once, both worked
    store = LocalStore(shared_store)
    assert not store.list("cache/index/")  # the replicas write no index
    fin = subprocess.run([*base, "--finalize=2"], capture_output=True, text=True, timeout=600)
    assert fin.returncode == 0, fin.stderr[-2000:]
    assert not [k for k in store.list("") if "manifest.shard-" in k]  # merged, then removed

    assert sorted(one.list("cache/")) == sorted(store.list("cache/"))
    assert store.get_json(index_one) == one.get_json(index_one)
    objects = [k for k in one.list("cache/") if k.endswith(".safetensors")]
    a, b = _tensors(one, objects), _tensors(store, objects)
    assert all(a[k].keys() == b[k].keys() and all((a[k][n] == b[k][n]).all() for n in a[k]) for k in objects)
    for prefix in {k.rsplit("/", 1)[0] for k in one.list("cache/") if k.endswith("manifest.json")}:
        assert Manifests(one).doc(prefix) == Manifests(store).doc(prefix)
    # a second round of replicas finds everything cached
    again = [DatasetEncoder(run, store).encode_with_index(shard=(i, 2))[0] for i in (0, 1)]
    assert [s.encoded for s in again] == [0, 0] and sum(s.cached for s in again) == total


def test_shards_split_every_entry_and_a_missing_replica_fails_finalize(tmp_path, tiny_models):
    data = write_dataset(tmp_path / "data", n=6, references=1)
    cfg, _ = write_configs(tmp_path / "cfg", data, tiny_models("edit-v2"), "edit-v2", 1)
    run = load_run_config(cfg)
    store = LocalStore(tmp_path / "store")
    enc = DatasetEncoder(run, store)
    _, items, _, _ = enc.prepare()
    assert sorted(shard_of(it, 3) for it in items) != [0] * len(items)  # spread, not all on one replica
    enc.encode_with_index(shard=(0, 2))  # replica 1 never ran
    import pytest

    from shared.errors import FailedPrecondition

    with pytest.raises(
        FailedPrecondition,
        match=r"cache entries are missing after 2 encoder replicas \(those of "
        r"shard\(s\) 1",
    ):
        enc.finalize(2)
    enc.encode_with_index(shard=(1, 2))
    assert enc.finalize(2)
