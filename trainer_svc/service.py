"""trainer_svc: StartRun validates, asks encoder_svc to encode, then supervises the training worker process.

A crash, an out-of-memory or a kill of the worker fails the run with its reason, never the service. At each
validation step the worker writes the LoRA to the store and the trainer submits a Render job to eval_svc from a
thread of its own, so training never waits for it. A busy or restarting eval_svc is waited for while training runs;
a validation it has not taken when training ends (or within the wait budget) is recorded as missed, with its last
answer, and the run succeeds.

A busy or restarting peer never fails a run at once: every call to encoder_svc and eval_svc waits out
RESOURCE_EXHAUSTED (a full queue, the stream limit), UNAVAILABLE and DEADLINE_EXCEEDED, following the peer's
retry hint, for up to ``Peers.wait_s`` seconds (EDITTUNER_PEER_WAIT_S, default 1800), the run's progress saying
what it waits for (``shared.rpc.patience``); a Watch stream the encoder refuses becomes GetJob polling.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from shared.errors import FailedPrecondition, Unavailable
from shared.model.device import resolve_device
from shared.plan.predict import check_fits
from shared.rpc import common_pb2, encoder_pb2, encoder_pb2_grpc, eval_pb2, eval_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from shared.rpc.patience import Patience
from shared.service.common import (
    JobRpcMixin,
    ServerPaths,
    check_run_id,
    error_of,
    files_from_proto,
    files_to_params,
    job_to_proto,
    run_from_params,
    state_name,
    validated_run,
)
from shared.service.jobs import JobContext
from shared.service.metrics import Metrics
from shared.service.outputs import MissedValidation, TrainOutputs, Validation
from shared.service.records import JobCancelled, JobRecord
from shared.service.supervisor import WorkerFailed, run_worker
from shared.service.worker import COMMAND as WORKER_COMMAND
from shared.train.distributed import launch_command
from shared.train.events import TrainEvent
from shared.train.trainer import run_id_for

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 30.0
PEER_WAIT_S = 1800.0  # EDITTUNER_PEER_WAIT_S: how long a run waits out a busy or restarting peer
RELEASE_WAIT_S = 30.0  # asking the encoder to free the GPU is worth less waiting: a restarted one holds nothing


@dataclass
class Peers:
    """Clients of the other two services (channels built by __main__ from the environment), their addresses
    for messages, and how long a run waits out a busy or restarting peer (``wait_s``)."""

    encoder: encoder_pb2_grpc.EncoderServiceStub | None
    eval: eval_pb2_grpc.EvalServiceStub | None
    more_encoders: tuple[encoder_pb2_grpc.EncoderServiceStub, ...] = ()  # replicas beyond the first, for shards
    encoder_addresses: tuple[str, ...] = ()  # the first's, then the replicas'
    eval_address: str = ""
    wait_s: float = PEER_WAIT_S

    def describe(self, label: str, index: int = 0) -> str:
        address = (
            self.eval_address
            if label == "eval_svc"
            else (self.encoder_addresses[index] if index < len(self.encoder_addresses) else "")
        )
        return f"{label} at {address}" if address else label


class TrainerCore:
    def __init__(
        self,
        store_url: str,
        peers: Peers,
        metrics: Metrics,
        workdir: Path,
        worker_cmd: list[str] | None = None,
        env: dict[str, str] | None = None,
        paths: ServerPaths | None = None,
        grace_s: float = 30.0,
    ):
        self.store_url, self.peers, self.metrics = store_url, peers, metrics
        self.workdir = workdir
        self.worker_cmd = worker_cmd or list(WORKER_COMMAND)
        self.env = env
        self.paths = paths or ServerPaths()
        self.grace_s = grace_s  # a stopped worker has this long to finish its step and write its checkpoint

    # ------------------------------------------------------------------------------------------ the job
    def execute(self, job: JobRecord, ctx: JobContext) -> TrainOutputs:
        run = run_from_params(job.params)
        run_id = job.params["run_id"]
        index = self._encode(job, ctx)
        folder = self.workdir / job.job_id
        folder.mkdir(parents=True, exist_ok=True)
        f = job.params["files"]
        (folder / "config.json").write_text(f["config_text"], encoding="utf-8")
        (folder / "multidatabackend.json").write_text(f["data_text"], encoding="utf-8")
        overrides = list(f["overrides"]) + (["resume_from_checkpoint=latest"] if job.attempt > 1 else [])
        cmd = launch_command(
            [
                *self.worker_cmd,
                "--config",
                str(folder / "config.json"),
                "--data",
                str(folder / "multidatabackend.json"),
                "--store",
                self.store_url,
                "--no-encode",
                "--external-validation",
                "--run-id",
                run_id,
                *[f"--index={k.split('/')[2]}={k}" for k in index],
                *overrides,
            ],
            run.train,
        )  # torchrun for N > 1
        validations: list[Validation] = []
        missed: list[MissedValidation] = []
        batch = run.train.train_batch_size * run.train.gradient_accumulation_steps
        renders = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"renders-{job.job_id}")  # in step order
        trained = threading.Event()  # training is over: a validation eval_svc has not taken yet is missed

        def render(e: TrainEvent) -> None:
            self._submit_render(job, ctx, e, validations, missed, index, trained)
            ctx.set_result(TrainOutputs(run_id=run_id, validations=list(validations), missed_validations=list(missed)))

        def on_event(e: TrainEvent) -> None:
            if e.phase == "validation_ready":
                renders.submit(render, e)  # training goes on while eval_svc is waited for
                return
            self.metrics.record_train_event(e, batch)
            ctx.progress(
                phase=e.phase,
                step=e.step,
                total=e.total,
                loss=e.loss or 0.0,
                seconds_per_step=e.seconds_per_step or 0.0,
                learning_rate=e.lr or 0.0,
                message=e.message,
                data_wait_fraction=e.data_wait_fraction,
            )

        try:
            result = run_worker(
                cmd,
                on_event=on_event,
                cancelled=ctx.cancelled,
                env=self.env,
                log_path=folder / "worker.log",
                kill_grace_s=self.grace_s,
            )
        finally:
            trained.set()  # wakes a submission waiting for eval_svc: one last try, then it is missed
            renders.shutdown(wait=True)
        if result.interrupted:  # stopped at a step boundary, with a checkpoint of that step
            if ctx.cancelled.is_set():  # a shutdown (the job resumes after the restart) or a cancel
                raise JobCancelled(f"the run stopped at step {result.steps} ({ctx.cancel_reason})")
            raise WorkerFailed(
                f"the training worker was stopped by a signal at step {result.steps}, after "
                "writing a checkpoint; start the run again with resume_from_checkpoint=latest to "
                "continue it"
            )
        return TrainOutputs(
            run_id=run_id,
            steps=result.steps,
            final_loss=result.final_loss,
            lora_keys=list(result.lora),
            checkpoint_steps=list(result.checkpoints),
            validations=validations,
            missed_validations=missed,
        )

    @staticmethod
    def _files(job: JobRecord) -> common_pb2.RunConfigFiles:
        f = job.params["files"]
        return common_pb2.RunConfigFiles(
            config_json=f["config_text"],
            data_json=f["data_text"],
            overrides=f["overrides"],
            config_name=f["config_name"],
            data_name=f["data_name"],
        )

    def _encode(self, job: JobRecord, ctx: JobContext) -> list[str]:
        """Encode through encoder_svc and wait; then ask it to free the GPU for training. Returns the cache index
        keys the encoder wrote: the worker reads those, so it never recomputes a key from model files this host
        may not have. With several encoder replicas (EDITTUNER_ENCODER_ADDRS) each encodes its shard at the same
        time, then the first merges their manifests and writes the index."""
        if self.peers.encoder is None:
            raise Unavailable("trainer_svc has no encoder_svc address (EDITTUNER_ENCODER_ADDR)")
        files = self._files(job)
        replicas = [self.peers.encoder, *self.peers.more_encoders]
        request_id = f"{job.job_id}-encode-{job.attempt}"
        if len(replicas) == 1:
            enc_job = self._encode_on(
                replicas[0], encoder_pb2.SubmitEncodeRequest(request_id=request_id, files=files), ctx
            )
        else:
            n = len(replicas)
            failures: list[BaseException] = []

            def shard(i: int) -> None:
                try:
                    self._encode_on(
                        replicas[i],
                        encoder_pb2.SubmitEncodeRequest(
                            request_id=f"{request_id}-shard-{i}-of-{n}", files=files, shard_index=i, shard_count=n
                        ),
                        ctx,
                        label=f"encoder replica {i}",
                        index=i,
                    )
                except BaseException as e:  # noqa: BLE001 - re-raised on the job's thread below
                    failures.append(e)

            threads = [threading.Thread(target=shard, args=(i,), name=f"encode-shard-{i}") for i in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if failures:
                raise failures[0]
            enc_job = self._encode_on(
                replicas[0],
                encoder_pb2.SubmitEncodeRequest(
                    request_id=f"{request_id}-finalize", files=files, shard_count=n, finalize=True
                ),
                ctx,
            )
        for i, stub in enumerate(replicas):
            try:
                self._patience(ctx, self.peers.describe("encoder_svc", i), RELEASE_WAIT_S, quiet=True).call(
                    stub.ReleaseModels, encoder_pb2.ReleaseModelsRequest(), timeout_s=RPC_TIMEOUT_S
                )
            except (grpc.RpcError, Unavailable) as e:
                log.warning(
                    "encoder_svc did not release its models: %s", e.details() if isinstance(e, grpc.RpcError) else e
                )
        return [k for k in enc_job.encode.index_keys if k.startswith("cache/index/")]

    def _patience(self, ctx: JobContext, peer: str, budget_s: float | None = None, *, quiet: bool = False) -> Patience:
        """How this job waits for ``peer``: its waits end at once when the job is cancelled, and unless ``quiet``
        the job's progress (phase ``encode``) says what it waits for."""

        def sleep(seconds: float) -> None:
            if ctx.cancelled.wait(seconds):
                ctx.check_cancelled()

        def on_wait(message: str) -> None:
            log.info("job %s: %s", ctx.job.job_id, message)
            if not quiet:
                ctx.progress(phase="encode", message=message)

        return Patience(
            peer,
            self.peers.wait_s if budget_s is None else budget_s,
            on_wait=on_wait,
            sleep=sleep,
            budget_name="EDITTUNER_PEER_WAIT_S",
        )

    def _encode_on(
        self,
        stub: encoder_pb2_grpc.EncoderServiceStub,
        request: encoder_pb2.SubmitEncodeRequest,
        ctx: JobContext,
        label: str = "encoder_svc",
        index: int = 0,
    ) -> Any:
        """Submit one encode job and follow it to its end, waiting out a busy encoder; returns the finished job."""
        patience = self._patience(ctx, self.peers.describe("encoder_svc", index))
        try:
            enc_job = patience.call(stub.SubmitEncode, request, timeout_s=RPC_TIMEOUT_S).job  # idempotent
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise FailedPrecondition(f"{label} refused the encode: {e.details()}") from None
            raise Unavailable(f"{label}: {e.code().name}: {e.details()}") from None

        def on_update(job: common_pb2.Job) -> None:
            p = job.progress
            ctx.progress(
                phase="encode",
                step=p.step,
                total=p.total,  # replicas: each its own share
                message=p.message if label == "encoder_svc" else f"{label}: {p.message}",
            )
            if ctx.cancelled.is_set():
                try:
                    patience.call(
                        stub.CancelJob, encoder_pb2.CancelJobRequest(job_id=job.job_id), timeout_s=RPC_TIMEOUT_S
                    )
                finally:
                    ctx.check_cancelled()

        try:
            enc_job = patience.watch_job(stub, encoder_pb2, enc_job.job_id, on_update, timeout_s=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            raise Unavailable(f"{label}: {e.code().name}: {e.details()}") from None
        state = state_name(enc_job)
        if state == "cancelled":
            raise FailedPrecondition(f"the encode job {enc_job.job_id} on {label} was cancelled; start the run again")
        if state == "failed":
            raise error_of(enc_job)
        return enc_job

    def _submit_render(
        self,
        job: JobRecord,
        ctx: JobContext,
        e: TrainEvent,
        validations: list[Validation],
        missed: list[MissedValidation],
        index: list[str],
        trained: threading.Event,
    ) -> None:
        """Hand a validation to eval_svc (not waiting for the render), waiting out a busy eval_svc while training
        runs (at most the peer budget); a validation it has not taken by then is recorded as missed, never fatal."""
        step = e.step
        files = self._files(job)
        last: list[str] = []

        def sleep(seconds: float) -> None:
            until = time.monotonic() + seconds
            while not trained.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    return
                if ctx.cancelled.wait(min(left, 0.25)):
                    ctx.check_cancelled()
            raise Unavailable(f"the run's training ended before eval_svc took it ({last[-1] if last else ''})")

        try:
            if self.peers.eval is None:
                raise Unavailable("no eval_svc address (EDITTUNER_EVAL_ADDR)")
            patience = self._patience(ctx, self.peers.describe("eval_svc"), quiet=True)

            def on_wait(message: str, log_wait: Any = patience.on_wait) -> None:
                last.append(message.removeprefix("waiting for "))
                log_wait(message)

            patience = dataclasses.replace(patience, sleep=sleep, on_wait=on_wait)
            r = patience.call(
                self.peers.eval.SubmitRender,
                eval_pb2.SubmitRenderRequest(
                    request_id=f"{job.job_id}-render-{step}",
                    files=files,
                    run_id=e.run_id,
                    step=step,
                    lora_key=e.lora_key,
                    index_keys=index,
                ),
                timeout_s=RPC_TIMEOUT_S,
            )
            validations.append(Validation(step, r.job.job_id))
        except (grpc.RpcError, Unavailable, JobCancelled) as err:
            reason = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            missed.append(MissedValidation(step, f"eval_svc unavailable ({reason})"))
            log.warning("validation at step %d missed: %s", step, reason)


class TrainerServicer(JobRpcMixin, trainer_pb2_grpc.TrainerServiceServicer):
    pb = trainer_pb2

    def StartRun(
        self, request: trainer_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.StartRunResponse:
        files = files_from_proto(request.files)
        run = validated_run(files, self.core.paths)
        if request.run_id:
            check_run_id(request.run_id)
        if request.skip_fit_check:  # the worker's Trainer.setup must not refuse what the client chose to try
            files = dataclasses.replace(files, overrides=(*files.overrides, "skip_fit_check=true"))
        elif not run.train.skip_fit_check and torch.cuda.is_available():
            check_fits(run, resolve_device(run.train.device))  # RESOURCE_EXHAUSTED before a job exists
        run_id = check_run_id(request.run_id or run_id_for(run.train.output_dir))
        params = files_to_params(files) | {"run_id": run_id}
        for active in self.jobs.list(state="running")[0] + self.jobs.list(state="queued")[0]:
            if active.params.get("run_id") == run_id and active.request_id != request.request_id:
                raise FailedPrecondition(
                    f"run {run_id!r} is already active as job {active.job_id}; cancel it "
                    "or pick another output_dir / run_id"
                )
        job = self.jobs.submit("train", params, request.request_id)
        return trainer_pb2.StartRunResponse(job=job_to_proto(job))
