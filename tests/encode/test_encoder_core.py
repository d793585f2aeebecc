"""encoder_svc's core keeps one model set resident: a job with the same model settings reuses it, a job that needs
another set (another text_encoder_1_precision) releases it before loading its own; a job that runs out of GPU
memory leaves nothing of its models or batch alive when the memory is given back."""

from __future__ import annotations

import time
import weakref
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from encoder_svc.service import EncoderCore
from shared.config.loading import read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.model import loading
from shared.service.common import files_to_params
from shared.service.metrics import Metrics
from shared.service.records import JobRecord, JobState
from shared.store.local import LocalStore


class _Ctx:
    def progress(self, **fields: Any) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


def _job(n: int, cfg, data, overrides: tuple[str, ...] = ()) -> JobRecord:
    now = time.time()
    params = files_to_params(read_config_files(cfg, data, overrides))
    return JobRecord(f"job-{n}", f"req-{n}", "encode", JobState.RUNNING, params, now, now)


def test_jobs_with_the_same_models_load_them_once_and_another_precision_replaces_them(
    tmp_path, tiny_models, monkeypatch
):
    model = tiny_models("edit-v2")
    configs = []
    for seed in (0, 1):  # two datasets: the second job has images of its own to encode, with the resident models
        root = write_dataset(tmp_path / f"data-{seed}", n=2, references=1, seed=seed)
        configs.append(write_configs(tmp_path / f"cfg-{seed}", root, model, "edit-v2", 1))
    real, loads = loading.load_encoder_pipeline, []

    def load(*args: Any, **kwargs: Any) -> Any:
        # what is still alive of the sets loaded before, at the moment this one loads
        loads.append((kwargs["text_encoder_precision"], [ref() is not None for ref, _ in loads]))
        pipe = real(*args, **kwargs)
        loads[-1] = (weakref.ref(pipe), loads[-1])
        return pipe

    monkeypatch.setattr(loading, "load_encoder_pipeline", load)
    core = EncoderCore(LocalStore(tmp_path / "store"), Metrics(CollectorRegistry()), idle_release_s=0)

    first = core.execute(_job(1, *configs[0]), _Ctx())
    second = core.execute(_job(2, *configs[1]), _Ctx())
    assert first.encoded > 0 and second.encoded > 0 and second.cached == 0
    assert [what for _, what in loads] == [("no_change", [])]  # the second job encoded with the first's models
    [resident] = core._pipes.values()
    assert resident is loads[0][0]()

    del resident
    third = core.execute(_job(3, *configs[1], ("text_encoder_1_precision=int8-quanto",)), _Ctx())
    assert third.encoded > 0  # the captions again, embedded by the quantized text encoder
    # loaded again, and the unquantized set was gone before the quantized one loaded
    assert [what for _, what in loads] == [("no_change", []), ("int8-quanto", [False])]
    [(key, resident)] = core._pipes.items()
    assert key[-1] == "int8-quanto" and resident is loads[1][0]()


def test_a_job_out_of_gpu_memory_frees_its_models_and_batch_before_giving_memory_back(
    tmp_path, tiny_models, monkeypatch
):
    """The error's traceback frames hold the VAE and the batch being encoded: when the core frees memory after the
    failed job, they are gone, and no model set stays resident."""
    from shared.encode import encoder, ops

    root = write_dataset(tmp_path / "data", n=2, references=1)
    cfg, data = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1)
    held: list[weakref.ref] = []
    frees: list[list[bool]] = []

    def encode_vae_latents(vae: Any, *args: Any, **kwargs: Any) -> Any:
        latents = torch.ones(1 << 20)  # what the batch holds when the allocator gives up
        held.extend([weakref.ref(vae), weakref.ref(latents)])
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.40 GiB")

    monkeypatch.setattr(ops, "encode_vae_latents", encode_vae_latents)
    monkeypatch.setattr(encoder, "free_gpu_memory", lambda: frees.append([ref() is None for ref in held]))
    core = EncoderCore(LocalStore(tmp_path / "store"), Metrics(CollectorRegistry()), idle_release_s=0)
    with pytest.raises(torch.OutOfMemoryError):
        core.execute(_job(1, cfg, data), _Ctx())
    assert frees == [[True, True]] and core._pipes == {}
