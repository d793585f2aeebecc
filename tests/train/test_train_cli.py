"""`edittuner train` with a bundled tiny preset, and the training worker's JSON-lines protocol."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import pytest
from PIL import Image
from safetensors.torch import load_file

from shared.cli.main import main

pytestmark = pytest.mark.slow  # starts training workers and the CLI as processes

SHORT = ["max_train_steps=4", "checkpoint_step_interval=2", "validation_step_interval=2", "num_eval_images=1"]


def test_train_example_tiny_preset_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "example=qwen_image.edit-v2-lora-tiny", *SHORT, "--quiet", "--in-process"]) == 0
    out = capsys.readouterr().out
    lora = tmp_path / "output" / "tiny-edit-v2" / "pytorch_lora_weights.safetensors"
    assert "pytorch_lora_weights.safetensors: output/tiny-edit-v2/pytorch_lora_weights.safetensors" in out
    assert "trained run 'tiny-edit-v2' to step 4" in out and "checkpoints 2, 4" in out
    sd = load_file(lora)
    assert len(sd) == 2 * 4 * 2  # 2 blocks x 4 attention projections x (A, B)
    assert all(k.startswith("transformer.transformer_blocks.") for k in sd)
    for step in (2, 4):
        folder = tmp_path / "output" / "tiny-edit-v2" / "validation" / f"step-{step}"
        grid = Image.open(folder / "0000.png")
        assert grid.width == 5 * 64  # 2 references | base | LoRA | target, 64 px cells
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["step"] == step and metrics["heldout_loss_mean"] > 0
    # training again without resuming would overwrite the run: refused, with what to do
    assert main(["train", "example=qwen_image.edit-v2-lora-tiny", *SHORT, "--quiet", "--in-process"]) == 1
    assert "resume_from_checkpoint=latest" in capsys.readouterr().err
    # resuming a finished run trains nothing more and exits cleanly
    assert (
        main(
            [
                "train",
                "example=qwen_image.edit-v2-lora-tiny",
                *SHORT,
                "resume_from_checkpoint=latest",
                "--quiet",
                "--no-validation",
                "--in-process",
            ]
        )
        == 0
    )


def test_worker_prints_json_lines_and_exit_codes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "shared.service.worker",
        "--store",
        str(tmp_path / "store"),
        "example=qwen_image.edit-v1-lora-tiny",
        "max_train_steps=2",
        "checkpoint_step_interval=1",
        "--no-validation",
    ]
    from shared.cli.demo import materialize_preset

    materialize_preset("qwen_image.edit-v1-lora-tiny", tmp_path)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torchao" not in proc.stderr and "register_constant" not in proc.stderr  # import noise kept out
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    steps = [
        e["event"]["step"] for e in lines if "event" in e and e["event"]["phase"] == "train" and "loss" in e["event"]
    ]
    assert steps == [1, 2]
    assert lines[-1]["result"]["steps"] == 2 and lines[-1]["result"]["checkpoints"] == [1, 2]
    bad = subprocess.run(cmd + ["lora_rank=0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "$.lora_rank" in json.loads(bad.stdout.splitlines()[-1])["error"]


def test_train_without_a_server_starts_local_services(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("EDITTUNER_SERVER", "EDITTUNER_TRAINER_ADDR", "EDITTUNER_STORE"):
        monkeypatch.delenv(var, raising=False)
    assert (
        main(
            [
                "train",
                "example=qwen_image.edit-v1-lora-tiny",
                "max_train_steps=3",
                "checkpoint_step_interval=3",
                "validation_step_interval=3",
                "num_eval_images=1",
                "--quiet",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "started local services" in captured.err and "submitted job" in captured.err
    assert "(train): succeeded" in captured.out
    lora = tmp_path / "output" / "tiny-edit-v1" / "pytorch_lora_weights.safetensors"
    assert len(load_file(lora)) == 16
    assert (tmp_path / "output" / "tiny-edit-v1" / "validation" / "step-3" / "0000.png").exists()
    assert (tmp_path / ".edittuner" / "logs" / "trainer.log").exists()


def test_train_in_process_on_two_processes_with_previews(tmp_path, monkeypatch, capsys):
    """num_processes=2: this process encodes, torchrun trains on two gloo ranks, rank 0 renders the previews
    while the other waits, and the outputs land where a single process puts them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert (
        main(
            [
                "train",
                "example=qwen_image.edit-v2-lora-tiny",
                *SHORT,
                "num_processes=2",
                "gradient_accumulation_steps=2",
                "--quiet",
                "--in-process",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "trained run 'tiny-edit-v2' to step 4 on 2 processes" in out and "checkpoints 2, 4" in out
    assert len(load_file(tmp_path / "output" / "tiny-edit-v2" / "pytorch_lora_weights.safetensors")) == 16
    for step in (2, 4):
        assert (tmp_path / "output" / "tiny-edit-v2" / "validation" / f"step-{step}" / "0000.png").is_file()


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
            "out of GPU memory in the training worker: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
            "`cublasCreate(handle)`; lower the resolution",
        ),
        (
            RuntimeError(
                "NCCL error in: ProcessGroupNCCL.cpp:3356, unhandled cuda error\nLast error:\n"
                "Cuda failure 'out of memory'"
            ),
            "out of GPU memory in the training worker: Cuda failure 'out of memory'; lower the resolution",
        ),
        (MemoryError(), "out of host memory in the training worker: MemoryError; lower the resolution"),
    ],
    ids=["cublas", "nccl", "host"],
)
def test_the_worker_reports_a_failed_allocation_as_out_of_memory(monkeypatch, capsys, error, said):
    """A CUDA library's failed allocation is a RuntimeError, not torch.OutOfMemoryError: exit 1, ResourceExhausted,
    quoting the line that says so (a MemoryError without a message is named by its class)."""
    from test_planner import seed_run

    from shared.service import worker

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(worker, "exit_with_parent", lambda: None)  # nothing of the worker's process set-up here
    monkeypatch.setattr(worker, "_stop_on_signals", threading.Event)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    monkeypatch.setattr(worker, "load_run_config", lambda *args: seed_run("device=cpu"))
    monkeypatch.setattr(worker, "train_run", fail)
    assert worker.main(["--store", "unused"]) == 1
    reported = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert reported["code"] == "RESOURCE_EXHAUSTED" and reported["error"].startswith(said)


def test_the_worker_keeps_bitsandbytes_per_call_warning_out_of_its_log(monkeypatch, caplog):
    """Stock bitsandbytes' int8 Linear warns on each eval forward (MatMul8bitLt casts bf16 to fp16; the project's
    int8-bnb layer never takes that kernel, other bitsandbytes code may); after the worker's logging set-up that
    warning is gone, and the project's own loggers are left as they were."""
    import bitsandbytes as bnb_lib
    import torch

    from shared.service import worker

    stock = bnb_lib.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=0.0)
    stock.weight = bnb_lib.nn.Int8Params(
        torch.randn(64, 64).to(torch.bfloat16), requires_grad=False, has_fp16_weights=False
    )
    linear = torch.nn.Sequential(stock).to("cpu").eval()
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # the test process keeps its handlers
    bnb = logging.getLogger("bitsandbytes")
    before = bnb.level
    bnb.setLevel(logging.NOTSET)  # as in a fresh process (the CLI's tests raise it in this one)
    try:
        with caplog.at_level(logging.WARNING), torch.no_grad():
            linear(torch.randn(2, 64, dtype=torch.bfloat16))
            assert any(
                r.name.startswith("bitsandbytes.") and "MatMul8bitLt: inputs will be cast" in r.getMessage()
                for r in caplog.records
            )
            caplog.clear()
            worker._configure_logging()
            linear(torch.randn(2, 64, dtype=torch.bfloat16))
            assert caplog.records == []
            assert logging.getLogger("shared.train.trainer").level == logging.NOTSET
    finally:
        bnb.setLevel(before)
