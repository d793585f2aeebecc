"""eval_svc: Render jobs (run, step, LoRA object, eval set) → preview grids and metrics in the store (and, with
report_to tensorboard, the render's TensorBoard event file in the run's logs: see ``shared.train.trackers``)."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import grpc

from shared.config.schema import RunConfig
from shared.errors import InvalidInput
from shared.evaluate.validation import RunValidation
from shared.model.adapters import TRAINED, lora_file_in
from shared.model.device import free_gpu_memory, resolve_device, resolve_dtype
from shared.model.loading import load_render_pipeline
from shared.rpc import eval_pb2, eval_pb2_grpc
from shared.service.common import (
    IdleRelease,
    JobRpcMixin,
    ServerPaths,
    check_run_id,
    files_from_proto,
    files_to_params,
    job_to_proto,
    run_from_params,
    validated_run,
)
from shared.service.jobs import JobContext
from shared.service.metrics import Metrics, start_gpu_job
from shared.service.outputs import RenderOutputs
from shared.service.records import JobRecord
from shared.store.base import ObjectStore, validate_key
from shared.train.trackers import publish_validation

ADAPTER = TRAINED  # the trained LoRA, loaded from its file for one render
log = logging.getLogger(__name__)


class EvalCore:
    """Renders validations; keeps the base pipeline loaded between jobs, the LoRA only for one job."""

    def __init__(
        self, store: ObjectStore, metrics: Metrics, idle_release_s: float = 300.0, paths: ServerPaths | None = None
    ):
        self.store, self.metrics, self.paths = store, metrics, paths or ServerPaths()
        self.idle = IdleRelease(self.release, idle_release_s)
        self._lock = threading.Lock()
        self._pipe: tuple[tuple[str, ...], Any] | None = None
        self._full: tuple[tuple[str, ...], Any] | None = None  # validation_on_full_precision's transformer
        self.components: tuple[str, ...] = ()  # what the resident render pipeline holds
        self._out_of_memory: dict[str, int] = {}  # run id → renders that ran out of GPU memory

    def _pipeline(self, run, text_encoder: bool) -> Any:
        """The render pipeline: the transformer at the run's base_model_precision, and the text encoder only when
        some preview sample's embeddings are not cached."""
        t = run.train
        device = resolve_device(t.device)
        dtype = resolve_dtype(t.mixed_precision, device)
        key = (
            t.model_path,
            t.pretrained_transformer_model_name_or_path,
            t.pretrained_transformer_subfolder,
            t.model_flavour,
            str(device),
            str(dtype),
            t.base_model_precision,
            str(text_encoder),
        )
        if self._pipe is None or self._pipe[0] != key:
            self._pipe = None
            free_gpu_memory()
            pipe, self.components = load_render_pipeline(
                t.model_path,
                t.model_flavour,
                device=device,
                dtype=dtype,
                precision=t.base_model_precision,
                quantize_via=t.quantize_via,
                text_encoder=text_encoder,
                transformer_file=t.pretrained_transformer_model_name_or_path,
                transformer_subfolder=t.pretrained_transformer_subfolder,
            )
            log.info("render pipeline: %s, transformer %s", ", ".join(self.components), t.base_model_precision)
            self._pipe = (key, pipe)
        return self._pipe[1]

    def execute(self, job: JobRecord, ctx: JobContext) -> RenderOutputs:
        p = job.params
        run = run_from_params(p)
        with self._lock:
            ctx.progress(phase="render", step=0, total=1, message=f"validation of {p['run_id']} step {p['step']}")
            start_gpu_job(run.train.device)
            previews = RunValidation(
                run, self.store, p["run_id"], p.get("index_keys") or (), self._out_of_memory.get(p["run_id"], 0)
            )
            pipe = self._pipeline(run, text_encoder=previews.eval_set().needs_text_encoder)
            full = self._full_transformer(run)
            try:
                result = previews.render(
                    pipe,
                    int(p["step"]),
                    self._lora_file(pipe, p["lora_key"], run, full),
                    what=f"{p['run_id']} step {p['step']}",
                    next_one="its next validation",
                    full=full,
                )
            finally:  # after an out-of-memory, the run's next render is smaller
                self._out_of_memory[p["run_id"]] = previews.out_of_memory
            self.metrics.eval_render_seconds.observe(result.seconds)
            self.metrics.record_validation(result.to_json())
            self.metrics.record_gpu("eval")
            report = previews.report_key  # refreshed in the lock: of two renders, the later is last
        self.idle.touch()
        outputs = RenderOutputs(
            run_id=p["run_id"],
            step=int(p["step"]),
            psnr_lora=result.psnr_lora,
            psnr_base=result.psnr_base,
            metrics_key=result.metrics_key,
            grid_keys=[s.grid_key for s in result.samples],
            report_key=report or "",
        )
        try:  # the worker has moved on: this render's TensorBoard file is written here, whenever it finishes
            outputs.tensorboard_key = publish_validation(self.store, run, p["run_id"], result.to_json()) or ""
        except Exception:  # the logs are not worth the render
            log.warning("the TensorBoard file of %s step %s was not written", p["run_id"], p["step"], exc_info=True)
        ctx.progress(phase="render", step=1, total=1, message="done")
        return outputs

    def _full_transformer(self, run: RunConfig) -> Any:
        """The model folder's unquantized transformer, for validation_on_full_precision (kept between jobs like the
        pipeline; None when the run does not ask for it)."""
        from shared.evaluate.full_precision import load_full_transformer, wanted

        if not wanted(run):
            return None
        t = run.train
        device = resolve_device(t.device)
        dtype = resolve_dtype(t.mixed_precision, device)
        key = (t.model_path, t.model_flavour, str(device), str(dtype))
        if self._full is None or self._full[0] != key:
            self._full = None
            free_gpu_memory()
            self._full = (key, load_full_transformer(run, device, dtype))
            log.info("full-precision transformer of %s loaded for validation_on_full_precision", t.model_path)
        return self._full[1]

    @contextmanager
    def _lora_file(self, pipe: Any, key: str, run: RunConfig | None = None, full: Any = None) -> Iterator[None]:
        """The LoRA in the pipeline for one render, loaded from the file itself, not a state dict: diffusers reads
        the LoRA's alpha from the file's metadata (a dict would silently apply it at alpha = rank); beside it, the
        frozen adapters the run's previews use (the assistant LoRA at its inference strength); with ``full`` (the
        full-precision transformer of validation_on_full_precision) the same in it."""
        train = run.train if run is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / key.rsplit("/", 1)[-1]
            self.store.get_file(key, path)
            with (
                lora_file_in(pipe, pipe.transformer, path, train),
                lora_file_in(pipe, full, path, train) if full is not None else nullcontext(),
            ):
                yield

    def release(self) -> None:
        with self._lock:
            self._pipe = self._full = None
        free_gpu_memory()


class EvalServicer(JobRpcMixin, eval_pb2_grpc.EvalServiceServicer):
    pb = eval_pb2

    def SubmitRender(
        self, request: eval_pb2.SubmitRenderRequest, context: grpc.ServicerContext
    ) -> eval_pb2.SubmitRenderResponse:
        files = files_from_proto(request.files)
        validated_run(files, self.core.paths)
        if not request.run_id or not request.lora_key:
            raise InvalidInput("SubmitRender needs run_id and lora_key (the LoRA object written by the trainer)")
        check_run_id(request.run_id)
        validate_key(request.lora_key)
        if not request.lora_key.startswith(f"runs/{request.run_id}/"):
            raise InvalidInput(
                f"lora_key: {request.lora_key[:120]!r} is not in run {request.run_id!r}'s folder "
                f"(runs/{request.run_id}/...): a render reads only the run's own LoRA"
            )
        for key in request.index_keys:
            if not validate_key(key).startswith("cache/index/"):
                raise InvalidInput(f"index_keys: {key[:120]!r} is not a cache index (cache/index/...)")
        params = files_to_params(files) | {
            "run_id": request.run_id,
            "step": request.step,
            "lora_key": request.lora_key,
            "index_keys": list(request.index_keys),
        }
        job = self.jobs.submit("render", params, request.request_id)
        return eval_pb2.SubmitRenderResponse(job=job_to_proto(job))

    def ReleaseModels(
        self, request: eval_pb2.ReleaseModelsRequest, context: grpc.ServicerContext
    ) -> eval_pb2.ReleaseModelsResponse:
        self.core.release()
        return eval_pb2.ReleaseModelsResponse()
