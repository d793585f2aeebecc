"""LocalStore: the content-addressed layout, corruption, writers killed midway, gc."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from stores import sha256_of

from shared import errors
from shared.store.local import LocalStore


def test_local_layout_is_content_addressed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("runs/r/a.bin", b"same", content_type="text/plain")
    store.put_bytes("runs/r/b.bin", b"same")
    sha = sha256_of(b"same")
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
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == [sha256_of(b"old")]


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
