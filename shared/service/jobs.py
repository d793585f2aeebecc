"""Jobs: how every service takes work (docs/ARCHITECTURE.md, "trainer_svc takes the job").

A client submits a job (idempotent on its ``request_id``) and gets an id at once; it can then get, list, cancel
and watch it. Records live in the object store, so a restarted service still knows its jobs and resumes the
unfinished ones::

    jobs/<service>/<job_id>.json                          the JobRecord
    jobs/<service>/requests/<sha256(request_id)[:32]>.json {"request_id", "job_id", "fingerprint"}

``JobManager`` runs jobs on worker threads by calling the service's executor, ``execute(record, ctx)``. The
executor reports through ``ctx`` and ends in one of three ways, each a job state: it returns (succeeded: typed
results, ``JobResult``, become the record's ``result`` and their strings its ``outputs``; a dict of strings, the
``outputs`` alone), raises ``JobCancelled`` (cancelled), or raises anything else (failed, with the gRPC status
name from ``errors.STATUS_CODES`` in ``error_code``). ``attempt`` counts executions: 1 on the first, 2 when a job
interrupted by a shutdown or a crash runs again, so an executor resumes when ``attempt > 1``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from shared import errors
from shared.service.records import (
    INTERRUPTED_MESSAGE,
    MAX_PAGE_SIZE,
    MAX_REQUEST_ID_CHARS,
    PROGRESS_FIELDS,
    RECOVERED_MESSAGE,
    SHUTDOWN,
    JobCancelled,
    JobRecord,
    JobState,
    decode_page_token,
    encode_page_token,
    error_code,
    finished_copy,
    json_params,
    parse_state,
    request_fingerprint,
)

if TYPE_CHECKING:
    from shared.service.spool import RecordSpool
    from shared.store.base import ObjectStore

log = logging.getLogger(__name__)


QUEUE_FULL_RETRY_S = 5.0  # the retry hint a full queue answers with
_WATCH_POLL_S = 0.5  # how often a waiting watcher checks that its client is still there
_SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
JOB_ID = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12], see submit


class JobContext:
    """What an executor gets beside its record: progress reporting, outputs and cancellation."""

    def __init__(self, manager: JobManager, job: JobRecord):
        self.job = job
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self._manager = manager

    def progress(self, **fields: Any) -> None:
        """Update ``phase``, ``step``, ``loss``... (see PROGRESS_FIELDS). Watchers see every call; the store is
        written on a phase change and otherwise at most every ``persist_interval_s``."""
        unknown = sorted(set(fields) - set(PROGRESS_FIELDS))
        if unknown:
            raise TypeError(f"unknown progress field(s) {unknown}; known: {sorted(PROGRESS_FIELDS)}")
        self._manager._update_progress(self.job.job_id, fields)

    def set_output(self, key: str, value: str) -> None:
        self._manager._set_output(self.job.job_id, key, value)

    def set_result(self, result: JobResult) -> None:
        """The typed results so far (a train job's validations while it runs), replacing earlier ones; what the
        executor returns replaces them at the end."""
        self._manager._set_result(self.job.job_id, result.to_json(), result.flat(complete=False))

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job.job_id} was cancelled ({self.cancel_reason or 'requested'})")


class JobResult(Protocol):
    """A job's typed results (``shared.service.outputs``): stored as JSON in ``JobRecord.result``, and as strings
    in its ``outputs`` (the deprecated ``Job.outputs`` map)."""

    def to_json(self) -> dict[str, Any]: ...

    def flat(self, complete: bool = True) -> dict[str, str]: ...


Executor = Callable[[JobRecord, JobContext], "JobResult | dict[str, str] | None"]


class JobManager:
    """The jobs of one service: persisted records, a bounded queue and ``workers`` executor threads.

    ``on_change(snapshot)`` is called (outside the lock, on the thread that made the change) after every change,
    progress included; it is meant for metrics and logs, and its exceptions are logged and swallowed."""

    def __init__(
        self,
        store: ObjectStore,
        service: str,
        execute: Executor,
        *,
        max_queued: int = 16,
        workers: int = 1,
        on_change: Callable[[JobRecord], None] | None = None,
        persist_interval_s: float = 2.0,
        spool: RecordSpool | None = None,
        spool_retry_s: float = 10.0,
    ):
        if not _SERVICE_NAME.match(service):
            raise ValueError(f"service name {service!r} must be lowercase letters, digits, '_' or '-'")
        if max_queued < 1 or workers < 1:
            raise ValueError(f"max_queued ({max_queued}) and workers ({workers}) must be at least 1")
        self.store, self.service, self.execute = store, service, execute
        self.max_queued, self.workers, self.on_change = max_queued, workers, on_change
        self.persist_interval_s = persist_interval_s
        self._cond = threading.Condition()
        self._submit_lock = threading.Lock()  # one submit at a time: the idempotency check reads the store
        self._persist_lock = threading.Lock()  # snapshots reach the store in the order they were taken
        self._jobs: dict[str, JobRecord] = {}
        self._by_request: dict[str, str] = {}
        self._versions: dict[str, int] = collections.defaultdict(int)
        self._queue: collections.deque[str] = collections.deque()
        self._running: dict[str, JobContext] = {}
        self._persisted: dict[str, float] = {}  # job_id → monotonic time of its last write
        self._threads: list[threading.Thread] = []
        self._stopping = self._closed = False
        self._last_created = 0.0
        self.spool, self.spool_retry_s = spool, spool_retry_s  # records the store could not take (see spool.py)
        self._load()

    # ------------------------------------------------------------------------------------------------ keys
    def _record_key(self, job_id: str) -> str:
        return f"jobs/{self.service}/{job_id}.json"

    def _request_key(self, request_id: str) -> str:
        return f"jobs/{self.service}/requests/{hashlib.sha256(request_id.encode()).hexdigest()[:32]}.json"

    # ---------------------------------------------------------------------------------------------- public
    def submit(self, kind: str, params: dict[str, Any], request_id: str = "") -> JobRecord:
        """Queue a job, or return the one this ``request_id`` already made (also after a restart)."""
        request_id = request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise errors.InvalidInput(f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
        params = json_params(params)
        fingerprint = request_fingerprint(kind, params)
        with self._submit_lock:
            existing = self._job_for_request(request_id)
            if existing is not None:
                if request_fingerprint(existing.kind, existing.params) != fingerprint:
                    raise errors.FailedPrecondition(
                        f"request_id {request_id!r} already used for a different request (job {existing.job_id}); "
                        "use a new request_id for new work"
                    )
                return existing
            with self._cond:
                waiting = len(self._queue)
                if waiting >= self.max_queued:
                    raise errors.ResourceExhausted(
                        f"queue full: {waiting} {self.service} jobs are waiting (max_queued={self.max_queued}); "
                        f"retry in {QUEUE_FULL_RETRY_S:g} s or cancel queued jobs",
                        retry_after_s=QUEUE_FULL_RETRY_S,
                    )
                now = self._last_created = max(time.time(), self._last_created + 1e-6)  # newest-first is total
            record = JobRecord(
                job_id=uuid.uuid4().hex[:12],
                request_id=request_id,
                kind=kind,
                state=JobState.QUEUED,
                params=params,
                created=now,
                updated=now,
            )
            self.store.put_json(self._record_key(record.job_id), record.to_json())
            index = {"request_id": request_id, "job_id": record.job_id, "fingerprint": fingerprint}
            self.store.put_json(self._request_key(request_id), index)
            with self._cond:
                self._jobs[record.job_id] = record
                self._by_request[request_id] = record.job_id
                self._queue.append(record.job_id)
                self._changed(record.job_id)
            snapshot = record.snapshot()
        self._notify(snapshot)
        return snapshot

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            return self._get(job_id).snapshot()

    def list(
        self, state: JobState | str | None = None, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[JobRecord], str]:
        """Records newest first, optionally of one state; ``next_token`` is "" on the last page. Tokens are
        cursors (not offsets), so jobs submitted between pages do not shift them."""
        wanted = parse_state(state) if state else None
        size = min(page_size, MAX_PAGE_SIZE) if page_size > 0 else 50
        after = decode_page_token(page_token) if page_token else None
        with self._cond:
            records = sorted(self._jobs.values(), key=lambda r: (r.created, r.job_id), reverse=True)
            records = [
                r
                for r in records
                if (wanted is None or r.state == wanted) and (after is None or (r.created, r.job_id) < after)
            ]
            page = [r.snapshot() for r in records[:size]]
        more = len(records) > size
        return page, encode_page_token(page[-1]) if more else ""

    def cancel(self, job_id: str) -> JobRecord:
        """Queued → cancelled now; running → the executor is told (state changes when it stops); terminal →
        unchanged."""
        with self._cond:
            record = self._get(job_id)
            if record.state == JobState.QUEUED and job_id in self._queue:
                self._queue.remove(job_id)
                final = finished_copy(record, JobState.CANCELLED, "cancelled before it started", "CANCELLED")
            else:  # running, terminal, or queued and being cancelled by another call right now
                ctx = self._running.get(job_id)
                if ctx is not None:
                    ctx.cancel_reason = ctx.cancel_reason or "cancelled by request"
                    ctx.cancelled.set()
                return record.snapshot()
        self._publish(final)
        return final.snapshot()

    def watch(
        self,
        job_id: str,
        timeout_s: float | None = None,
        *,
        is_active: Callable[[], bool] | None = None,
        heartbeat_s: float | None = None,
    ) -> Iterator[JobRecord]:
        """Yield the record now and after every change until it is terminal, and the unchanged record again after
        ``heartbeat_s`` without a change (a keepalive through proxies, and proof the job is still known). Changes
        that happen while the consumer is busy are coalesced into the latest snapshot. Ends early when
        ``timeout_s`` has passed, when ``is_active()`` (e.g. a gRPC context's) turns false, or when the manager
        shuts down (``closed`` is then true)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            snapshot, seen = self._get(job_id).snapshot(), self._versions[job_id]
        while True:
            yield snapshot  # never while holding the lock: a consumer may stop here for good
            if snapshot.state.terminal:
                return
            sent = time.monotonic()
            with self._cond:
                while self._versions[job_id] == seen:
                    now = time.monotonic()
                    remaining = None if deadline is None else deadline - now
                    if (
                        (remaining is not None and remaining <= 0)
                        or self._closed
                        or (is_active is not None and not is_active())
                    ):
                        return
                    if heartbeat_s is not None and now - sent >= heartbeat_s:
                        break
                    waits = (
                        [_WATCH_POLL_S]
                        + ([remaining] if remaining is not None else [])
                        + ([heartbeat_s - (now - sent)] if heartbeat_s is not None else [])
                    )
                    self._cond.wait(max(0.0, min(waits)))
                snapshot, seen = self._jobs[job_id].snapshot(), self._versions[job_id]

    @property
    def closed(self) -> bool:
        return self._closed

    def jobs_by_state(self) -> dict[str, int]:
        with self._cond:
            counts = collections.Counter(r.state.value for r in self._jobs.values())
        return {s.value: counts.get(s.value, 0) for s in JobState}

    def start(self) -> None:
        """Re-queue the jobs a previous process left queued or running (oldest first), then start the workers."""
        with self._cond:
            if self._threads or self._stopping:
                raise RuntimeError("JobManager.start() may be called once")
            unfinished = sorted(
                (r for r in self._jobs.values() if r.state in (JobState.QUEUED, JobState.RUNNING)),
                key=lambda r: (r.created, r.job_id),
            )
            recovered = [r for r in unfinished if r.state == JobState.RUNNING]
            for record in recovered:
                record.state, record.updated = JobState.QUEUED, time.time()
                record.progress["message"] = RECOVERED_MESSAGE
            self._queue = collections.deque(r.job_id for r in unfinished)
            for i in range(self.workers):
                thread = threading.Thread(target=self._work, name=f"jobs-{self.service}-{i}", daemon=True)
                self._threads.append(thread)
            if self.spool is not None:
                threading.Thread(target=self._flush_spool, name=f"jobs-{self.service}-spool", daemon=True).start()
            self._cond.notify_all()
        for record in recovered:
            log.info("%s job %s was running when the service stopped; re-queued to resume", self.service, record.job_id)
            self._commit(record.job_id)
        for thread in self._threads:
            thread.start()

    def shutdown(self, wait: bool = True, grace_s: float = 30.0) -> None:
        """Stop for a restart: no new job starts, open watches end, running executors are cancelled with reason
        "shutdown" and, once they stop, recorded as queued to resume on the next start. Jobs whose executor outlives
        ``grace_s`` stay "running" in the store, which the next start also resumes. May be called twice: first
        without waiting (the moment the signal arrives), then to wait."""
        with self._cond:
            self._stopping = True
            self._closed = True  # open watches end now, not when the server's grace runs out
            for ctx in self._running.values():
                ctx.cancel_reason = ctx.cancel_reason or SHUTDOWN
                ctx.cancelled.set()
            self._cond.notify_all()
        if wait:
            deadline = time.monotonic() + grace_s
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    # --------------------------------------------------------------------------------------------- workers
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job_id = self._queue.popleft()
                record = self._jobs[job_id]
                record.state, record.attempt, record.updated = JobState.RUNNING, record.attempt + 1, time.time()
                record.error = record.error_code = ""
                if record.progress["message"] in (INTERRUPTED_MESSAGE, RECOVERED_MESSAGE):
                    record.progress["message"] = f"resuming (attempt {record.attempt})"
                ctx = JobContext(self, record.snapshot())
                self._running[job_id] = ctx
            self._commit(job_id)
            self._run(ctx)

    def _run(self, ctx: JobContext) -> None:
        job_id = ctx.job.job_id
        try:
            outputs = self.execute(ctx.job, ctx) or {}
            outcome = (JobState.SUCCEEDED, "", "", outputs)
        except BaseException as err:  # noqa: BLE001 - a failing job must never take the manager down
            outcome = self._failure(ctx, err)
        state, message, code, outputs = outcome
        with self._cond:
            final = finished_copy(self._jobs[job_id], state, message, code)
        if not isinstance(outputs, dict):  # typed results
            final.result, outputs = outputs.to_json(), outputs.flat()
        final.outputs.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in outputs.items()})
        if state == JobState.QUEUED:
            final.progress["message"] = INTERRUPTED_MESSAGE
        self._publish(final)

    def _failure(self, ctx: JobContext, err: BaseException) -> tuple[JobState, str, str, dict[str, str]]:
        if ctx.cancelled.is_set() and ctx.cancel_reason == SHUTDOWN:
            return JobState.QUEUED, "", "", {}
        if ctx.cancelled.is_set() or isinstance(err, JobCancelled):
            return JobState.CANCELLED, str(err) or "cancelled", "CANCELLED", {}
        if isinstance(err, errors.EditTunerError):
            log.info("%s job %s failed: %s", self.service, ctx.job.job_id, err)
            return JobState.FAILED, str(err), error_code(err), {}
        log.error("%s job %s failed unexpectedly", self.service, ctx.job.job_id, exc_info=err)
        return JobState.FAILED, f"internal error: {type(err).__name__}", "INTERNAL", {}

    # ------------------------------------------------------------------------------------- record changes
    def _update_progress(self, job_id: str, fields: dict[str, Any]) -> None:
        with self._cond:
            record = self._jobs[job_id]
            if record.state != JobState.RUNNING:  # a straggling thread of an executor that has returned
                return
            phase_changed = "phase" in fields and fields["phase"] != record.progress.get("phase")
            record.progress.update(fields)
            record.updated = time.time()
            self._changed(job_id)
            due = phase_changed or time.monotonic() - self._persisted.get(job_id, 0.0) >= self.persist_interval_s
            snapshot = record.snapshot()
        if due:
            self._persist(job_id)
        else:
            self._notify(snapshot)

    def _set_output(self, job_id: str, key: str, value: str) -> None:
        with self._cond:
            self._jobs[job_id].outputs[str(key)] = str(value)
        self._commit(job_id)

    def _set_result(self, job_id: str, result: dict[str, Any], flat: dict[str, str]) -> None:
        with self._cond:
            record = self._jobs[job_id]
            record.result = result
            record.outputs.update(flat)
        self._commit(job_id)

    def _publish(self, final: JobRecord) -> None:
        """Make an executor's end (or a queued job's cancellation) visible: store first, then ``on_change``,
        then memory and watchers, so a client whose Watch ended at a terminal state finds that state in the
        store and the metrics too."""
        with self._persist_lock:
            self._write(final)
        self._notify(final)
        with self._cond:
            self._jobs[final.job_id] = final
            self._running.pop(final.job_id, None)
            self._changed(final.job_id)

    def _commit(self, job_id: str) -> None:
        """Persist an in-memory change, then wake the watchers."""
        self._persist(job_id)
        with self._cond:
            self._changed(job_id)

    def _changed(self, job_id: str) -> None:
        """Caller holds the lock: wake the watchers."""
        self._versions[job_id] += 1
        self._cond.notify_all()

    def _persist(self, job_id: str) -> None:
        """Write the current record and tell ``on_change``; a store failure is logged, not raised (the job goes
        on in memory, and the next write catches up)."""
        with self._persist_lock:
            with self._cond:
                snapshot = self._jobs[job_id].snapshot()
                self._persisted[job_id] = time.monotonic()
            self._write(snapshot)
        self._notify(snapshot)

    def _write(self, record: JobRecord) -> None:
        """Write the record; when the store fails even after its retries, spool it on local disk (a later
        write, the spool thread or the next start writes it), so the store never keeps a stale state."""
        try:
            self.store.put_json(self._record_key(record.job_id), record.to_json())
        except Exception as err:
            if self.spool is None:
                log.exception("could not persist %s job %s to %s", self.service, record.job_id, self.store.describe())
                return
            log.error(
                "could not persist %s job %s to %s (%s); kept in %s until the store answers",
                self.service,
                record.job_id,
                self.store.describe(),
                err,
                self.spool.directory,
            )
            self.spool.put(record.job_id, record.to_json())
            return
        if self.spool is not None and self.spool.has(record.job_id):
            self.spool.remove(record.job_id)

    def _flush_spool(self) -> None:
        """Runs on its own thread while the manager is open: write spooled records back to the store."""
        assert self.spool is not None  # the thread is started only with a spool
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed, timeout=self.spool_retry_s)
                if self._closed:
                    return
                pending = [
                    self._jobs[d["job_id"]].snapshot() for d in self.spool.pending() if d.get("job_id") in self._jobs
                ]
            for record in pending:
                with self._persist_lock:
                    self._write(record)

    def _notify(self, snapshot: JobRecord) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(snapshot)
        except Exception:
            log.exception("on_change hook failed for %s job %s", self.service, snapshot.job_id)

    # ------------------------------------------------------------------------------------------- loading
    def _get(self, job_id: str) -> JobRecord:
        """Caller holds the lock."""
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise errors.InvalidInput(f"job_id {str(job_id)[:80]!r} is not a job id (12 hex digits, as Submit returns)")
        record = self._jobs.get(job_id)
        if record is None:
            raise errors.NotFound(f"{self.service} job '{job_id}' not found")
        return record

    def _job_for_request(self, request_id: str) -> JobRecord | None:
        with self._cond:
            job_id = self._by_request.get(request_id)
        key = self._request_key(request_id)
        if job_id is None and self.store.exists(key):
            doc = self.store.get_json(key)
            job_id = doc.get("job_id") if isinstance(doc, dict) and doc.get("request_id") == request_id else None
        with self._cond:
            record = self._jobs.get(job_id) if job_id else None
            return record.snapshot() if record else None

    def _load(self) -> None:
        prefix = f"jobs/{self.service}/"
        for key in self.store.list(prefix):
            if "/" in key[len(prefix) :] or not key.endswith(".json"):
                continue
            try:
                record = JobRecord.from_json(self.store.get_json(key))
            except errors.EditTunerError as err:
                log.warning("skipping unreadable job record %s in %s: %s", key, self.store.describe(), err)
                continue
            self._jobs[record.job_id] = record
            self._by_request[record.request_id] = record.job_id
            self._last_created = max(self._last_created, record.created)
        for doc in self.spool.pending() if self.spool is not None else []:
            try:
                record = JobRecord.from_json(doc)
            except errors.EditTunerError as err:
                log.warning("skipping unreadable spooled %s job record: %s", self.service, err)
                continue
            stored = self._jobs.get(record.job_id)
            if stored is None or record.updated >= stored.updated:  # the store missed this write: it wins
                log.info(
                    "%s job %s: taking the record the store missed (%s)",
                    self.service,
                    record.job_id,
                    record.state.value,
                )
                self._jobs[record.job_id] = record
                self._by_request[record.request_id] = record.job_id
                self._write(record)
