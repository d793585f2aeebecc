"""Training step speed: the trainer (store-backed loader with prefetch, checkpoints off) against a bare loop
over the same model and tensors held in memory, and the fraction of step time spent waiting on data. With
``--rollout K``: the trainer without scheduled sampling against the trainer with it (max_step_offset K,
probability 1.0, the 30-step preview schedule), and the rollout forwards a step took.

    .venv/bin/python bench/train_step.py [--steps 60] [--flavour edit-v2] [--references 2] [--resolution 80,256]
                                         [--rollout 5 [--sampler unipc]]

Tiny random-weight model and generated pairs (no download); prints figures with the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
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


def bare_step(trainer: Trainer, batch, i: int) -> None:
    """The same step with nothing around it: a batch already in memory, no loader, no bookkeeping."""
    cfg = trainer.cfg
    g = step_generator(cfg.seed, i + 1)
    B, _, h, w = batch.latents_BChw.shape
    noise = torch.randn(B, (h // 2) * (w // 2), 64, generator=g)
    loss = flow_matching_loss(trainer.transformer, batch, noise, sample_sigmas(B, cfg.flow_schedule_shift, g))
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--flavour", default="edit-v2")
    ap.add_argument("--references", type=int, default=2)
    ap.add_argument("--resolution", default="80", help="one or more, comma-separated: each is measured in turn")
    ap.add_argument("--precision", default="no_change")
    ap.add_argument("--compile", action="store_true", help="compile_transformer=true (regional torch.compile)")
    ap.add_argument(
        "--rollout",
        type=int,
        default=0,
        help="K > 0: the trainer with scheduled sampling "
        "(max_step_offset K, probability 1.0) against the trainer without it, instead of the bare loop",
    )
    ap.add_argument("--sampler", default="unipc", help="with --rollout: scheduled_sampling_sampler")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}"
    )
    for resolution in (int(r) for r in str(args.resolution).split(",")):
        (measure_rollout if args.rollout else measure)(args, resolution)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:.0f} MiB")


def _config(args: argparse.Namespace, root: Path, resolution: int) -> tuple[Path, LocalStore]:
    """The tiny model, 16 generated pairs and their caches under ``root``."""
    model = save_tiny_model(root / "model", args.flavour)
    data = write_dataset(root / "data", n=16, references=args.references)
    cfg, _ = write_configs(
        root / "cfg",
        data,
        model,
        args.flavour,
        args.references,
        resolution=resolution,
        max_train_steps=args.steps + 20,
        checkpoint_step_interval=10**6,
        lora_rank=16,
        base_model_precision=args.precision,
        output_dir=str(root / "out"),
        compile_transformer=args.compile,
        validation_num_inference_steps=30,
    )
    store = LocalStore(root / "store")
    DatasetEncoder(load_run_config(cfg), store).encode()
    return cfg, store


def measure(args: argparse.Namespace, resolution: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, store = _config(args, root, resolution)
        trainer = Trainer(load_run_config(cfg), store)
        trainer.setup()
        batches = [trainer.loader.load(0, i) for i in range(min(8, len(trainer.loader.batches_of(0))))]
        for i in range(5):  # warm-up: first-call allocations and kernel selection
            trainer.train_step()
            bare_step(trainer, batches[i % len(batches)], i)
        # Interleaved rounds, medians of single steps: a shared machine's load drifts over a run, and timing one
        # loop after the other puts that drift into the ratio.
        trainer_t, bare_t, waits = [], [], 0.0
        rounds, per_round = 10, max(1, args.steps // 10)
        for r in range(rounds):
            wait0 = trainer.loader.wait_seconds
            trainer_t += [timed(trainer.train_step) for _ in range(per_round)]
            waits += trainer.loader.wait_seconds - wait0
            bare_t += [
                timed(lambda i=i: bare_step(trainer, batches[i % len(batches)], i))
                for i in range(r * per_round, (r + 1) * per_round)
            ]
        trainer.loader.close()
        trainer_s, bare_s = statistics.median(trainer_t), statistics.median(bare_t)
        stall = waits / sum(trainer_t)
    print(
        f"setup: tiny {args.flavour}, {args.references} reference(s), resolution {resolution}, batch 1, "
        f"LoRA rank 16, precision {args.precision}, compile {args.compile}, {rounds * per_round} timed steps each "
        "(10 interleaved rounds) after 5 warm-up"
    )
    print(
        f"  median trainer step: {1000 * trainer_s:.1f} ms; bare loop step: {1000 * bare_s:.1f} ms; trainer / bare "
        f"ratio: {trainer_s / bare_s:.2f}; data wait: {100 * stall:.1f}% of trainer step time"
    )


def measure_rollout(args: argparse.Namespace, resolution: int) -> None:
    """The trainer without and with scheduled sampling over the same data, in interleaved rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, store = _config(args, root, resolution)
        on = [
            f"scheduled_sampling_max_step_offset={args.rollout}",
            "scheduled_sampling_probability=1.0",
            "scheduled_sampling_reflexflow=false",
            f"scheduled_sampling_sampler={args.sampler}",
        ]
        trainers = {}
        for name, overrides in (("off", []), ("on", on)):
            trainers[name] = Trainer(load_run_config(cfg, overrides=[f"output_dir={root / name}", *overrides]), store)
            trainers[name].setup()
        for _ in range(5):  # warm-up
            for t in trainers.values():
                t.train_step()
        times: dict[str, list[float]] = {"off": [], "on": []}
        forwards: list[int] = []
        rounds, per_round = 10, max(1, args.steps // 10)
        for _ in range(rounds):
            for name, t in trainers.items():
                for _ in range(per_round):
                    r = t.train_step()
                    times[name].append(r.seconds)
                    forwards += [r.rollout_forwards] if name == "on" else []
        for t in trainers.values():
            t.loader.close()
    off_s, on_s = statistics.median(times["off"]), statistics.median(times["on"])
    print(
        f"setup: tiny {args.flavour}, {args.references} reference(s), resolution {resolution}, batch 1, "
        f"LoRA rank 16, precision {args.precision}, compile {args.compile}, {rounds * per_round} timed steps each "
        f"(10 interleaved rounds) after 5 warm-up; rollout max_step_offset {args.rollout}, probability 1.0, "
        f"sampler {args.sampler}, 30-step preview schedule"
    )
    print(
        f"  median trainer step without rollout: {1000 * off_s:.1f} ms; with rollout: {1000 * on_s:.1f} ms; "
        f"ratio {on_s / off_s:.2f}; rollout forwards per step: mean {statistics.mean(forwards):.2f} "
        f"(max {max(forwards)})"
    )


if __name__ == "__main__":
    main()
