"""Previews with a stacked adapter (SimpleTuner's ``validation_adapter_*``): a made-up few-step adapter (a random
LoRA with a 4-step, guidance-1 profile and its own scheduler shift in a scheduler_config.json beside it) rendered
beside the normal profile. The grid, metrics.json and the report hold both, the effect retention is the documented
ratio (recomputed here from the saved grid), and the exported LoRA is the one a run without the adapter exports,
bit for bit."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import make_run

from shared.config.loading import load_run_config
from shared.errors import ConfigError
from shared.evaluate.adapter_runs import effect_retention
from shared.evaluate.grid import LABEL_HEIGHT
from shared.model.loading import load_transformer
from shared.model.lora import DIFFUSERS_FILE, attach_lora, lora_state_dict, save_lora_files
from shared.train.previews import in_process_validator
from shared.train.trainer import Trainer

pytestmark = pytest.mark.slow  # trains twice with previews


@pytest.fixture(scope="module")
def few_step(tiny_models, tmp_path_factory) -> Path:
    """A random LoRA standing in for a Lightning LoRA, with the scheduler settings it would ship beside it."""
    tr = load_transformer(tiny_models("edit-v2"), "edit-v2")
    attach_lora(tr, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=5)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    folder = tmp_path_factory.mktemp("lightning")
    files = save_lora_files(lora_state_dict(tr), alpha=4.0, rank=4, fmt="diffusers", transformer=tr)
    (folder / DIFFUSERS_FILE).write_bytes(files[DIFFUSERS_FILE])
    (folder / "scheduler_config.json").write_text(json.dumps({"shift": 3.0, "use_dynamic_shifting": False}))
    return folder


def _run(cfg, store, name, *overrides):
    run = load_run_config(cfg, overrides=[f"output_dir={name}", *overrides])
    t = Trainer(run, store, validate=in_process_validator(run, store))
    t.setup()
    return t, t.train()


def test_a_few_step_adapter_is_previewed_beside_the_normal_profile(tmp_path, tiny_models, few_step):
    cfg, store = make_run(
        tmp_path, tiny_models, refs=1, n=5, max_train_steps=4, checkpoint_step_interval=4, validation_step_interval=2
    )
    adapter = [
        f"validation_adapter_path={few_step}",
        "validation_adapter_name=lightning",
        "validation_adapter_mode=comparison",
        "validation_adapter_steps=4",
        "validation_adapter_guidance=1",
        "num_eval_images=1",
    ]
    _, with_adapter = _run(cfg, store, "adapted", *adapter)
    _, without = _run(cfg, store, "plain", "num_eval_images=1")
    assert with_adapter.losses == without.losses  # previews never touch training
    a = store.get_tensors("runs/adapted/lora/pytorch_lora_weights.safetensors")[0]
    b = store.get_tensors("runs/plain/lora/pytorch_lora_weights.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # only the trained keys, bit for bit

    metrics = json.loads(store.get_bytes("runs/adapted/validation/step-4/metrics.json"))
    [run] = metrics["adapters"]
    assert (run["label"], run["steps"], run["guidance"]) == ("lightning", 4, 1.0)
    assert run["adapters"] == [{"file": few_step.name, "strength": 1.0}] and run["scheduler"] == {
        "shift": 3.0,
        "use_dynamic_shifting": False,
    }
    assert metrics["settings"]["adapter_mode"] == "comparison"
    [sample] = metrics["samples"]
    [scores] = sample["adapters"]
    assert scores["retention"] is not None and run["retention"] == scores["retention"]
    # the grid: ref | base | LoRA | lightning | lightning + LoRA | target, the renders recomputed into retention
    W, H = sample["width"], sample["height"]
    grid = Image.open(io.BytesIO(store.get_bytes(sample["grid"]))).convert("RGB")
    assert grid.width == 6 * W and (grid.height - H - LABEL_HEIGHT) % LABEL_HEIGHT == 0
    cells = [grid.crop((i * W, grid.height - H, (i + 1) * W, grid.height)) for i in range(6)]
    assert effect_retention(cells[1], cells[2], cells[3], cells[4]) == pytest.approx(scores["retention"], abs=1e-12)
    dn = np.asarray(cells[2], dtype=np.float64) / 255 - np.asarray(cells[1], dtype=np.float64) / 255
    df = np.asarray(cells[4], dtype=np.float64) / 255 - np.asarray(cells[3], dtype=np.float64) / 255
    assert scores["retention"] == pytest.approx(float((df * dn).sum() / (dn * dn).sum()), abs=1e-12)
    assert not np.array_equal(np.asarray(cells[3]), np.asarray(cells[1]))  # the adapter changed the render
    normal = json.loads(store.get_bytes("runs/plain/validation/step-4/metrics.json"))["samples"][0]
    assert sample["psnr_lora"] == normal["psnr_lora"]  # the normal cells are the run without the adapter's
    report = store.get_bytes("runs/adapted/report/index.html").decode()
    assert "lightning" in report and "retention" in report


def test_the_scheduler_beside_the_adapter_is_its_profile(tmp_path, tiny_models, few_step):
    from shared.config.validation_adapters import adapter_runs
    from shared.evaluate.adapter_runs import profile
    from shared.evaluate.render_pair import RenderSettings

    cfg, _ = make_run(tmp_path, tiny_models, refs=1, n=1)
    run = load_run_config(cfg, overrides=[f"validation_adapter_path={few_step}", "validation_adapter_steps=4"])
    [r] = adapter_runs(run.train)
    p = profile(RenderSettings.of(run), r)
    assert (p.steps, p.guidance, p.scheduler) == (4, 4.0, {"shift": 3.0, "use_dynamic_shifting": False})
    configured = [{"label": "x", "path": str(few_step), "guidance": 1, "scheduler": {"shift": 5.0}}]
    run = load_run_config(cfg, overrides=[f"validation_adapter_config={json.dumps(configured)}"])
    [r] = adapter_runs(run.train)
    assert profile(RenderSettings.of(run), r).scheduler == {"shift": 5.0, "use_dynamic_shifting": False}
    with pytest.raises(ConfigError, match="unknown settings warp"):
        load_run_config(cfg, overrides=['validation_adapter_config=[{"path": "x", "scheduler": {"warp": 1}}]'])
    with pytest.raises(ConfigError, match="give one of them"):
        load_run_config(cfg, overrides=["validation_adapter_path=x", 'validation_adapter_config=["y"]'])


def test_check_reports_the_adapter_files_and_profiles(tmp_path, tiny_models, few_step, capsys):
    from shared.cli.main import main

    cfg, _ = make_run(tmp_path, tiny_models, refs=1, n=2)
    data = json.loads(cfg.read_text())["data_backend_config"]
    argv = ["check", "--config", str(cfg), "--data", data, "--store", str(tmp_path / "store")]
    overrides = [
        f"validation_adapter_path={few_step}",
        "validation_adapter_name=lightning",
        "validation_adapter_steps=4",
        "validation_adapter_guidance=1",
        "validation_adapter_mode=comparison",
        f"assistant_lora_path={few_step}",
        "assistant_lora_inference_strength=0.5",
    ]
    assert main([*argv, *overrides]) == 0
    out = capsys.readouterr().out
    assert f"preview 'lightning' (comparison): {few_step} ×1; 4 steps, guidance 1" in out
    assert f"assist  {few_step}: strength 1 in training, 0.5 in previews" in out
