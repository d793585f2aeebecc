"""The three services as real processes on loopback: the whole flow, jobs, failures, restart, validation misses.

One stack per module (starting three Python processes costs seconds); tests that break a service restart it.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load as load_safetensors

from shared.cli.remote import wait_for_validations
from shared.config.loading import read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.rpc import encoder_pb2, trainer_pb2
from shared.rpc.client import Client
from shared.service.common import files_to_proto, state_name
from shared.service.local_stack import start_local_stack
from shared.store.checkpoint import committed_steps
from shared.store.local import LocalStore

pytestmark = pytest.mark.slow  # starts the three services and their training workers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("stack")
    root = write_dataset(tmp / "data", n=4, references=2)
    model = tiny_models("edit-v2")
    s = start_local_stack(str(tmp / "store"), tmp / "logs", env={**os.environ, "EDITTUNER_WORKDIR": str(tmp / "work")})
    s.tmp, s.root, s.model = tmp, root, model
    yield s
    s.stop()


def files_for(stack, name, **overrides):
    base = dict(
        max_train_steps=4,
        checkpoint_step_interval=2,
        validation_step_interval=2,
        num_eval_images=1,
        learning_rate=1e-3,
        lora_rank=4,
        output_dir=str(stack.tmp / "out" / name),
    )
    cfg, data = write_configs(stack.tmp / "cfg" / name, stack.root, stack.model, "edit-v2", 2, **(base | overrides))
    return files_to_proto(read_config_files(cfg, data))


def start(stack, name, request_id=None, **overrides):
    c = Client("trainer", stack.addresses["trainer"])
    job = c.call(
        "StartRun",
        trainer_pb2.StartRunRequest(
            request_id=request_id or uuid.uuid4().hex, files=files_for(stack, name, **overrides)
        ),
    ).job
    return c, job


def test_whole_flow_through_the_three_services(stack):
    c, job = start(stack, "flow")
    seen = []
    final = c.watch(job.job_id, lambda j: seen.append((j.progress.phase, j.progress.step, state_name(j))))
    assert state_name(final) == "succeeded", final.error
    train_steps = [step for phase, step, _ in seen if phase == "train"]
    assert train_steps == sorted(train_steps) and train_steps[-1] == 4
    assert any(phase == "encode" for phase, _, _ in seen)
    t = final.train  # the typed results
    assert (final.WhichOneof("result"), t.run_id, t.steps, list(t.checkpoint_steps)) == ("train", "flow", 4, [2, 4])
    assert t.HasField("final_loss") and t.final_loss > 0 and not t.missed_validations
    assert [v.step for v in t.validations] == [2, 4]
    assert final.outputs["run_id"] == "flow" and final.outputs["checkpoints"] == "2,4"  # the deprecated strings
    assert final.outputs["validations"] == ",".join(f"{v.step}:{v.job_id}" for v in t.validations)
    store = LocalStore(stack.tmp / "store")
    [lora_key] = t.lora_keys
    assert final.outputs["lora"] == lora_key
    lora = load_safetensors(store.get_bytes(lora_key))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in lora
    # the encode job the run made: its typed results name the index the worker and eval_svc read
    [enc] = [
        j for j in Client("encoder", stack.addresses["encoder"]).list() if j.request_id == f"{job.job_id}-encode-1"
    ]
    assert enc.WhichOneof("result") == "encode" and enc.encode.encoded + enc.encode.cached > 0 and not enc.encode.failed
    assert enc.encode.index_keys and all(k.startswith("cache/index/") for k in enc.encode.index_keys)
    # the validations went to eval_svc as Render jobs; both finish with grids in the store
    renders = wait_for_validations(final, stack.addresses["eval"])
    assert [r.job_id for r in renders] == [v.job_id for v in t.validations]
    for v, r in zip(t.validations, renders, strict=True):
        assert state_name(r) == "succeeded", r.error
        metrics = json.loads(store.get_bytes(f"runs/flow/validation/step-{v.step}/metrics.json"))
        assert (r.render.run_id, r.render.step, r.render.metrics_key) == (
            "flow",
            v.step,
            f"runs/flow/validation/step-{v.step}/metrics.json",
        )
        assert (r.render.psnr_lora, r.render.psnr_base) == (metrics["psnr_lora"], metrics["psnr_base"])
        assert metrics["step"] == v.step and metrics["samples"][0]["grid"] in r.render.grid_keys
        assert r.outputs["grids"] == ",".join(r.render.grid_keys)
    # every process parsed the run's config once: each service's job and watchers, and eval_svc's two renders,
    # used the RunConfig its request was validated with (docs/ARCHITECTURE.md, "One run, traced")
    name = stack.tmp / "cfg" / "flow" / "config.json"
    for service in ("trainer", "encoder", "eval"):
        log_text = (stack.log_dir / f"{service}.log").read_text()
        assert log_text.count(f"parsed the run config {name} (") == 1, (service, log_text[-3000:])
    worker_log = (stack.tmp / "work" / job.job_id / "worker.log").read_text()
    assert worker_log.count("parsed the run config ") == 1, worker_log[-3000:]
    # the LoRA file loads into the flavour's pipeline and changes the transformer's output
    from shared.model.loading import load_pipeline

    pipe = load_pipeline(stack.model, "edit-v2")
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(
        hidden_states=x,
        timestep=torch.tensor([0.5]),
        encoder_hidden_states=torch.randn(1, 7, 32),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )
    with torch.no_grad():
        base = pipe.transformer(**kw)[0]
        pipe.load_lora_weights(lora, adapter_name="run")
        tuned = pipe.transformer(**kw)[0]
    assert not torch.allclose(base, tuned)


def test_submit_is_idempotent_and_active_runs_are_exclusive(stack):
    rid = uuid.uuid4().hex
    c, a = start(stack, "idem", request_id=rid, max_train_steps=30)
    _, b = start(stack, "idem", request_id=rid, max_train_steps=30)
    assert a.job_id == b.job_id
    with pytest.raises(Exception) as e:
        start(stack, "idem", max_train_steps=30)  # another request for the same run
    assert "already active" in str(e.value)
    cancelled = c.cancel(a.job_id)
    final = c.watch(a.job_id, lambda j: None)
    assert state_name(final) == "cancelled" and cancelled.job_id == a.job_id


def test_bad_config_is_invalid_argument_listing_every_problem(stack):
    stub_files = files_for(stack, "bad")
    stub_files.overrides.extend(["lora_rank=0", "base_model_precision=int3"])
    c = Client("trainer", stack.addresses["trainer"])
    with pytest.raises(grpc.RpcError) as e:
        c.stub.StartRun(trainer_pb2.StartRunRequest(request_id="x", files=stub_files), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 problems" in e.value.details() and "$.lora_rank" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        c.stub.GetJob(trainer_pb2.GetJobRequest(job_id="0123456789ab"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_missing_reference_fails_the_encode_and_the_run_with_the_reason(stack):
    root = write_dataset(stack.tmp / "broken", n=2, references=2)
    (root / "reference_b" / "0001.png").unlink()
    cfg, data = write_configs(
        stack.tmp / "cfg" / "broken", root, stack.model, "edit-v2", 2, output_dir=str(stack.tmp / "out" / "broken")
    )
    enc = Client("encoder", stack.addresses["encoder"])
    job = enc.call(
        "SubmitEncode",
        encoder_pb2.SubmitEncodeRequest(
            request_id=uuid.uuid4().hex, files=files_to_proto(read_config_files(cfg, data, ["bad_image_policy=fail"]))
        ),
    ).job
    final = enc.watch(job.job_id, lambda j: None)
    assert state_name(final) == "failed" and final.error_code == "INVALID_ARGUMENT"
    assert "Control tensor list length" in final.error and "0001.png" in final.error


def test_a_killed_worker_fails_the_run_not_the_service_and_the_reason_is_the_signal(stack):
    c, job = start(stack, "killed", max_train_steps=500, checkpoint_step_interval=1000, validation_step_interval=1000)
    wait_for_step(c, job, 1)
    os.kill(_worker_pid(stack, "killed"), signal.SIGKILL)
    final = c.watch(job.job_id, lambda j: None)
    assert state_name(final) == "failed" and "the worker was killed by SIGKILL" in final.error
    assert "out of memory" not in final.error  # a kill is not a guess at memory: no oom_kill was recorded
    assert c.list()[0].job_id  # the service still answers


def wait_for_step(c, job, step, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while True:
        p = c.get(job.job_id).progress
        if p.phase == "train" and p.step >= step:
            return p.step
        assert time.monotonic() < deadline, f"the run never reached step {step} ({p.phase} {p.step})"
        time.sleep(0.05)


def _worker_pid(stack, run_id):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"shared.service.worker" in cmd and run_id.encode() in cmd:
                return int(pid)
    raise AssertionError("no worker process found")


def test_eval_down_the_run_goes_on_and_the_miss_is_reported(stack):
    stack.stop_one("eval")
    try:
        c, job = start(stack, "noeval")
        final = c.watch(job.job_id, lambda j: None)
        assert state_name(final) == "succeeded", final.error
        missed = final.train.missed_validations
        assert [m.step for m in missed] == [2, 4] and not final.train.validations
        assert all(m.reason.startswith("eval_svc unavailable (") for m in missed)
        assert "step 2: eval_svc unavailable" in final.outputs["missed_validations"]  # the deprecated strings
        assert "step 4" in final.outputs["missed_validations"]
    finally:
        stack.launch("eval")
        stack.wait_ready("eval")


def test_a_restarted_trainer_resumes_the_run_from_its_checkpoint(stack):
    c, job = start(stack, "restart", max_train_steps=40, checkpoint_step_interval=2, validation_step_interval=1000)
    deadline = time.time() + 90
    while time.time() < deadline:
        p = c.get(job.job_id).progress
        if p.phase == "train" and p.step >= 5:
            break
        time.sleep(0.1)
    c.close()
    stack.restart("trainer")
    c = Client("trainer", stack.addresses["trainer"])
    final = c.watch(job.job_id, lambda j: None)
    assert state_name(final) == "succeeded", final.error
    assert final.attempt == 2 and final.train.steps == 40
    log = (stack.tmp / "work" / job.job_id / "worker.log").read_text()
    assert "resumed run restart from step" in log


# ------------------------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("run_id", ["a/b", "../../escape/run", "ref/checkpoints/step-99", ".hidden", "x" * 101])
def test_a_run_id_is_one_key_segment_checked_before_a_job_exists(stack, run_id):
    c = Client("trainer", stack.addresses["trainer"])
    with pytest.raises(grpc.RpcError) as e:
        c.stub.StartRun(
            trainer_pb2.StartRunRequest(request_id=uuid.uuid4().hex, files=files_for(stack, "ids"), run_id=run_id),
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("run_id: ")
    assert not [j for j in c.list() if j.train.run_id == run_id]


def test_an_output_dir_from_a_client_names_the_run_and_is_never_written_on_the_server(stack, tmp_path):
    outside = tmp_path / "outside"
    for output_dir in ("../escape/ref-out", str(outside / "abs-out")):
        c, job = start(stack, output_dir.rsplit("/", 1)[1], output_dir=output_dir, validation_step_interval=1000)
        final = c.watch(job.job_id, lambda j: None)
        assert state_name(final) == "succeeded", final.error
        assert final.outputs["run_id"] == output_dir.rsplit("/", 1)[1]
    assert not (ROOT.parent / "escape").exists() and not (ROOT / "escape").exists() and not outside.exists()
    store = LocalStore(stack.tmp / "store")
    assert store.exists("runs/ref-out/lora/pytorch_lora_weights.safetensors")  # the outputs are in the store


def test_datasets_and_models_outside_the_servers_folders_are_refused_by_name(stack, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    env = {**os.environ, "EDITTUNER_DATASET_ROOTS": str(allowed), "EDITTUNER_MODEL_ROOTS": str(allowed)}
    strict = start_local_stack(str(tmp_path / "store"), tmp_path / "logs", env=env, services=("trainer",))
    try:
        c = Client("trainer", strict.addresses["trainer"])
        with pytest.raises(grpc.RpcError) as e:
            c.stub.StartRun(trainer_pb2.StartRunRequest(request_id="x", files=files_for(stack, "roots")), timeout=10)
    finally:
        strict.stop()
    details = e.value.details()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "4 problems" in details
    assert "$[0].instance_data_dir (id 'demo-images')" in details and str(allowed) in details
    assert "$.pretrained_model_name_or_path" in details


def test_sigterm_to_the_trainer_checkpoints_the_step_it_is_on_and_the_restart_loses_no_step(stack):
    c, job = start(stack, "graceful", max_train_steps=40, checkpoint_step_interval=1000, validation_step_interval=1000)
    reached = wait_for_step(c, job, 3)
    started = time.monotonic()
    code = stack.stop_one("trainer", grace_s=60)  # SIGTERM
    assert code == 0 and time.monotonic() - started < 30  # within the service's grace period, not killed
    store = LocalStore(stack.tmp / "store")
    [step] = committed_steps(store, "runs/graceful")  # no periodic checkpoint: this one is the stop's
    assert reached <= step < 40
    assert store.get_json(f"jobs/trainer/{job.job_id}.json")["state"] == "queued"  # to resume
    stack.launch("trainer")
    stack.wait_ready("trainer")
    c = Client("trainer", stack.addresses["trainer"])
    final = c.watch(job.job_id, lambda j: None)
    assert state_name(final) == "succeeded" and final.attempt == 2 and final.train.steps == 40
    log = (stack.tmp / "work" / job.job_id / "worker.log").read_text()
    assert f"resumed run graceful from step {step}" in log  # the second attempt started where the first stopped


def test_a_killed_supervisor_takes_its_worker_along_and_nothing_is_committed_after(stack):
    c, job = start(stack, "orphan", max_train_steps=500, checkpoint_step_interval=2, validation_step_interval=1000)
    wait_for_step(c, job, 3)
    worker = _worker_pid(stack, "orphan")
    store = LocalStore(stack.tmp / "store")
    stack.procs["trainer"].kill()  # SIGKILL: no handler runs in trainer_svc
    stack.procs["trainer"].wait()
    killed, killed_wall = time.monotonic(), time.time()
    while _alive(worker):
        assert time.monotonic() - killed < 1.0, "the worker outlived its supervisor by a second"
        time.sleep(0.01)
    markers = [
        store.root / "keys" / "runs" / "orphan" / "checkpoints" / f"step-{s}" / "_COMMITTED.ptr"
        for s in committed_steps(store, "runs/orphan")
    ]
    assert markers and all(m.stat().st_mtime <= killed_wall + 0.05 for m in markers)  # none written after
    stack.launch("trainer")
    stack.wait_ready("trainer")
    c = Client("trainer", stack.addresses["trainer"])
    c.cancel(job.job_id)  # the restarted service resumes the run: stop it, later tests want the CPU
    c.watch(job.job_id, lambda j: None)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has died; only its parent's reaping is left
