"""``edittuner demo``: the trained tiny model and a generated paired dataset, run end to end on a CPU.

The tiny model ships trained (``shared.train.tiny``): its VAE reconstructs the generated scenes and its transformer
copies its reference. The demo trains a LoRA on one edit ("make the shapes red") through the three services and
renders pairs held out of training, so that the previews show the base copying the reference and the LoRA applying
the edit, and the PSNRs against the held-out targets measure it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from shared.config.loading import load_run_config
from shared.data.pairing import pair_datasets
from shared.data.synthetic import DEMO_CAPTION, write_configs, write_dataset, write_edit_dataset
from shared.model.tiny_model import save_tiny_model
from shared.store.local import LocalStore

if TYPE_CHECKING:
    from shared.rpc.common_pb2 import Job


def materialize_preset(name: str, cwd: Path | None = None) -> None:
    """A ``…-tiny`` preset names a tiny model and generated data under .edittuner/tiny/: build them on first
    use (no download), so ``edittuner train example=qwen_image.edit-v2-lora-tiny`` runs anywhere."""
    import json

    from shared.config.loading import preset_dir

    spec_path = preset_dir(name) / "generate.json"
    if not spec_path.is_file():
        return
    spec = json.loads(spec_path.read_text())
    root = (cwd or Path.cwd()) / spec["root"]
    if not (root / "model" / "model_index.json").exists():
        save_tiny_model(root / "model", spec["flavour"])
    if not (root / "data" / "images").is_dir():
        write_dataset(root / "data", n=spec["samples"], references=spec["references"])


def _psnr(render: Job) -> tuple[float, float]:
    """A Render job's held-out PSNR against the targets in dB, (base, LoRA); NaN where it has none."""
    r, nan = render.render, float("nan")
    return (r.psnr_base if r.HasField("psnr_base") else nan), (r.psnr_lora if r.HasField("psnr_lora") else nan)


def run_demo(out: Path, flavour: str = "edit-v2", samples: int = 24, steps: int = 300) -> None:
    """The whole flow through the three gRPC services, started here on loopback with the local store: encode,
    train, validate on eval_svc, export, report. Prints where the LoRA, the previews and the report are."""
    import uuid

    from shared.cli.remote import wait_for_validations
    from shared.config.loading import read_config_files
    from shared.evaluate.report import write_run_report
    from shared.rpc import encoder_pb2, trainer_pb2
    from shared.rpc.client import Client
    from shared.service.common import files_to_proto, state_name
    from shared.service.local_stack import start_local_stack
    from shared.train.runner import copy_outputs

    started = time.perf_counter()
    out = out.resolve()
    model = out / "model"
    if not (model / "model_index.json").exists():
        save_tiny_model(model, flavour, trained=True)
    print(
        f"[demo] trained tiny {flavour} model (its VAE reconstructs the generated scenes, its transformer copies "
        f"its reference): {model}"
    )
    data = write_edit_dataset(out / "data", n=samples, extent=(0.35, 0.65))
    eval_images = 4
    config, databackend = write_configs(
        out / "config",
        data,
        model,
        flavour,
        1,
        resolution=64,
        output_dir=str(out / "output"),
        max_train_steps=steps,
        learning_rate=3e-3,
        lr_scheduler="cosine",
        lr_warmup_steps=10,
        lora_rank=16,
        checkpoint_step_interval=steps,
        validation_step_interval=max(1, steps // 3),
        num_eval_images=eval_images,
        validation_num_inference_steps=12,
        validation_guidance=1.0,
        seed=0,
    )
    print(f"[demo] {samples} generated pairs, {eval_images} held out for previews: {DEMO_CAPTION!r} ({data})")
    print(f"[demo] config: {config}\n[demo] data:   {databackend}")
    run = load_run_config(config)
    paired, _ = pair_datasets(run)
    for ds in paired:
        buckets = ", ".join(f"{w}x{h} ×{n}" for (w, h), n in ds.buckets().items())
        print(f"[demo] dataset {ds.config.id!r}: {len(ds.samples)} samples, buckets {buckets}")
    store = LocalStore(out / "store")
    store.delete_prefix("runs")  # a fresh run each time; caches are kept
    files = files_to_proto(read_config_files(config, databackend))
    import os

    with start_local_stack(
        str(out / "store"), out / "logs", env={**os.environ, "EDITTUNER_WORKDIR": str(out / "work")}
    ) as stack:
        print(
            "[demo] services: "
            + ", ".join(f"{k}_svc {v}" for k, v in stack.addresses.items())
            + f" (logs {out / 'logs'})"
        )
        trainer = Client("trainer", stack.addresses["trainer"])
        job = trainer.call(
            "StartRun", trainer_pb2.StartRunRequest(request_id=uuid.uuid4().hex, files=files, run_id="demo")
        ).job
        print(f"[demo] trainer_svc job {job.job_id}: watching")
        shown: set[tuple[str, int]] = set()

        def progress(j: Job) -> None:
            p = j.progress
            key = (p.phase, p.step)
            if key in shown:
                return
            shown.add(key)
            if p.phase == "encode" and p.step == p.total and p.total:
                print(f"[demo] encode_svc: {p.message}")
            elif p.phase == "train" and p.loss and (p.step % 25 == 0 or p.step == 1):
                print(f"[demo] step {p.step:>3}/{p.total}: loss {p.loss:.4f}, {p.seconds_per_step:.2f}s/step")
            elif p.phase == "checkpoint":
                print(f"[demo] {p.message}")

        job = trainer.watch(job.job_id, progress)
        if state_name(job) != "succeeded":
            raise RuntimeError(f"the demo run failed: {job.error_code}: {job.error}")
        renders = wait_for_validations(job, stack.addresses["eval"])
        for v in renders:
            base, lora = _psnr(v)
            print(
                f"[demo] eval_svc render {v.job_id}: {state_name(v)}, held-out PSNR vs target: base "
                f"{base:.2f} dB, LoRA {lora:.2f} dB -> {v.render.metrics_key if v.HasField('render') else v.error}"
            )
        encoder = Client("encoder", stack.addresses["encoder"])
        again = encoder.call(
            "SubmitEncode", encoder_pb2.SubmitEncodeRequest(request_id=uuid.uuid4().hex, files=files)
        ).job
        again = encoder.watch(again.job_id, lambda j: None)
        print(f"[demo] encoding again: {again.encode.encoded} encoded, {again.encode.cached} cached")
    trained = job.train
    final_loss = trained.final_loss if trained.HasField("final_loss") else float("nan")
    print(
        f"[demo] run {trained.run_id}: {trained.steps} steps, final loss {final_loss:.4f}, checkpoints at "
        f"{','.join(map(str, trained.checkpoint_steps))}"
    )
    write_run_report(store, trained.run_id)  # once more, now that every render is in
    outputs = copy_outputs(store, f"runs/{trained.run_id}", Path(run.train.output_dir))
    print(f"[demo] store: {store.describe()} (runs/{trained.run_id}/: checkpoints, lora, validation)")
    for name, path in outputs.items():
        print(f"[demo] {name}: {path}")
    if renders and state_name(renders[-1]) == "succeeded":
        base, lora = _psnr(renders[-1])
        print(
            f"[demo] on {eval_images} held-out pairs the base copies the reference ({base:.2f} dB against the "
            f"targets) and the LoRA applies the edit ({lora:.2f} dB): {lora - base:+.2f} dB"
        )
    print(f"[demo] done in {time.perf_counter() - started:.1f}s")
