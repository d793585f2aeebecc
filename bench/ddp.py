"""Data parallel speed: samples per second of the training worker on 1 and on 2 processes (one thread each), the
global batch the same (train_batch_size x gradient_accumulation_steps).

    .venv/bin/python bench/ddp.py [--steps 30] [--resolution 256] [--accumulation 2] [--processes 1,2]
    .venv/bin/python bench/ddp.py --exits 20     # 20 short 2-process runs in a row: how many exit cleanly

Each run is the real worker (``python -m shared.service.worker``, under torchrun for 2) on a tiny random-weight
model and generated pairs (no download). Figures are medians of seconds_per_step after 5 warm-up steps; a CPU
with fewer cores than processes x threads shares them, so the ratio is the machine's, printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.model.tiny_model import save_tiny_model
from shared.store.local import LocalStore
from shared.train.distributed import launch_command

WARMUP = 5


def run(cfg: Path, store: Path, processes: int, steps: int, name: str) -> list[float]:
    overrides = [
        f"output_dir={name}",
        f"num_processes={processes}",
        f"max_train_steps={steps}",
        f"checkpoint_step_interval={steps * 10}",
    ]
    train = load_run_config(cfg, overrides=overrides).train
    cmd = launch_command(
        [
            sys.executable,
            "-m",
            "shared.service.worker",
            "--config",
            str(cfg),
            "--store",
            str(store),
            "--no-encode",
            "--no-validation",
            *overrides,
        ],
        train,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{out.stderr[-3000:]}")
    events = [json.loads(line)["event"] for line in out.stdout.splitlines() if line.startswith('{"event"')]
    return [e["seconds_per_step"] for e in events if e.get("phase") == "train" and "seconds_per_step" in e]


def exits(cfg: Path, store: Path, runs: int) -> None:
    """Short 2-process runs one after another; a clean exit is status 0, a result line, and no abort at teardown
    ("terminate called ...", which a DDP wrapper alive at destroy_process_group can cause)."""
    clean = 0
    for i in range(runs):
        overrides = [f"output_dir=exit-{i}", "num_processes=2", "max_train_steps=2", "checkpoint_step_interval=2"]
        train = load_run_config(cfg, overrides=overrides).train
        cmd = launch_command(
            [
                sys.executable,
                "-m",
                "shared.service.worker",
                "--config",
                str(cfg),
                "--store",
                str(store),
                "--no-encode",
                "--no-validation",
                *overrides,
            ],
            train,
        )
        out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        ok = out.returncode == 0 and '"result"' in out.stdout and "terminate called" not in out.stderr
        clean += ok
        if not ok:
            print(f"run {i}: exit {out.returncode}\n{out.stderr[-1500:]}")
    print(f"{clean} of {runs} consecutive 2-process runs exited cleanly")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument(
        "--exits", type=int, default=0, help="instead: this many short 2-process runs, counting clean exits"
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    model = save_tiny_model(root / "model", "edit-v2", seed=0)
    data = write_dataset(root / "data", n=8, references=1, sizes=((args.resolution, args.resolution),))
    cfg, _ = write_configs(
        root / "cfg",
        data,
        model,
        "edit-v2",
        1,
        resolution=args.resolution,
        lora_rank=16,
        gradient_accumulation_steps=args.accumulation,
        output_dir=str(root / "out"),
    )
    DatasetEncoder(load_run_config(cfg), LocalStore(root / "store")).encode()
    if args.exits:
        return exits(cfg, root / "store", args.exits)
    samples_per_step = args.accumulation  # train_batch_size 1
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}; tiny edit-v2, 1 reference, resolution {args.resolution}, batch 1 x "
        f"{args.accumulation} micro-batches, one thread per process, {args.steps} steps"
    )
    print("| processes | s/step (median) | samples/s | vs 1 process |\n|---|---|---|---|")
    base = None
    for n in (int(x) for x in args.processes.split(",")):
        times = run(cfg, root / "store", n, args.steps, f"p{n}")[WARMUP:]
        med = statistics.median(times)
        rate = samples_per_step / med
        base = base or rate
        print(f"| {n} | {med * 1000:.1f} ms | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
