"""Datasets uploaded into the store by a client whose folders the services cannot read.

Content-addressed, so that uploads are incremental and resumable at file granularity::

    uploads/blobs/<sha256>                 a file's bytes, stored once whatever its name or dataset
    uploads/datasets/<upload_id>.json      the dataset: relative path → sha256 and size (written last)

A file is stored only once its sha256 matched (``store_verified``); a manifest is written only when every file
it names is stored (``commit_manifest``). A dataset entry ``{"type": "store", "store_upload": "<upload_id>"}``
reads the files back through ``shared.data.sources.StoreSource``.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import errors
from shared.store.base import ObjectStore
from shared.store.keys import validate_key

FORMAT = "edittuner.upload.v1"
BLOBS = "uploads/blobs"
DATASETS = "uploads/datasets"
MAX_FILES = 200_000
MAX_FILE_BYTES = 256 * 1024 * 1024  # one image (or caption); a dataset has no larger file
UPLOAD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the dataset folder, '/'-separated
    size: int
    sha256: str


def blob_key(sha256: str) -> str:
    return f"{BLOBS}/{sha256}"


def manifest_key(upload_id: str) -> str:
    return f"{DATASETS}/{check_upload_id(upload_id)}.json"


def check_upload_id(upload_id: str) -> str:
    if not UPLOAD_ID.fullmatch(upload_id or "") or upload_id.endswith("."):
        raise errors.InvalidInput(
            f"upload_id: {str(upload_id)[:80]!r} is not an upload name: use 1 to 100 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit"
        )
    return upload_id


def check_entry(path: str, size: int, sha256: str, max_file_bytes: int = MAX_FILE_BYTES) -> Entry:
    """An uploaded file's name, size and hash, checked before a byte is stored: a relative path (no '..', no
    absolute path, no backslash), a size within the limit, a sha256 of 64 hex digits."""
    try:
        validate_key(path)
    except errors.InvalidInput as err:
        raise errors.InvalidInput(
            f"file {str(path)[:120]!r}: not a relative path inside the dataset ({str(err).split(': ', 1)[-1]})"
        ) from None
    if size < 0 or size > max_file_bytes:
        raise errors.InvalidInput(
            f"file {path!r}: {size} bytes; a dataset file is at most {max_file_bytes} bytes "
            "(EDITTUNER_MAX_UPLOAD_BYTES)"
        )
    if not _SHA256.fullmatch(sha256 or ""):
        raise errors.InvalidInput(f"file {path!r}: sha256 {str(sha256)[:80]!r} is not 64 lowercase hex digits")
    return Entry(path, int(size), sha256)


def check_entries(entries: list[Entry]) -> list[Entry]:
    if len(entries) > MAX_FILES:
        raise errors.InvalidInput(f"{len(entries)} files; an upload holds at most {MAX_FILES}")
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise errors.InvalidInput(f"file {e.path!r} is listed twice")
        seen.add(e.path)
    return entries


def missing(store: ObjectStore, entries: list[Entry]) -> list[str]:
    """The distinct sha256s of ``entries`` the store does not hold (with that hash), in first-seen order."""
    out: list[str] = []
    for sha in dict.fromkeys(e.sha256 for e in entries):
        try:
            if store.stat(blob_key(sha)).sha256 == sha:
                continue
        except errors.NotFound:
            pass
        out.append(sha)
    return out


def store_verified(store: ObjectStore, tmp: Path, entry: Entry) -> tuple[str, bool]:
    """Store the received file ``tmp`` as ``entry``'s blob if its size and sha256 are the announced ones.
    Returns (key, written); an already stored blob is not written again."""
    size, h = 0, hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    if size != entry.size or h.hexdigest() != entry.sha256:
        raise errors.InvalidInput(
            f"file {entry.path!r}: received {size} bytes with sha256 {h.hexdigest()[:12]}…, "
            f"announced {entry.size} bytes, {entry.sha256[:12]}…; nothing was stored: send "
            "it again"
        )
    key = blob_key(entry.sha256)
    if not missing(store, [entry]):
        return key, False
    store.put_file(key, tmp)
    return key, True


def commit_manifest(store: ObjectStore, upload_id: str, entries: list[Entry]) -> str:
    """Write the dataset's manifest once every file it names is stored; FailedPrecondition naming the missing."""
    check_entries(entries)
    absent = missing(store, entries)
    if absent:
        names = [e.path for e in entries if e.sha256 in set(absent)]
        raise errors.FailedPrecondition(
            f"upload {upload_id!r}: {len(names)} file(s) are not in the store yet "
            f"({', '.join(names[:5])}{' …' if len(names) > 5 else ''}); upload them "
            "first"
        )
    key = manifest_key(upload_id)
    store.put_json(
        key,
        {
            "format": FORMAT,
            "upload_id": upload_id,
            "created": time.time(),
            "files": {e.path: {"sha256": e.sha256, "size": e.size} for e in entries},
        },
    )
    return key


def read_manifest(store: ObjectStore, upload_id: str) -> dict[str, Entry]:
    """relative path → Entry of a committed upload; NotFound naming it when it was never committed."""
    key = manifest_key(upload_id)
    try:
        doc: Any = store.get_json(key)
    except errors.NotFound:
        raise errors.NotFound(
            f"no uploaded dataset {upload_id!r} in {store.describe()} ({key} is missing): "
            "push it again with `edittuner data push`"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise errors.IntegrityError(f"{key} is not an upload manifest ({FORMAT})")
    return {p: Entry(p, int(v["size"]), str(v["sha256"])) for p, v in doc["files"].items()}
