"""The object store's interface: string keys → bytes, with a sha256 per object; key rules and commit manifests.

Every object is whole or absent (a reader never sees half a write, also after a crash), and its sha256 is
recorded at write time and checked on every read. Multi-object artifacts (a checkpoint) are valid only once
their ``<prefix>/_COMMITTED`` manifest exists; it is written last and lists each object's sha256 and size.

Keys are ``/``-separated relative paths (``runs/<run>/lora/adapter.safetensors``); ``validate_key`` says which
ones are allowed. A *prefix* names a folder: ``list("a/b")`` returns the keys under ``a/b/``, never ``a/bc``.

Two implementations: ``shared.store.local.LocalStore`` (a directory) and ``shared.store.s3.MinioStore``
(MinIO/S3); ``shared.store.url.open_store`` opens either from a URL.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from shared import errors

# Re-exported: the key rules are part of the store's interface (``validate_key`` in the module docstring).
from shared.store.keys import folder_prefix as folder_prefix
from shared.store.keys import validate_key as validate_key

DEFAULT_BUCKET = "edittuner"
COMMIT_MARKER = "_COMMITTED"
MANIFEST_FORMAT = "edittuner.commit.v1"


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


def mismatch_error(key: str, where: str, expected: str, actual: str) -> errors.IntegrityError:
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
            return (
                f"'{expected.key}' changed after the commit "
                f"(sha256 {info.sha256[:12]}…, expected {expected.sha256[:12]}…)"
            )
        return None

    def _marker(self, prefix: str) -> tuple[str, str]:
        folder = folder_prefix(prefix)
        if not folder:
            raise errors.InvalidInput("a commit needs a non-empty prefix (the artifact's folder)")
        return folder, folder + COMMIT_MARKER
