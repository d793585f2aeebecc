"""``validation_on_full_precision``: a LoRA trained over a GGUF file is previewed on the file's transformer and, beside
it, on the model folder's unquantized one holding the same LoRA. The full-precision base cell is exactly the base a
run on the folder's weights renders; metrics.json and the report carry the full-precision PSNRs and retention;
eval_svc renders what the training worker renders."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training import make_run

from shared.config.loading import load_run_config
from shared.evaluate.adapter_runs import effect_retention
from shared.evaluate.full_precision import FULL_LABEL
from shared.model.tiny_files import write_gguf
from shared.train.previews import in_process_validator
from shared.train.trainer import Trainer

pytestmark = pytest.mark.slow  # trains twice with previews


def _run(cfg: Path, store: Any, name: str, *overrides: str) -> Any:
    run = load_run_config(cfg, overrides=[f"output_dir={name}", *overrides])
    t = Trainer(run, store, validate=in_process_validator(run, store))
    t.setup()
    return t.train()


def _cells(store: Any, sample: dict[str, Any], n: int) -> list[np.ndarray]:
    W, H = sample["width"], sample["height"]
    grid = Image.open(io.BytesIO(store.get_bytes(sample["grid"]))).convert("RGB")
    assert grid.width == n * W
    return [np.asarray(grid.crop((i * W, grid.height - H, (i + 1) * W, grid.height))) for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: Any, tiny_models: Any) -> tuple[Path, Any, str]:
    tmp = tmp_path_factory.mktemp("full-precision")
    cfg, store = make_run(
        tmp, tiny_models, refs=1, n=5, max_train_steps=4, checkpoint_step_interval=4, validation_step_interval=4
    )
    folder = Path(load_run_config(cfg).train.model_path)
    gguf = tmp / "transformer-Q4_0.gguf"
    write_gguf(load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")), gguf, "Q4_0")
    over = [f"pretrained_transformer_model_name_or_path={gguf}", "num_eval_images=1", "learning_rate=1e-2"]
    both = _run(cfg, store, "both", *over, "validation_on_full_precision=true")
    only = _run(cfg, store, "file", *over)
    assert both.losses == only.losses  # previews never touch training
    _run(cfg, store, "folder", "num_eval_images=1", "learning_rate=1e-2")  # the same run on the folder's weights
    return cfg, store, str(gguf)


def test_the_previews_show_the_lora_on_both_transformers(trained: Any) -> None:
    cfg, store, _ = trained
    metrics = json.loads(store.get_bytes("runs/both/validation/step-4/metrics.json"))
    [entry] = metrics["adapters"]
    assert entry["label"] == FULL_LABEL and entry["full_precision"] is True
    [sample] = metrics["samples"]
    [scores] = sample["adapters"]
    assert entry["psnr_lora"] == scores["psnr_lora"] and entry["retention"] == scores["retention"]
    # ref | base | LoRA | full base | full + LoRA | target
    cells = _cells(store, sample, 6)
    folder = json.loads(store.get_bytes("runs/folder/validation/step-4/metrics.json"))["samples"][0]
    folder_base = _cells(store, folder, 4)[1]
    np.testing.assert_array_equal(cells[3], folder_base)  # the folder's transformer without the LoRA, same seed
    assert not np.array_equal(cells[3], cells[1])  # Q4_0's base renders differently
    assert not np.array_equal(cells[4], cells[3])  # the LoRA changes the full-precision render
    imgs = [Image.fromarray(c) for c in cells]
    assert effect_retention(imgs[1], imgs[2], imgs[3], imgs[4]) == pytest.approx(scores["retention"], abs=1e-12)
    assert 0.3 < scores["retention"] < 1.5, scores  # much of the change the LoRA makes on Q4_0 carries over (0.58)
    file_only = json.loads(store.get_bytes("runs/file/validation/step-4/metrics.json"))
    assert file_only["adapters"] == [] and file_only["samples"][0]["psnr_lora"] == sample["psnr_lora"]
    report = store.get_bytes("runs/both/report/index.html").decode()
    assert FULL_LABEL in report and "retention" in report


def test_eval_svc_renders_what_the_worker_renders(trained: Any) -> None:
    from prometheus_client import CollectorRegistry
    from test_eval_core import _Ctx

    from eval_svc.service import EvalCore
    from shared.config.loading import read_config_files
    from shared.service.common import files_to_params
    from shared.service.jobs import JobState
    from shared.service.metrics import Metrics
    from shared.service.records import JobRecord

    cfg, store, gguf = trained
    overrides = [
        f"pretrained_transformer_model_name_or_path={gguf}",
        "num_eval_images=1",
        "learning_rate=1e-2",
        "validation_on_full_precision=true",
        "output_dir=both",
    ]
    params = files_to_params(read_config_files(cfg, None, overrides)) | {
        "run_id": "both",
        "step": 4,
        "lora_key": "runs/both/lora/pytorch_lora_weights.safetensors",
        "index_keys": [],
    }
    core = EvalCore(store, Metrics(CollectorRegistry()), idle_release_s=0)
    now = time.time()
    outputs = core.execute(JobRecord("job-1", "req-1", "render", JobState.RUNNING, params, now, now), _Ctx())
    rendered = json.loads(store.get_bytes(outputs.metrics_key))
    worker = json.loads(store.get_bytes("runs/both/validation/step-4/metrics.json"))
    assert rendered["adapters"][0]["label"] == FULL_LABEL
    ours, theirs = _cells(store, rendered["samples"][0], 6), _cells(store, worker["samples"][0], 6)
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not getattr(core._full[1], "peft_config", {})  # the LoRA left the full-precision transformer
    assert torch.is_tensor(next(core._full[1].parameters()))
