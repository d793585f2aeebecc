"""``edittuner demo``: a tiny random-weight model and a generated paired dataset, run end to end on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from shared.config import load_run_config
from shared.datasets import pair_datasets
from shared.encoding import DatasetEncoder
from shared.storage import LocalStore
from shared.synthetic import write_configs, write_dataset
from shared.tiny_model import save_tiny_model


def materialize_preset(name: str, cwd: Path | None = None) -> None:
    """A ``…-tiny`` preset names a tiny model and generated data under .edittuner/tiny/: build them on first
    use (no download), so ``edittuner train example=qwen_image.edit-v2-lora-tiny`` runs anywhere."""
    import json

    from shared.config import preset_dir

    spec_path = preset_dir(name) / "generate.json"
    if not spec_path.is_file():
        return
    spec = json.loads(spec_path.read_text())
    root = (cwd or Path.cwd()) / spec["root"]
    if not (root / "model" / "model_index.json").exists():
        save_tiny_model(root / "model", spec["flavour"])
    if not (root / "data" / "images").is_dir():
        write_dataset(root / "data", n=spec["samples"], references=spec["references"])


def run_demo(out: Path, flavour: str = "edit-v2", samples: int = 8, steps: int = 40) -> None:
    """Build, encode, train, validate, export: the whole flow on a tiny model, printing where everything is."""
    from shared.runner import train_run

    refs = 1 if flavour == "edit-v1" else 2
    started = time.perf_counter()
    model = out / "model"
    if not (model / "model_index.json").exists():
        save_tiny_model(model, flavour)
    print(f"[demo] tiny {flavour} model: {model}")
    data = write_dataset(out / "data", n=samples, references=refs)
    config, databackend = write_configs(
        out / "config", data, model, flavour, refs, output_dir=str(out / "output"), max_train_steps=steps,
        learning_rate=3e-3, lora_rank=8, checkpointing_steps=steps // 2, validation_step_interval=steps // 2,
        num_eval_images=2, seed=0)
    print(f"[demo] {samples} generated pairs with {refs} reference(s): {data}")
    print(f"[demo] config: {config}\n[demo] data:   {databackend}")
    run = load_run_config(config)
    paired, _ = pair_datasets(run)
    for ds in paired:
        buckets = ", ".join(f"{w}x{h} ×{n}" for (w, h), n in ds.buckets().items())
        print(f"[demo] dataset {ds.config.id!r}: {len(ds.samples)} samples, buckets {buckets}")
    store = LocalStore(out / "store")
    store.delete_prefix("runs")  # the demo starts a fresh run each time; caches are kept

    def progress(e: dict) -> None:
        if e.get("phase") == "train" and "loss" in e and (e["step"] % 10 == 0 or e["step"] == 1):
            print(f"[demo] step {e['step']:>3}/{e['total']}: loss {e['loss']:.4f}, {e['seconds_per_step']:.2f}s/step")
        elif e.get("phase") in ("checkpoint", "validation"):
            print(f"[demo] {e['message']}")

    result = train_run(run, store, events=progress)
    again = DatasetEncoder(run, store).encode()
    s = result.summary
    print(f"[demo] encode: {result.encode.encoded} encoded, {result.encode.cached} cached, "
          f"{result.encode.failed} failed; encoding again: {again.encoded} encoded, {again.cached} cached")
    for v in s.validations:
        if "error" in v:
            print(f"[demo] validation at step {v.get('step')} failed: {v['error']}")
        else:
            print(f"[demo] validation step {v['step']}: PSNR vs target: base {v['psnr_base']:.2f} dB, LoRA "
                  f"{v['psnr_lora']:.2f} dB; held-out loss {v['heldout_loss_mean']:.4f}; "
                  f"{len(v['samples'])} grids in {v['seconds']:.1f}s")
    print(f"[demo] trained {s.steps} steps in {s.seconds:.1f}s: loss {s.losses[0]:.4f} -> "
          f"{sum(s.losses[-5:]) / len(s.losses[-5:]):.4f} (mean of the last 5)")
    print(f"[demo] store: {store.describe()} (runs/{s.run_id}/: checkpoints, lora, validation, metrics.jsonl)")
    for name, path in result.outputs.items():
        print(f"[demo] {name}: {path}")
    print(f"[demo] done in {time.perf_counter() - started:.1f}s")
