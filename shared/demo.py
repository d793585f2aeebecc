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


def run_demo(out: Path, flavour: str = "edit-v2", samples: int = 8) -> None:
    refs = 1 if flavour == "edit-v1" else 2
    started = time.perf_counter()
    model = out / "model"
    if not (model / "model_index.json").exists():
        save_tiny_model(model, flavour)
    print(f"[demo] tiny {flavour} model: {model}")
    data = write_dataset(out / "data", n=samples, references=refs)
    config, databackend = write_configs(out / "config", data, model, flavour, refs, output_dir=str(out / "output"))
    print(f"[demo] {samples} generated pairs with {refs} reference(s): {data}")
    print(f"[demo] config: {config}\n[demo] data:   {databackend}")
    run = load_run_config(config)
    paired, _ = pair_datasets(run)
    for ds in paired:
        buckets = ", ".join(f"{w}x{h} ×{n}" for (w, h), n in ds.buckets().items())
        print(f"[demo] dataset {ds.config.id!r}: {len(ds.samples)} samples, buckets {buckets}")
    store = LocalStore(out / "store")
    enc = DatasetEncoder(run, store)
    try:
        first = enc.encode()
        second = enc.encode()
    finally:
        enc.release()
    print(f"[demo] encode: {first.encoded} encoded, {first.cached} cached, {first.failed} failed")
    print(f"[demo] encode again: {second.encoded} encoded, {second.cached} cached (nothing changed)")
    for prefix in sorted({k.rsplit('/', 1)[0] for k in store.list("cache")}):
        keys = [k for k in store.list(prefix) if k.endswith(".safetensors") and k.rsplit("/", 1)[0] == prefix]
        if keys:
            tensors, _ = store.get_tensors(keys[0])
            shapes = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                               for k, v in sorted(tensors.items()))
            print(f"[demo] {prefix}: {len(keys)} objects, e.g. {shapes}")
    print(f"[demo] store: {store.describe()}")
    print(f"[demo] done in {time.perf_counter() - started:.1f}s")
