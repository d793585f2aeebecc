"""Data parallel training over the LoRA parameters: one process per GPU (gloo processes on a CPU), started by
``torch.distributed.run`` over the training worker.

The global batch does not depend on the number of processes N: of a step's ``gradient_accumulation_steps`` A
micro-batches, rank r computes those with index g mod N == r, each loss scaled by N/A, and DDP averages the
gradients over the ranks on each rank's last micro-batch. Noise, sigmas and LoRA dropout are drawn from
(seed, step, g), so N processes compute what one computes: with A = N the sums are the same floating-point
operations (bit-identical); with A > N they add in another order. Every rank reads every batch from the
loader, so its position, and a checkpoint, do not depend on N: a run resumes on another number of processes.
Rank 0 alone writes (checkpoints, exports, metrics, previews) and reports events; the others wait at a barrier.

The frozen base is not part of DDP's start-up broadcast: it would not sync quantized weights (quanto's are
untouched, bitsandbytes' packed data overwritten without their scales). Each rank loads and quantizes it the
same way instead (the processes of one machine in turns, ``in_turns``: one host copy at a time), and
``check_replicas`` compares a fingerprint of the base and of the LoRA's initial weights across ranks.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shared.config.checks import accumulation_split_problem
from shared.errors import FailedPrecondition, InvalidInput

log = logging.getLogger(__name__)

# A barrier waits for rank 0's checkpoint writes and in-process previews; a rank that dies is seen by torchrun
# at once, so the timeout only bounds a rank that hangs.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Dist:
    """This process's place, from torchrun's environment (one process when it is absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: torch.device, dist: Dist) -> torch.device:
    """The GPU this process computes on, made its current device. Each rank binds its own (``cuda:LOCAL_RANK``); a
    bare ``cuda`` would put every rank on GPU 0. One process binds the one it was given (``device=cuda:1``):
    what is allocated on the current device rather than on a tensor's (cuBLAS handles, libraries' scratch
    space, the CUDA context) would otherwise land on GPU 0."""
    if device.type != "cuda":
        return device
    if dist.active:
        if dist.local_rank >= torch.cuda.device_count():
            raise InvalidInput(
                f"num_processes: rank {dist.rank} has local rank {dist.local_rank}, but this host "
                f"has {torch.cuda.device_count()} GPU(s); use num_processes "
                f"{torch.cuda.device_count()} or fewer"
            )
        device = torch.device("cuda", dist.local_rank)
    elif device.index is None:  # resolve_device gives one; a bare "cuda" is the current GPU already
        # torch's stub types device.index as int, but a device named without one ("cuda") has None
        return torch.device("cuda", torch.cuda.current_device())  # type: ignore[unreachable]
    torch.cuda.set_device(device)
    return device


def process_group_backend(device: torch.device) -> str:
    """The process group's backend for a run on ``device``: gloo on a CPU; on CUDA, nccl for CUDA tensors and
    gloo for CPU ones. The trainer also all-reduces host values (the stop flag, the data wait), and ``"nccl"``
    alone serves only the cuda device type: such a collective fails with "No backend type associated with device
    type cpu". Object collectives and barriers go through gloo then too (torch picks cpu when the group has it)."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device) -> Dist:
    """Join the process group (``process_group_backend``) when torchrun started this process."""
    dist = current()
    if dist.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(process_group_backend(device), timeout=TIMEOUT)
    return dist


def shutdown() -> None:
    """Leave the process group; DDP wrappers must be gone first (collected here)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.active:
        torch.distributed.barrier()


def in_turns(load: Callable[[], Any], dist: Dist) -> Any:
    """``load()`` on one process of this machine at a time (local rank 0 first), the others waiting at a barrier:
    every process loading and quantizing the base at once would need as many host copies of it."""
    if not dist.active:
        return load()
    turns = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    out = None
    for turn in range(turns):
        if turn == dist.local_rank:
            log.info("rank %d: loading the base model (turn %d of %d on this machine)", dist.rank, turn + 1, turns)
            out = load()
            gc.collect()  # the host copy goes before the next process loads
        barrier(dist)
    return out


def own_micro_batches(accumulation: int, dist: Dist) -> list[int]:
    return [g for g in range(accumulation) if g % dist.world == dist.rank]


def check_divisible(accumulation: int, world: int) -> None:
    problem = accumulation_split_problem(accumulation, world)
    if problem:
        raise InvalidInput(f"gradient_accumulation_steps {problem}")


def wrap(transformer: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP over the trainable (LoRA) parameters; the frozen base and buffers are left out of its sync."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in transformer.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in transformer.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(transformer, frozen)
    return DDP(
        transformer,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        gradient_as_bucket_view=True,
    )


def _fingerprint(transformer: torch.nn.Module) -> tuple[str, str]:
    """Digests of the base (the first values of every frozen tensor, quantized data and scales included) and of
    the LoRA weights: equal on every rank when each loaded, quantized and initialised the same."""
    base, lora = hashlib.sha256(), hashlib.sha256()
    for name, p in sorted(transformer.named_parameters(), key=lambda kv: kv[0]):
        h = lora if p.requires_grad else base
        h.update(name.encode())
        for t in (getattr(p, "_data", None), getattr(p, "_scale", None)) if hasattr(p, "_data") else (p,):
            if t is None:
                continue
            try:
                values = t.detach().reshape(-1)[:256].to("cpu", torch.float64)
            except (RuntimeError, TypeError, NotImplementedError):
                values = torch.tensor(list(t.shape), dtype=torch.float64)  # a packing that does not slice
            h.update(values.numpy().tobytes())
    return base.hexdigest(), lora.hexdigest()


def check_replicas(transformer: torch.nn.Module, dist: Dist) -> None:
    if not dist.active:
        return
    mine = _fingerprint(transformer)
    every: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(every, mine)
    for what, i in (("base model weights", 0), ("LoRA initial weights", 1)):
        differ = [r for r, f in enumerate(every) if f[i] != every[0][i]]
        if differ:
            raise FailedPrecondition(
                f"the {what} of rank(s) {differ} differ from rank 0's: every process must load "
                "the same model files with the same base_model_precision and seed"
            )


def all_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.active:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.active:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


# ------------------------------------------------------------------------------------------------ launch
def processes_per_machine(cfg: Any) -> int:
    if cfg.num_processes == "auto":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return int(cfg.num_processes)


def is_distributed(cfg: Any) -> bool:
    return processes_per_machine(cfg) > 1 or cfg.num_machines > 1


def launch_command(worker: list[str], cfg: Any) -> list[str]:
    """``worker`` (``[python, -m, shared.service.worker, ...]``) under torchrun: standalone on one machine, a c10d
    rendezvous at main_process_ip:main_process_port across machines; no restarts (a failed rank fails the run,
    which resumes from its checkpoint)."""
    if not is_distributed(cfg):
        return worker
    if len(worker) < 3 or worker[1] != "-m":
        raise InvalidInput(f"cannot start {worker[:3]} under torchrun: expected python -m MODULE")
    python, module, rest = worker[0], worker[2], worker[3:]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={processes_per_machine(cfg)}", "--max-restarts=0"]
    if cfg.num_machines > 1:
        cmd += [
            f"--nnodes={cfg.num_machines}",
            f"--node-rank={cfg.machine_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.main_process_ip}:{cfg.main_process_port}",
            f"--rdzv-id=edittuner-{cfg.main_process_port}",
            # machine 0 hosts the rendezvous; the others wait there while it encodes (up to an hour)
            f"--rdzv-conf=is_host={'true' if cfg.machine_rank == 0 else 'false'},join_timeout=3600",
        ]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", module, *rest]
