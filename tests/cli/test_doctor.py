"""``edittuner doctor`` and ``bench/first_contact.sh`` on a CPU: the smoke run a GPU host runs first, with the rows a
CPU can fill (the small block, the tiny run) and the GPU-only ones saying so; and the checks catching what they
exist to catch: a kernel that drops biases, a precision that computes another function, a process-group backend
that cannot all-reduce what the trainer all-reduces."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from shared.cli.doctor import block, host
from shared.cli.doctor.rows import Report, Row
from shared.plan import probe

pytestmark = pytest.mark.slow  # runs the doctor's tiny trainings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def first_contact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("first-contact")
    env = {
        **os.environ,
        "PYTHON": str(Path(os.sys.executable)),
        "TMPDIR": str(out.parent),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "first_contact.sh"), str(out)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, proc


def test_first_contact_runs_every_stage_on_a_cpu(first_contact) -> None:
    out, proc = first_contact
    summary = (out / "summary.txt").read_text()
    for stage in ("env", "doctor", "full", "gpu_step"):
        assert f"== {stage}: exit 0 after" in summary, summary + proc.stdout[-3000:]
    assert "== first contact done in" in summary
    assert "torch" in (out / "env.log").read_text()
    assert "not installed" not in [
        ln.split(" ", 1)[1]
        for ln in (out / "env.log").read_text().splitlines()
        if ln.startswith(("diffusers ", "peft ", "optimum-quanto "))
    ]
    steps = json.loads((out / "gpu_step.json").read_text())["rows"]
    assert {r["precision"] for r in steps} == {"nf4-bnb", "fp8-quanto", "int4-quanto"}
    assert all(r["status"] == "ok" and r["s_per_step"] > 0 for r in steps)


def test_doctor_rows_on_a_cpu(first_contact) -> None:
    out, _ = first_contact
    doc = json.loads((out / "doctor.json").read_text())
    rows = {r["check"]: r for r in doc["rows"]}
    assert doc["device"] == "cpu"
    assert rows["device"]["status"] == "info" and "rows that need a GPU say so" in rows["device"]["detail"]
    assert rows["process group 'gloo' (the trainer's)"]["status"] == "pass"
    assert rows["bitsandbytes"]["data"]["nf4_roundtrip_rel_err"] < 0.15
    assert rows["optimum-quanto"]["data"]["kernels"] == "pure torch"
    for precision in probe.BLOCK_PRECISIONS:
        r = rows[f"block {precision}"]
        assert r["status"] == "pass", r
        d = r["data"]
        assert 0 < d["rel_error"] < probe.MAX_REL_ERROR[precision]
        assert d["biases_honoured"] == d["biased_linears"] == 14  # every quantized Linear of the block
        assert d["lora_b_nonzero"] == d["lora_b_tensors"] == 4 and d["finite"]
    # the quanto classes chosen are the pure-torch ones; int4 with bf16 scales is PyTorch's own TinyGemm kernel
    assert rows["block int4-quanto"]["data"]["weight_classes"] == ["TinyGemmWeightQBitsTensor", "WeightQBitsTensor"]
    assert rows["block fp8-quanto"]["data"]["weight_classes"] == ["WeightQBytesTensor"]
    # 8-bit weights lose less than 4-bit ones: a wrong threshold table or a swapped precision would not order so
    err = {p: rows[f"block {p}"]["data"]["rel_error"] for p in probe.BLOCK_PRECISIONS}
    assert err["int8-quanto"] < err["fp8-quanto"] < err["int4-quanto"] < err["int2-quanto"]
    tiny = rows["tiny run (int8-quanto, EMA)"]
    assert tiny["status"] == "pass" and tiny["data"]["checkpoints"] == [2, 4] and all(tiny["data"]["files"].values())
    assert rows["tiny run resume"]["data"]["max_rel_diff"] == 0.0  # bit-exact on the CPU
    assert rows["diffusers loads the LoRA"]["data"]["max_abs_diff"] > 0
    full = json.loads((out / "full.json").read_text())["rows"]
    assert [(r["check"], r["status"]) for r in full] == [
        (f"step {p} edit-v2 1024 x3 refs", "skip") for p in ("bf16", "int8-quanto", "nf4-bnb")
    ]
    assert all("needs a GPU" in r["detail"] for r in full)


# ------------------------------------------------------------------------------------------------ the checks fail
@pytest.fixture(scope="module")
def small_reference():
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    side, text = probe.SMALL_TOKENS
    return probe.build_transformer(probe.SMALL_BLOCK, cpu).requires_grad_(False), probe.block_inputs(
        probe.SMALL_BLOCK, side, text, cpu
    )


def test_a_kernel_that_drops_the_bias_fails_the_block_row(small_reference, monkeypatch) -> None:
    """As quanto's Marlin fp8 forward does: the bias is never added."""
    from optimum.quanto.nn import QLinear

    def no_bias(self, input):
        return torch.nn.functional.linear(input, self.qweight.dequantize())

    monkeypatch.setattr(QLinear, "forward", no_bias)
    row = block.precision_row("fp8-quanto", *small_reference, torch.device("cpu"), 1)
    assert row.status == "fail" and "14 of 14 quantized Linears drop their bias" in row.detail


def test_a_precision_computing_another_function_fails_on_its_error(small_reference, monkeypatch) -> None:
    """Wrong scales (every weight 1.5x): the biases survive, the relative error does not."""
    from optimum.quanto.nn import QLinear

    real = QLinear.forward
    monkeypatch.setattr(
        QLinear,
        "forward",
        lambda self, x: real(self, x) + 0.5 * torch.nn.functional.linear(x, self.qweight.dequantize()),
    )
    row = block.precision_row("int8-quanto", *small_reference, torch.device("cpu"), 1)
    assert row.status == "fail" and "relative error" in row.detail.split("; ")[-1]
    assert row.data["biases_honoured"] == 14 and row.data["rel_error"] > probe.MAX_REL_ERROR["int8-quanto"]


def test_the_wrong_weight_class_fails_even_when_the_numbers_pass(small_reference, monkeypatch) -> None:
    monkeypatch.setattr(probe, "weight_classes", lambda model: ["MarlinF8QBytesTensor"])
    row = block.precision_row("int8-quanto", *small_reference, torch.device("cpu"), 1)
    assert row.status == "fail" and "MarlinF8QBytesTensor in use (drops the Linear bias)" in row.detail


def test_nccl_alone_is_what_the_process_group_row_would_catch(monkeypatch) -> None:
    """A backend that cannot all-reduce a CPU tensor fails the row, naming the tensor: what "nccl" alone does."""
    import torch.distributed as dist

    real = dist.all_reduce

    def gpu_only(t, *a, **k):
        if t.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")
        return real(t, *a, **k)

    monkeypatch.setattr(dist, "all_reduce", gpu_only)
    rows = host.process_group_row(torch.device("cpu"))
    assert rows[0].status == "fail" and "cpu float32 FAILED" in rows[0].detail
    assert "No backend type associated with device type cpu" in rows[0].detail


def test_a_failing_check_is_a_row_and_the_next_checks_still_run(tmp_path) -> None:
    report = Report(tmp_path / "rows.json")

    def broken() -> Row:
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED")

    report.run("broken", broken, "what to do")
    report.run("fine", lambda: Row("fine", "pass", "ok"))
    saved = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["check"], r["status"]) for r in saved] == [("broken", "fail"), ("fine", "pass")]
    assert "RuntimeError: CUBLAS_STATUS_ALLOC_FAILED" in saved[0]["detail"] and saved[0]["fix"] == "what to do"


def test_device_row_without_cuda_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    row = host.device_row(torch.device("cuda"))
    assert row.status == "fail" and "--gpus all" in row.fix


def test_bitsandbytes_without_its_cuda_library_fails_on_a_cuda_device(monkeypatch) -> None:
    from bitsandbytes import cextension

    monkeypatch.setattr(cextension, "BNB_BACKEND", "CUDA")
    row = host.bitsandbytes_row(torch.device("cuda"))  # this host's bitsandbytes holds its CPU library only
    assert row.status == "fail" and "libbitsandbytes_cpu" in row.detail and "BNB_CUDA_VERSION" in row.fix


def test_doctor_refuses_an_unknown_precision(capsys) -> None:
    from shared.cli.main import main

    assert main(["doctor", "--device", "cpu", "--precisions", "int3-magic", "--skip", "host,tiny"]) == 1
    assert "unknown precision(s) int3-magic" in capsys.readouterr().err
