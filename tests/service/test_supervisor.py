"""run_worker against small Python workers: each way a worker can end maps to one result or error."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shared import errors
from shared.service import supervisor
from shared.service.records import JobCancelled
from shared.service.supervisor import WorkerFailed, run_worker
from shared.train.events import TrainEvent, WorkerResult

# The workers speak the real protocol (shared.train.events), as shared.service.worker does.
PRELUDE = """import json, os, signal, subprocess, sys, time
from shared.train.events import TrainEvent, WorkerError, WorkerResult, encode_line
def emit(message):
    print(encode_line(message), flush=True)
def result(**kw):
    return WorkerResult(**{"run_id": "r", "steps": 2, "processes": 1, "final_loss": None, "lora": [],
                           "checkpoints": [], **kw})
"""


def worker(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return [sys.executable, str(script)]


def run(cmd: list[str], cancelled: threading.Event | None = None, **kwargs):
    events: list[TrainEvent] = []
    result = run_worker(cmd, on_event=events.append, cancelled=cancelled or threading.Event(), **kwargs)
    return result, events


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for init to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_events_then_result_and_stray_stdout_goes_to_the_log(tmp_path):
    cmd = worker(
        tmp_path,
        """
        emit(TrainEvent("train", 1, 2, loss=0.5, gpu={"gpu_peak_bytes": 7}))
        print("a stray print")
        print(json.dumps({"not": "a protocol message"}))
        emit(TrainEvent("train", 2, 2, loss=0.25))
        print("warning on stderr", file=sys.stderr)
        emit(result(lora=["runs/r/lora.safetensors"], final_loss=0.25))
    """,
    )
    result, events = run(cmd, log_path=tmp_path / "logs" / "w.log")
    assert result == WorkerResult("r", 2, 1, 0.25, ["runs/r/lora.safetensors"], [])
    assert events == [
        TrainEvent("train", 1, 2, loss=0.5, gpu={"gpu_peak_bytes": 7}),
        TrainEvent("train", 2, 2, loss=0.25),
    ]
    log_text = (tmp_path / "logs" / "w.log").read_text()
    assert "a stray print\n" in log_text and "warning on stderr\n" in log_text
    assert '{"not": "a protocol message"}' in log_text


def test_a_malformed_message_fails_the_run_naming_the_field(tmp_path):
    cmd = worker(
        tmp_path,
        """
        print(json.dumps({"event": {"phase": "train", "step": "three"}}), flush=True)
        emit(result())
    """,
    )
    with pytest.raises(WorkerFailed, match=r"malformed message \(field step: expected an integer, got 'three'\)"):
        run(cmd)


@pytest.mark.parametrize(
    "kind, code, cls",
    [
        ("InvalidInput", "INVALID_ARGUMENT", errors.InvalidInput),
        ("ConfigError", "INVALID_ARGUMENT", errors.InvalidInput),
        ("DatasetError", "INVALID_ARGUMENT", errors.InvalidInput),
        ("NotFound", "NOT_FOUND", errors.NotFound),
        ("FailedPrecondition", "FAILED_PRECONDITION", errors.FailedPrecondition),
        ("ResourceExhausted", "RESOURCE_EXHAUSTED", errors.ResourceExhausted),
        ("Unavailable", "UNAVAILABLE", errors.Unavailable),
        ("IntegrityError", "DATA_LOSS", errors.IntegrityError),
        ("TrainingDiverged", "UNKNOWN", WorkerFailed),
    ],
)
def test_error_line_is_reraised_as_its_status_class(tmp_path, kind, code, cls):
    cmd = worker(
        tmp_path,
        f"""
        emit(WorkerError("config.json: $.learning_rate: must be positive", "{code}", "{kind}"))
        sys.exit(1)
    """,
    )
    with pytest.raises(cls) as info:
        run(cmd)
    assert type(info.value) is cls
    assert str(info.value) == "config.json: $.learning_rate: must be positive"


def test_internal_error_line_carries_the_log_tail(tmp_path):
    cmd = worker(
        tmp_path,
        """
        print("Traceback (most recent call last):\\nZeroDivisionError: division by zero", file=sys.stderr)
        message = "internal error in the training worker: ZeroDivisionError"
        emit(WorkerError.of(ZeroDivisionError("division by zero"), message))
        sys.exit(2)
    """,
    )
    with pytest.raises(WorkerFailed) as info:
        run(cmd)
    assert str(info.value).startswith("internal error in the training worker: ZeroDivisionError; last log lines")
    assert "ZeroDivisionError: division by zero" in str(info.value)
    assert info.value.kind == "ZeroDivisionError" and info.value.exit_code == 2


def test_nonzero_exit_names_the_code_and_quotes_stderr(tmp_path):
    cmd = worker(
        tmp_path,
        """
        for i in range(100):
            print(f"log line {i}", file=sys.stderr)
        sys.exit(3)
    """,
    )
    with pytest.raises(WorkerFailed) as info:
        run(cmd)
    message = str(info.value)
    assert message.startswith("the worker exited with code 3; last log lines:\n")
    assert "log line 99" in message and "log line 84" not in message  # a bounded tail: the last 15 lines
    assert info.value.exit_code == 3


def test_exit_zero_without_result_is_a_failure(tmp_path):
    with pytest.raises(WorkerFailed, match="exited with code 0 without printing a result line"):
        run(worker(tmp_path, "emit(TrainEvent('train'))\n"))


def test_killed_by_a_signal_is_named(tmp_path):
    with pytest.raises(WorkerFailed, match="was killed by SIGABRT"):
        run(worker(tmp_path, "os.kill(os.getpid(), signal.SIGABRT)\n"))


def test_sigkill_is_reported_as_a_kill_not_a_guess_at_memory(tmp_path):
    with pytest.raises(WorkerFailed, match="the worker was killed by SIGKILL") as info:
        run(worker(tmp_path, "print('loading', file=sys.stderr, flush=True)\nos.kill(os.getpid(), 9)\n"))
    assert not isinstance(info.value, errors.ResourceExhausted) and "ran out of memory" not in str(info.value)


def test_sigkill_with_the_cgroups_oom_kill_count_up_is_out_of_memory(tmp_path, monkeypatch):
    """The kernel's OOM killer can't be triggered safely in a test: the counter it bumps is read twice, so a
    count that went up between the worker's start and end is the evidence the supervisor states."""
    counts = iter([7, 8])
    monkeypatch.setattr(supervisor, "oom_kill_count", lambda: next(counts))
    with pytest.raises(
        errors.ResourceExhausted,
        match=r"out-of-memory killer killed it \(the cgroup's memory.events "
        r"oom_kill went from 7 to 8\)",
    ):
        run(worker(tmp_path, "os.kill(os.getpid(), 9)\n"))


def test_the_oom_kill_counter_is_read_from_this_process_cgroup():
    count = supervisor.oom_kill_count()
    assert count is None or (isinstance(count, int) and count >= 0)


# Failed allocations that reach Python as a RuntimeError, not torch.OutOfMemoryError (as torch and the libraries word
# them), and errors that only look alike
LIBRARY_OOM = [
    "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "RuntimeError: CUDA error: out of memory",
]
NOT_OOM = [
    "RuntimeError: CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx( handle, opa, opb)`",
    "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
    "non-contiguous input.",
    "RuntimeError: CUDA error: an illegal memory access was encountered",
    "Cuda failure 'invalid argument'",
    "ValueError: ALLOC_FAILED is not a valid mode",
]


@pytest.mark.parametrize(
    "marker", ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "MemoryError", *LIBRARY_OOM]
)
def test_out_of_memory_in_stderr_is_resource_exhausted(tmp_path, marker):
    cmd = worker(
        tmp_path,
        f"""
        print("Traceback (most recent call last):", file=sys.stderr)
        print({marker!r}, file=sys.stderr)
        emit(WorkerError("internal error in the training worker: OutOfMemoryError", "INTERNAL", "OutOfMemoryError"))
        sys.exit(1)
    """,
    )
    with pytest.raises(errors.ResourceExhausted) as info:
        run(cmd)
    assert str(info.value).startswith(f"the worker ran out of memory: {marker}; lower the resolution")


def test_nccls_out_of_memory_is_resource_exhausted_and_lookalikes_are_not(tmp_path):
    cmd = worker(
        tmp_path,
        """
        print("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:3356, unhandled cuda error "
              "(run with NCCL_DEBUG=INFO for details), NCCL version 2.27.3", file=sys.stderr)
        print("ncclUnhandledCudaError: Call to CUDA function failed.\\nLast error:", file=sys.stderr)
        print("Cuda failure 2 'out of memory'", file=sys.stderr)
        message = "rank 1: internal error in the training worker: DistBackendError"
        emit(WorkerError(message, "INTERNAL", "DistBackendError", 1))
        sys.exit(2)
    """,
    )
    with pytest.raises(errors.ResourceExhausted) as info:
        run(cmd)
    assert str(info.value).startswith("the worker ran out of memory: Cuda failure 2 'out of memory'; lower the")
    assert [line for line in NOT_OOM if supervisor.OOM_MARKERS.search(line)] == []


def test_cancel_stops_the_worker_with_sigterm(tmp_path):
    cmd = worker(
        tmp_path,
        """
        emit(TrainEvent("train", message=str(os.getpid())))
        time.sleep(600)
    """,
    )
    cancelled, pids = threading.Event(), []

    def on_event(event):
        pids.append(int(event.message))
        cancelled.set()

    t0 = time.monotonic()
    with pytest.raises(JobCancelled):
        run_worker(cmd, on_event=on_event, cancelled=cancelled, kill_grace_s=10.0)
    assert time.monotonic() - t0 < 5.0  # SIGTERM was enough: no wait for the 10 s grace
    assert gone(pids[0])


def test_cancel_kills_a_worker_that_ignores_sigterm_and_its_children(tmp_path):
    cmd = worker(
        tmp_path,
        """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        emit(TrainEvent("train", message=f"{os.getpid()} {child.pid}"))
        time.sleep(600)
    """,
    )
    cancelled, seen = threading.Event(), []

    def on_event(event):
        seen.append(event)
        cancelled.set()

    t0 = time.monotonic()
    with pytest.raises(JobCancelled):
        run_worker(cmd, on_event=on_event, cancelled=cancelled, kill_grace_s=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5.0
    pid, child = map(int, seen[0].message.split())
    assert gone(pid)
    deadline = time.monotonic() + 3
    while not gone(child) and time.monotonic() < deadline:  # init reaps the orphan
        time.sleep(0.05)
    assert gone(child)


def test_an_on_event_error_stops_the_worker_and_propagates(tmp_path):
    cmd = worker(
        tmp_path,
        """
        emit(TrainEvent("train", message=str(os.getpid())))
        time.sleep(600)
    """,
    )
    pids = []

    def on_event(event):
        pids.append(int(event.message))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_worker(cmd, on_event=on_event, cancelled=threading.Event(), kill_grace_s=1.0)
    assert gone(pids[0])


def test_a_stderr_flood_does_not_deadlock(tmp_path):
    cmd = worker(
        tmp_path,
        """
        chunk = "x" * 1023 + "\\n"
        for _ in range(6 * 1024):  # 6 MiB
            sys.stderr.write(chunk)
        for i in range(2000):
            print(f"stray stdout {i}")
        emit(TrainEvent("checkpoint"))
        emit(result())
    """,
    )
    t0 = time.monotonic()
    result, events = run(cmd, log_path=tmp_path / "w.log")
    assert result.run_id == "r" and events == [TrainEvent("checkpoint")]
    assert time.monotonic() - t0 < 10
    assert (tmp_path / "w.log").stat().st_size >= 6 * 1024 * 1024
    assert "stray stdout 1999\n" in (tmp_path / "w.log").read_text()[-100:]


def test_log_tail_covers_only_this_run(tmp_path):
    log_path = tmp_path / "w.log"
    log_path.write_text("an earlier attempt: CUDA out of memory\n")
    with pytest.raises(WorkerFailed, match="exited with code 4"):
        run(worker(tmp_path, "print('second attempt', file=sys.stderr)\nsys.exit(4)\n"), log_path=log_path)
    assert log_path.read_text() == "an earlier attempt: CUDA out of memory\nsecond attempt\n"


def test_a_missing_program_is_a_clear_failure(tmp_path):
    with pytest.raises(WorkerFailed, match="cannot start the worker"):
        run([str(tmp_path / "no-such-worker")])


def test_environment_and_working_directory_are_passed(tmp_path):
    cmd = worker(tmp_path, 'emit(result(run_id=os.getcwd(), lora=[os.environ.get("X", "")]))\n')
    result, _ = run(cmd, env={**os.environ, "X": "42"}, cwd=tmp_path)
    assert (result.run_id, result.lora) == (str(tmp_path), ["42"])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("expandable_segments:True", None)),
        ({"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}, ("backend:cudaMallocAsync", None)),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, (None, "expandable_segments:False")),
    ],
    ids=["default", "user-cuda", "user-generic"],
)
def test_workers_get_expandable_segments_unless_the_allocator_is_configured(tmp_path, env, expected):
    cmd = worker(
        tmp_path,
        """
        names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
        emit(result(lora=[os.environ.get(v, "unset") for v in names]))
        """,
    )
    base = {k: v for k, v in os.environ.items() if k not in supervisor.ALLOC_CONF_VARS}
    result, _ = run(cmd, env={**base, **env})
    assert tuple(None if v == "unset" else v for v in result.lora) == expected
