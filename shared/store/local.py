"""The embedded store: a directory on a local file system, content-addressed blobs + pointer files.

Layout::

    <root>/blobs/<sha[:2]>/<sha>      the bytes, named by their sha256 (identical contents are stored once)
    <root>/blobs/.tmp-*               a blob being written (left behind only by a crash; ``gc`` removes it)
    <root>/keys/<key>.ptr             {"content_type": ..., "sha256": ..., "size": ...}

Both files are written to a temp file in the same file system, fsynced, then ``os.replace``d into place, blob
first: so a pointer only ever names a complete blob, and an overwrite swaps one pointer for another. A key may
also be a folder of other keys (``a/b`` and ``a/b/c``, as S3 allows): pointer files end in ``.ptr`` and a
folder whose name ends in ``.ptr`` (plus any ``_``s) gets one more ``_``, so files and folders never clash.
Deleting a key removes its pointer; ``gc()`` removes blobs no pointer names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared import errors
from shared.store.base import ObjectInfo, ObjectStore, folder_prefix, mismatch_error, validate_key
from shared.store.files import file_chunks, publish, write_file_verified, write_temp

_POINTER_SUFFIX = ".ptr"
_ESCAPED_DIR = re.compile(r"\.ptr_*$")


class LocalStore(ObjectStore):
    """The embedded store: a directory on a local file system (layout in the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "keys").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise errors.InvalidInput(f"cannot use {self.root} as a local object store: {err}") from err

    def describe(self) -> str:
        return f"local directory {self.root}"

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        validate_key(key)
        return self._put_chunks(key, [data], content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        validate_key(key)
        if not Path(path).is_file():
            raise errors.NotFound(f"cannot store '{key}': local file {path} does not exist")
        return self._put_chunks(key, file_chunks(Path(path)), content_type)

    def get_bytes(self, key: str) -> bytes:
        info = self.stat(key)
        data = self._blob(info).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha != info.sha256:
            raise mismatch_error(key, self.describe(), info.sha256, sha)
        return data

    def get_file(self, key: str, path: Path) -> None:
        info = self.stat(key)
        write_file_verified(Path(path), file_chunks(self._blob(info)), info.sha256, key, self.describe())

    def stat(self, key: str) -> ObjectInfo:
        pointer = self._pointer(validate_key(key))
        try:
            doc = json.loads(pointer.read_bytes())
            return ObjectInfo(key, int(doc["size"]), str(doc["sha256"]), str(doc["content_type"]))
        except (FileNotFoundError, NotADirectoryError) as err:
            raise errors.NotFound(f"object '{key}' not found in {self.describe()}") from err
        except (ValueError, KeyError, TypeError) as err:
            raise errors.IntegrityError(f"the pointer file {pointer} of '{key}' is corrupt ({err!r})") from err

    def exists(self, key: str) -> bool:
        return self._pointer(validate_key(key)).is_file()

    def list(self, prefix: str = "") -> list[str]:
        folder = folder_prefix(prefix)
        start = self._keys_dir(folder[:-1].split("/")) if folder else self.root / "keys"
        return sorted(self._walk(start, folder))

    def delete(self, key: str) -> None:
        pointer = self._pointer(validate_key(key))
        try:
            pointer.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        keys_root, parent = self.root / "keys", pointer.parent
        while parent != keys_root:  # prune folders this delete emptied; a non-empty one stops the walk
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def path_of(self, key: str) -> Path:
        """The blob file holding ``key``'s bytes — for reading or copying out only; never write to it."""
        return self._blob(self.stat(key))

    def gc(self, grace_s: float = 3600.0) -> int:
        """Remove blobs (and crashed writers' temp files) that no pointer names and that are older than
        ``grace_s`` — the grace spares a blob whose writer has not yet written its pointer. Run it while no
        writer is active: a writer re-using an old unreferenced blob could otherwise lose it. Returns the count."""
        keys_root = self.root / "keys"
        live = {self.stat(key).sha256 for key in self._walk(keys_root, "")}  # a corrupt pointer aborts the gc
        cutoff, removed = time.time() - grace_s, 0
        stale_temps = (p for p in keys_root.rglob(".tmp-*") if p.is_file())
        for path in [*(self.root / "blobs").rglob("*"), *stale_temps]:
            if path.is_file() and path.name not in live and path.stat().st_mtime <= cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _put_chunks(self, key: str, chunks: Iterable[bytes], content_type: str) -> ObjectInfo:
        tmp, sha, size = write_temp(self.root / "blobs", chunks, mode=0o444)  # shared by keys: never edit
        blob = self.root / "blobs" / sha[:2] / sha
        blob.parent.mkdir(exist_ok=True)
        publish(tmp, blob)
        info = ObjectInfo(key, size, sha, content_type)
        doc = {"sha256": sha, "size": size, "content_type": content_type}
        self._write_pointer(self._pointer(key), json.dumps(doc, sort_keys=True).encode())
        return info

    def _write_pointer(self, pointer: Path, data: bytes) -> None:
        # A concurrent delete may prune the folder between mkdir and the write; try again once it is recreated.
        for attempt in range(3):
            try:
                tmp, _, _ = write_temp(pointer.parent, [data])
                publish(tmp, pointer)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def _blob(self, info: ObjectInfo) -> Path:
        blob = self.root / "blobs" / info.sha256[:2] / info.sha256
        if not blob.is_file():
            raise errors.IntegrityError(f"object '{info.key}' in {self.describe()} is corrupt: blob {blob} is missing")
        return blob

    def _keys_dir(self, segments: Iterable[str]) -> Path:
        return self.root.joinpath("keys", *(s + "_" if _ESCAPED_DIR.search(s) else s for s in segments))

    def _pointer(self, key: str) -> Path:
        *folders, name = key.split("/")
        return self._keys_dir(folders) / (name + _POINTER_SUFFIX)

    def _walk(self, directory: Path, key_prefix: str) -> Iterator[str]:
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                name = entry.name[:-1] if _ESCAPED_DIR.search(entry.name) else entry.name
                yield from self._walk(Path(entry.path), f"{key_prefix}{name}/")
            elif entry.name.endswith(_POINTER_SUFFIX) and entry.is_file():
                yield key_prefix + entry.name[: -len(_POINTER_SUFFIX)]
