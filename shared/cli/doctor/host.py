"""The host's rows: torch and the device, the libraries each precision needs, a C compiler, the model files, and
the process group the trainer creates."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch

from shared.cli.doctor.rows import Check, Row

GiB = 2**30
MIN_MEMORY_GIB = 24  # the smallest card a shipped preset plans to fit (docs/PLANNER.md)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (torch does not expose it), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# ------------------------------------------------------------------------------------------------ torch, device
def torch_row() -> Row:
    cuda = torch.version.cuda
    # torch.backends.cudnn's functions have no annotations
    cudnn_version = cast("Callable[[], int | None]", torch.backends.cudnn.version)
    cudnn_available = cast("Callable[[], bool]", torch.backends.cudnn.is_available)
    detail = (
        f"Python {platform.python_version()}, torch {torch.__version__}"
        + (f" built for CUDA {cuda}" if cuda else " (a CPU build)")
        + (f", cuDNN {cudnn_version()}" if cuda and cudnn_available() else "")
    )
    data = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": cuda,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    return Row("torch", "pass", detail, data=data)


def device_row(device: torch.device) -> Row:
    """The device the checks run on: name, memory, compute capability, bf16; a CUDA request without CUDA fails."""
    if device.type != "cuda":
        if torch.cuda.is_available():
            return Row(
                "device",
                "info",
                f"{device} requested; this host also has CUDA "
                f"({torch.cuda.get_device_name(0)}): run with --device cuda to check it",
            )
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        return Row("device", "info", f"{device}: {why}; the rows that need a GPU say so", data={"device": device.type})
    if not torch.cuda.is_available():
        why = "torch is a CPU build" if torch.version.cuda is None else "CUDA sees no device"
        return Row(
            "device",
            "fail",
            f"{device} requested but {why}",
            "install torch's CUDA build (pip install torch==<version> from PyPI on Linux), check "
            "`nvidia-smi`, and in Docker start the container with the NVIDIA runtime (--gpus all)",
        )
    props = torch.cuda.get_device_properties(device)
    cap = f"{props.major}.{props.minor}"
    bf16 = torch.cuda.is_bf16_supported()
    mem = props.total_memory / GiB
    data = {
        "name": props.name,
        "memory_gib": round(mem, 1),
        "capability": cap,
        "bf16": bf16,
        "driver": driver_version(),
        "count": torch.cuda.device_count(),
        "multiprocessors": props.multi_processor_count,
    }
    detail = (
        f"{props.name}, {mem:.1f} GiB, compute capability {cap}, bf16 {'yes' if bf16 else 'NO'}, driver "
        f"{data['driver'] or 'unknown'}, {data['count']} GPU(s) visible"
    )
    if not bf16:
        return Row(
            "device",
            "warn",
            detail,
            "this card has no bf16: training computes in fp32 (twice the "
            "activation memory, slower); an Ampere or newer card (compute capability 8.0+) is what the "
            "planner's figures assume",
            data=data,
        )
    if mem < MIN_MEMORY_GIB - 1:
        return Row(
            "device",
            "warn",
            detail,
            f"under {MIN_MEMORY_GIB} GiB: run `edittuner plan --gpu-memory "
            f"{mem:.0f}GiB` before training; the 20B transformer needs a 4-bit base and small images here",
            data=data,
        )
    return Row("device", "pass", detail, data=data)


# ------------------------------------------------------------------------------------------------ libraries
def bitsandbytes_row(device: torch.device) -> Row:
    """Which native library bitsandbytes loaded, and one 4-bit round trip on the device through it."""
    version = _version("bitsandbytes")
    if version is None:
        return Row(
            "bitsandbytes",
            "warn",
            "not installed: nf4-bnb and int8-bnb are refused",
            "pip install bitsandbytes (or train with a quanto precision)",
        )
    import bitsandbytes.functional as F
    from bitsandbytes import cextension

    lib = getattr(getattr(cextension.lib, "_lib", None), "_name", None)
    name = Path(lib).name if isinstance(lib, str) else "no native library"
    data: dict[str, Any] = {"version": version, "library": name, "backend": cextension.BNB_BACKEND}
    if device.type == "cuda" and "cuda" not in name:
        return Row(
            "bitsandbytes",
            "fail",
            f"{version} loaded {name} on a CUDA host (backend {cextension.BNB_BACKEND})",
            "bitsandbytes ships one library per CUDA version; the one for "
            f"torch's CUDA {torch.version.cuda} is missing: reinstall bitsandbytes, or set "
            "BNB_CUDA_VERSION to a version it ships",
            data=data,
        )
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g).to(device, torch.bfloat16)
    q, state = F.quantize_4bit(w, quant_type="nf4")
    back = F.dequantize_4bit(q, state)
    err = float((back.float() - w.float()).norm() / w.float().norm())
    data["nf4_roundtrip_rel_err"] = round(err, 4)
    ok = err < 0.15  # nf4 on a Gaussian: ~0.1
    return Row(
        "bitsandbytes",
        "pass" if ok else "fail",
        f"{version}, {name}; nf4 round trip on {device}: relative error {err:.3f}",
        "" if ok else "the 4-bit kernels return wrong values on this device: check that the library matches the driver",
        data=data,
    )


def quanto_row(device: torch.device) -> Row:
    """quanto runs on its pure-torch kernels here (shared.model.quantize.pure_torch_quanto): no compiler needed."""
    version = _version("optimum-quanto")
    if version is None:
        return Row(
            "optimum-quanto",
            "warn",
            "not installed: the *-quanto precisions are refused",
            "pip install optimum-quanto (or train with a bnb precision)",
        )
    from shared.model.quantize import pure_torch_quanto

    pure_torch_quanto()
    return Row(
        "optimum-quanto",
        "pass",
        f"{version}, pure-torch kernels (its compiled extensions are not used: no compiler needed)",
        data={"version": version, "kernels": "pure torch"},
    )


def compiler_row() -> Row:
    """torch.compile (compile_transformer, the ao-* optimizers) builds C code: Inductor's CPU kernels, Triton's
    CUDA launcher. Both need a C compiler and Python's headers (shared.train.toolchain, which the trainer checks)."""
    from shared.train.toolchain import c_compiler, python_headers

    found, headers = c_compiler(), python_headers()
    data = {"cc": found, "python_headers": headers, "nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja")}
    if found and headers:
        return Row(
            "C compiler",
            "pass",
            f"{found} and Python.h: compile_transformer and the ao-* optimizers can compile",
            data=data,
        )
    missing = " and ".join(m for m, ok in (("a C compiler", found), ("Python.h", headers)) if not ok)
    return Row(
        "C compiler",
        "warn",
        f"no {missing}: compile_transformer=true and the ao-* optimizers are refused before a run loads its model",
        "apt-get install gcc python3-dev (the Docker image has both), or "
        "leave compile_transformer off and use a non-ao optimizer",
        data=data,
    )


def model_rows(model: str | None) -> list[Row]:
    """Where each flavour's weights are found (EDITTUNER_MODEL_DIR first, as the services look)."""
    from shared.config.flavours import FLAVOURS
    from shared.model.location import locate_model

    ids = [model] if model else sorted({f.default_model_id for f in FLAVOURS.values()})
    rows = []
    for mid in ids:
        loc = locate_model(mid)
        if loc.local:
            rows.append(Row(f"model {mid}", "pass", f"found: {loc.where}", data={"source": loc.source}))
        else:
            target = os.environ.get("EDITTUNER_MODEL_DIR") or "./models"
            rows.append(
                Row(
                    f"model {mid}",
                    "warn" if model else "info",
                    "not on this host: looked in "
                    + ("; ".join(loc.searched) or "EDITTUNER_MODEL_DIR (unset) and the Hugging Face cache"),
                    f"huggingface-cli download {mid} --local-dir {target}/{mid}",
                    data={"searched": list(loc.searched)},
                )
            )
    return rows


# ------------------------------------------------------------------------------------------------ process group
def process_group_row(device: torch.device) -> list[Row]:
    """A one-rank group with the backend the trainer creates, all-reducing what the trainer all-reduces: CPU
    float32 and float64 flags, and gradients on the device. On CUDA, also plain "nccl", which has no CPU backend
    (information: what a trainer creating it would meet at its first step)."""
    import torch.distributed as dist

    from shared.train.distributed import process_group_backend

    rows = []
    backends = [process_group_backend(device)] + (["nccl"] if device.type == "cuda" else [])
    for backend in backends:
        ok, detail = _one_rank_group(dist, backend, device)
        trainer = backend == backends[0]
        status = ("pass" if ok else "fail") if trainer else "info"
        rows.append(
            Row(
                f"process group {backend!r}" + (" (the trainer's)" if trainer else ""),
                status,
                detail,
                ""
                if ok or not trainer
                else "data-parallel training cannot start here: check NCCL and the driver (NCCL_DEBUG=INFO says why)",
                data={"backend": backend, "ok": ok},
            )
        )
    return rows


def _one_rank_group(dist: ModuleType, backend: str, device: torch.device) -> tuple[bool, str]:
    results: list[tuple[str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            backend,
            init_method=f"file://{tmp}/rendezvous",
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=60),
            **({"device_id": device} if device.type == "cuda" and device.index is not None else {}),
        )
        try:
            tensors = [("cpu float32", torch.ones(1)), ("cpu float64", torch.ones(1, dtype=torch.float64))]
            if device.type != "cpu":
                tensors.append((f"{device.type} float32", torch.ones(4, device=device)))
            for label, t in tensors:
                try:
                    dist.all_reduce(t)
                    results.append((label, bool(t.sum().item() == t.numel())))
                except (RuntimeError, ValueError) as err:
                    results.append((label, False))
                    results.append((f"  ({str(err).splitlines()[0][:160]})", False))
        finally:
            dist.destroy_process_group()
    ok = all(r for _, r in results)
    return ok, "all-reduce " + ", ".join(
        f"{label} {'ok' if r else 'FAILED'}" if not label.startswith(" ") else label.strip() for label, r in results
    )


def host_rows(device: torch.device, model: str | None) -> list[Check]:
    """The checks of this module, in order, as (name, function) pairs for ``Report.run``."""
    return [
        ("torch", torch_row),
        ("device", lambda: device_row(device)),
        ("bitsandbytes", lambda: bitsandbytes_row(device)),
        ("optimum-quanto", lambda: quanto_row(device)),
        ("C compiler", compiler_row),
        ("model files", lambda: model_rows(model)),
        ("process group", lambda: process_group_row(device)),
    ]
