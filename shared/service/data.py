"""DataService, on every service's port: a client's datasets into the store, a run's files back out.

One mechanism for both store backends, through the service port rather than presigned S3 URLs: a client needs
no store credentials and no route to MinIO (compose publishes only on the GPU host's loopback, and the services
name it ``minio:9000``, which a remote client cannot resolve), the local store works the same way, and the token
and TLS of the service apply to every byte. The layout and the checks are ``shared.store.uploads``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from shared import errors
from shared.rpc import data_pb2, data_pb2_grpc
from shared.service.common import ServerPaths, check_run_id
from shared.store.base import ObjectStore
from shared.store.files import file_chunks
from shared.store.keys import validate_key
from shared.store.uploads import (
    MAX_FILE_BYTES,
    Entry,
    check_entries,
    check_entry,
    commit_manifest,
    missing,
    store_verified,
)

MAX_STAT_PATHS = 64


class DataServicer(data_pb2_grpc.DataServiceServicer):
    def __init__(self, store: ObjectStore, paths: ServerPaths, workdir: Path, max_file_bytes: int = MAX_FILE_BYTES):
        self.store, self.paths, self.max_file_bytes = store, paths, max_file_bytes
        self.tmp = Path(workdir) / "transfers"

    def StatFiles(
        self, request: data_pb2.StatFilesRequest, context: grpc.ServicerContext
    ) -> data_pb2.StatFilesResponse:
        if len(request.paths) > MAX_STAT_PATHS:
            raise errors.InvalidInput(f"paths: {len(request.paths)} paths; at most {MAX_STAT_PATHS} per call")
        files = []
        for path in request.paths:
            readable, size, sha = self.paths.stat(path, self.max_file_bytes)
            files.append(data_pb2.ServerFile(path=path, readable=readable, size=size, sha256=sha))
        return data_pb2.StatFilesResponse(files=files)

    def PlanUpload(
        self, request: data_pb2.PlanUploadRequest, context: grpc.ServicerContext
    ) -> data_pb2.PlanUploadResponse:
        return data_pb2.PlanUploadResponse(missing_sha256=missing(self.store, self._entries(request.files)))

    def UploadFile(
        self, request_iterator: Iterator[data_pb2.UploadFileRequest], context: grpc.ServicerContext
    ) -> data_pb2.UploadFileResponse:
        first = next(request_iterator, None)
        if first is None or not first.HasField("file"):
            raise errors.InvalidInput("file: the first message of an upload names the file (path, size, sha256)")
        entry = check_entry(first.file.path, first.file.size, first.file.sha256, self.max_file_bytes)
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=".up-")
        try:
            received = 0
            with os.fdopen(fd, "wb") as f:
                for message in _chunks(first, request_iterator):
                    received += len(message)
                    if received > entry.size:
                        raise errors.InvalidInput(
                            f"file {entry.path!r}: more than the announced {entry.size} "
                            "bytes arrived; nothing was stored"
                        )
                    f.write(message)
            key, written = store_verified(self.store, Path(name), entry)
        finally:
            Path(name).unlink(missing_ok=True)
        return data_pb2.UploadFileResponse(key=key, written=written)

    def CommitUpload(
        self, request: data_pb2.CommitUploadRequest, context: grpc.ServicerContext
    ) -> data_pb2.CommitUploadResponse:
        entries = self._entries(request.files)
        key = commit_manifest(self.store, request.upload_id, entries)
        return data_pb2.CommitUploadResponse(manifest_key=key, files=len(entries))

    def ListRunFiles(
        self, request: data_pb2.ListRunFilesRequest, context: grpc.ServicerContext
    ) -> data_pb2.ListRunFilesResponse:
        prefix = f"runs/{check_run_id(request.run_id)}"
        keys = [k for k in self.store.list(prefix) if request.include_checkpoints or "/checkpoints/" not in k]
        if not keys:
            raise errors.NotFound(f"no run {request.run_id!r} in the services' store")
        files = []
        for key in keys:
            info = self.store.stat(key)
            files.append(data_pb2.RunFile(key=key, size=info.size, sha256=info.sha256))
        return data_pb2.ListRunFilesResponse(files=files)

    def DownloadFile(
        self, request: data_pb2.DownloadFileRequest, context: grpc.ServicerContext
    ) -> Iterator[data_pb2.DownloadFileResponse]:
        key = validate_key(request.key)
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != "runs":
            raise errors.InvalidInput(f"key: {key[:120]!r} is not a run's file (runs/<run_id>/...)")
        check_run_id(parts[1], "key")
        info = self.store.stat(key)
        self.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.tmp) as tmp:
            path = Path(tmp) / "file"
            self.store.get_file(key, path)  # verified against its sha256 on the way
            yield data_pb2.DownloadFileResponse(file=data_pb2.RunFile(key=key, size=info.size, sha256=info.sha256))
            for chunk in file_chunks(path):
                yield data_pb2.DownloadFileResponse(chunk=chunk)

    def _entries(self, files: Iterable[data_pb2.UploadEntry]) -> list[Entry]:
        return check_entries([check_entry(f.path, f.size, f.sha256, self.max_file_bytes) for f in files])


def _chunks(first: data_pb2.UploadFileRequest, rest: Iterator[data_pb2.UploadFileRequest]) -> Iterator[bytes]:
    if first.chunk:
        yield first.chunk
    for message in rest:
        if message.HasField("file"):
            raise errors.InvalidInput("file: one upload carries one file; name it in the first message only")
        yield message.chunk
