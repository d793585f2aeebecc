"""The object store, on both backends: a LocalStore in tmp_path and a MinioStore on a real S3 server (moto in
its own process). Each MinioStore test gets a fresh bucket, so tests share the server but not state."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from shared import errors
from shared.storage import (
    COMMIT_MARKER,
    LocalStore,
    MinioStore,
    ObjectInfo,
    ObjectStore,
    minio_client_from_aws_fields,
    open_store,
    parse_endpoint_url,
    resolve_s3_credentials,
    validate_key,
)

from s3server import ACCESS_KEY, SECRET_KEY, free_port

S3_ENV = {"EDITTUNER_S3_ACCESS_KEY": ACCESS_KEY, "EDITTUNER_S3_SECRET_KEY": SECRET_KEY}
BAD_KEYS = [
    ("", "non-empty"),
    ("/abs/key", "leading '/'"),
    ("a/../b", "'..'"),
    ("..", "'..'"),
    ("a/./b", "'.'"),
    ("a//b", "empty path segments"),
    ("a\\b", "backslashes"),
    ("a/b\x00", "control characters"),
    ("a/\nb", "control characters"),
    ("a/b\x7f", "control characters"),
    ("folder/", "must not end with '/'"),
    ("x" * 251, "at most 250 bytes"),
    ("a/" * 600 + "b", "at most 1024 bytes"),
]


def _minio_store(endpoint_url: str, **kwargs: object) -> MinioStore:
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    return MinioStore(urlsplit(endpoint_url).netloc, ACCESS_KEY, SECRET_KEY, bucket, retries=0, **kwargs)


@pytest.fixture(params=["local", "minio"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return _minio_store(request.getfixturevalue("s3_server"))


@pytest.fixture
def minio_store(s3_server: str) -> MinioStore:
    return _minio_store(s3_server)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- core behaviour, both backends ---------------------------------------------------------------------------


def test_bytes_round_trip_and_stat(store: ObjectStore) -> None:
    data = bytes(range(256)) * 5
    info = store.put_bytes("runs/r1/blob.bin", data, content_type="image/png")
    assert info == ObjectInfo("runs/r1/blob.bin", 1280, _sha(data), "image/png")
    assert store.get_bytes("runs/r1/blob.bin") == data
    assert store.stat("runs/r1/blob.bin") == info
    assert store.exists("runs/r1/blob.bin") and not store.exists("runs/r1/other.bin")


def test_empty_object(store: ObjectStore) -> None:
    assert store.put_bytes("empty", b"").sha256 == _sha(b"")
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
    assert store.stat("k") == info and info.sha256 == _sha(b"new content") and info.size == 11


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
    assert info.sha256 == _sha(data) and info.size == len(data)
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
    assert [(o.key, o.sha256, o.size) for o in manifest.objects] == [
        (a.key, a.sha256, 4), (b.key, b.sha256, b.size)
    ]
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


# --- LocalStore: layout, corruption, crashes, gc -------------------------------------------------------------


def test_local_layout_is_content_addressed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("runs/r/a.bin", b"same", content_type="text/plain")
    store.put_bytes("runs/r/b.bin", b"same")
    sha = _sha(b"same")
    assert store.path_of("runs/r/a.bin") == store.path_of("runs/r/b.bin") == tmp_path / "blobs" / sha[:2] / sha
    pointer = json.loads((tmp_path / "keys" / "runs" / "r" / "a.bin.ptr").read_text())
    assert pointer == {"sha256": sha, "size": 4, "content_type": "text/plain"}
    store.delete("runs/r/a.bin")
    assert store.gc(grace_s=0) == 0 and store.get_bytes("runs/r/b.bin") == b"same"
    store.delete("runs/r/b.bin")
    assert not (tmp_path / "keys" / "runs").exists()  # emptied folders are pruned
    assert store.gc(grace_s=0) == 1 and not (tmp_path / "blobs" / sha[:2] / sha).exists()


def test_local_gc_spares_young_blobs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("k", b"v1")
    store.put_bytes("k", b"v2")
    assert store.gc() == 0  # the v1 blob is unreferenced but younger than the grace period
    assert store.gc(grace_s=0) == 1 and store.get_bytes("k") == b"v2"


def test_local_flipped_byte_is_detected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("cache/vae/ds/x.safetensors", b"abcdef")
    blob = store.path_of("cache/vae/ds/x.safetensors")
    blob.chmod(0o644)
    blob.write_bytes(b"abXdef")
    with pytest.raises(errors.IntegrityError, match="'cache/vae/ds/x.safetensors'.*corrupt"):
        store.get_bytes("cache/vae/ds/x.safetensors")
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"previous")
    with pytest.raises(errors.IntegrityError, match="corrupt"):
        store.get_file("cache/vae/ds/x.safetensors", dst)
    assert dst.read_bytes() == b"previous" and [p.name for p in tmp_path.glob("*.bin")] == ["out.bin"]
    store.put_bytes("cache/vae/ds/c", b"")
    store.commit("cache/vae/ds", ["cache/vae/ds/x.safetensors"])
    assert store.verify_commit("cache/vae/ds")  # the recorded sha256s still agree ...
    with pytest.raises(errors.IntegrityError, match="1 problem"):
        store.verify_commit("cache/vae/ds", deep=True)  # ... but the bytes do not


def test_local_missing_blob_and_corrupt_pointer_are_integrity_errors(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a", b"a")
    store.path_of("a").unlink()
    with pytest.raises(errors.IntegrityError, match="'a'.*blob .* is missing"):
        store.get_bytes("a")
    store.put_bytes("b", b"b")
    (tmp_path / "keys" / "b.ptr").write_text("{not json")
    with pytest.raises(errors.IntegrityError, match="pointer file .* of 'b' is corrupt"):
        store.stat("b")
    with pytest.raises(errors.IntegrityError):
        store.gc(grace_s=0)  # never collect while a pointer cannot be read


@pytest.mark.parametrize("crash_at", ["pointer", "blob", "fsync"])
def test_local_write_killed_midway_keeps_old_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("runs/r/run.json", b"old")
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: str | Path, dst: str | Path) -> None:
        target = "pointer" if str(dst).endswith(".ptr") else "blob"
        if crash_at == target:
            raise OSError("simulated crash")
        real_replace(src, dst)

    def fsync(fd: int) -> None:  # dies while flushing the new blob's bytes
        if crash_at == "fsync" and os.fstat(fd).st_size == len(b"new contents"):
            raise OSError("simulated crash")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="simulated crash"):
        store.put_bytes("runs/r/run.json", b"new contents")
    monkeypatch.undo()
    assert store.get_bytes("runs/r/run.json") == b"old"
    assert store.list() == ["runs/r/run.json"]
    assert not list(tmp_path.rglob(".tmp-*"))  # a failed write cleans up its temp file
    store.gc(grace_s=0)
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == [_sha(b"old")]


def test_local_crash_leftovers_are_invisible_and_collected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/k", b"v")
    # What a SIGKILL mid-write leaves: temp files beside the blobs and the pointers.
    (tmp_path / "blobs" / ".tmp-deadbeef").write_bytes(b"half a blo")
    (tmp_path / "keys" / "a" / ".tmp-cafebabe").write_bytes(b'{"sha2')
    assert store.list() == ["a/k"] and store.get_bytes("a/k") == b"v"
    assert store.gc(grace_s=0) == 2 and store.list() == ["a/k"]


def test_local_store_on_a_file_is_invalid_input(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(errors.InvalidInput, match="cannot use .*file as a local object store"):
        LocalStore(tmp_path / "file")


# --- MinioStore: metadata, corruption, errors ----------------------------------------------------------------


def test_minio_records_sha_in_user_metadata(minio_store: MinioStore) -> None:
    minio_store.put_bytes("a/k", b"payload")
    obj = minio_store.client.stat_object(minio_store.bucket, "a/k")
    assert {k.lower(): v for k, v in obj.metadata.items()}["x-amz-meta-sha256"] == _sha(b"payload")


def test_minio_overwritten_bytes_with_stale_metadata_are_detected(minio_store: MinioStore, tmp_path: Path) -> None:
    minio_store.put_bytes("cache/text/ds/x.safetensors", b"original")
    stale = {"sha256": _sha(b"original")}
    minio_store.client.put_object(minio_store.bucket, "cache/text/ds/x.safetensors", io.BytesIO(b"tampered"), 8,
                                  metadata=stale)
    assert minio_store.stat("cache/text/ds/x.safetensors").sha256 == _sha(b"original")  # metadata looks fine
    with pytest.raises(errors.IntegrityError, match="'cache/text/ds/x.safetensors'.*corrupt"):
        minio_store.get_bytes("cache/text/ds/x.safetensors")
    dst = tmp_path / "x.safetensors"
    with pytest.raises(errors.IntegrityError, match="corrupt"):
        minio_store.get_file("cache/text/ds/x.safetensors", dst)
    assert list(tmp_path.iterdir()) == []


def test_minio_object_without_sha_metadata_is_rejected(minio_store: MinioStore) -> None:
    minio_store.client.put_object(minio_store.bucket, "foreign.png", io.BytesIO(b"png"), 3)
    assert minio_store.exists("foreign.png") and minio_store.list() == ["foreign.png"]
    with pytest.raises(errors.IntegrityError, match="'foreign.png'.*no recorded sha256"):
        minio_store.get_bytes("foreign.png")


def test_minio_bucket_creation_tolerates_existing_bucket(minio_store: MinioStore, s3_server: str) -> None:
    minio_store.put_bytes("k", b"v")
    again = MinioStore(urlsplit(s3_server).netloc, ACCESS_KEY, SECRET_KEY, minio_store.bucket)
    assert again.get_bytes("k") == b"v"


def test_minio_closed_port_is_unavailable_quickly() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(errors.Unavailable, match=f"http://127.0.0.1:{port} is unreachable.*check that MinIO"):
        MinioStore(f"127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, "edittuner", connect_timeout_s=0.5, retries=0)
    assert time.monotonic() - start < 5


def test_minio_invalid_bucket_name() -> None:
    with pytest.raises(errors.InvalidInput, match="invalid bucket name 'Bad_Bucket'"):
        MinioStore("127.0.0.1:1", ACCESS_KEY, SECRET_KEY, "Bad_Bucket")


# --- URLs, credentials, dataset clients ----------------------------------------------------------------------


def test_open_store_local_forms(tmp_path: Path) -> None:
    assert open_store(None, default_root=tmp_path / "d").root == tmp_path / "d"
    assert open_store(str(tmp_path / "p")).root == tmp_path / "p"
    assert open_store(f"file://{tmp_path}/f%20x").root == tmp_path / "f x"
    default = open_store(None, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert isinstance(default, LocalStore) and default.root == tmp_path / "xdg" / "edittuner" / "store"


def test_open_store_s3_forms(s3_server: str) -> None:
    host = urlsplit(s3_server).netloc
    env = {**S3_ENV, "EDITTUNER_S3_ENDPOINT": s3_server}
    for url, bucket in [
        ("s3://bkt-one", "bkt-one"),
        (f"minio://{host}/bkt-two", "bkt-two"),
        (f"http://{host}/bkt-three/", "bkt-three"),
        (f"minio://{host}", "edittuner"),
    ]:
        store = open_store(url, env=env)
        assert isinstance(store, MinioStore) and (store.endpoint, store.bucket, store.secure) == (host, bucket, False)
        store.put_bytes("k", url.encode())
        assert store.get_bytes("k") == url.encode()


@pytest.mark.parametrize(
    "url",
    ["", "ftp://host/bucket", "s3://", "s3://bucket/extra", "minio://host:9000/a/b", "file://relative/path",
     "s3://Bad_Bucket", "minio://", "http://host:9000/x"],
)
def test_open_store_rejects_bad_urls_naming_them(url: str) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        open_store(url, env=S3_ENV)
    assert (repr(url) in str(info.value)) if url else "empty" in str(info.value)


def test_open_store_needs_credentials_for_s3() -> None:
    with pytest.raises(errors.InvalidInput, match="needs credentials.*EDITTUNER_S3_ACCESS_KEY"):
        open_store("minio://127.0.0.1:9/bkt", env={})


def test_credentials_precedence() -> None:
    env = {"MINIO_ROOT_USER": "mu", "MINIO_ROOT_PASSWORD": "mp", "AWS_ACCESS_KEY_ID": "au",
           "AWS_SECRET_ACCESS_KEY": "ap"}
    assert resolve_s3_credentials("u", "p", {**env, **S3_ENV}) == ("u", "p")
    assert resolve_s3_credentials(None, None, {**env, **S3_ENV}) == (ACCESS_KEY, SECRET_KEY)
    assert resolve_s3_credentials(None, None, env) == ("mu", "mp")
    aws_only = {"AWS_ACCESS_KEY_ID": "au", "AWS_SECRET_ACCESS_KEY": "ap"}
    assert resolve_s3_credentials(None, None, aws_only) == ("au", "ap")
    assert resolve_s3_credentials(None, None, {}) is None
    with pytest.raises(errors.InvalidInput, match="EDITTUNER_S3_SECRET_KEY is missing"):
        resolve_s3_credentials(None, None, {"EDITTUNER_S3_ACCESS_KEY": "x", **env})
    with pytest.raises(errors.InvalidInput, match="secret_key argument is missing"):
        resolve_s3_credentials("u", None, env)


def test_parse_endpoint_url() -> None:
    assert parse_endpoint_url("http://127.0.0.1:9000") == ("127.0.0.1:9000", False)
    assert parse_endpoint_url("https://s3.example.com/") == ("s3.example.com", True)
    for bad in ["127.0.0.1:9000", "ftp://h", "http://h:9000/prefix", "http://u:p@h:9000", "http://"]:
        with pytest.raises(errors.InvalidInput, match="aws_endpoint_url"):
            parse_endpoint_url(bad, "aws_endpoint_url")


def test_minio_client_from_aws_fields_reads_foreign_images(minio_store: MinioStore, s3_server: str) -> None:
    minio_store.client.put_object(minio_store.bucket, "images/a.png", io.BytesIO(b"A"), 1)
    fields = {"aws_bucket_name": minio_store.bucket, "aws_endpoint_url": s3_server, "aws_region_name": "us-east-1",
              "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}
    client, bucket = minio_client_from_aws_fields(fields, env={})
    assert bucket == minio_store.bucket
    assert [o.object_name for o in client.list_objects(bucket, prefix="images/", recursive=True)] == ["images/a.png"]
    response = client.get_object(bucket, "images/a.png")
    try:
        assert response.read() == b"A"
    finally:
        response.close()
        response.release_conn()


def test_minio_client_from_aws_fields_rejects_bad_fields() -> None:
    with pytest.raises(errors.InvalidInput, match="aws_bucket_name"):
        minio_client_from_aws_fields({"aws_endpoint_url": "http://127.0.0.1:9000"}, env={})
    with pytest.raises(errors.InvalidInput, match="aws_endpoint_url 'localhost:9000'"):
        minio_client_from_aws_fields({"aws_bucket_name": "b", "aws_endpoint_url": "localhost:9000"}, env={})
    assert minio_client_from_aws_fields({"aws_bucket_name": "imgs"}, env={})[1] == "imgs"  # AWS, anonymous
