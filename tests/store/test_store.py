"""The object store's contract, on both backends: a LocalStore and a MinioStore on a real S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from stores import BAD_KEYS, new_minio_store, sha256_of

from shared import errors
from shared.store.base import COMMIT_MARKER, ObjectInfo, ObjectStore, validate_key
from shared.store.local import LocalStore
from shared.store.s3 import MinioStore


@pytest.fixture(params=["local", "minio"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return new_minio_store(request.getfixturevalue("s3_server"))


# --- core behaviour, both backends ---------------------------------------------------------------------------


def test_bytes_round_trip_and_stat(store: ObjectStore) -> None:
    data = bytes(range(256)) * 5
    info = store.put_bytes("runs/r1/blob.bin", data, content_type="image/png")
    assert info == ObjectInfo("runs/r1/blob.bin", 1280, sha256_of(data), "image/png")
    assert store.get_bytes("runs/r1/blob.bin") == data
    assert store.stat("runs/r1/blob.bin") == info
    assert store.exists("runs/r1/blob.bin") and not store.exists("runs/r1/other.bin")


def test_empty_object(store: ObjectStore) -> None:
    assert store.put_bytes("empty", b"").sha256 == sha256_of(b"")
    assert store.get_bytes("empty") == b""


def test_json_is_utf8_sorted_indented(store: ObjectStore) -> None:
    doc = {"zeta": [1, 2.5, None], "alpha": {"b": "ü", "a": True}}
    store.put_json("jobs/train/j1.json", doc)
    assert store.get_json("jobs/train/j1.json") == doc
    expected = '{\n  "alpha": {\n    "a": true,\n    "b": "ü"\n  },\n  "zeta": [\n    1,\n    2.5,\n    null\n  ]\n}\n'
    assert store.get_bytes("jobs/train/j1.json") == expected.encode("utf-8")
    assert store.stat("jobs/train/j1.json").content_type == "application/json"


def test_tensors_round_trip_exactly(store: ObjectStore) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "latents_BCHW": torch.randn(1, 16, 4, 6, generator=g).to(torch.bfloat16),
        "embeds_BLC": torch.randn(1, 7, 8, generator=g),
        "half": torch.randn(3, generator=g).half(),
        "mask_BL": torch.tensor([[True, False, True]]),
        "img_shapes": torch.tensor([[1, 4, 6]], dtype=torch.int64),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # non-contiguous input
    }
    store.put_tensors("cache/vae/ds/a.safetensors", tensors, metadata={"crop": "0,0,64,96", "bucket": "96x64"})
    loaded, metadata = store.get_tensors("cache/vae/ds/a.safetensors")
    assert metadata == {"crop": "0,0,64,96", "bucket": "96x64"}
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    store.put_tensors("cache/vae/ds/b.safetensors", {"x": torch.ones(2)})
    assert store.get_tensors("cache/vae/ds/b.safetensors")[1] == {}


def test_list_is_sorted_recursive_and_folder_scoped(store: ObjectStore) -> None:
    for key in ["a/b/2", "a/b/1", "a/b/c/3", "a/bc/x", "a/b", "z", "a/b.json"]:
        store.put_bytes(key, key.encode())
    assert store.list("a/b") == ["a/b/1", "a/b/2", "a/b/c/3"]
    assert store.list("a/b/") == ["a/b/1", "a/b/2", "a/b/c/3"]
    assert store.list("a") == ["a/b", "a/b.json", "a/b/1", "a/b/2", "a/b/c/3", "a/bc/x"]
    assert store.list() == ["a/b", "a/b.json", "a/b/1", "a/b/2", "a/b/c/3", "a/bc/x", "z"]
    assert store.list("nothing/here") == []
    assert store.list("z") == []  # a key is not a folder of itself


def test_a_key_can_also_be_a_folder(store: ObjectStore) -> None:
    # LocalStore must keep these apart on disk: see the ".ptr" escaping in the module docstring.
    keys = ["d", "d/e", "d.ptr", "d.ptr/f", "d.ptr_/g", "d.ptr__", "x.ptr.ptr/y"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(keys)
    assert [store.get_bytes(k) for k in keys] == [k.encode() for k in keys]
    store.delete("d.ptr/f")
    assert store.list("d.ptr") == [] and store.get_bytes("d.ptr") == b"d.ptr"


def test_overwrite_returns_new_content(store: ObjectStore) -> None:
    store.put_bytes("k", b"old")
    info = store.put_bytes("k", b"new content")
    assert store.get_bytes("k") == b"new content"
    assert store.stat("k") == info and info.sha256 == sha256_of(b"new content") and info.size == 11


def test_missing_key_is_not_found_naming_it(store: ObjectStore, tmp_path: Path) -> None:
    for read in (store.get_bytes, store.stat, store.get_json, store.get_tensors):
        with pytest.raises(errors.NotFound, match="'runs/none/x.json'"):
            read("runs/none/x.json")
    with pytest.raises(errors.NotFound, match="'runs/none/x.json'"):
        store.get_file("runs/none/x.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    store.delete("runs/none/x.json")  # missing is fine
    assert not store.exists("runs/none/x.json")


def test_delete_removes_only_that_key(store: ObjectStore) -> None:
    store.put_bytes("a/1", b"1")
    store.put_bytes("a/2", b"2")
    store.delete("a/1")
    assert store.list("a") == ["a/2"] and not store.exists("a/1") and store.get_bytes("a/2") == b"2"


@pytest.mark.parametrize(("key", "rule"), BAD_KEYS)
def test_validate_key_rejects_naming_key_and_rule(key: str, rule: str) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        validate_key(key)
    assert repr(key)[:60] in str(info.value) and rule in str(info.value)


def test_validate_key_accepts_ordinary_keys() -> None:
    for key in ["a", "runs/r-1/checkpoints/step-100/lora.safetensors", ".hidden/x", "ünï/cødé", "a/b c/d"]:
        assert validate_key(key) == key


def test_every_method_validates_keys(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    calls = [
        lambda k: store.put_bytes(k, b"x"),
        store.get_bytes,
        store.stat,
        store.exists,
        store.delete,
        lambda k: store.put_file(k, src),
        lambda k: store.get_file(k, tmp_path / "dst"),
        lambda k: store.put_json(k, {}),
        store.get_json,
        lambda k: store.put_tensors(k, {"t": torch.zeros(1)}),
        store.get_tensors,
    ]
    for key, _ in BAD_KEYS:
        for call in calls:
            with pytest.raises(errors.InvalidInput, match="invalid object key"):
                call(key)
    for prefix in ["/abs", "a//b", "../x"]:
        with pytest.raises(errors.InvalidInput, match="invalid object key"):
            store.list(prefix)
    assert store.list() == []


def test_file_round_trip_is_atomic_and_streamed(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(11 * (1 << 20) + 123)  # several read chunks; a multipart upload on S3
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = store.put_file("runs/r/checkpoints/step-1/model.safetensors", src)
    assert info.sha256 == sha256_of(data) and info.size == len(data)
    if isinstance(store, MinioStore):  # the sha256 metadata survives a multipart upload (etag "<md5>-<parts>")
        assert "-" in store.client.stat_object(store.bucket, info.key).etag
        assert store.stat(info.key) == info
    dst = tmp_path / "out" / "nested" / "model.safetensors"
    store.get_file("runs/r/checkpoints/step-1/model.safetensors", dst)
    assert dst.read_bytes() == data
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.safetensors"]  # no temp file left behind
    with pytest.raises(errors.NotFound, match="does not exist"):
        store.put_file("k", tmp_path / "missing.bin")


def test_commit_marker_lifecycle(store: ObjectStore) -> None:
    prefix = "runs/r/checkpoints/step-10"
    a = store.put_bytes(f"{prefix}/lora.safetensors", b"lora")
    b = store.put_json(f"{prefix}/state.json", {"step": 10})
    store.put_bytes("runs/r/checkpoints/step-100/lora.safetensors", b"other")
    assert not store.is_committed(prefix)
    with pytest.raises(errors.NotFound, match="not committed"):
        store.read_commit(prefix)
    manifest = store.commit(prefix, [b.key, a.key, a.key])
    assert store.is_committed(prefix) and store.is_committed(prefix + "/")
    assert not store.is_committed("runs/r/checkpoints/step-100")
    assert [(o.key, o.sha256, o.size) for o in manifest.objects] == [(a.key, a.sha256, 4), (b.key, b.sha256, b.size)]
    assert store.read_commit(prefix) == manifest and store.verify_commit(prefix) == manifest
    doc = store.get_json(f"{prefix}/{COMMIT_MARKER}")
    assert doc["prefix"] == prefix and doc["objects"][0] == {"key": a.key, "sha256": a.sha256, "size": 4}

    store.put_bytes(a.key, b"changed")
    store.delete(b.key)
    with pytest.raises(errors.IntegrityError) as info:
        store.verify_commit(prefix)
    message = str(info.value)
    assert "2 problems" in message and f"'{a.key}' changed" in message and f"'{b.key}' is missing" in message


def test_commit_rejects_keys_outside_the_prefix(store: ObjectStore) -> None:
    store.put_bytes("runs/r/step-1/a", b"a")
    store.put_bytes("runs/r/step-10/a", b"a")
    with pytest.raises(errors.InvalidInput, match="'runs/r/step-10/a'.*not under"):
        store.commit("runs/r/step-1", ["runs/r/step-1/a", "runs/r/step-10/a"])
    with pytest.raises(errors.NotFound, match="'runs/r/step-1/b'"):
        store.commit("runs/r/step-1", ["runs/r/step-1/b"])
    with pytest.raises(errors.InvalidInput, match="non-empty prefix"):
        store.commit("", ["runs/r/step-1/a"])
    assert not store.is_committed("runs/r/step-1")


def test_delete_prefix_spares_sibling_prefixes(store: ObjectStore) -> None:
    for key in ["ckpt/step-1/a", "ckpt/step-1/b/c", "ckpt/step-10/a"]:
        store.put_bytes(key, b"x")
    store.commit("ckpt/step-1", ["ckpt/step-1/a"])
    assert store.delete_prefix("ckpt/step-1") == 3
    assert store.list() == ["ckpt/step-10/a"] and not store.is_committed("ckpt/step-1")
    with pytest.raises(errors.InvalidInput, match="non-empty prefix"):
        store.delete_prefix("/")


def test_describe_says_where(store: ObjectStore) -> None:
    if isinstance(store, LocalStore):
        assert str(store.root) in store.describe() and str(store.root) in repr(store)
    else:
        assert isinstance(store, MinioStore)
        assert store.describe() == f"s3 bucket '{store.bucket}' at http://{store.endpoint}"
