"""Atomic, durable file writes: stream into a fsynced temp file beside the destination, hash on the way, rename."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.store.base import mismatch_error

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the new directory entry must reach the disk, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: Path, chunks: Iterable[bytes], mode: int = 0o644) -> tuple[Path, str, int]:
    """Stream ``chunks`` into a fsynced temp file in ``directory``, hashing on the way. The caller renames
    it into place with ``publish`` (same file system, so the rename is atomic) or removes it."""
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


def publish(tmp: Path, dest: Path) -> None:
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def write_file_verified(dest: Path, chunks: Iterable[bytes], expected_sha: str, key: str, where: str) -> None:
    """Write a downloaded object to ``dest`` atomically, only if its bytes match the recorded sha256."""
    dest = Path(dest)
    tmp, sha, _ = write_temp(dest.parent, chunks)
    if sha != expected_sha:
        tmp.unlink(missing_ok=True)
        raise mismatch_error(key, where, expected_sha, sha)
    publish(tmp, dest)
