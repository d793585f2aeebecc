"""Job records the store could not take, kept on the service's local disk until it can.

A record write to the store is retried for the store's whole budget (``shared.store.s3``); a write that still
fails (an outage longer than that) must not leave the store saying ``running`` for a job that ended: the record
goes here instead, ``<dir>/<job_id>.json``, written atomically. The job manager retries it in the background
and, when it starts, prefers a spooled record to the store's older one, so a run that failed stays failed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RecordSpool:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def put(self, job_id: str, doc: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / f"{job_id}.json")

    def remove(self, job_id: str) -> None:
        (self.directory / f"{job_id}.json").unlink(missing_ok=True)

    def has(self, job_id: str) -> bool:
        return (self.directory / f"{job_id}.json").is_file()

    def pending(self) -> list[dict[str, Any]]:
        """Every spooled record; an unreadable file (a crash mid-write of an old layout) is logged and skipped."""
        out = []
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as err:
                log.warning("skipping unreadable spooled job record %s: %s", path, err)
        return out
