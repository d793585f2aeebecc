"""Training step speed: the trainer (store-backed loader with prefetch, checkpoints off) against a bare loop
over the same model and tensors held in memory, and the fraction of step time spent waiting on data.

    .venv/bin/python bench/train_step.py [--steps 60] [--flavour edit-v2] [--references 2] [--resolution 80]

Tiny random-weight model and generated pairs (no download); prints figures with the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.model.flow import flow_matching_loss, sample_sigmas, step_generator
from shared.model.tiny_model import save_tiny_model
from shared.store.local import LocalStore
from shared.train.trainer import Trainer


def bare_loop(trainer: Trainer, batches: list, steps: int) -> float:
    """The same step with nothing around it: batches already in memory, no loader, no bookkeeping."""
    cfg = trainer.cfg
    t0 = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        g = step_generator(cfg.seed, i + 1)
        B, _, h, w = batch.latents_BChw.shape
        noise = torch.randn(B, (h // 2) * (w // 2), 64, generator=g)
        loss = flow_matching_loss(trainer.transformer, batch, noise, sample_sigmas(B, cfg.flow_schedule_shift, g))
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--flavour", default="edit-v2")
    ap.add_argument("--references", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=80)
    ap.add_argument("--precision", default="no_change")
    ap.add_argument("--compile", action="store_true", help="compile_transformer=true (regional torch.compile)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_model(root / "model", args.flavour)
        data = write_dataset(root / "data", n=16, references=args.references)
        cfg, _ = write_configs(root / "cfg", data, model, args.flavour, args.references, resolution=args.resolution,
                               max_train_steps=args.steps + 5, checkpointing_steps=10 ** 6, lora_rank=16,
                               base_model_precision=args.precision, output_dir=str(root / "out"),
                               compile_transformer=args.compile)
        run = load_run_config(cfg)
        store = LocalStore(root / "store")
        DatasetEncoder(run, store).encode()
        trainer = Trainer(run, store)
        trainer.setup()
        for _ in range(5):  # warm-up: first-call allocations and kernel selection
            trainer.train_step()
        wait0 = trainer.loader.wait_seconds
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        trainer_s = (time.perf_counter() - t0) / args.steps
        stall = (trainer.loader.wait_seconds - wait0) / (trainer_s * args.steps)
        batches = [trainer.loader.load(0, i) for i in range(min(8, len(trainer.loader.batches_of(0))))]
        trainer.loader.close()
        bare_s = bare_loop(trainer, batches, args.steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}")
    print(f"setup: tiny {args.flavour}, {args.references} reference(s), resolution {args.resolution}, batch 1, "
          f"LoRA rank 16, precision {args.precision}, compile {args.compile}, {args.steps} timed steps after 5 "
          "warm-up")
    print(f"trainer step: {1000 * trainer_s:.1f} ms")
    print(f"bare loop step: {1000 * bare_s:.1f} ms")
    print(f"trainer / bare ratio: {trainer_s / bare_s:.2f}")
    print(f"data wait: {100 * stall:.1f}% of trainer step time")
    print(f"peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
