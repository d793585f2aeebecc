"""The CUDA-only paths of a training process, held on a CPU: torch.cuda's answers on a GPU host are injected
(``FakeCuda``), and the code is asked what it does with them."""

from __future__ import annotations

import pytest
import torch

from shared import errors
from shared.model.device import resolve_device
from shared.train.ema import LoraEMA
from shared.train.trainer import Trainer
from test_planner import seed_run


class FakeCuda:
    """torch.cuda on a host with ``count`` GPUs, GPU 0 the current one: what the code asks, answered; what it
    sets, recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 2):
        self.count, self.current = count, 0
        self.set_devices: list[int] = []
        for name in ("is_available", "device_count", "current_device", "set_device"):
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
