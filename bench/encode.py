"""Encode throughput: images/s for a first encode and the speed-up of the cached second pass.

    .venv/bin/python bench/encode.py [--samples 16] [--references 2] [--flavour edit-v2] [--resolution 80]

Builds the tiny model and a generated dataset (no download), encodes it into a fresh local store twice and
prints the figures with the machine they came from. "images" counts targets and references (each one VAE
encode); every sample also gets one caption embedding conditioned on its references.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.model.tiny_model import save_tiny_model
from shared.store.local import LocalStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--references", type=int, default=2)
    ap.add_argument("--flavour", default="edit-v2")
    ap.add_argument("--resolution", type=int, default=80, help="dataset resolution (pixel area side)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_model(root / "model", args.flavour)
        data = write_dataset(
            root / "data",
            n=args.samples,
            references=args.references,
            sizes=((args.resolution, args.resolution), (args.resolution * 3 // 2, args.resolution)),
        )
        cfg, _ = write_configs(root / "cfg", data, model, args.flavour, args.references, resolution=args.resolution)
        run = load_run_config(cfg)
        store = LocalStore(root / "store")
        enc = DatasetEncoder(run, store)
        _ = enc.pipe  # load outside the timed region: the figure is encoding, not model loading
        t0 = time.perf_counter()
        first = enc.encode()
        t1 = time.perf_counter()
        second = enc.encode()
        t2 = time.perf_counter()
    images = args.samples * (1 + args.references)
    cold, warm = t1 - t0, t2 - t1
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"dataset: {args.samples} samples x (1 target + {args.references} references) = {images} images, "
        f"{args.flavour}, resolution {args.resolution}, tiny model"
    )
    print(
        f"first encode:  {first.encoded} entries in {cold:.2f}s = {images / cold:.1f} images/s "
        f"({args.samples / cold:.1f} samples/s incl. caption embeddings)"
    )
    print(
        f"second encode: {second.encoded} encoded, {second.cached} cached in {warm:.2f}s = {images / warm:.1f} images/s"
    )
    print(f"cached speed-up: {cold / warm:.1f}x")


if __name__ == "__main__":
    main()
