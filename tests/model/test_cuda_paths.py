"""The CUDA-only paths of a training process, held on a CPU: torch.cuda's answers on a GPU host are injected
(``FakeCuda``), and the code is asked what it does with them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from prometheus_client import CollectorRegistry
from test_planner import seed_run
from test_training import make_run

from shared import errors
from shared.config.loading import load_run_config
from shared.model.device import resolve_device, resolve_dtype
from shared.service.metrics import Metrics
from shared.train import gpu
from shared.train.distributed import Dist, rank_device
from shared.train.ema import LoraEMA
from shared.train.events import TrainEvent
from shared.train.trainer import Trainer

GiB = 1 << 30


class FakeCuda:
    """torch.cuda on a host with ``count`` GPUs, GPU 0 the current one: what the code asks, answered; what it
    sets, recorded. Every GPU computes bf16 natively unless ``bf16_native`` says otherwise. Its caching allocator
    (one for the host) keeps what it reserved when tensors are freed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 2):
        self.count, self.current = count, 0
        self.set_devices: list[int] = []
        self.bf16_native = [True] * count
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.peak_resets: list[torch.device | None] = []
        for name in (
            "is_available",
            "device_count",
            "current_device",
            "set_device",
            "device",
            "is_bf16_supported",
            "memory_allocated",
            "memory_reserved",
            "max_memory_allocated",
            "max_memory_reserved",
            "reset_peak_memory_stats",
        ):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return self.current

    def set_device(self, device: torch.device | int) -> None:
        index = device if isinstance(device, int) else torch.device(device).index
        assert index is not None and 0 <= index < self.count, device  # torch refuses a device without an index
        self.current = index
        self.set_devices.append(index)

    @contextmanager
    def device(self, device: torch.device) -> Iterator[None]:
        before, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = before

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return including_emulation or self.bf16_native[self.current]

    def allocate(self, n: int) -> None:
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def memory_allocated(self, device: torch.device | None = None) -> int:
        return self.allocated

    def memory_reserved(self, device: torch.device | None = None) -> int:
        return self.reserved

    def max_memory_allocated(self, device: torch.device | None = None) -> int:
        return self.peak_allocated

    def max_memory_reserved(self, device: torch.device | None = None) -> int:
        return self.peak_reserved

    def reset_peak_memory_stats(self, device: torch.device | None = None) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved
        self.peak_resets.append(device)


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    return FakeCuda(monkeypatch)


class _OnGpu:
    """A LoRA parameter as the EMA reads it on a GPU: its values, and the device a CUDA tensor reports (with its
    index, always)."""

    def __init__(self, values: torch.Tensor, device: torch.device):
        self.values, self.device = values, device

    def detach(self) -> torch.Tensor:
        return self.values


# ------------------------------------------------------------------------------------- which device
def test_auto_and_cuda_mean_the_current_gpu_by_its_index(cuda):
    cuda.current = 1
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) != torch.device("cuda")
    with pytest.raises(errors.InvalidInput, match="this host has 2 GPU"):
        resolve_device("cuda:2")


def test_the_ema_on_the_accelerator_reads_the_parameters_where_they_are(cuda):
    """The trainer's EMA device equals what its GPU parameters report, so the update takes them as they are: no
    concatenation, staging copy or stream sync (here such a copy to a GPU could not even run)."""
    t = Trainer(seed_run("use_ema=true", "ema_device=accelerator"), store=None)
    assert t.device == t._ema_device() == torch.device("cuda", 0)
    ema = LoraEMA([("w", torch.nn.Parameter(torch.ones(3)))], decay=0.5)
    ema.params, ema.device = [_OnGpu(torch.full((3,), 3.0), torch.device("cuda", 0))], t._ema_device()
    ema.update()
    assert ema._staging is None and torch.equal(ema.shadow[0], torch.full((3,), 2.0))


def test_one_process_binds_the_gpu_it_was_given(cuda):
    """device=cuda:1 becomes the current GPU (handles and scratch space go there, not to GPU 0); under torchrun each
    rank binds cuda:LOCAL_RANK whatever device says; a CPU run binds nothing."""
    t = Trainer(seed_run("device=cuda:1"), store=None)
    assert (t.device, cuda.current, cuda.set_devices) == (torch.device("cuda", 1), 1, [1])
    assert rank_device(torch.device("cpu"), Dist()) == torch.device("cpu")
    assert rank_device(torch.device("cuda"), Dist()) == torch.device("cuda", 1)  # the current one, left as it is
    assert rank_device(torch.device("cuda", 1), Dist(rank=2, world=4, local_rank=0)) == torch.device("cuda", 0)
    assert cuda.set_devices == [1, 0]
    with pytest.raises(errors.InvalidInput, match="has local rank 2, but this host has 2 GPU"):
        rank_device(torch.device("cuda", 0), Dist(rank=2, world=3, local_rank=2))


def test_auto_precision_is_bf16_only_on_a_gpu_that_computes_it(cuda, caplog):
    """GPU 0 an A100, GPU 1 a V100 (bf16 emulated only): auto is bf16 on the first, fp32 with the reason logged on
    the second, whichever GPU is current; asked for explicitly, bf16 it is."""
    cuda.bf16_native = [True, False]
    with caplog.at_level(logging.WARNING, logger="shared.model.device"):
        assert resolve_dtype("auto", torch.device("cuda", 0)) == resolve_dtype(None, "cuda:0") == torch.bfloat16
        assert not caplog.records
        assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.float32
        assert "cuda:1 has no native bf16" in caplog.text and cuda.current == 0
        assert resolve_dtype("bf16", "cuda:1") == torch.bfloat16
        assert resolve_dtype("auto", "cpu") == torch.float32
        for device, dtype in (("cuda:1", torch.float32), ("cuda:0", torch.bfloat16)):
            assert Trainer(seed_run("mixed_precision=auto", f"device={device}"), store=None).dtype == dtype


# ------------------------------------------------------------------------------------------ GPU memory
def test_the_reported_peak_is_the_steps_not_the_loads(cuda):
    """A bf16 base loaded (41 GiB) and quantized down to 12 GiB; after the reset a step peaks at 20 GiB. Reported:
    that 20, and the reserved peak beside it (the allocator still holds the 41 GiB it reserved for the load)."""
    device = torch.device("cuda", 1)
    cuda.allocate(41 * GiB)
    cuda.allocate(-29 * GiB)
    gpu.reset_peak(device)
    cuda.allocate(8 * GiB)
    cuda.allocate(-8 * GiB)
    assert cuda.peak_resets == [device]
    assert gpu.memory(device, Dist()) == {
        "gpu_allocated_bytes": 12 * GiB,
        "gpu_reserved_bytes": 41 * GiB,
        "gpu_peak_bytes": 20 * GiB,
        "gpu_peak_reserved_bytes": 41 * GiB,
    }
    assert gpu.memory(torch.device("cpu"), Dist()) == {}
    gpu.reset_peak(torch.device("cpu"))
    assert cuda.peak_resets == [device]


def test_setup_allows_tf32_first_and_resets_the_peak_last_also_on_a_resume(tmp_path, tiny_models, monkeypatch):
    """TF32 is on before the base loads; the peak is reset after everything setup allocates: the base, the LoRA, the
    optimizer, the EMA, and on a resume the checkpoint's state (its step loaded)."""
    cfg, store = make_run(tmp_path, tiny_models, n=2)
    seen: list[tuple] = []
    trainers: list[Trainer] = []
    monkeypatch.setattr(gpu, "allow_tf32", lambda device: seen.append(("tf32", device, trainers[-1].transformer)))
    monkeypatch.setattr(
        gpu,
        "reset_peak",
        lambda device: seen.append(
            ("reset", device, trainers[-1].step, hasattr(trainers[-1], "scheduler"), trainers[-1].ema is not None)
        ),
    )
    for overrides in (
        ["max_train_steps=3", "use_ema=true"],
        ["max_train_steps=4", "resume_from_checkpoint=latest", "use_ema=true"],
    ):
        trainers.append(Trainer(load_run_config(cfg, overrides=overrides), store))
        trainers[-1].setup()
        assert len(seen) == 2 * len(trainers)
        trainers[-1].train()
    cpu = torch.device("cpu")
    assert seen == [
        ("tf32", cpu, None),
        ("reset", cpu, 0, True, True),
        ("tf32", cpu, None),
        ("reset", cpu, 3, True, True),
    ]


def test_tf32_is_allowed_for_a_cuda_run_and_a_cpu_run_changes_nothing():
    matmul = torch.backends.cuda.matmul
    before, matmul.allow_tf32 = matmul.allow_tf32, False  # torch's default
    try:
        gpu.allow_tf32(torch.device("cpu"))
        assert matmul.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
        gpu.allow_tf32(torch.device("cuda", 0))
        assert matmul.allow_tf32 is True
        # readable through the new API and the process-wide one too (torch raises on a mix of set and read APIs)
        assert (matmul.fp32_precision, torch.get_float32_matmul_precision()) == ("tf32", "high")
    finally:
        matmul.allow_tf32 = before


def test_the_services_export_the_reserved_peak_beside_the_allocated_one(cuda):
    cuda.allocate(10 * GiB)
    cuda.allocate(-4 * GiB)
    cuda.reset_peak_memory_stats()
    cuda.empty_cache()
    cuda.allocate(1 * GiB)  # now 7 GiB allocated and reserved; peaks 7 GiB allocated, 10 GiB reserved
    m = Metrics(CollectorRegistry())
    m.record_gpu("eval")
    m.record_train_event(
        TrainEvent("train", loss=0.1, gpu={"gpu_peak_bytes": 7 * GiB, "gpu_peak_reserved_bytes": 9 * GiB})
    )

    def value(service: str, kind: str) -> float | None:
        return m.registry.get_sample_value("edittuner_gpu_memory_bytes", {"service": service, "kind": kind})

    assert [value("eval", k) for k in ("allocated", "reserved", "peak", "peak_reserved")] == [
        7 * GiB,
        7 * GiB,
        7 * GiB,
        10 * GiB,
    ]
    assert (value("trainer", "peak"), value("trainer", "peak_reserved")) == (7 * GiB, 9 * GiB)


def test_an_encode_or_render_job_binds_its_gpu_and_starts_its_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """encoder_svc and eval_svc do their GPU work in the service process: a job on cuda:1 makes GPU 1 current and
    the peak they export is the job's, not the largest since the process started."""
    from shared.service.metrics import start_gpu_job

    cuda = FakeCuda(monkeypatch, count=2)
    start_gpu_job("cuda:1")
    assert cuda.set_devices == [1] and cuda.current == 1
    assert cuda.peak_resets == [torch.device("cuda", 1)]
    start_gpu_job("auto")  # the current GPU, bound by index
    assert cuda.peak_resets[-1] == torch.device("cuda", 1)
    start_gpu_job("cpu")  # nothing to bind or reset
    assert len(cuda.peak_resets) == 2
