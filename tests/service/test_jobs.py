"""JobManager over a LocalStore: idempotent submit, the queue, watch, cancel, error codes, restart recovery."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from shared import errors
from shared.service.jobs import JobContext, JobManager
from shared.service.records import INTERRUPTED_MESSAGE, JobCancelled, JobRecord, JobState
from shared.store.local import LocalStore

SERVICE = "trainer"


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def managers():
    """Shut down every manager a test made, even when it fails."""
    made: list[JobManager] = []
    yield made
    for m in made:
        m.shutdown(grace_s=5)


def manager(managers, store, execute, *, start=True, **kwargs) -> JobManager:
    m = JobManager(store, SERVICE, execute, **kwargs)
    managers.append(m)
    if start:
        m.start()
    return m


def wait_terminal(m: JobManager, job_id: str, timeout_s: float = 5.0) -> JobRecord:
    *_, last = m.watch(job_id, timeout_s=timeout_s)
    assert last.state.terminal, f"job {job_id} still {last.state.value} after {timeout_s} s"
    return last


def wait_state(m: JobManager, job_id: str, state: JobState, timeout_s: float = 5.0) -> JobRecord:
    for record in m.watch(job_id, timeout_s=timeout_s):
        if record.state == state:
            return record
    raise AssertionError(f"job {job_id} never reached {state.value}")


def echo(job: JobRecord, ctx: JobContext) -> dict[str, str]:
    return {"echo": job.params["x"], "attempt": str(job.attempt)}


def until_cancelled(job: JobRecord, ctx: JobContext) -> None:
    ctx.progress(phase="train", step=1)
    while True:
        ctx.check_cancelled()
        time.sleep(0.01)


def test_submit_runs_the_job_and_persists_record_and_index(managers, store):
    m = manager(managers, store, echo)
    submitted = m.submit("train", {"x": "a"}, "req-1")
    assert submitted.state == JobState.QUEUED and submitted.request_id == "req-1" and submitted.attempt == 0
    done = wait_terminal(m, submitted.job_id)
    assert done.state == JobState.SUCCEEDED
    assert done.outputs == {"echo": "a", "attempt": "1"}
    assert done.error == "" and done.error_code == "" and done.attempt == 1
    stored = JobRecord.from_json(store.get_json(f"jobs/{SERVICE}/{submitted.job_id}.json"))
    assert stored == done
    [index_key] = store.list(f"jobs/{SERVICE}/requests")
    assert store.get_json(index_key)["job_id"] == submitted.job_id


def test_submit_is_idempotent_on_request_id_also_after_a_restart(managers, store):
    m1 = manager(managers, store, echo, start=False)
    first = m1.submit("train", {"x": "a", "n": [1, 2]}, "req-1")
    assert m1.submit("train", {"n": [1, 2], "x": "a"}, "req-1").job_id == first.job_id
    with pytest.raises(errors.FailedPrecondition, match="request_id 'req-1' already used for a different request"):
        m1.submit("train", {"x": "b"}, "req-1")
    with pytest.raises(errors.FailedPrecondition):
        m1.submit("encode", {"x": "a", "n": [1, 2]}, "req-1")
    m1.shutdown()

    m2 = manager(managers, store, echo)
    assert m2.submit("train", {"x": "a", "n": [1, 2]}, "req-1").job_id == first.job_id
    with pytest.raises(errors.FailedPrecondition):
        m2.submit("train", {"x": "b"}, "req-1")
    assert wait_terminal(m2, first.job_id).outputs["echo"] == "a"
    assert m2.jobs_by_state()["succeeded"] == 1


def test_index_alone_finds_the_job(managers, store):
    """A record whose request_id field was lost is still found through the request index."""
    m1 = manager(managers, store, echo, start=False)
    first = m1.submit("train", {"x": "a"}, "req-1")
    doc = store.get_json(f"jobs/{SERVICE}/{first.job_id}.json")
    store.put_json(f"jobs/{SERVICE}/{first.job_id}.json", {**doc, "request_id": "renamed"})
    m2 = manager(managers, store, echo, start=False)
    assert m2.submit("train", {"x": "a"}, "req-1").job_id == first.job_id


def test_an_empty_request_id_gets_a_fresh_one(managers, store):
    m = manager(managers, store, echo, start=False)
    a, b = m.submit("train", {"x": "a"}, ""), m.submit("train", {"x": "a"}, "")
    assert a.job_id != b.job_id and a.request_id and a.request_id != b.request_id


def test_bad_params_and_request_ids_are_invalid_input(managers, store):
    m = manager(managers, store, echo, start=False)
    with pytest.raises(errors.InvalidInput, match="JSON values"):
        m.submit("train", {"x": object()}, "r")
    with pytest.raises(errors.InvalidInput, match="request_id is 300 characters"):
        m.submit("train", {}, "r" * 300)


def test_queue_full_is_resource_exhausted(managers, store):
    m = manager(managers, store, echo, start=False, max_queued=2)
    first = m.submit("train", {"x": "1"}, "r1")
    m.submit("train", {"x": "2"}, "r2")
    with pytest.raises(errors.ResourceExhausted, match=r"queue full: 2 trainer jobs are waiting \(max_queued=2\)"):
        m.submit("train", {"x": "3"}, "r3")
    assert m.submit("train", {"x": "1"}, "r1").job_id == first.job_id  # a retry is not new work
    m.cancel(first.job_id)
    m.submit("train", {"x": "3"}, "r3")


def test_watch_streams_every_progress_step_in_order(managers, store):
    seen = threading.Semaphore(0)

    def steps(job, ctx):
        for step in range(1, 6):
            ctx.progress(phase="train", step=step, total=5, loss=1.0 / step)
            assert seen.acquire(timeout=5)  # the watcher has this step before the next one is made
        return {"lora": "runs/r/lora"}

    m = manager(managers, store, steps, start=False)
    job = m.submit("train", {}, "r")
    m.start()
    snapshots = []
    for record in m.watch(job.job_id, timeout_s=10):
        snapshots.append(record)
        if record.state == JobState.RUNNING and record.progress["step"] > 0:
            seen.release()
    observed_steps = [r.progress["step"] for r in snapshots if r.state == JobState.RUNNING and r.progress["step"]]
    assert observed_steps == [1, 2, 3, 4, 5]
    assert snapshots[0].state in (JobState.QUEUED, JobState.RUNNING)
    assert snapshots[-1].state == JobState.SUCCEEDED and snapshots[-1].outputs == {"lora": "runs/r/lora"}
    assert snapshots[-1].progress["loss"] == pytest.approx(0.2)


def test_watch_ends_at_its_timeout_and_when_the_client_goes_away(managers, store):
    m = manager(managers, store, echo, start=False)
    job = m.submit("train", {}, "r")
    t0 = time.monotonic()
    assert [r.state for r in m.watch(job.job_id, timeout_s=0.3)] == [JobState.QUEUED]
    assert 0.3 <= time.monotonic() - t0 < 2
    active = [True]
    stream = m.watch(job.job_id, is_active=lambda: active[0])
    assert next(stream).state == JobState.QUEUED
    active[0] = False
    t0 = time.monotonic()
    assert list(stream) == []
    assert time.monotonic() - t0 < 2
    abandoned = m.watch(job.job_id)
    next(abandoned)
    abandoned.close()  # a client that disconnects mid-stream: nothing is left waiting
    with pytest.raises(errors.NotFound, match="trainer job '0123456789ab' not found"):
        next(m.watch("0123456789ab"))
    with pytest.raises(errors.InvalidInput, match="job_id '../nope' is not a job id"):
        next(m.watch("../nope"))


def test_progress_is_persisted_on_phase_change_not_every_step(managers, store):
    stored_steps = []

    def steps(job, ctx):
        key = f"jobs/{SERVICE}/{job.job_id}.json"
        for phase, step in [("encode", 1), ("train", 1), ("train", 2), ("train", 3), ("checkpoint", 3)]:
            ctx.progress(phase=phase, step=step)
            stored = store.get_json(key)["progress"]
            stored_steps.append((stored["phase"], stored["step"]))

    m = manager(managers, store, steps, persist_interval_s=60)
    wait_terminal(m, m.submit("train", {}, "r").job_id)
    assert stored_steps == [("encode", 1), ("train", 1), ("train", 1), ("train", 1), ("checkpoint", 3)]


def test_unknown_progress_fields_fail_the_job_as_internal(managers, store):
    m = manager(managers, store, lambda job, ctx: ctx.progress(lr=1e-4))
    done = wait_terminal(m, m.submit("train", {}, "r").job_id)
    assert (done.state, done.error_code, done.error) == (JobState.FAILED, "INTERNAL", "internal error: TypeError")


def test_cancel_a_queued_job(managers, store):
    calls = []
    m = manager(managers, store, lambda job, ctx: calls.append(job.job_id), start=False)
    job = m.submit("train", {}, "r")
    cancelled = m.cancel(job.job_id)
    assert cancelled.state == JobState.CANCELLED and cancelled.error_code == "CANCELLED"
    assert store.get_json(f"jobs/{SERVICE}/{job.job_id}.json")["state"] == "cancelled"
    m.start()
    later = m.submit("train", {"n": 2}, "r2")
    wait_terminal(m, later.job_id)
    assert calls == [later.job_id]


def test_cancel_a_running_job_and_cancel_a_terminal_one(managers, store):
    m = manager(managers, store, until_cancelled)
    job = m.submit("train", {}, "r")
    wait_state(m, job.job_id, JobState.RUNNING)
    assert m.cancel(job.job_id).state == JobState.RUNNING  # asked; the executor stops on its own time
    done = wait_terminal(m, job.job_id)
    assert done.state == JobState.CANCELLED and done.error_code == "CANCELLED"
    assert "cancelled by request" in done.error
    assert m.cancel(job.job_id) == done
    with pytest.raises(errors.NotFound):
        m.cancel("0123456789ab")
    with pytest.raises(errors.InvalidInput, match="job_id"):
        m.cancel("nope")


@pytest.mark.parametrize(
    "err, code",
    [
        (errors.InvalidInput("config.json: $.rank: must be positive"), "INVALID_ARGUMENT"),
        (errors.ConfigError([errors.Problem("config.json: $.rank", "must be positive")]), "INVALID_ARGUMENT"),
        (errors.NotFound("run 'r' not found"), "NOT_FOUND"),
        (errors.FailedPrecondition("run 'r' is already active"), "FAILED_PRECONDITION"),
        (errors.ResourceExhausted("the worker ran out of memory"), "RESOURCE_EXHAUSTED"),
        (errors.Unavailable("models are still loading"), "UNAVAILABLE"),
        (errors.IntegrityError("object 'x' is corrupt"), "DATA_LOSS"),
        (errors.EditTunerError("a domain error without its own code"), "UNKNOWN"),
        (JobCancelled("stopped"), "CANCELLED"),
    ],
)
def test_executor_errors_map_to_status_codes(managers, store, err, code):
    def fail(job, ctx):
        raise err

    m = manager(managers, store, fail)
    done = wait_terminal(m, m.submit("train", {}, "r").job_id)
    assert done.state == (JobState.CANCELLED if code == "CANCELLED" else JobState.FAILED)
    assert (done.error, done.error_code) == (str(err), code)


def test_an_unexpected_exception_is_internal_and_the_manager_goes_on(managers, store, caplog):
    def execute(job, ctx):
        if job.params["n"] == 1:
            raise ZeroDivisionError("secret detail")
        return {"ok": "yes"}

    m = manager(managers, store, execute)
    with caplog.at_level(logging.ERROR, logger="shared.service.jobs"):
        bad = wait_terminal(m, m.submit("train", {"n": 1}, "r1").job_id)
    assert (bad.state, bad.error, bad.error_code) == (JobState.FAILED, "internal error: ZeroDivisionError", "INTERNAL")
    assert "ZeroDivisionError: secret detail" in caplog.text  # the traceback is in the log, not the record
    good = wait_terminal(m, m.submit("train", {"n": 2}, "r2").job_id)
    assert good.state == JobState.SUCCEEDED


def test_outputs_from_set_output_and_the_return_value_merge(managers, store):
    def execute(job, ctx):
        ctx.set_output("checkpoint", "runs/r/checkpoints/step-1")
        return {"lora": "runs/r/lora", "steps": 3}

    m = manager(managers, store, execute)
    done = wait_terminal(m, m.submit("train", {}, "r").job_id)
    assert done.outputs == {"checkpoint": "runs/r/checkpoints/step-1", "lora": "runs/r/lora", "steps": "3"}


def test_shutdown_leaves_the_running_job_to_resume_on_the_next_start(managers, store):
    m1 = manager(managers, store, until_cancelled)
    job = m1.submit("train", {"x": "a"}, "r")
    waiting = m1.submit("train", {"x": "b"}, "r2")
    wait_state(m1, job.job_id, JobState.RUNNING)
    m1.shutdown(grace_s=5)
    stored = JobRecord.from_json(store.get_json(f"jobs/{SERVICE}/{job.job_id}.json"))
    assert (stored.state, stored.attempt, stored.progress["message"]) == (JobState.QUEUED, 1, INTERRUPTED_MESSAGE)
    assert store.get_json(f"jobs/{SERVICE}/{waiting.job_id}.json")["state"] == "queued"

    m2 = manager(managers, store, echo)
    resumed = wait_terminal(m2, job.job_id)
    assert resumed.state == JobState.SUCCEEDED and resumed.attempt == 2
    assert resumed.outputs == {"echo": "a", "attempt": "2"}  # the executor saw attempt 2: it resumes
    assert resumed.progress["message"] == "resuming (attempt 2)"
    assert wait_terminal(m2, waiting.job_id).outputs == {"echo": "b", "attempt": "1"}  # never ran before


def test_a_job_left_running_by_a_crash_is_requeued(managers, store):
    m1 = manager(managers, store, echo, start=False)
    job = m1.submit("train", {"x": "a"}, "r")
    doc = store.get_json(f"jobs/{SERVICE}/{job.job_id}.json")  # as a killed service leaves it
    store.put_json(f"jobs/{SERVICE}/{job.job_id}.json", {**doc, "state": "running", "attempt": 1})

    m2 = manager(managers, store, echo, start=False)
    assert m2.get(job.job_id).state == JobState.RUNNING
    m2.start()
    done = wait_terminal(m2, job.job_id)
    assert (done.state, done.attempt, done.outputs["attempt"]) == (JobState.SUCCEEDED, 2, "2")
    assert done.progress["message"] == "resuming (attempt 2)"


def test_a_corrupt_record_is_skipped(managers, store, caplog):
    store.put_json(f"jobs/{SERVICE}/bad.json", {"job_id": "bad"})
    with caplog.at_level(logging.WARNING, logger="shared.service.jobs"):
        m = manager(managers, store, echo, start=False)
    assert "skipping unreadable job record jobs/trainer/bad.json" in caplog.text
    assert m.list() == ([], "")


def test_list_pages_newest_first_and_filters_by_state(managers, store):
    m = manager(managers, store, echo, start=False, max_queued=10)
    jobs = [m.submit("train", {"n": i}, f"r{i}") for i in range(5)]
    m.cancel(jobs[1].job_id)
    pages, token = [], ""
    while True:
        page, token = m.list(page_size=2, page_token=token)
        pages.append([r.job_id for r in page])
        if not token:
            break
    newest_first = [j.job_id for j in reversed(jobs)]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    page, token = m.list(page_size=2)
    m.submit("train", {"n": 5}, "r5")  # a new job does not shift the next page
    assert [r.job_id for r in m.list(page_size=2, page_token=token)[0]] == newest_first[2:4]
    assert [r.job_id for r in m.list(state="cancelled")[0]] == [jobs[1].job_id]
    assert [r.job_id for r in m.list(state=JobState.QUEUED, page_size=100)[0]][-1] == jobs[0].job_id
    with pytest.raises(errors.InvalidInput, match="unknown job state 'done'"):
        m.list(state="done")
    with pytest.raises(errors.InvalidInput, match="invalid page_token"):
        m.list(page_token="not-a-token")


def test_jobs_by_state_counts_every_state(managers, store):
    def execute(job, ctx):
        if job.params["n"] == 0:
            raise errors.InvalidInput("bad")
        return None

    m = manager(managers, store, execute, start=False, max_queued=10)
    jobs = [m.submit("train", {"n": i}, f"r{i}") for i in range(4)]
    m.cancel(jobs[3].job_id)
    assert m.jobs_by_state() == {"queued": 3, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 1}
    m.start()
    for job in jobs[:3]:
        wait_terminal(m, job.job_id)
    assert m.jobs_by_state() == {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 1}


def test_on_change_sees_each_state_and_its_errors_do_not_break_jobs(managers, store):
    states = []

    def on_change(record):
        states.append(record.state)
        raise RuntimeError("metrics are broken")

    m = manager(managers, store, echo, on_change=on_change)
    done = wait_terminal(m, m.submit("train", {"x": "a"}, "r").job_id)
    assert done.state == JobState.SUCCEEDED
    assert states == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]


def test_several_workers_run_jobs_at_once(managers, store):
    both_running = threading.Barrier(2, timeout=5)

    def execute(job, ctx):
        both_running.wait()
        return None

    m = manager(managers, store, execute, workers=2)
    a, b = m.submit("train", {"n": 1}, "r1"), m.submit("train", {"n": 2}, "r2")
    assert wait_terminal(m, a.job_id).state == wait_terminal(m, b.job_id).state == JobState.SUCCEEDED


def test_typed_results_are_stored_beside_their_strings_and_survive_a_restart(managers, store):
    """An executor's typed results (shared.service.outputs) land in the record's ``result`` as JSON and, as the
    strings of the deprecated ``outputs`` map, in ``outputs``; while it runs, ``set_result`` shows what it has."""
    from shared.service.common import job_to_proto
    from shared.service.outputs import MissedValidation, TrainOutputs, Validation

    during: list[JobRecord] = []
    validations = [Validation(2, "aaaaaaaaaaaa")]
    missed = [MissedValidation(4, "eval_svc unavailable (UNAVAILABLE: down; step 9: not a step)")]

    final = TrainOutputs("r1", 4, 0.25, ["runs/r1/lora/a.safetensors"], [2, 4], validations, missed)

    def execute(job: JobRecord, ctx: JobContext) -> TrainOutputs:
        ctx.set_result(TrainOutputs(run_id="r1", validations=validations, missed_validations=missed))
        during.append(JobRecord.from_json(store.get_json(f"jobs/{SERVICE}/{job.job_id}.json")))
        return final

    m = manager(managers, store, execute)
    done = wait_terminal(m, m.submit("train", {"run_id": "r1"}, "r").job_id)
    [running] = during
    assert running.state == JobState.RUNNING and running.result["train"]["validations"] == [
        {"step": 2, "job_id": "aaaaaaaaaaaa"}
    ]
    assert running.outputs == {  # what the trainer's set_output calls wrote before
        "validations": "2:aaaaaaaaaaaa",
        "missed_validations": "step 4: eval_svc unavailable (UNAVAILABLE: down; step 9: not a step)",
    }
    assert done.state == JobState.SUCCEEDED
    assert done.outputs == {
        "run_id": "r1",
        "lora": "runs/r1/lora/a.safetensors",
        "steps": "4",
        "final_loss": "0.25",
        "checkpoints": "2,4",
        "validations": "2:aaaaaaaaaaaa",
        "missed_validations": "step 4: eval_svc unavailable (UNAVAILABLE: down; step 9: not a step)",
    }
    m.shutdown()
    again = manager(managers, store, execute, start=False).get(done.job_id)
    assert again == done and again.result == final.to_json()
    job = job_to_proto(again)
    assert job.WhichOneof("result") == "train" and dict(job.outputs) == done.outputs
    t = job.train
    assert (t.run_id, t.steps, t.final_loss, list(t.checkpoint_steps)) == ("r1", 4, 0.25, [2, 4])
    assert list(t.lora_keys) == ["runs/r1/lora/a.safetensors"]
    assert [(v.step, v.job_id) for v in t.validations] == [(2, "aaaaaaaaaaaa")]
    assert [(v.step, v.reason) for v in t.missed_validations] == [(4, missed[0].reason)]


# Records as the services stored them before Job had typed results: `outputs` strings only, no `result`.
OLD_RECORDS = {
    "train": (
        JobState.SUCCEEDED,
        {"run_id": "r1"},
        {
            "run_id": "r1",
            "lora": "runs/r1/lora/pytorch_lora_weights.safetensors",
            "steps": "40",
            "final_loss": "None",
            "checkpoints": "20,40",
            "validations": "20:aaaaaaaaaaaa,40:bbbbbbbbbbbb",
            "missed_validations": "step 20: eval_svc unavailable (a; b); step 40: eval_svc unavailable (c)",
        },
    ),
    "encode": (
        JobState.SUCCEEDED,
        {},
        {"encoded": "12", "cached": "3", "failed": "0", "index": "cache/index/ds/1.json,cache/index/ds2/2.json"},
    ),
    "render": (
        JobState.SUCCEEDED,
        {"run_id": "r1", "step": 20},
        {
            "metrics": "runs/r1/validation/step-20/metrics.json",
            "grids": "runs/r1/validation/step-20/a.png,runs/r1/validation/step-20/b.png",
            "psnr_lora": "21.5",
            "psnr_base": "18.25",
            "report": "runs/r1/report/index.html",
        },
    ),
}


@pytest.mark.parametrize("kind", sorted(OLD_RECORDS))
def test_a_record_stored_before_typed_results_loads_and_gets_them_from_its_strings(managers, store, kind):
    from shared.service.common import job_to_proto
    from shared.service.outputs import flat_outputs

    state, params, outputs = OLD_RECORDS[kind]
    doc = JobRecord("0123456789ab", "req", kind, state, params, 1.0, 2.0, outputs=outputs, attempt=1).to_json()
    del doc["result"]
    store.put_json(f"jobs/{SERVICE}/0123456789ab.json", doc)
    record = manager(managers, store, echo, start=False).get("0123456789ab")
    assert (record.state, record.outputs, record.result) == (state, outputs, {})
    job = job_to_proto(record)
    assert job.WhichOneof("result") == kind and dict(job.outputs) == outputs
    assert flat_outputs(job) == outputs  # what the CLI prints from the typed fields: the same strings
    if kind == "train":
        t = job.train
        assert (t.run_id, t.steps, t.HasField("final_loss"), list(t.checkpoint_steps)) == ("r1", 40, False, [20, 40])
        assert [(v.step, v.job_id) for v in t.validations] == [(20, "aaaaaaaaaaaa"), (40, "bbbbbbbbbbbb")]
        assert [(m.step, m.reason) for m in t.missed_validations] == [
            (20, "eval_svc unavailable (a; b)"),
            (40, "eval_svc unavailable (c)"),
        ]
    elif kind == "encode":
        assert (job.encode.encoded, job.encode.cached, list(job.encode.index_keys)) == (
            12,
            3,
            ["cache/index/ds/1.json", "cache/index/ds2/2.json"],
        )
    else:
        r = job.render
        assert (r.run_id, r.step, r.psnr_lora, r.psnr_base, r.tensorboard_key) == ("r1", 20, 21.5, 18.25, "")
        assert len(r.grid_keys) == 2 and r.report_key == "runs/r1/report/index.html"


def test_an_old_failed_run_keeps_its_validations_and_unreadable_results_are_served_without_them(
    managers, store, caplog
):
    from shared.service.common import job_to_proto
    from shared.service.outputs import flat_outputs

    old = {"validations": "2:aaaaaaaaaaaa"}  # a run that failed after its first validation
    doc = JobRecord("0123456789ab", "r", "train", JobState.FAILED, {"run_id": "r1"}, 1.0, 2.0, outputs=old).to_json()
    del doc["result"]
    store.put_json(f"jobs/{SERVICE}/0123456789ab.json", doc)
    bad = JobRecord("0123456789ac", "s", "train", JobState.SUCCEEDED, {}, 1.0, 2.0, result={"train": {"steps": "x"}})
    store.put_json(f"jobs/{SERVICE}/0123456789ac.json", bad.to_json())
    m = manager(managers, store, echo, start=False)
    job = job_to_proto(m.get("0123456789ab"))
    assert (job.train.run_id, [v.job_id for v in job.train.validations]) == ("r1", ["aaaaaaaaaaaa"])
    assert flat_outputs(job) == old
    with caplog.at_level(logging.WARNING, logger="shared.service.outputs"):
        assert job_to_proto(m.get("0123456789ac")).WhichOneof("result") is None
    assert "results are unreadable" in caplog.text
