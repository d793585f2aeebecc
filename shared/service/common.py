"""What the three servicers share: job records ↔ protos, the Get/List/Cancel/Watch methods, config files.

A servicer is an adapter: parse the request, call the core, convert back. The job methods are identical in
every service except for the message classes, so they live here once, parametrised by the service's pb2 module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from shared import errors
from shared.config.loading import ConfigFiles, load_run_config_text
from shared.config.schema import RunConfig, is_single_file
from shared.model.location import looks_like_hub_id
from shared.model.single_file import transformer_candidates
from shared.rpc import common_pb2
from shared.service.jobs import JobManager
from shared.service.outputs import result_of, set_result
from shared.service.records import JobRecord

_STATE_TO_PROTO = {
    "queued": common_pb2.JOB_STATE_QUEUED,
    "running": common_pb2.JOB_STATE_RUNNING,
    "succeeded": common_pb2.JOB_STATE_SUCCEEDED,
    "failed": common_pb2.JOB_STATE_FAILED,
    "cancelled": common_pb2.JOB_STATE_CANCELLED,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def _ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def job_to_proto(rec: JobRecord) -> common_pb2.Job:
    p = rec.progress or {}
    progress = common_pb2.Progress(
        phase=str(p.get("phase", "")),
        step=int(p.get("step", 0) or 0),
        total=int(p.get("total", 0) or 0),
        loss=float(p.get("loss", 0.0) or 0.0),
        seconds_per_step=float(p.get("seconds_per_step", 0.0) or 0.0),
        message=str(p.get("message", "")),
        learning_rate=float(p.get("learning_rate", 0.0) or 0.0),
        data_wait_fraction=float(p.get("data_wait_fraction", 0.0) or 0.0),
    )
    state = rec.state.value if hasattr(rec.state, "value") else str(rec.state)
    job = common_pb2.Job(
        job_id=rec.job_id,
        request_id=rec.request_id,
        kind=rec.kind,
        state=_STATE_TO_PROTO[state],
        progress=progress,
        outputs={k: str(v) for k, v in rec.outputs.items()},
        error=rec.error,
        error_code=rec.error_code,
        create_time=_ts(rec.created),
        update_time=_ts(rec.updated),
        attempt=rec.attempt,
    )
    return set_result(job, result_of(rec))  # the typed results; `outputs` above is their deprecated strings


def state_name(job: common_pb2.Job) -> str:
    return _STATE_FROM_PROTO.get(job.state, "unspecified")


def error_of(job: common_pb2.Job) -> errors.EditTunerError:
    """The domain error a failed job stands for (a trainer waiting on an encoder job re-raises it)."""
    return errors.error_class(job.error_code)(job.error or "the job failed")


def files_from_proto(files: common_pb2.RunConfigFiles) -> ConfigFiles:
    if not files.config_json.strip():
        raise errors.InvalidInput("files.config_json is empty: send the text of config.json")
    if not files.data_json.strip():
        raise errors.InvalidInput("files.data_json is empty: send the text of multidatabackend.json")
    return ConfigFiles(
        files.config_json,
        files.data_json,
        tuple(files.overrides),
        files.config_name or "config.json",
        files.data_name or "multidatabackend.json",
    )


def files_to_proto(cf: ConfigFiles) -> common_pb2.RunConfigFiles:
    return common_pb2.RunConfigFiles(
        config_json=cf.config_text,
        data_json=cf.data_text,
        overrides=list(cf.overrides),
        config_name=cf.config_name,
        data_name=cf.data_name,
    )


def files_to_params(cf: ConfigFiles) -> dict[str, Any]:
    return {"files": dataclasses.asdict(cf) | {"overrides": list(cf.overrides)}}


def run_from_params(params: dict[str, Any]) -> RunConfig:
    f = params["files"]
    return run_from_files(
        ConfigFiles(f["config_text"], f["data_text"], tuple(f["overrides"]), f["config_name"], f["data_name"])
    )


def run_from_files(cf: ConfigFiles, extra_overrides: tuple[str, ...] = ()) -> RunConfig:
    return load_run_config_text(
        cf.config_text,
        cf.data_text,
        [*cf.overrides, *extra_overrides],
        config_name=cf.config_name,
        data_name=cf.data_name,
    )


class IdleRelease:
    """Calls ``release`` once nothing has used the models for ``idle_s`` seconds: on one GPU the three services
    cannot all keep 20B-parameter models resident, so an idle service gives its memory back."""

    def __init__(self, release: Callable[[], object], idle_s: float):
        self.release, self.idle_s = release, idle_s
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def touch(self) -> None:
        """Call after each job: restarts the countdown."""
        if self.idle_s <= 0:
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.idle_s, self.release)
            self._timer.daemon = True
            self._timer.start()


class JobRpcMixin:
    """GetJob, ListJobs, CancelJob, WatchJob over ``self.jobs`` with the service's own message classes."""

    pb: Any  # the service's *_pb2 module

    def __init__(self, jobs: JobManager, core: Any, *, keepalive_s: float = 15.0):
        self.jobs, self.core, self.keepalive_s = jobs, core, keepalive_s

    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.pb.GetJobResponse(job=job_to_proto(self.jobs.get(request.job_id)))

    def ListJobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.state and request.state not in _STATE_FROM_PROTO:
            known = ", ".join(common_pb2.JobState.Name(v) for v in _STATE_FROM_PROTO)
            raise errors.InvalidInput(
                f"state: {request.state} is not a job state; use one of {known} (or leave it unset for every state)"
            )
        if request.page_size < 0:
            raise errors.InvalidInput(f"page_size: {request.page_size} is negative; use 0 for the default (50)")
        state = _STATE_FROM_PROTO.get(request.state) if request.state else None
        records, token = self.jobs.list(state=state, page_size=request.page_size or 50, page_token=request.page_token)
        return self.pb.ListJobsResponse(jobs=[job_to_proto(r) for r in records], next_page_token=token)

    def CancelJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.pb.CancelJobResponse(job=job_to_proto(self.jobs.cancel(request.job_id)))

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Events until the job ends, the job's state again every ``keepalive_s`` without a change, and at the
        service's shutdown UNAVAILABLE (the job goes on after the restart: a client watches again)."""
        last = None
        for last in self.jobs.watch(request.job_id, is_active=context.is_active, heartbeat_s=self.keepalive_s):
            yield self.pb.WatchJobResponse(job=job_to_proto(last))
        if last is not None and not last.state.terminal and self.jobs.closed and context.is_active():
            raise errors.Unavailable(
                f"{self.jobs.service}_svc is shutting down; job {last.job_id} goes on when it is back: watch it again"
            )


# ------------------------------------------------------------------------------------------ request checks
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str, field: str = "run_id") -> str:
    """A run id is one store-key segment: ``runs/<run_id>/`` can never reach into another run's folder."""
    if not RUN_ID.fullmatch(run_id) or run_id.endswith("."):
        raise errors.InvalidInput(
            f"{field}: {run_id[:80]!r} is not a run id: use 1 to 100 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (no '/')"
        )
    return run_id


@dataclasses.dataclass(frozen=True)
class ServerPaths:
    """The server folders a request may name: local datasets under ``dataset_roots``, local model directories
    under ``model_roots``. Anything else in a request is never a server path: a dataset elsewhere is uploaded into
    the store, outputs go to the store."""

    dataset_roots: tuple[str, ...] = ()
    model_roots: tuple[str, ...] = ()

    @staticmethod
    def _inside(path: str, roots: tuple[str, ...]) -> bool:
        real = os.path.realpath(path)  # '..' and symlinks resolved before the comparison
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in map(os.path.realpath, roots))

    def stat(self, path: str, max_hash_bytes: int = 256 * 1024 * 1024) -> tuple[bool, int, str]:
        """(readable, size, sha256) of a server file a client asks about; (False, 0, "") outside the dataset
        folders (nothing there is even looked at) or for anything but a regular file."""
        if not path or len(path) > 4096 or "\x00" in path or not self._inside(path, self.dataset_roots):
            return False, 0, ""
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_hash_bytes:
                return False, 0, ""
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError:
            return False, 0, ""
        return True, st.st_size, h.hexdigest()

    def check(self, run: RunConfig) -> None:
        """ConfigError listing every dataset folder or model directory of ``run`` outside the roots."""
        problems = []
        for i, d in enumerate(run.data.datasets):
            if (
                d.type == "local"
                and d.dataset_type in ("image", "conditioning")
                and d.instance_data_dir
                and not self._inside(d.instance_data_dir, self.dataset_roots)
            ):
                problems.append(
                    errors.Problem(
                        f"{run.data.source}: $[{i}].instance_data_dir (id {d.id!r})",
                        f"{d.instance_data_dir!r} is not in a folder this server reads datasets from "
                        f"({', '.join(self.dataset_roots) or 'none: EDITTUNER_DATASET_ROOTS is not set'}); put the "
                        "dataset there, or upload it into the store and use an aws-type entry",
                    )
                )
        model = run.train.pretrained_model_name_or_path
        if model and not looks_like_hub_id(model) and not self._inside(model, self.model_roots):
            problems.append(
                errors.Problem(
                    f"{run.config_source}: $.pretrained_model_name_or_path",
                    f"{model!r} is not in a folder this server loads models from "
                    f"({', '.join(self.model_roots) or 'none: EDITTUNER_MODEL_DIR is not set'}); use the hub id, or "
                    "place the weights under EDITTUNER_MODEL_DIR",
                )
            )
        transformer = run.train.pretrained_transformer_model_name_or_path
        if transformer and (is_single_file(transformer) or not looks_like_hub_id(transformer)):
            where = _transformer_path(transformer)
            if not self._inside(where, self.model_roots):
                problems.append(
                    errors.Problem(
                        f"{run.config_source}: $.pretrained_transformer_model_name_or_path",
                        f"{transformer!r} is not in a folder this server loads models from "
                        f"({', '.join(self.model_roots) or 'none: EDITTUNER_MODEL_DIR is not set'}); place the "
                        "transformer file under EDITTUNER_MODEL_DIR",
                    )
                )
        for option, path in adapter_files(run):
            if not self._inside(path, self.model_roots):
                problems.append(
                    errors.Problem(
                        f"{run.config_source}: $.{option}",
                        f"{path!r} is not in a folder this server loads models from "
                        f"({', '.join(self.model_roots) or 'none: EDITTUNER_MODEL_DIR is not set'}); place the LoRA "
                        "file under EDITTUNER_MODEL_DIR",
                    )
                )
        if problems:
            raise errors.ConfigError(problems, "the request names server paths it may not use")


def _transformer_path(value: str) -> str:
    """Where the loader finds a transformer file or folder: the first of its places that exists, else as given."""
    return str(next((p for p in transformer_candidates(value) if p.exists()), value))


def adapter_files(run: RunConfig) -> list[tuple[str, str]]:
    """(option, path) of every LoRA file the run loads beside its base: server paths, like the base's folder."""
    from shared.config.validation_adapters import adapter_runs

    t = run.train
    named = [("init_lora", t.init_lora), ("assistant_lora_path", t.assistant_lora)]
    named += [
        ("validation_adapter_path" if t.validation_adapter_path else "validation_adapter_config", path)
        for r in adapter_runs(t)
        for _, path, _ in r.adapters
    ]
    return [(option, path) for option, path in named if path]


def validated_run(files: ConfigFiles, paths: ServerPaths) -> RunConfig:
    """Parse a request's files and check every server path they name, before a job exists."""
    run = run_from_files(files)
    paths.check(run)
    return run
