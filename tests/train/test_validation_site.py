"""Where a service-run's validations render: trainer_svc's worker (previews.AUTO) hands them to eval_svc, unless
the planner says the trainer and eval_svc share a GPU (the environment compose sets) without room for both; then
the worker renders them itself, on its resident transformer, and says so in its log.

The GPU is simulated: ``device_memory`` (the total torch.cuda.mem_get_info would report) is replaced, on a CPU
run of the tiny model, by a size between the larger of the two services and their sum.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import pytest

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.plan import predict
from shared.plan.gpus import GiB
from shared.store.local import LocalStore
from shared.train import previews
from shared.train.events import TrainEvent
from shared.train.runner import train_run

ONE_GPU = {"EDITTUNER_ENCODER_GPU": "0", "EDITTUNER_TRAINER_GPU": "0", "EDITTUNER_EVAL_GPU": "0"}


@pytest.fixture
def tiny_run(tmp_path, tiny_models):
    root = write_dataset(tmp_path / "data", n=3, references=1)
    cfg, _ = write_configs(
        tmp_path / "cfg",
        root,
        tiny_models("edit-v2"),
        "edit-v2",
        1,
        max_train_steps=2,
        validation_step_interval=2,
        checkpoint_step_interval=2,
        num_eval_images=1,
        lora_rank=4,
        output_dir=str(tmp_path / "out" / "site"),
    )
    return load_run_config(cfg), LocalStore(tmp_path / "store")


def _between(run) -> int:
    """A GPU that holds either service alone but not both."""
    plan = predict.plan_run(run, recommend=False, environ=ONE_GPU)
    tr, ev = plan.trainer.total, plan.services["eval"].total
    memory = tr + ev - GiB // 2
    assert max(tr, ev) < memory < tr + ev
    return memory


def test_one_gpu_without_room_for_both_validates_in_the_worker(tiny_run, monkeypatch, caplog):
    run, store = tiny_run
    memory = _between(run)
    for k, v in ONE_GPU.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(predict, "device_memory", lambda device: memory)
    assert predict.validation_site(run, "cpu")[0] == "training worker"
    events: list[TrainEvent] = []
    with caplog.at_level(logging.INFO, logger="shared.train.previews"):
        result = train_run(run, store, events=events.append, previews=previews.AUTO, copy_to_output_dir=False)
    assert "validations render in the training worker" in caplog.text
    assert not [e for e in events if e.phase == "validation_ready"]  # nothing handed to eval_svc
    [validation] = result.summary.validations
    assert "external" not in validation and validation["step"] == 2 and validation["samples"]
    assert store.exists(f"runs/{result.summary.run_id}/validation/step-2/metrics.json")


def test_eval_svc_renders_when_it_has_its_own_gpu_or_room_beside_the_trainer(tiny_run, monkeypatch, caplog):
    run, store = tiny_run
    memory = _between(run)
    monkeypatch.setattr(predict, "device_memory", lambda device: memory)
    own = {**ONE_GPU, "EDITTUNER_EVAL_GPU": "1"}
    site, why = predict.validation_site(run, "cpu", environ=own)
    assert site == "eval_svc" and "own GPU (1)" in why
    monkeypatch.setattr(predict, "device_memory", lambda device: 2 * memory)  # room for both
    for k, v in ONE_GPU.items():
        monkeypatch.setenv(k, v)
    events: list[TrainEvent] = []
    with caplog.at_level(logging.INFO, logger="shared.train.previews"):
        result = train_run(run, store, events=events.append, previews=previews.AUTO, copy_to_output_dir=False)
    assert "fit" in caplog.text and "eval_svc renders" in caplog.text
    [ready] = [e for e in events if e.phase == "validation_ready"]
    assert ready.step == 2 and result.summary.validations[0]["external"] is True


def test_off_a_gpu_eval_svc_renders(tiny_run):
    run, _ = tiny_run
    assert predict.validation_site(run, "cpu") == ("eval_svc", "cpu is not a GPU: eval_svc renders")


# ------------------------------------------------------------------------ out of memory during a validation
def test_smaller_validation_walks_the_planners_eval_ladder():
    from seed_files import SEED_CONFIG, SEED_DATA_V2

    from shared.config.loading import load_run_config_text
    from shared.plan.recommend import smaller_validation

    run = load_run_config_text(SEED_CONFIG, SEED_DATA_V2, ["model_flavour=edit-v2"])  # validation at 1024x1024
    assert smaller_validation(run, 0) == (run, [])
    steps = [smaller_validation(run, n) for n in (1, 2, 3, 4)]
    assert [c for _, c in steps] == [
        ["vae_enable_tiling=true"],
        ["vae_enable_tiling=true", "validation_resolution=768x768"],
        ["vae_enable_tiling=true", "validation_resolution=512x512"],
        ["vae_enable_tiling=true", "validation_resolution=512x512"],
    ]
    assert steps[2][0].train.validation_size == (512, 512) and steps[2][0].train.vae_enable_tiling
    small = load_run_config_text(SEED_CONFIG, SEED_DATA_V2, ["model_flavour=edit-v2", "validation_resolution=512x512"])
    assert smaller_validation(small, 3)[1] == ["vae_enable_tiling=true"]  # never a larger preview


def test_an_out_of_memory_validation_is_recorded_and_the_next_renders_smaller(tiny_run, monkeypatch):
    """In the worker: the first validation runs out of GPU memory (simulated), the run goes on, the error names the
    settings the next one uses, and the next renders with them (tiled VAE; 64x64 is below every ladder size). The
    failed render's tensors, which its error's traceback frames hold, are gone when the memory is given back."""
    import torch

    from shared.evaluate import preview
    from shared.evaluate import validation as routine
    from shared.model import device

    run, store = tiny_run
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, max_train_steps=4))
    real, seen, held, frees = preview.render_validation, [], [], []

    def render(pipe, vrun, *args, **kwargs):
        seen.append((vrun.train.vae_enable_tiling, pipe.vae.use_tiling))
        if len(seen) == 1:
            activations = torch.ones(1 << 20)  # what the render holds when the allocator gives up
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.40 GiB")
        return real(pipe, vrun, *args, **kwargs)

    monkeypatch.setattr(routine, "render_validation", render)  # the routine the worker and eval_svc render with
    monkeypatch.setattr(device, "free_gpu_memory", lambda: frees.append([ref() is None for ref in held]))
    result = train_run(run, store, previews=previews.IN_THIS_PROCESS, copy_to_output_dir=False)
    assert frees == [[True]]  # one free, after the out-of-memory render: its tensor already gone
    assert result.summary.steps == 4
    first, second = result.summary.validations
    assert "out of GPU memory rendering the validation at step 2" in first["error"]
    assert "the next one renders with vae_enable_tiling=true" in first["error"]
    assert "error" not in second and second["step"] == 4 and second["samples"]
    assert seen == [(False, False), (True, True)]
