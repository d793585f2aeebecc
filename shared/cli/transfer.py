"""The client side of DataService: send datasets the services cannot read, fetch a run's files back.

Before a run is submitted, ``datasets_for_server`` asks the server whether it reads each local dataset folder
itself (a sample of files, compared by size and sha256: a shared mount needs no upload); a folder it does not see
is uploaded (only the files the store lacks, by sha256) and its entry in the multidatabackend.json sent to the
server becomes ``{"type": "store", "store_upload": ...}``. The user's own files are never changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shared.config import jsonc
from shared.config.loading import ConfigFiles, load_run_config_text
from shared.data.sources import IMAGE_EXTENSIONS
from shared.errors import DatasetError, InvalidInput, Problem
from shared.rpc import data_pb2
from shared.rpc.client import Client
from shared.store.files import file_chunks, sha256_file, write_file_verified

SAMPLE = 8  # files per dataset compared with the server's view of the same path


@dataclasses.dataclass
class PushResult:
    upload_id: str
    files: int
    sent: int  # files whose bytes crossed the network (the store lacked their sha256)
    sent_bytes: int


def dataset_files(folder: Path) -> list[Path]:
    """What a dataset folder contributes: its images and .txt captions (hidden files left out), sorted."""
    keep = (*IMAGE_EXTENSIONS, ".txt")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in keep
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def upload_id_for(folder: Path) -> str:
    """A stable name per source folder and host: ``<folder name>-<hash of host and absolute path>``."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in folder.name).strip("-._") or "dataset"
    where = f"{socket.gethostname()}:{folder.resolve()}"
    return f"{name[:60]}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def server_sees(client: Client, config_path: str, folder: Path) -> bool:
    """Whether the server reads the same files at ``config_path`` (the folder as the config names it)."""
    files = dataset_files(folder)
    if not files:
        return False
    picks = sorted({files[round(i * (len(files) - 1) / max(1, SAMPLE - 1))] for i in range(min(SAMPLE, len(files)))})
    paths = [os.path.join(config_path, p.relative_to(folder).as_posix()) for p in picks]
    reply = client.call("StatFiles", data_pb2.StatFilesRequest(paths=paths))
    return all(
        f.readable and f.size == p.stat().st_size and f.sha256 == sha256_file(p)
        for f, p in zip(reply.files, picks, strict=True)
    )


def push_folder(
    client: Client, folder: Path, upload_id: str | None = None, progress: Callable[[int, int], None] | None = None
) -> PushResult:
    """Upload ``folder`` as a dataset: send what the store lacks, then commit the manifest. ``progress(done,
    total)`` in bytes. Interrupted, it resumes where it stopped: files already stored are not sent again."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a folder")
    upload_id = upload_id or upload_id_for(folder)
    entries: list[data_pb2.UploadEntry] = []
    by_sha: dict[str, tuple[Path, data_pb2.UploadEntry]] = {}
    for path in dataset_files(folder):
        entry = data_pb2.UploadEntry(
            path=path.relative_to(folder).as_posix(), size=path.stat().st_size, sha256=sha256_file(path)
        )
        entries.append(entry)
        by_sha.setdefault(entry.sha256, (path, entry))
    if not entries:
        raise DatasetError([Problem(str(folder), f"no images ({', '.join(IMAGE_EXTENSIONS)}) to upload")])
    todo = list(client.call("PlanUpload", data_pb2.PlanUploadRequest(files=entries)).missing_sha256)
    total = sum(by_sha[sha][1].size for sha in todo)
    done = 0
    for sha in todo:
        path, entry = by_sha[sha]
        client.call_stream("UploadFile", _upload_messages(path, entry))
        done += entry.size
        if progress:
            progress(done, total)
    client.call("CommitUpload", data_pb2.CommitUploadRequest(upload_id=upload_id, files=entries))
    return PushResult(upload_id, len(entries), len(todo), total)


def _upload_messages(path: Path, entry: data_pb2.UploadEntry) -> Iterator[data_pb2.UploadFileRequest]:
    yield data_pb2.UploadFileRequest(file=entry)
    for chunk in file_chunks(path):  # 1 MiB: the chunk size DataService takes
        yield data_pb2.UploadFileRequest(chunk=chunk)


def datasets_for_server(
    client: Client,
    files: ConfigFiles,
    cwd: Path,
    report: Callable[[str], None] = print,
    progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> ConfigFiles:
    """``files`` with every local dataset the server cannot read uploaded and pointed at its upload."""
    run = load_run_config_text(
        files.config_text, files.data_text, files.overrides, config_name=files.config_name, data_name=files.data_name
    )
    entries: Any = jsonc.loads(files.data_text, files.data_name)
    changed = False
    for ds in run.data.datasets:
        if ds.type != "local" or ds.dataset_type not in ("image", "conditioning") or not ds.instance_data_dir:
            continue
        folder = (cwd / ds.instance_data_dir).resolve()
        if server_sees(client, ds.instance_data_dir, folder):
            report(f"dataset {ds.id!r}: the server reads {ds.instance_data_dir} itself; nothing to upload")
            continue
        result = push_folder(client, folder, progress=progress(ds.id) if progress else None)
        report(
            f"dataset {ds.id!r}: uploaded {result.sent} of {result.files} files ({result.sent_bytes} bytes) "
            f"as {result.upload_id!r}"
        )
        index = next(
            j for j, e in enumerate(entries) if isinstance(e, dict) and (e.get("id") or e.get("--id")) == ds.id
        )
        entry = {k: v for k, v in entries[index].items() if k.lstrip("-") != "instance_data_dir"}
        entries[index] = {**entry, "type": "store", "store_upload": result.upload_id}
        changed = True
    if not changed:
        return files
    return dataclasses.replace(files, data_text=json.dumps(entries, indent=2) + "\n")


def pull_run(
    client: Client,
    run_id: str,
    dest: Path,
    include_checkpoints: bool = False,
    progress: Callable[[int, int], None] | None = None,
    only: Callable[[str], bool] | None = None,
) -> list[Path]:
    """A run's files from the services into ``dest`` (each written atomically, verified by sha256); ``only``: the
    files to fetch, by their name under ``runs/<run>/`` (default all)."""
    listing = client.call(
        "ListRunFiles", data_pb2.ListRunFilesRequest(run_id=run_id, include_checkpoints=include_checkpoints)
    )
    prefix = f"runs/{run_id}/"
    files = [f for f in listing.files if only is None or only(f.key[len(prefix) :])]
    total, done, written = sum(f.size for f in files), 0, []
    for f in files:
        target = Path(dest) / f.key[len(prefix) :]
        stream = client.call_stream("DownloadFile", data_pb2.DownloadFileRequest(key=f.key), streaming_response=True)
        head = next(stream)
        write_file_verified(target, (m.chunk for m in stream), head.file.sha256, f.key, client.address)
        done += f.size
        written.append(target)
        if progress:
            progress(done, total)
    return written
