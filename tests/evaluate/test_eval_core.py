"""eval_svc's core loads a LoRA from its file, so alpha (in the file's metadata) is applied, not alpha = rank."""

from __future__ import annotations

import io
import json
import time
import traceback
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from eval_svc.service import ADAPTER, EvalCore
from shared.config.loading import load_run_config, read_config_files
from shared.data.pairing import pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.cache import eval_candidates
from shared.encode.encoder import DatasetEncoder
from shared.evaluate.preview import render_validation
from shared.model.loading import RENDER_COMPONENTS, load_pipeline, load_transformer
from shared.model.lora import attach_lora, lora_state_dict, save_lora_files
from shared.model.quantize import quantize_transformer, quantized_modules
from shared.service.common import files_to_params
from shared.service.metrics import Metrics
from shared.service.records import JobRecord, JobState
from shared.store.local import LocalStore


def test_lora_alpha_from_the_file_reaches_the_pipeline(tmp_path, tiny_models):
    model = tiny_models("edit-v2")
    tr = load_transformer(model, "edit-v2")
    attach_lora(tr, 4, 2.0, 0.0, ["to_q", "to_k"], seed=0)
    files = save_lora_files(lora_state_dict(tr), alpha=2.0, rank=4, fmt="diffusers", transformer=tr)
    store = LocalStore(tmp_path / "store")
    store.put_bytes("runs/r/lora/pytorch_lora_weights.safetensors", files["pytorch_lora_weights.safetensors"])
    core = EvalCore(store, Metrics(CollectorRegistry()), idle_release_s=0)
    pipe = load_pipeline(model, "edit-v2")
    with core._lora_file(pipe, "runs/r/lora/pytorch_lora_weights.safetensors"):
        cfg = pipe.transformer.peft_config[ADAPTER]
        assert cfg.r == 4 and cfg.lora_alpha == 2.0
        layer = pipe.transformer.transformer_blocks[0].attn.to_q
        assert layer.scaling[ADAPTER] == torch.tensor(0.5).item()
    assert ADAPTER not in getattr(pipe.transformer, "peft_config", {})  # for this render only


# ------------------------------------------------------------------ previews from cached embeddings
class _Ctx:
    def progress(self, **fields) -> None:
        pass

    def set_output(self, key: str, value: str) -> None:
        pass


def _grid(store: LocalStore, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.get_bytes(key))).convert("RGB"), dtype=np.int16)


def test_eval_renders_from_cached_embeddings_without_the_text_encoder_on_a_quantized_base(tmp_path, tiny_models):
    """The encoder caches the preview samples' caption and negative-prompt embeddings; eval_svc then loads only
    transformer (int8-quanto, the training code's quantization), VAE and scheduler, and its render of a LoRA file
    equals the in-worker render (the quantized training transformer, text encoder present, same seed): the grids
    differ by at most 1 of 255 per pixel (measured: identical on the tiny model)."""
    model = tiny_models("edit-v2")
    root = write_dataset(tmp_path / "data", n=3, references=1)
    cfg, data = write_configs(
        tmp_path / "cfg",
        root,
        model,
        "edit-v2",
        1,
        num_eval_images=1,
        lora_rank=4,
        base_model_precision="int8-quanto",
        validation_guidance=4.0,
    )
    run = load_run_config(cfg)
    store = LocalStore(tmp_path / "store")
    DatasetEncoder(run, store).encode()
    [(ds, sample)] = eval_candidates(run, pair_datasets(run)[0])
    text, _ = store.get_tensors(f"cache/text/demo-images/{sample.key}.safetensors")
    assert {"prompt_embeds", "negative_embeds", "negative_mask"} <= set(text)

    # the in-worker side: the training transformer, quantized then given a LoRA that does something
    tr = quantize_transformer(
        load_transformer(model, "edit-v2"), "int8-quanto", device="cpu", compute_dtype=torch.float32
    )
    attach_lora(tr, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    files = save_lora_files(lora_state_dict(tr), alpha=4.0, rank=4, fmt="diffusers", transformer=tr)
    lora_key = "runs/r/validation/step-1/lora/pytorch_lora_weights.safetensors"
    store.put_bytes(lora_key, files["pytorch_lora_weights.safetensors"])
    full = load_pipeline(model, "edit-v2", components=("vae", "text_encoder", "tokenizer", "processor", "scheduler"))
    full.transformer = tr
    worker = render_validation(full, run, [(ds, sample)], step=1, store=store, prefix="runs/worker/validation")

    core = EvalCore(store, Metrics(CollectorRegistry()), idle_release_s=0)
    params = files_to_params(read_config_files(cfg, data)) | {
        "run_id": "r",
        "step": 1,
        "lora_key": lora_key,
        "index_keys": [],
    }
    now = time.time()
    outputs = core.execute(JobRecord("job-1", "req-1", "render", JobState.RUNNING, params, now, now), _Ctx())
    pipe = core._pipe[1]
    assert core.components == RENDER_COMPONENTS  # transformer, vae, scheduler: no text encoder was read
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert set(quantized_modules(pipe.transformer).values()) == {"quanto:qint8"}
    [grid_key] = outputs.grid_keys
    ours, theirs = _grid(store, grid_key), _grid(store, worker.samples[0].grid_key)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
    rendered = json.loads(store.get_bytes(outputs.metrics_key))
    assert (outputs.run_id, outputs.step, outputs.psnr_lora, outputs.psnr_base) == (
        "r",
        1,
        rendered["psnr_lora"],
        rendered["psnr_base"],
    )
    assert rendered["samples"][0]["psnr_lora"] == pytest.approx(worker.samples[0].psnr_lora, abs=0.05)
    assert worker.samples[0].psnr_lora != worker.samples[0].psnr_base  # the LoRA changes the image


def _render_job(tmp_path, tiny_models) -> tuple[EvalCore, dict]:
    """An eval core and the params of a render job of run r (edit-v2, previews at 1024x1024) with a LoRA file."""
    model = tiny_models("edit-v2")
    root = write_dataset(tmp_path / "data", n=3, references=1)
    cfg, data = write_configs(
        tmp_path / "cfg", root, model, "edit-v2", 1, num_eval_images=1, validation_resolution="1024x1024"
    )
    store = LocalStore(tmp_path / "store")
    DatasetEncoder(load_run_config(cfg), store).encode()
    tr = load_transformer(model, "edit-v2")
    attach_lora(tr, 4, 4.0, 0.0, ["to_q"], seed=0)
    lora_key = "runs/r/validation/step-1/lora/pytorch_lora_weights.safetensors"
    store.put_bytes(
        lora_key,
        save_lora_files(lora_state_dict(tr), alpha=4.0, rank=4, fmt="diffusers", transformer=tr)[
            "pytorch_lora_weights.safetensors"
        ],
    )
    core = EvalCore(store, Metrics(CollectorRegistry()), idle_release_s=0)
    params = files_to_params(read_config_files(cfg, data)) | {
        "run_id": "r",
        "step": 1,
        "lora_key": lora_key,
        "index_keys": [],
    }
    return core, params


def _job(n: int, params: dict) -> JobRecord:
    now = time.time()
    return JobRecord(f"job-{n}", f"req-{n}", "render", JobState.RUNNING, params, now, now)


def test_a_render_out_of_gpu_memory_fails_its_job_and_the_runs_next_render_is_smaller(
    tmp_path, tiny_models, monkeypatch
):
    import shared.evaluate.validation as service  # the routine eval_svc renders with
    from shared import errors

    core, params = _render_job(tmp_path, tiny_models)
    seen = []

    def render(pipe, vrun, *args, **kwargs):
        seen.append((vrun.train.validation_resolution, pipe.vae.use_tiling))
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(service, "render_validation", render)
    for n in range(3):
        with pytest.raises(errors.ResourceExhausted, match="out of GPU memory rendering r step 1") as err:
            core.execute(_job(n, params), _Ctx())
    assert str(err.value) == (
        "out of GPU memory rendering r step 1 with vae_enable_tiling=true, "
        "validation_resolution=768x768; its next validation renders with vae_enable_tiling=true, "
        "validation_resolution=512x512"
    )
    assert seen == [("1024x1024", False), ("1024x1024", True), ("768x768", True)]


def test_the_tensors_of_a_render_out_of_gpu_memory_are_freed_before_the_memory_is_given_back(
    tmp_path, tiny_models, monkeypatch
):
    """The render's tensors live on in the error's traceback frames: freeing memory while they do gives nothing
    back. When eval_svc frees it after an out-of-memory render, they are gone, and so is the job's LoRA; the error
    still carries the render's traceback."""
    import shared.evaluate.validation as service  # the routine eval_svc renders with
    from shared import errors
    from shared.model import device

    core, params = _render_job(tmp_path, tiny_models)
    held: list[weakref.ref] = []
    frees: list[tuple[list[bool], bool]] = []

    def render(pipe, vrun, *args, **kwargs):
        activations = torch.ones(1 << 20)  # what the render holds when the allocator gives up
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.40 GiB")

    def free_gpu_memory() -> None:  # when it runs: is each render's tensor gone, is the LoRA still attached
        frees.append(
            ([ref() is None for ref in held], ADAPTER in getattr(core._pipe[1].transformer, "peft_config", {}))
        )

    monkeypatch.setattr(service, "render_validation", render)
    monkeypatch.setattr(device, "free_gpu_memory", free_gpu_memory)
    for n in range(2):
        with pytest.raises(errors.ResourceExhausted, match="out of GPU memory rendering r step 1") as err:
            core.execute(_job(n, params), _Ctx())
    assert frees == [([True], False), ([True, True], False)]
    cause = err.value.__cause__
    assert isinstance(cause, torch.OutOfMemoryError)
    assert ", in render\n    raise torch.OutOfMemoryError(" in "".join(traceback.format_exception(cause))


def test_eval_renders_stacked_adapters_as_the_worker_does_and_lets_them_go(tmp_path, tiny_models):
    """A preview adapter run (comparison mode) and an assistant at its inference strength, on eval_svc: the same
    grid as the in-worker render, the adapters' runs in metrics.json, and no adapter left in the resident pipeline."""
    from shared.model.adapters import ASSISTANT, TRAINED, attach_frozen_adapter, set_active_adapters

    model = tiny_models("edit-v2")
    root = write_dataset(tmp_path / "data", n=3, references=1)
    donor = load_transformer(model, "edit-v2")
    attach_lora(donor, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=7)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    extra = tmp_path / "extra.safetensors"
    extra.write_bytes(
        save_lora_files(lora_state_dict(donor), alpha=4.0, rank=4, fmt="comfyui", transformer=donor)[
            "pytorch_lora_weights_comfyui.safetensors"
        ]
    )
    cfg, data = write_configs(
        tmp_path / "cfg",
        root,
        model,
        "edit-v2",
        1,
        num_eval_images=1,
        validation_guidance=1.0,
        validation_adapter_path=str(extra),
        validation_adapter_name="fast",
        validation_adapter_mode="comparison",
        validation_adapter_steps=3,
        assistant_lora_path=str(extra),
        assistant_lora_inference_strength=0.5,
    )
    run = load_run_config(cfg)
    store = LocalStore(tmp_path / "store")
    DatasetEncoder(run, store).encode()
    [(ds, sample)] = eval_candidates(run, pair_datasets(run)[0])
    tr = load_transformer(model, "edit-v2")
    attach_lora(tr, 4, 4.0, 0.0, ["to_q", "to_k"], seed=0)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name) + 1))
    attach_frozen_adapter(tr, ASSISTANT, str(extra), "assistant_lora_path")  # as training attached it
    set_active_adapters(tr, {TRAINED: 1.0, ASSISTANT: 1.0})
    lora_key = "runs/r/validation/step-1/lora/pytorch_lora_weights.safetensors"
    store.put_bytes(
        lora_key,
        save_lora_files(lora_state_dict(tr), alpha=4.0, rank=4, fmt="diffusers", transformer=tr)[
            "pytorch_lora_weights.safetensors"
        ],
    )
    full = load_pipeline(model, "edit-v2", components=("vae", "text_encoder", "tokenizer", "processor", "scheduler"))
    full.transformer = tr
    worker = render_validation(full, run, [(ds, sample)], step=1, store=store, prefix="runs/worker/validation")
    core = EvalCore(store, Metrics(CollectorRegistry()), idle_release_s=0)
    params = files_to_params(read_config_files(cfg, data)) | {"run_id": "r", "step": 1, "lora_key": lora_key}
    now = time.time()
    outputs = core.execute(JobRecord("job-2", "req-2", "render", JobState.RUNNING, params, now, now), _Ctx())
    [grid_key] = outputs.grid_keys
    ours, theirs = _grid(store, grid_key), _grid(store, worker.samples[0].grid_key)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
    rendered = json.loads(store.get_bytes(outputs.metrics_key))
    [fast] = rendered["adapters"]
    assert fast["label"] == "fast" and fast["steps"] == 3 and fast["retention"] is not None
    assert not getattr(core._pipe[1].transformer, "peft_config", {})  # everything loaded for the render is gone
