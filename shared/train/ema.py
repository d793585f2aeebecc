"""The exponential moving average of the LoRA parameters (``use_ema``), kept on the CPU by default.

``ema_device`` as SimpleTuner names it: ``cpu`` (the seed's choice: no accelerator memory for a second copy of
the adapter) or ``accelerator``. On the CPU the update costs one batched transfer per step — the parameters are
concatenated on the device (one kernel), copied into a pinned buffer without blocking the host, and the average
is updated with ``torch._foreach_*`` over views of that buffer — instead of one blocking copy per tensor (~480 at
rank 16). The arithmetic is the per-tensor ``ema = ema * decay + p * (1 - decay)`` of before, element for element.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class LoraEMA:
    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float, device: torch.device | str = "cpu"):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = decay
        self.device = torch.device(device)
        self.shadow = [p.detach().float().to(self.device).clone() for p in self.params]
        self._staging: torch.Tensor | None = None

    def _current(self) -> list[torch.Tensor]:
        """The parameters' values where the average lives, in fp32."""
        if all(p.device == self.device for p in self.params):
            return [p.detach().float() for p in self.params]
        flat = torch.cat([p.detach().float().reshape(-1) for p in self.params])
        if self._staging is None or self._staging.numel() != flat.numel():
            pinned = flat.device.type == "cuda" and self.device.type == "cpu"
            self._staging = torch.empty(flat.numel(), dtype=torch.float32, device=self.device, pin_memory=pinned)
        self._staging.copy_(flat, non_blocking=True)
        if flat.device.type == "cuda":
            torch.cuda.current_stream(flat.device).synchronize()  # the buffer is read next, on the host
        return [
            v.view_as(s)
            for v, s in zip(torch.split(self._staging, [s.numel() for s in self.shadow]), self.shadow, strict=True)
        ]

    @torch.no_grad()
    def update(self) -> None:
        current = self._current()
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, current, alpha=1 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """name → average, on the CPU (checkpoints, export)."""
        return {n: s.detach().cpu() for n, s in zip(self.names, self.shadow, strict=True)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = [state[n].float().to(self.device).clone() for n in self.names]

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the average inside the block (previews render what the exported file holds)."""
        saved = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)
