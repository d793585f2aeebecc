"""The object store: string keys → bytes, with a sha256 per object, on a local directory or MinIO/S3.

Every object is whole or absent (a reader never sees half a write, also after a crash), and its sha256 is
recorded at write time and checked on every read. Multi-object artifacts (a checkpoint) are valid only once
their ``<prefix>/_COMMITTED`` manifest exists; it is written last and lists each object's sha256 and size.

Keys are ``/``-separated relative paths (``runs/<run>/lora/adapter.safetensors``); ``validate_key`` says which
ones are allowed. A *prefix* names a folder: ``list("a/b")`` returns the keys under ``a/b/``, never ``a/bc``.

``LocalStore`` layout (content-addressed blobs + pointer files)::

    <root>/blobs/<sha[:2]>/<sha>      the bytes, named by their sha256 (identical contents are stored once)
    <root>/blobs/.tmp-*               a blob being written (left behind only by a crash; ``gc`` removes it)
    <root>/keys/<key>.ptr             {"content_type": ..., "sha256": ..., "size": ...}

Both files are written to a temp file in the same file system, fsynced, then ``os.replace``d into place, blob
first: so a pointer only ever names a complete blob, and an overwrite swaps one pointer for another. A key may
also be a folder of other keys (``a/b`` and ``a/b/c``, as S3 allows): pointer files end in ``.ptr`` and a
folder whose name ends in ``.ptr`` (plus any ``_``s) gets one more ``_``, so files and folders never clash.
Deleting a key removes its pointer; ``gc()`` removes blobs no pointer names.

``MinioStore`` keeps the sha256 in the object's user metadata (``x-amz-meta-sha256``); an S3 PUT is atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tempfile
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import certifi
import safetensors.torch
import torch
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from shared import errors

DEFAULT_BUCKET = "edittuner"
COMMIT_MARKER = "_COMMITTED"
MANIFEST_FORMAT = "edittuner.commit.v1"
MAX_KEY_BYTES = 1024  # the S3 limit
MAX_SEGMENT_BYTES = 250  # leaves room for ".ptr" within a 255-byte file name
_CHUNK = 1 << 20
_POINTER_SUFFIX = ".ptr"
_ESCAPED_DIR = re.compile(r"\.ptr_*$")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_ENV = (
    ("EDITTUNER_S3_ACCESS_KEY", "EDITTUNER_S3_SECRET_KEY"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
)
_AWS_ENDPOINT = "https://s3.amazonaws.com"
# minio's own defaults (5 min connect timeout, 5 retries) take minutes to report a store that is down.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0
RETRIES = 3


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class CommitManifest:
    """The contents of ``<prefix>/_COMMITTED``: the objects that make up one artifact."""

    prefix: str
    objects: tuple[ObjectInfo, ...]

    def to_json(self) -> dict[str, Any]:
        objects = [{"key": o.key, "sha256": o.sha256, "size": o.size} for o in self.objects]
        return {"format": MANIFEST_FORMAT, "prefix": self.prefix, "objects": objects}

    @classmethod
    def from_json(cls, doc: Any, key: str) -> CommitManifest:
        try:
            if doc["format"] != MANIFEST_FORMAT:
                raise ValueError(f"unknown format {doc['format']!r}")
            objects = tuple(ObjectInfo(o["key"], int(o["size"]), str(o["sha256"])) for o in doc["objects"])
            return cls(prefix=str(doc["prefix"]), objects=objects)
        except (KeyError, TypeError, ValueError) as err:
            message = f"commit manifest '{key}' is malformed ({err!r}); rewrite the artifact"
            raise errors.IntegrityError(message) from err


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise InvalidInput naming the key and the broken rule.

    The rules keep keys meaningful as relative paths on every backend: a LocalStore maps them to files, so
    ``..``, absolute paths and odd characters could otherwise escape the root or collide."""
    rule = _broken_key_rule(key)
    if rule:
        raise errors.InvalidInput(f"invalid object key {key!r}: {rule}")
    return key


def _broken_key_rule(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "a key must be a non-empty string"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in key):
        return "control characters (including NUL) are not allowed"
    if "\\" in key:
        return "backslashes are not allowed; separate folders with '/'"
    if key.startswith("/"):
        return "a key must be relative (no leading '/')"
    if key.endswith("/"):
        return "a key must not end with '/' (that names a folder)"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"a key must be at most {MAX_KEY_BYTES} bytes in UTF-8"
    for segment in key.split("/"):
        if segment == "":
            return "empty path segments ('//') are not allowed"
        if segment in (".", ".."):
            return "'.' and '..' segments are not allowed"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"each '/'-separated segment must be at most {MAX_SEGMENT_BYTES} bytes"
    return None


def _folder(prefix: str) -> str:
    """``""`` (everything) or the validated folder prefix ending in ``/``."""
    if prefix == "":
        return ""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix) + "/"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the new directory entry must reach the disk, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, chunks: Iterable[bytes], mode: int = 0o644) -> tuple[Path, str, int]:
    """Stream ``chunks`` into a fsynced temp file in ``directory``, hashing on the way. The caller renames
    it into place with ``_publish`` (same file system, so the rename is atomic) or removes it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    tmp, h, size = Path(name), hashlib.sha256(), 0
    try:
        os.fchmod(fd, mode)  # mkstemp's 0600 would hide downloads and shared stores from other users
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size


def _publish(tmp: Path, dest: Path) -> None:
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _write_file_verified(dest: Path, chunks: Iterable[bytes], expected_sha: str, key: str, where: str) -> None:
    """Write a downloaded object to ``dest`` atomically, only if its bytes match the recorded sha256."""
    dest = Path(dest)
    tmp, sha, _ = _write_temp(dest.parent, chunks)
    if sha != expected_sha:
        tmp.unlink(missing_ok=True)
        raise _mismatch(key, where, expected_sha, sha)
    _publish(tmp, dest)


def _mismatch(key: str, where: str, expected: str, actual: str) -> errors.IntegrityError:
    return errors.IntegrityError(
        f"object '{key}' in {where} is corrupt: its bytes hash to sha256 {actual[:12]}…, "
        f"but {expected[:12]}… was recorded when it was written; rewrite or delete it"
    )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: its header is a little-endian u64 length, then JSON."""
    (length,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + length]).get("__metadata__") or {})


class ObjectStore(ABC):
    """Bytes under string keys. Subclasses implement the primitives; JSON, tensors and commit manifests are
    built on them here, once, so every backend behaves the same."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes, verified against its sha256 (IntegrityError) ; NotFound if absent."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under the folder ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    @abstractmethod
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo: ...

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download to ``path`` atomically: it holds the verified object, or is left as it was."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for messages: 'local directory /x' or "s3 bucket 'b' at http://h:9000"."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def put_json(self, key: str, obj: Any) -> ObjectInfo:
        text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        return self.put_bytes(key, text.encode("utf-8"), content_type="application/json")

    def get_json(self, key: str) -> Any:
        try:
            return json.loads(self.get_bytes(key).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise errors.IntegrityError(f"object '{key}' in {self.describe()} is not valid JSON: {err}") from err

    def put_tensors(
        self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Store tensors as safetensors (no pickle); ``metadata`` is a flat str → str map kept in the header."""
        contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
        data = safetensors.torch.save(contiguous, metadata=dict(metadata) if metadata else None)
        return self.put_bytes(key, data)

    def get_tensors(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        data = self.get_bytes(key)
        try:
            return safetensors.torch.load(data), _safetensors_metadata(data)
        except Exception as err:  # safetensors raises its own SafetensorError, struct/JSON errors too
            message = f"object '{key}' in {self.describe()} is not a safetensors file: {err}"
            raise errors.IntegrityError(message) from err

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under the folder ``prefix``; commit markers go first, so a half-deleted artifact
        is never mistaken for a committed one. Returns the number of keys deleted."""
        if not prefix.strip("/"):
            raise errors.InvalidInput(f"delete_prefix needs a non-empty prefix (got {prefix!r}) in {self.describe()}")
        keys = self.list(prefix)
        for key in sorted(keys, key=lambda k: k.rsplit("/", 1)[-1] != COMMIT_MARKER):
            self.delete(key)
        return len(keys)

    def commit(self, prefix: str, keys: Iterable[str]) -> CommitManifest:
        """Mark the artifact under ``prefix`` complete: write ``<prefix>/_COMMITTED`` listing ``keys`` (full keys,
        all under ``prefix``) with their recorded sha256 and size. Write the objects first, commit last."""
        folder, marker = self._marker(prefix)
        objects = []
        for key in sorted(set(keys)):
            validate_key(key)
            if not key.startswith(folder) or key == marker:
                raise errors.InvalidInput(f"cannot commit '{key}' as part of '{folder[:-1]}': not under that prefix")
            info = self.stat(key)
            objects.append(ObjectInfo(info.key, info.size, info.sha256))
        manifest = CommitManifest(prefix=folder[:-1], objects=tuple(objects))
        self.put_json(marker, manifest.to_json())
        return manifest

    def is_committed(self, prefix: str) -> bool:
        return self.exists(self._marker(prefix)[1])

    def read_commit(self, prefix: str) -> CommitManifest:
        folder, marker = self._marker(prefix)
        try:
            doc = self.get_json(marker)
        except errors.NotFound as err:
            raise errors.NotFound(
                f"'{folder[:-1]}' in {self.describe()} is not committed (no {marker}): it is incomplete or absent"
            ) from err
        return CommitManifest.from_json(doc, marker)

    def verify_commit(self, prefix: str, deep: bool = False) -> CommitManifest:
        """Check that every object in the manifest exists with its recorded sha256 and size; ``deep`` also reads
        each object and hashes its bytes. Raises IntegrityError listing every problem found."""
        manifest = self.read_commit(prefix)
        problems = [p for o in manifest.objects if (p := self._object_problem(o, deep))]
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise errors.IntegrityError(
                f"artifact '{manifest.prefix}' in {self.describe()} fails verification ({len(problems)} "
                f"problem{'s' if len(problems) != 1 else ''}):\n{lines}"
            )
        return manifest

    def _object_problem(self, expected: ObjectInfo, deep: bool) -> str | None:
        try:
            info = self.stat(expected.key)
            if deep:
                self.get_bytes(expected.key)
        except errors.NotFound:
            return f"'{expected.key}' is missing"
        except errors.IntegrityError as err:
            return str(err)
        if (info.sha256, info.size) != (expected.sha256, expected.size):
            return (f"'{expected.key}' changed after the commit "
                    f"(sha256 {info.sha256[:12]}…, expected {expected.sha256[:12]}…)")
        return None

    def _marker(self, prefix: str) -> tuple[str, str]:
        folder = _folder(prefix)
        if not folder:
            raise errors.InvalidInput("a commit needs a non-empty prefix (the artifact's folder)")
        return folder, folder + COMMIT_MARKER


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
        return self._put_chunks(key, _file_chunks(Path(path)), content_type)

    def get_bytes(self, key: str) -> bytes:
        info = self.stat(key)
        data = self._blob(info).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha != info.sha256:
            raise _mismatch(key, self.describe(), info.sha256, sha)
        return data

    def get_file(self, key: str, path: Path) -> None:
        info = self.stat(key)
        _write_file_verified(Path(path), _file_chunks(self._blob(info)), info.sha256, key, self.describe())

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
        folder = _folder(prefix)
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
        tmp, sha, size = _write_temp(self.root / "blobs", chunks, mode=0o444)  # shared by keys: never edit
        blob = self.root / "blobs" / sha[:2] / sha
        blob.parent.mkdir(exist_ok=True)
        _publish(tmp, blob)
        info = ObjectInfo(key, size, sha, content_type)
        doc = {"sha256": sha, "size": size, "content_type": content_type}
        self._write_pointer(self._pointer(key), json.dumps(doc, sort_keys=True).encode())
        return info

    def _write_pointer(self, pointer: Path, data: bytes) -> None:
        # A concurrent delete may prune the folder between mkdir and the write; try again once it is recreated.
        for attempt in range(3):
            try:
                tmp, _, _ = _write_temp(pointer.parent, [data])
                _publish(tmp, pointer)
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


def _http_client(connect_timeout_s: float, read_timeout_s: float, retries: int) -> urllib3.PoolManager:
    """An HTTP client for minio with our timeouts and retries, and the same TLS setup as minio's default."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header lookup that ignores case whatever the mapping (servers differ in how they spell metadata)."""
    name = name.lower()
    return next((v for k, v in headers.items() if k.lower() == name), None)


class MinioStore(ObjectStore):
    """Objects in one MinIO/S3 bucket, created if missing. ``endpoint`` is ``host:port`` (no scheme)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str = DEFAULT_BUCKET,
        secure: bool = False,
        region: str | None = None,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        retries: int = RETRIES,
    ):
        self.endpoint, self.bucket, self.secure, self.region = endpoint, bucket, secure, region
        if not _BUCKET_NAME.match(bucket):
            raise errors.InvalidInput(f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' or '-'")
        try:
            http = _http_client(connect_timeout_s, read_timeout_s, retries)
            self.client = Minio(endpoint, access_key, secret_key, secure=secure, region=region, http_client=http)
        except ValueError as err:
            raise errors.InvalidInput(f"invalid object store endpoint {endpoint!r}: {err}") from err
        self.ensure_bucket()

    def describe(self) -> str:
        return f"s3 bucket '{self.bucket}' at {'https' if self.secure else 'http'}://{self.endpoint}"

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists; another process creating it at the same time is fine."""
        with self._translated():
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket, location=self.region)
            except S3Error:
                if not self.client.bucket_exists(self.bucket):
                    raise

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        sha = hashlib.sha256(data).hexdigest()
        with self._translated(validate_key(key)):
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type, metadata={"sha256": sha}
            )
        return ObjectInfo(key, len(data), sha, content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Hashes the file, then uploads it (multipart for big files): S3 takes the metadata before the bytes."""
        validate_key(key)
        if not Path(path).is_file():
            raise errors.NotFound(f"cannot store '{key}': local file {path} does not exist")
        sha = _sha256_file(Path(path))
        with self._translated(key):
            self.client.fput_object(self.bucket, key, str(path), content_type, metadata={"sha256": sha})
        return ObjectInfo(key, Path(path).stat().st_size, sha, content_type)

    def get_bytes(self, key: str) -> bytes:
        with self._translated(validate_key(key)), self._response(key) as response:
            data = response.read()
            expected = self._recorded_sha(key, response.headers)
        sha = hashlib.sha256(data).hexdigest()
        if sha != expected:
            raise _mismatch(key, self.describe(), expected, sha)
        return data

    def get_file(self, key: str, path: Path) -> None:
        with self._translated(validate_key(key)), self._response(key) as response:
            expected = self._recorded_sha(key, response.headers)
            _write_file_verified(Path(path), response.stream(_CHUNK), expected, key, self.describe())

    def stat(self, key: str) -> ObjectInfo:
        with self._translated(validate_key(key)):
            obj = self.client.stat_object(self.bucket, key)
        content_type = obj.content_type or "application/octet-stream"
        return ObjectInfo(key, int(obj.size or 0), self._recorded_sha(key, obj.metadata or {}), content_type)

    def exists(self, key: str) -> bool:
        with self._translated(validate_key(key)):
            try:
                self.client.stat_object(self.bucket, key)
            except S3Error as err:
                if err.code == "NoSuchKey":
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        folder = _folder(prefix)
        with self._translated():
            objects = self.client.list_objects(self.bucket, prefix=folder or None, recursive=True)
            return sorted(o.object_name for o in objects if o.object_name and not o.is_dir)

    def delete(self, key: str) -> None:
        with self._translated(validate_key(key)):
            self.client.remove_object(self.bucket, key)

    def _recorded_sha(self, key: str, headers: Mapping[str, str]) -> str:
        sha = _header(headers, "x-amz-meta-sha256")
        if not sha:
            raise errors.IntegrityError(
                f"object '{key}' in {self.describe()} has no recorded sha256 (x-amz-meta-sha256), so it cannot be "
                "verified: it was not written by EditTuner; rewrite it through the store"
            )
        return sha

    @contextmanager
    def _response(self, key: str) -> Iterator[urllib3.BaseHTTPResponse]:
        response = self.client.get_object(self.bucket, key)
        try:
            yield response
        finally:
            response.close()
            response.release_conn()

    @contextmanager
    def _translated(self, key: str | None = None) -> Iterator[None]:
        """Turn minio/urllib3 exceptions into EditTuner errors that say what to check."""
        try:
            yield
        except S3Error as err:
            raise self._s3_error(err, key) from err
        except (urllib3.exceptions.HTTPError, MinioException) as err:
            raise errors.Unavailable(
                f"object store at {'https' if self.secure else 'http'}://{self.endpoint} is unreachable or not "
                f"an S3 server ({type(err).__name__}: {err}); check that MinIO is running and that the "
                "endpoint (EDITTUNER_S3_ENDPOINT or the store URL) is right"
            ) from err

    def _s3_error(self, err: S3Error, key: str | None) -> errors.EditTunerError:
        where = self.describe()
        if err.code == "NoSuchKey" and key is not None:
            return errors.NotFound(f"object '{key}' not found in {where}")
        if err.code == "NoSuchBucket":
            return errors.NotFound(f"{where} does not exist; create it or let the store create it on start")
        if err.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return errors.Unavailable(
                f"{where} refused access ({err.code}); check EDITTUNER_S3_ACCESS_KEY / EDITTUNER_S3_SECRET_KEY"
            )
        subject = f"'{key}' in {where}" if key else where
        return errors.EditTunerError(f"object store error on {subject}: {err.code}: {err.message}")


def parse_endpoint_url(url: str, what: str = "endpoint") -> tuple[str, bool]:
    """``http://127.0.0.1:9000`` → ``("127.0.0.1:9000", False)``: the host:port and TLS flag minio wants."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidInput(f"{what} {url!r} must be an http(s):// URL with a host, e.g. http://127.0.0.1:9000")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise errors.InvalidInput(f"{what} {url!r} must be only scheme://host[:port], without a path or credentials")
    return parts.netloc, parts.scheme == "https"


def resolve_s3_credentials(
    access_key: str | None, secret_key: str | None, env: Mapping[str, str]
) -> tuple[str, str] | None:
    """Explicit arguments win; else the first environment pair that is set (EDITTUNER_S3_*, MINIO_ROOT_*,
    AWS_*). A half-set pair is an error rather than silently mixing two sources."""
    pairs = [("the access_key argument", "the secret_key argument", access_key, secret_key)]
    pairs += [(a, s, env.get(a), env.get(s)) for a, s in _CREDENTIAL_ENV]
    for access_name, secret_name, access, secret in pairs:
        if access and secret:
            return access, secret
        if access or secret:
            missing = secret_name if access else access_name
            raise errors.InvalidInput(f"S3 credentials are half set: {missing} is missing")
    return None


def minio_client_from_aws_fields(fields: Mapping[str, Any], env: Mapping[str, str] | None = None) -> tuple[Minio, str]:
    """A raw minio client and bucket name from a SimpleTuner ``type: aws`` dataset entry, for listing and
    reading source images (which carry no EditTuner sha256). Without keys it reads anonymously."""
    bucket = fields.get("aws_bucket_name")
    if not bucket or not isinstance(bucket, str):
        raise errors.InvalidInput("an aws dataset needs aws_bucket_name (the bucket holding its images)")
    host, secure = parse_endpoint_url(fields.get("aws_endpoint_url") or _AWS_ENDPOINT, "aws_endpoint_url")
    creds = resolve_s3_credentials(fields.get("aws_access_key_id"), fields.get("aws_secret_access_key"),
                                   os.environ if env is None else env)
    access, secret = creds or (None, None)
    client = Minio(host, access, secret, secure=secure, region=fields.get("aws_region_name") or None,
                   http_client=_http_client(CONNECT_TIMEOUT_S, READ_TIMEOUT_S, RETRIES))
    return client, bucket


def default_local_root(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/edittuner/store`` (``~/.cache/edittuner/store``): where the embedded store lives."""
    env = os.environ if env is None else env
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edittuner" / "store"


def open_store(
    url: str | None,
    *,
    default_root: Path | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ObjectStore:
    """Open the store a URL names.

    ``None`` → LocalStore at ``default_root`` (or ``default_local_root()``); a path or ``file:///abs/path`` →
    LocalStore; ``s3://bucket`` → MinioStore at ``$EDITTUNER_S3_ENDPOINT`` (default AWS);
    ``minio://host:port[/bucket]`` (plain HTTP), ``http(s)://host:port[/bucket]`` → MinioStore (bucket
    defaults to ``edittuner``). Credentials: arguments, else environment (see ``resolve_s3_credentials``)."""
    env = os.environ if env is None else env
    if url is None:
        return LocalStore(default_root or default_local_root(env))
    if not url.strip():
        raise errors.InvalidInput("the store URL is empty: give a directory, file:///path, s3://b or minio://host/b")
    if "://" not in url:
        return LocalStore(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise errors.InvalidInput(f"store URL {url!r}: a file URL needs an absolute path: file:///srv/edittuner")
        return LocalStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc or parts.path.strip("/"):
            raise errors.InvalidInput(f"store URL {url!r}: write s3://<bucket> (set EDITTUNER_S3_ENDPOINT for MinIO)")
        endpoint_url = env.get("EDITTUNER_S3_ENDPOINT") or _AWS_ENDPOINT
        endpoint, secure = parse_endpoint_url(endpoint_url, "EDITTUNER_S3_ENDPOINT")
        bucket = parts.netloc
    elif parts.scheme in ("minio", "http", "https"):
        endpoint, secure, bucket = parts.netloc, parts.scheme == "https", parts.path.strip("/") or DEFAULT_BUCKET
        if not parts.hostname or "/" in bucket or parts.query or parts.username:
            raise errors.InvalidInput(f"store URL {url!r}: write {parts.scheme}://host:port/<bucket>")
    else:
        raise errors.InvalidInput(
            f"store URL {url!r}: unknown scheme {parts.scheme!r}; use a path, file://, s3://, minio:// or http(s)://"
        )
    if not _BUCKET_NAME.match(bucket):
        raise errors.InvalidInput(f"store URL {url!r}: invalid bucket name {bucket!r} (use 3-63 of a-z 0-9 . -)")
    creds = resolve_s3_credentials(access_key, secret_key, env)
    if creds is None:
        raise errors.InvalidInput(
            f"store URL {url!r} needs credentials: set EDITTUNER_S3_ACCESS_KEY and EDITTUNER_S3_SECRET_KEY"
        )
    return MinioStore(endpoint, creds[0], creds[1], bucket, secure=secure, region=region)
