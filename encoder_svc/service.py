"""encoder_svc: Encode jobs over a run's data config → caches, manifests and training indexes in the store."""

from __future__ import annotations

import threading
from typing import Any

import grpc

from shared.encode.encoder import DatasetEncoder, EncodeStats, pipe_key
from shared.errors import InvalidInput, clear_frames
from shared.model.device import free_gpu_memory
from shared.rpc import encoder_pb2, encoder_pb2_grpc
from shared.service.common import (
    IdleRelease,
    JobRpcMixin,
    ServerPaths,
    files_from_proto,
    files_to_params,
    job_to_proto,
    run_from_params,
    validated_run,
)
from shared.service.jobs import JobContext
from shared.service.metrics import Metrics, start_gpu_job
from shared.service.outputs import EncodeOutputs
from shared.service.records import JobRecord
from shared.store.base import ObjectStore


class EncoderCore:
    """Runs encode jobs; keeps the VAE and text encoder loaded between jobs until released."""

    def __init__(
        self, store: ObjectStore, metrics: Metrics, idle_release_s: float = 300.0, paths: ServerPaths | None = None
    ):
        self.store, self.metrics, self.paths = store, metrics, paths or ServerPaths()
        self.idle = IdleRelease(self.release, idle_release_s)
        self._lock = threading.Lock()
        self._pipes: dict[tuple[str, ...], Any] = {}

    def execute(self, job: JobRecord, ctx: JobContext) -> EncodeOutputs:
        run = run_from_params(job.params)
        with self._lock:
            start_gpu_job(run.train.device)
            key = pipe_key(run)  # the key the models are stored under below
            if key not in self._pipes and self._pipes:  # never two model sets on the GPU at once
                self._pipes.clear()
                free_gpu_memory()
            enc = DatasetEncoder(run, self.store, pipe=self._pipes.get(key))
            seen = EncodeStats()

            def progress(stats: EncodeStats, total: int) -> None:
                self.metrics.encoder_images.inc(stats.encoded - seen.encoded)
                self.metrics.encoder_cache_hits.inc(stats.cached - seen.cached)
                seen.encoded, seen.cached = stats.encoded, stats.cached
                ctx.progress(
                    phase="encode",
                    step=stats.total,
                    total=total,
                    message=f"encoded {stats.encoded}, cached {stats.cached}, failed {stats.failed}",
                )
                ctx.check_cancelled()

            count = int(job.params.get("shard_count", "0") or 0)
            try:
                if job.params.get("finalize") == "true":  # the replicas' shards merged; nothing encoded here
                    index_keys, stats = enc.finalize(count), EncodeStats()
                else:
                    shard = (int(job.params.get("shard_index", "0")), count) if count > 1 else None
                    stats, index_keys = enc.encode_with_index(progress, shard=shard)
            except BaseException as err:
                self._pipes.clear()  # a failed job must not leave half-used models resident
                clear_frames(err)  # its frames hold the models and the batch: freed only once they are cleared
                enc.release()
                raise
            if enc._pipe is not None:
                self._pipes = {key: enc._pipe}  # one model set resident at a time
            self.metrics.record_gpu("encoder")
        self.idle.touch()
        return EncodeOutputs(
            encoded=stats.encoded, cached=stats.cached, failed=stats.failed, index_keys=list(index_keys)
        )

    def release(self) -> bool:
        """Free GPU memory (the trainer asks before training starts on the same GPU)."""
        with self._lock:
            had = bool(self._pipes)
            self._pipes.clear()
        free_gpu_memory()
        return had


class EncoderServicer(JobRpcMixin, encoder_pb2_grpc.EncoderServiceServicer):
    pb = encoder_pb2

    def SubmitEncode(
        self, request: encoder_pb2.SubmitEncodeRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.SubmitEncodeResponse:
        files = files_from_proto(request.files)
        validated_run(files, self.core.paths)  # bad input fails the call, listing every problem, before a job
        if request.shard_count > 1 and request.shard_index >= request.shard_count:
            raise InvalidInput(
                f"shard_index {request.shard_index} with shard_count {request.shard_count}: expected "
                "0 <= shard_index < shard_count"
            )
        if request.finalize and request.shard_count < 1:
            raise InvalidInput("finalize needs shard_count: the number of replicas whose shards it merges")
        shard = (
            {
                "shard_index": str(request.shard_index),
                "shard_count": str(request.shard_count),
                "finalize": "true" if request.finalize else "false",
            }
            if request.shard_count > 1 or request.finalize
            else {}
        )
        job = self.jobs.submit("encode", files_to_params(files) | shard, request.request_id)
        return encoder_pb2.SubmitEncodeResponse(job=job_to_proto(job))

    def ReleaseModels(
        self, request: encoder_pb2.ReleaseModelsRequest, context: grpc.ServicerContext
    ) -> encoder_pb2.ReleaseModelsResponse:
        self.core.release()
        return encoder_pb2.ReleaseModelsResponse()
