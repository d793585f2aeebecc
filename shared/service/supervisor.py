"""Run a worker process and relay it (docs/ARCHITECTURE.md, "The training worker").

The worker (``shared.service.worker``, or torchrun starting it) prints the protocol of ``shared.train.events`` on
stdout: ``TrainEvent``s while it runs, then a ``WorkerResult`` or a ``WorkerError``; ``decode_line`` reads them here,
the one place they are decoded. ``run_worker`` turns every way it can end into a return value or an
``EditTunerError`` with a clear reason, so a crash, an out-of-memory or a kill of the worker fails the job and
never the service.

The worker's stderr goes straight to a file (never a pipe we might stop reading, which could fill and block it);
stdout lines that are not protocol JSON are appended there too. A bounded tail of that file goes into errors.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from shared import errors
from shared.service.records import JobCancelled
from shared.train.events import TrainEvent, WorkerError, WorkerMessage, WorkerResult, decode_line

log = logging.getLogger(__name__)

TAIL_BYTES = 64 * 1024  # what is searched for out-of-memory markers
TAIL_LINES = 15  # what an error message quotes ...
TAIL_CHARS = 2000  # ... at most
EXIT_DRAIN_S = 2.0  # after the worker exits, how long a process it left behind may hold stdout open
# What the worker's own output shows when it ran out of memory: torch's CUDA message and exception, Python's
# MemoryError; and the failed allocations that reach Python as a RuntimeError, not torch.OutOfMemoryError: a CUDA
# call's own (cudaErrorMemoryAllocation), a CUDA library's status (CUBLAS_STATUS_ALLOC_FAILED when cublasCreate
# finds no room for its workspace, cuDNN's CUDNN_STATUS_ALLOC_FAILED or, from cuDNN 9, ..._ALLOCATION_FAILED,
# cuFFT's, cuRAND's, ...) and NCCL's "Cuda failure 'out of memory'". A bare SIGKILL is not such evidence (torchrun
# prints "Signal 9 (SIGKILL) received" for any kill): an out-of-memory kill by the kernel is told by the cgroup's
# memory.events (see oom_kill_count).
OOM_MARKERS = re.compile(
    r"CUDA out of memory|torch\.OutOfMemoryError|OutOfMemoryError: |^MemoryError"
    r"|CUDA error: out of memory|Cuda failure (?:\d+ )?'out of memory'"
    r"|\bCU[A-Z]+_(?:STATUS_)?(?:INTERNAL_ERROR_(?:HOST|DEVICE)_)?ALLOC(?:ATION)?_FAILED\b",
    re.M,
)
OOM_ADVICE = (
    "lower the resolution or train_batch_size, enable gradient_checkpointing, or quantize the base "
    "model (base_model_precision)"
)
# The CUDA caching allocator of a worker: expandable segments, which grow in place, so that batches of another
# bucket's shape reuse the memory the last ones freed instead of fragmenting it into blocks of the wrong size
# (check_fits leaves only CUDA_OVERHEAD of slack). Unless the environment configures the allocator: torch reads
# PYTORCH_ALLOC_CONF too (its newer name, preferred for the settings every device shares).
ALLOC_CONF = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
ALLOC_CONF_VARS = {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"}


class WorkerFailed(errors.EditTunerError):
    """The worker ended without a result: it reported an error of its own (``kind``), crashed, or was killed."""

    def __init__(self, message: str, *, kind: str = "", exit_code: int | None = None, log_tail: str = ""):
        super().__init__(message)
        self.kind, self.exit_code, self.log_tail = kind, exit_code, log_tail


def run_worker(
    cmd: list[str],
    *,
    on_event: Callable[[TrainEvent], None],
    cancelled: threading.Event,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    log_path: Path | None = None,
    kill_grace_s: float = 10.0,
) -> WorkerResult:
    """Run ``cmd`` in a new process group; call ``on_event`` (on this thread) for each event; return the result.

    ``env`` replaces the environment as in ``subprocess`` (None inherits), with ``ALLOC_CONF`` added unless it
    configures the allocator itself. Stderr is appended to ``log_path`` (else to an anonymous temp file). When
    ``cancelled`` is set, or ``on_event`` raises, the group gets SIGTERM, then SIGKILL after ``kill_grace_s``;
    cancellation raises ``JobCancelled``."""
    with _open_log(log_path) as logf:
        start = logf.seek(0, os.SEEK_END)
        child_env = {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}
        if not ALLOC_CONF_VARS & child_env.keys():  # the user's configuration wins
            child_env.update(ALLOC_CONF)
        oom_before = oom_kill_count()
        try:
            # No preexec_fn (Python code between fork and exec, beside the service's threads, can crash the
            # child): the worker itself asks to die with its parent, first thing (exit_with_parent).
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=logf,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as err:
            raise WorkerFailed(f"cannot start the worker {cmd[0]!r}: {err}") from err
        try:
            ended = _relay(proc, on_event, cancelled, logf)
        finally:
            if proc.poll() is None:
                _stop(proc, kill_grace_s)
            _signal_group(proc, signal.SIGKILL)  # anything the worker left behind in its group
        if cancelled.is_set() and not (proc.returncode == 0 and isinstance(ended, WorkerResult)):
            raise JobCancelled("the job was cancelled; its worker was stopped")
        return _outcome(proc.returncode, ended, _tail(logf, start), log_path, oom_before, oom_kill_count())


def _relay(
    proc: subprocess.Popen[bytes], on_event: Callable[[TrainEvent], None], cancelled: threading.Event, logf: IO[bytes]
) -> WorkerResult | WorkerError | None:
    """Read stdout until it closes and the worker exits; return its final ``result`` or ``error`` line."""
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), name="worker-stdout", daemon=True)
    reader.start()
    ended: WorkerResult | WorkerError | None = None
    exited_at: float | None = None
    while True:
        if cancelled.is_set():
            return ended
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:  # a process the worker started may still hold stdout open
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > EXIT_DRAIN_S:
                    _signal_group(proc, signal.SIGKILL)
            continue
        if line is None:
            break
        message = _parse(line)
        if message is None:
            logf.write(line.encode("utf-8", "replace"))
            logf.flush()
        elif isinstance(message, TrainEvent):
            on_event(message)
        elif not isinstance(ended, WorkerError):  # with several ranks the first error is the cause, later ones echo
            ended = message
    while proc.poll() is None:  # stdout closed, the worker still running
        if cancelled.wait(0.1):
            return ended
    return ended


def _read_lines(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Runs on its own thread, so a worker that prints nothing never blocks the cancellation checks."""
    try:
        for raw in iter(stream.readline, b""):
            lines.put(raw.decode("utf-8", "replace"))
    finally:
        stream.close()
        lines.put(None)


def _parse(line: str) -> WorkerMessage | None:
    """A protocol message, or None for any other line (a stray print goes to the log). A malformed message is a
    worker of another version, or a bug: a WorkerError that says so, never a silent drop."""
    try:
        return decode_line(line)
    except ValueError as e:
        return WorkerError(f"the worker sent a malformed message ({e}): {line.strip()[:200]}", errors.INTERNAL, "")


def _outcome(
    code: int,
    ended: WorkerResult | WorkerError | None,
    tail: str,
    log_path: Path | None,
    oom_before: int | None = None,
    oom_after: int | None = None,
) -> WorkerResult:
    """The result, or the EditTunerError that says why there is none, stating the evidence for it."""
    if code == 0 and isinstance(ended, WorkerResult):
        return ended
    quoted = _quote(tail)
    where = f" (full log: {log_path})" if log_path else ""
    root = _torchrun_root_cause(tail)
    if root is not None and root[1] < 0:  # a rank killed by a signal: the others' errors are its consequence
        rank, code = root
        if code == -signal.SIGKILL and oom_before is not None and oom_after is not None and oom_after > oom_before:
            raise errors.ResourceExhausted(
                f"rank {rank} ran out of memory: the kernel's out-of-memory killer killed it (the cgroup's "
                f"memory.events oom_kill went from {oom_before} to {oom_after}); {OOM_ADVICE}. Last log "
                f"lines{where}:\n{quoted}"
            )
        raise WorkerFailed(
            f"the training failed: rank {rank} killed by {_signal_name(-code)} (torchrun's first "
            f"observed failure; the other ranks were stopped); last log lines{where}:\n{quoted}",
            exit_code=code,
            log_tail=quoted,
        )
    if isinstance(ended, WorkerError):
        message, kind = ended.message, ended.kind
        if ended.code not in ("UNKNOWN", errors.INTERNAL):  # the worker's domain error, as errors.STATUS_CODES has it
            raise errors.error_class(ended.code)(message)
        if not OOM_MARKERS.search(tail):
            if ended.code == errors.INTERNAL:
                message = f"{message}; last log lines{where}:\n{quoted}"
            raise WorkerFailed(message, kind=kind, exit_code=code, log_tail=quoted)
    if code == -signal.SIGKILL and oom_before is not None and oom_after is not None and oom_after > oom_before:
        raise errors.ResourceExhausted(
            "the worker ran out of memory: the kernel's out-of-memory killer killed it (the cgroup's memory.events "
            f"oom_kill went from {oom_before} to {oom_after}); {OOM_ADVICE}. Last log lines{where}:\n{quoted}"
        )
    if OOM_MARKERS.search(tail):
        raise errors.ResourceExhausted(
            f"the worker ran out of memory: {_oom_line(tail)}; {OOM_ADVICE}. Last log lines{where}:\n{quoted}"
        )
    if code == 0:
        what = "exited with code 0 without printing a result line"
    elif code < 0:
        what = f"was killed by {_signal_name(-code)}"
        if code == -signal.SIGKILL:
            what += (
                " (not by the kernel's out-of-memory killer: the cgroup recorded no oom_kill)"
                if oom_before is not None
                else ""
            )
    else:
        what = f"exited with code {code}"
    raise WorkerFailed(f"the worker {what}; last log lines{where}:\n{quoted}", exit_code=code, log_tail=quoted)


# ------------------------------------------------------------------------------------ evidence, lifelines
PARENT_PID_ENV = "EDITTUNER_PARENT_PID"  # the worker checks it still has the parent that started it
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def exit_with_parent() -> None:
    """For a worker's first line: the kernel sends it SIGKILL when its parent dies (PR_SET_PDEATHSIG), so a
    killed service leaves no worker behind to write checkpoints after it; and if the supervisor that started it
    died before this line ran, exit at once. (Under torchrun the parent is the agent, not the supervisor.)"""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and "LOCAL_RANK" not in os.environ and os.getppid() != int(expected):
        os._exit(3)  # orphaned between fork and prctl: commit nothing


def oom_kill_count() -> int | None:
    """The ``oom_kill`` counter of this process's cgroup (v2 ``memory.events``, v1 ``memory.oom_control``), or
    None where there is none to read: the evidence that the kernel's out-of-memory killer struck."""
    candidates: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, group = line.split(":", 2)
            if hierarchy == "0":
                candidates.append(Path("/sys/fs/cgroup") / group.lstrip("/") / "memory.events")
            elif "memory" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/memory") / group.lstrip("/") / "memory.oom_control")
    except (OSError, ValueError):
        return None
    for path in candidates:
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _torchrun_root_cause(tail: str) -> tuple[int, int] | None:
    """(rank, exit code) from torchrun's failure summary, whose exit codes below 0 are signals."""
    m = _ROOT_CAUSE.search(tail)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _oom_line(tail: str) -> str:
    line = next(line for line in reversed(tail.splitlines()) if OOM_MARKERS.search(line))
    return line.strip()[:300]


def _quote(tail: str) -> str:
    text = "\n".join(tail.rstrip().splitlines()[-TAIL_LINES:])
    return text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the group, SIGKILL it if the worker is still there after ``grace_s``."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("worker %d ignored SIGTERM for %.1f s; sending SIGKILL", proc.pid, grace_s)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the worker leads its own group
    except (ProcessLookupError, PermissionError):
        pass


def _open_log(log_path: Path | None) -> IO[bytes]:
    """The log in append mode (our writes and the worker's never overwrite each other), readable for the tail."""
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        return open(log_path, "a+b")
    fd, name = tempfile.mkstemp(prefix="edittuner-worker-", suffix=".log")
    os.close(fd)
    try:
        return open(name, "a+b")
    finally:
        os.unlink(name)  # anonymous: gone when closed


def _tail(logf: IO[bytes], start: int) -> str:
    end = logf.seek(0, os.SEEK_END)
    logf.seek(max(start, end - TAIL_BYTES))
    return logf.read().decode("utf-8", "replace")
