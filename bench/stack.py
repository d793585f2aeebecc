"""A training run through the gRPC stack against the training worker alone: wall time and ratio.

    .venv/bin/python bench/stack.py [--steps 100]

Both runs: tiny edit-v2 model, generated pairs, caches already encoded, no validation, local store. The stack
figure is StartRun to the job's end (encode check through encoder_svc, worker process start, relayed progress);
the worker figure is ``python -m shared.service.worker`` run directly with the same config.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from shared.config.loading import load_run_config, read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.model.tiny_model import save_tiny_model
from shared.rpc import trainer_pb2
from shared.rpc.client import Client
from shared.service.common import files_to_proto, state_name
from shared.service.local_stack import start_local_stack
from shared.store.local import LocalStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_model(root / "model", "edit-v2")
        data = write_dataset(root / "data", n=8, references=2)
        common = dict(max_train_steps=args.steps, checkpoint_step_interval=args.steps, validation_step_interval=10**6)
        cfg_w, data_w = write_configs(
            root / "cfg-w", data, model, "edit-v2", 2, output_dir=str(root / "o" / "w"), **common
        )
        cfg_s, data_s = write_configs(
            root / "cfg-s", data, model, "edit-v2", 2, output_dir=str(root / "o" / "s"), **common
        )
        store = root / "store"
        DatasetEncoder(load_run_config(cfg_w), LocalStore(store)).encode()

        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shared.service.worker",
                "--config",
                str(cfg_w),
                "--data",
                str(data_w),
                "--store",
                str(store),
                "--no-encode",
                "--no-validation",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        worker_s = time.perf_counter() - t0

        with start_local_stack(
            str(store), root / "logs", env={**os.environ, "EDITTUNER_WORKDIR": str(root / "w")}
        ) as stack:
            client = Client("trainer", stack.addresses["trainer"])
            t0 = time.perf_counter()
            job = client.call(
                "StartRun",
                trainer_pb2.StartRunRequest(
                    request_id=uuid.uuid4().hex, files=files_to_proto(read_config_files(cfg_s, data_s))
                ),
            ).job
            job = client.watch(job.job_id, lambda j: None)
            stack_s = time.perf_counter() - t0
            assert state_name(job) == "succeeded", job.error
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus")
    print(f"run: tiny edit-v2, 2 references, {args.steps} steps, cached, no validation")
    print(f"worker alone (process start to exit): {worker_s:.2f}s")
    print(f"through the gRPC stack (StartRun to job end): {stack_s:.2f}s")
    print(f"stack / worker ratio: {stack_s / worker_s:.2f}")


if __name__ == "__main__":
    main()
