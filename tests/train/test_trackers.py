"""report_to: TensorBoard event files and offline W&B runs of a tiny run, read back with each tool's own reader and
compared step by step with the run's metrics.jsonl; their copies in the store; none writes nothing."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training import make_run

from shared.config.loading import load_run_config
from shared.errors import InvalidInput
from shared.evaluate.preview import png_bytes
from shared.train import previews, trackers
from shared.train.events import TrainEvent
from shared.train.runner import train_run
from shared.train.trackers import publish_validation

LOGS = "runs/out/logs"


def steps_of(store) -> list[dict]:
    """The optimizer steps the run recorded (metrics.jsonl), in order."""
    lines = store.get_bytes("runs/out/metrics.jsonl").decode().splitlines()
    return [h for h in map(json.loads, lines) if "loss" in h]


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in ea.Tags()["scalars"]:
        events = ea.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step logged twice"
        out[tag] = {e.step: e.value for e in events}
    return out


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard keeps scalars as float32


def pull(store, prefix: str, dest: Path) -> Path:
    """What `edittuner runs pull` does with a store: every key under the prefix, as files."""
    for key in store.list(prefix):
        store.get_file(key, dest / key[len(prefix) + 1 :])
    return dest


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run's .wandb file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of
    records with a 7-byte header each) of wandb's own Record protos."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_tensorboard_logs_each_step_and_the_in_process_validation(tmp_path, tiny_models):
    cfg, store = make_run(
        tmp_path,
        tiny_models,
        max_train_steps=4,
        checkpoint_step_interval=2,
        validation_step_interval=4,
        num_eval_images=1,
    )
    run = load_run_config(cfg, overrides=["report_to=tensorboard"])
    train_run(run, store, encode=False)
    steps = steps_of(store)
    pulled = pull(store, LOGS, tmp_path / "pulled")
    assert {p.relative_to(pulled) for p in pulled.rglob("*") if p.is_file()} == {
        p.relative_to(tmp_path / "out" / "logs") for p in (tmp_path / "out" / "logs").rglob("*") if p.is_file()
    }
    train = scalars(pulled / "tensorboard" / "out")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert train["train/loss"] == {s["step"]: f32(s["loss"]) for s in steps}
    assert train["train/learning_rate"] == {s["step"]: f32(s["lr"]) for s in steps}
    assert train["train/grad_norm"] == {s["step"]: f32(s["grad_norm"]) for s in steps}
    assert train["train/grad_norm"][1] > 0
    assert set(train["train/data_wait"]) == set(train["train/seconds_per_step"]) == {1, 2, 3, 4}
    assert set(train["checkpoint/save_seconds"]) == {2, 4}

    metrics = store.get_json("runs/out/validation/step-4/metrics.json")
    folder = pulled / "tensorboard" / "out" / "validation"
    assert [p.name for p in folder.iterdir()] == ["events.out.tfevents.0000000004.validation"]
    val = scalars(folder)
    assert val["validation/psnr_lora"] == {4: f32(metrics["psnr_lora"])}
    assert val["validation/psnr_base"] == {4: f32(metrics["psnr_base"])}
    assert val["validation/heldout_loss"] == {4: f32(metrics["heldout_loss_mean"])}
    ea = EventAccumulator(str(folder), size_guidance={"images": 0})
    ea.Reload()
    [sample] = metrics["samples"]
    grid = Image.open(io.BytesIO(store.get_bytes(sample["grid"])))
    name = sample["grid"].rsplit("/", 1)[1].removesuffix(".png")
    [image] = ea.Images(f"validation/{name}")
    shown = Image.open(io.BytesIO(image.encoded_image_string))
    assert image.step == 4 and np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(grid.convert("RGB")))


def test_a_resumed_run_shows_each_step_once_with_the_values_it_kept(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2, max_train_steps=4, checkpoint_step_interval=2)
    train_run(
        load_run_config(cfg, overrides=["report_to=tensorboard"]),
        store,
        encode=False,
        previews=previews.NONE,
        until_step=3,
    )
    train_run(
        load_run_config(cfg, overrides=["report_to=tensorboard", "resume_from_checkpoint=latest"]),
        store,
        encode=False,
        previews=previews.NONE,
    )
    folder = pull(store, LOGS, tmp_path / "pulled") / "tensorboard" / "out"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one per start; step 3 is in both
    assert scalars(folder)["train/loss"] == {s["step"]: f32(s["loss"]) for s in steps_of(store)}


def test_wandb_offline_and_eval_svc_files_of_a_service_run(tmp_path, tiny_models, monkeypatch):
    """As the worker runs it: external validation, nothing outside the store. The fake eval_svc finishes step 2
    while training goes on and step 4 only after the worker ended: W&B has step 2 only, TensorBoard both."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # wandb must not write to the user's home
    monkeypatch.setattr(trackers, "POLL_S", 0.0)  # look for finished renders at every step
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg, store = make_run(
        tmp_path,
        tiny_models,
        n=2,
        max_train_steps=4,
        checkpoint_step_interval=2,
        validation_step_interval=2,
        report_to="all",
        tracker_run_name="my run",
    )
    run = load_run_config(cfg)
    ready: list[int] = []

    def render(step: int) -> None:
        """What eval_svc leaves in the store for a render."""
        grid = f"runs/out/validation/step-{step}/0000.png"
        store.put_bytes(grid, png_bytes(Image.new("RGB", (48, 16), (step * 40, 0, 0))))
        result = {
            "step": step,
            "psnr_lora": 20.0 + step,
            "psnr_base": 18.0,
            "heldout_loss": {"0.5": 0.1 * step},
            "heldout_loss_mean": 0.1 * step,
            "seconds": 1.0,
            "samples": [
                {
                    "dataset": "demo-images",
                    "key": "0000",
                    "caption": "c",
                    "grid": grid,
                    "psnr_lora": 20.0 + step,
                    "psnr_base": 18.0,
                }
            ],
        }
        store.put_json(f"runs/out/validation/step-{step}/metrics.json", result)
        publish_validation(store, run, "out", result)

    def events(e: TrainEvent) -> None:
        if e.phase == "validation_ready":
            ready.append(e.step)
            if e.step == 2:
                render(2)

    train_run(run, store, events=events, previews=previews.ON_EVAL_SVC, encode=False, copy_to_output_dir=False)
    render(4)
    assert ready == [2, 4]
    assert not (tmp_path / "out").exists() and not (tmp_path / "home").exists()
    assert "WANDB_MODE" not in os.environ and "WANDB_DIR" not in os.environ
    steps = steps_of(store)
    pulled = pull(store, LOGS, tmp_path / "pulled")

    [folder] = (pulled / "wandb").glob("offline-run-*-out")
    assert (folder / "run-out.wandb").is_file() and (folder / "files").is_dir()
    rows = wandb_history(folder / "run-out.wandb")
    assert {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r} == {s["step"]: s["loss"] for s in steps}
    assert [r["train/grad_norm"] for r in rows if "train/loss" in r] == [s["grad_norm"] for s in steps]
    [val] = [r for r in rows if "validation/step" in r]
    assert val["validation/step"] == 2 and val["validation/psnr_lora"] == 22.0
    assert val["_step"] == 3  # found at the next step: W&B's steps only grow, validation/step is its x axis
    assert val["validation/0000/_type"] == "image-file" and (folder / "files" / val["validation/0000/path"]).is_file()
    dry = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"WANDB_MODE": "offline"},
    )
    assert "Would sync 1 run(s)" in dry.stdout + dry.stderr, dry.stdout + dry.stderr

    tb = pulled / "tensorboard" / "my-run"  # tracker_run_name, as one path segment
    assert scalars(tb)["train/loss"] == {s["step"]: f32(s["loss"]) for s in steps}
    assert scalars(tb / "validation")["validation/psnr_lora"] == {2: 22.0, 4: 24.0}


def test_none_writes_nothing(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2, max_train_steps=2, checkpoint_step_interval=2)
    train_run(load_run_config(cfg), store, encode=False, previews=previews.NONE)
    assert store.list(LOGS) == [] and not (tmp_path / "out" / "logs").exists()
    assert store.list("runs/out/lora")  # the run itself did happen


def test_a_tracker_that_cannot_load_is_a_clear_error_before_anything_runs(tmp_path, tiny_models, monkeypatch):
    cfg, store = make_run(tmp_path, tiny_models, n=2, max_train_steps=2)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(InvalidInput) as e:
        train_run(load_run_config(cfg, overrides=["report_to=tensorboard,wandb"]), store, encode=False)
    assert "report_to='tensorboard,wandb'" in str(e.value) and "wandb cannot be imported" in str(e.value)
    assert store.list("runs/out") == []  # refused before the trainer's setup: no run.json, no logs


def test_a_tracker_failing_mid_run_costs_logs_not_the_run(tmp_path, tiny_models, monkeypatch, caplog):
    cfg, store = make_run(tmp_path, tiny_models, n=2, max_train_steps=3, checkpoint_step_interval=3)

    def broken(self, values, step):
        raise OSError("disk full")

    monkeypatch.setattr(trackers._TensorBoard, "scalars", broken)
    result = train_run(
        load_run_config(cfg, overrides=["report_to=tensorboard"]), store, encode=False, previews=previews.NONE
    )
    assert result.summary.steps == 3 and store.list("runs/out/lora")
    failures = [r for r in caplog.records if "tensorboard: logging scalars failed" in r.getMessage()]
    assert len(failures) == 1 and "disk full" in caplog.text  # warned once, with the reason
    assert "tensorboard: logging scalars: 4x" in caplog.text  # counted at the end: 3 steps, 1 checkpoint


def test_absolute_logging_dir_receives_the_files(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2, max_train_steps=2, checkpoint_step_interval=2)
    logs = tmp_path / "elsewhere"
    train_run(
        load_run_config(cfg, overrides=["report_to=tensorboard", f"logging_dir={logs}"]),
        store,
        encode=False,
        previews=previews.NONE,
    )
    assert scalars(logs / "tensorboard" / "out")["train/loss"].keys() == {1, 2}
    assert not (tmp_path / "out" / "logs").exists()
