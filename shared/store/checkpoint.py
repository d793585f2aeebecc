"""Checkpoints in the object store: everything exact resume needs, nothing pickled, valid only once committed.

``runs/<run>/checkpoints/step-<N>/`` holds

- ``lora.safetensors``      the LoRA parameters (peft names), exactly as trained
- ``optimizer.safetensors`` + ``optimizer.json``   the optimizer state: tensors, and the structure around them
  (torchao's quantized states as their inner tensors; the scheduler's tensors, e.g. torchao's tensor lr, too)
- ``ema.safetensors``       the EMA of the LoRA parameters, when use_ema
- ``rng.safetensors``       torch CPU (and CUDA) generator states
- ``state.json``            step, scheduler, loader position, Python/NumPy RNG, metrics so far
- exported LoRA files (diffusers / ComfyUI) for use without resuming

and ``_COMMITTED`` last (the store's commit marker). A checkpoint without it — a crash mid-save — is never
loaded; ``checkpoints_total_limit`` deletes the oldest committed ones.
"""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch

from shared.errors import IntegrityError, InvalidInput, NotFound
from shared.store.base import ObjectStore

_STEP_DIR = re.compile(r"/checkpoints/step-(\d+)/")


# ------------------------------------------------------------------------------------- structure ↔ tensors
# Tensor subclasses an optimizer state may hold (torchao's low-bit states), by qualified name: they are stored as
# their inner tensors (__tensor_flatten__), and loading imports only the classes listed here.
TENSOR_SUBCLASSES = frozenset(
    {
        "torchao.optim.subclass_8bit.OptimState8bit",
        "torchao.optim.subclass_4bit.OptimState4bit",
        "torchao.optim.subclass_fp8.OptimStateFp8",
    }
)


class _WrapperSubclass(Protocol):
    """A traceable tensor subclass (torchao's low-bit states): its inner tensors' attribute names and a context."""

    def __tensor_flatten__(self) -> tuple[list[str], Any]: ...


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """A JSON skeleton of ``obj`` with every tensor moved into ``tensors`` (dict keys keep their int/str type)."""
    if isinstance(obj, torch.Tensor) and hasattr(type(obj), "__tensor_flatten__"):
        name = _qualname(type(obj))
        if name not in TENSOR_SUBCLASSES:
            raise TypeError(f"cannot store a {name} at {path} in a checkpoint (not in TENSOR_SUBCLASSES)")
        inner, ctx = cast(_WrapperSubclass, obj).__tensor_flatten__()  # its class has it (checked above)
        return {
            "__subclass__": name,
            "inner": {n: flatten(getattr(obj, n), tensors, f"{path}.{n}") for n in inner},
            "ctx": flatten(ctx, tensors, f"{path}.ctx"),
            "size": list(obj.size()),
            "stride": list(obj.stride()),
        }
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()  # a snapshot, not a view of live state
        return {"__tensor__": path}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.Size):
        return {"__size__": list(obj)}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def unflatten(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {k: unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__tuple__" in skel:
            return tuple(unflatten(v, tensors) for v in skel["__tuple__"])
        if "__dtype__" in skel:
            dtype = getattr(torch, skel["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise IntegrityError(f"checkpoint names an unknown dtype {skel['__dtype__']!r}")
            return dtype
        if "__size__" in skel:
            return torch.Size(skel["__size__"])
        if "__subclass__" in skel:
            return _unflatten_subclass(skel, tensors)
    if isinstance(skel, list):
        return [unflatten(v, tensors) for v in skel]
    return skel


def _unflatten_subclass(skel: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    name = skel["__subclass__"]
    if name not in TENSOR_SUBCLASSES:  # never import what a checkpoint names, only what this list names
        raise IntegrityError(f"checkpoint holds a tensor of class {name!r}, which EditTuner does not load")
    module, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as err:
        raise InvalidInput(
            f"this checkpoint's optimizer state needs {module.split('.')[0]} ({err}): pip install "
            f"{module.split('.')[0]}"
        ) from None
    inner = {n: unflatten(v, tensors) for n, v in skel["inner"].items()}
    tensor: torch.Tensor = cls.__tensor_unflatten__(
        inner, unflatten(skel["ctx"], tensors), torch.Size(skel["size"]), tuple(skel["stride"])
    )
    return tensor


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state(legacy=True)  # the default, named: numpy's stub types a bare call as a dict
    assert isinstance(np_state, tuple)  # the legacy form: the global RandomState's generator is MT19937
    py_state = random.getstate()
    return tensors, {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------------------------- save/load
@dataclass
class CheckpointState:
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loader: dict[str, int]
    ema: dict[str, torch.Tensor] | None
    rng_tensors: dict[str, torch.Tensor]
    rng: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_prefix(run_prefix: str, step: int) -> str:
    return f"{run_prefix}/checkpoints/step-{step}"


def save_checkpoint(
    store: ObjectStore, run_prefix: str, state: CheckpointState, files: dict[str, bytes] | None = None
) -> str:
    """Write every object of the checkpoint, then its commit marker; returns the checkpoint prefix."""
    prefix = checkpoint_prefix(run_prefix, state.step)
    if store.is_committed(prefix):  # an overwrite must never leave a marker that vouches for mixed contents
        store.delete(f"{prefix}/_COMMITTED")
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_skel = flatten(state.optimizer, opt_tensors)
    scheduler = flatten(state.scheduler, opt_tensors, "scheduler")  # its tensors beside the optimizer's
    keys = [
        store.put_tensors(f"{prefix}/lora.safetensors", state.lora).key,
        store.put_tensors(f"{prefix}/optimizer.safetensors", opt_tensors).key,
        store.put_json(f"{prefix}/optimizer.json", opt_skel).key,
        store.put_tensors(f"{prefix}/rng.safetensors", state.rng_tensors).key,
    ]
    if state.ema is not None:
        keys.append(store.put_tensors(f"{prefix}/ema.safetensors", state.ema).key)
    keys.append(
        store.put_json(
            f"{prefix}/state.json",
            {
                "step": state.step,
                "scheduler": scheduler,
                "loader": state.loader,
                "rng": state.rng,
                "extra": state.extra,
            },
        ).key
    )
    for name, data in (files or {}).items():
        keys.append(store.put_bytes(f"{prefix}/{name}", data).key)
    store.commit(prefix, keys)
    return prefix


def committed_steps(store: ObjectStore, run_prefix: str) -> list[int]:
    steps = set()
    for key in store.list(f"{run_prefix}/checkpoints"):
        m = _STEP_DIR.search("/" + key)
        if m and key.endswith("/_COMMITTED"):
            steps.add(int(m.group(1)))
    return sorted(steps)


def resolve_resume(store: ObjectStore, run_prefix: str, spec: str | None) -> int | None:
    """'latest' → the newest committed step (None when there is none); 'N' / 'step-N' → N, which must exist."""
    if spec in (None, "", "none"):
        return None
    steps = committed_steps(store, run_prefix)
    if spec == "latest":
        return steps[-1] if steps else None
    step = int(str(spec).removeprefix("step-"))
    if step not in steps:
        raise InvalidInput(
            f"resume_from_checkpoint: no committed checkpoint step-{step} under {run_prefix}/checkpoints"
            f"; available: {', '.join(f'step-{s}' for s in steps) or 'none'}"
        )
    return step


def load_checkpoint(store: ObjectStore, run_prefix: str, step: int) -> CheckpointState:
    prefix = checkpoint_prefix(run_prefix, step)
    if not store.is_committed(prefix):
        raise NotFound(f"checkpoint {prefix} is incomplete (no commit marker): it was never finished")
    store.verify_commit(prefix)
    state = store.get_json(f"{prefix}/state.json")
    opt_tensors, _ = store.get_tensors(f"{prefix}/optimizer.safetensors")
    optimizer = unflatten(store.get_json(f"{prefix}/optimizer.json"), opt_tensors)
    ema = store.get_tensors(f"{prefix}/ema.safetensors")[0] if store.exists(f"{prefix}/ema.safetensors") else None
    if int(state["step"]) != step:
        raise IntegrityError(f"{prefix}/state.json says step {state['step']}, expected {step}")
    return CheckpointState(
        step=step,
        lora=store.get_tensors(f"{prefix}/lora.safetensors")[0],
        optimizer=optimizer,
        scheduler=unflatten(state["scheduler"], opt_tensors),
        loader=state["loader"],
        ema=ema,
        rng_tensors=store.get_tensors(f"{prefix}/rng.safetensors")[0],
        rng=state["rng"],
        extra=state.get("extra", {}),
    )


def prune_checkpoints(store: ObjectStore, run_prefix: str, keep: int | None) -> list[int]:
    """Delete the oldest committed checkpoints beyond ``keep``; returns the steps deleted."""
    if not keep:  # None or 0: keep every checkpoint
        return []
    steps = committed_steps(store, run_prefix)
    gone = steps[: max(0, len(steps) - keep)]
    for s in gone:
        store.delete_prefix(checkpoint_prefix(run_prefix, s))
    return gone
