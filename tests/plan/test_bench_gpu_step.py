"""bench/gpu_step.py: the FLOP count against hand arithmetic, the parameter split against the real module tree, the
OOM path, and an end-to-end CPU smoke run of the script (--small) with its JSON table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # runs the GPU-step bench as a process

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_step.py"

# 1 block, 1 head of 8 (d = 8), text width 8; rope axes sum to the head dim.
TOY = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=1,
    joint_attention_dim=8,
    guidance_embeds=False,
    axes_dims_rope=(2, 2, 4),
    zero_cond_t=False,
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_flops_of_a_one_block_toy_by_hand(bench):
    # Per block and stream, d = 8: q, k, v, out = 4·(8·8 + 8) = 288; MLP 8->32->8 = (8·32 + 32) + (32·8 + 8) = 552;
    # together 840 (= 12d² + 9d). Image stream + img_in (64·8 + 8 = 520) + proj_out (8·64 + 64 = 576) = 1936.
    # Text stream + txt_in (8·8 + 8 = 72) = 912.
    assert bench.linear_params(TOY) == (1936, 912)
    # 10 image tokens, 3 text tokens: Linear 2·(1936·10 + 912·3) = 44192; attention 4·13²·8·1 = 5408.
    assert bench.forward_flops(TOY, 10, 3) == (44192, 5408)
    # Step, frozen base: forward + activation gradients = 2·44192 + 3·5408 = 104608 model FLOPs; checkpointing
    # recomputes one forward on the hardware: 104608 + 44192 + 5408 = 154208.
    assert bench.model_step_flops(TOY, 10, 3, checkpointing=False) == (104608, 104608)
    assert bench.model_step_flops(TOY, 10, 3, checkpointing=True) == (104608, 154208)


@pytest.mark.parametrize("config", ["TOY", "REAL"])
def test_linear_params_match_the_module_tree(bench, config):
    """The analytic split equals the Linears of the real class, by stream; the rest act on the timestep only."""
    from diffusers import QwenImageTransformer2DModel

    cfg = TOY if config == "TOY" else bench.REAL
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**cfg)
    img = ("img_in", "proj_out", ".to_q", ".to_k", ".to_v", ".to_out.0", ".img_mlp.")
    txt = ("txt_in", ".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out", ".txt_mlp.")
    per_sample = ("_mod.", "time_text_embed.", "norm_out.")
    counts = {"img": 0, "txt": 0, "per_sample": 0}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            kind = [
                k
                for k, keys in (("img", img), ("txt", txt), ("per_sample", per_sample))
                if any(key in name or name.startswith(key) for key in keys)
            ]
            assert len(kind) == 1, name
            counts[kind[0]] += sum(p.numel() for p in m.parameters())
    assert (counts["img"], counts["txt"]) == bench.linear_params(cfg)
    if config == "REAL":  # 20.43B in all: the token Linears 13.6B, the timestep modulation 6.8B, norms the rest
        assert sum(p.numel() for p in model.parameters()) == 20_430_401_088


def test_oom_case_reports_oom(bench, monkeypatch):
    class Stub:
        def enable_gradient_checkpointing(self): ...
        def disable_gradient_checkpointing(self): ...
        def zero_grad(self, set_to_none=True): ...

    def oom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "time_steps", oom)
    args = type("Args", (), {"text_len": 32, "steps": 1})()
    case = bench.Case("bf16", "edit-v2", 128, True, 24.0)
    row = bench.run_case(Stub(), Stub(), bench.SMALL, case, args, torch.device("cpu"), None)
    assert (row.status, row.s_per_step, row.peak_mem_gib, row.mfu) == ("OOM", None, None, None)
    assert (row.tokens_target, row.tokens_refs, row.tokens_text) == (64, 192, 32)


def test_case_filters(bench):
    filters = bench.parse_filters("bf16,nf4-bnb:edit-v1:64:off")
    cases = bench.plan_cases("nf4-bnb", [64, 128], filters, None)
    assert [(c.flavour, c.resolution, c.checkpointing) for c in cases] == [("edit-v1", 64, False)]
    capped = bench.plan_cases("bf16", [64, 128], filters, 24.0)
    assert len(capped) == 8 + 4 and all(c.resolution == 128 for c in capped if c.cap_gib == 24.0)
    with pytest.raises(SystemExit):
        bench.parse_filters("int3-magic")


def test_small_cpu_run_writes_the_table(bench, tmp_path):
    out = tmp_path / "gpu_step.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--small",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--cases",
            "bf16,int8-quanto,nf4-bnb:edit-v1:64:off",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = json.loads(out.read_text())
    rows = table["rows"]
    expected = {
        (p, f, r, c)
        for p in ("bf16", "int8-quanto")
        for f in ("edit-v1", "edit-v2")
        for r in (64, 128)
        for c in (False, True)
    } | {("nf4-bnb", "edit-v1", 64, False)}
    got = [(r["precision"], r["flavour"], r["resolution"], r["checkpointing"]) for r in rows]
    assert sorted(got) == sorted(expected)  # each case exactly once; no capped rows on the CPU
    for r in rows:
        assert r["status"] == "ok" and r["s_per_step"] > 0 and r["cap_gib"] is None and r["mfu"] is None
        refs = {"edit-v1": 1, "edit-v2": 3}[r["flavour"]]
        assert r["tokens_target"] == (r["resolution"] // 16) ** 2 and r["tokens_refs"] == refs * r["tokens_target"]
        assert r["tokens_total"] == r["tokens_target"] + r["tokens_refs"] + 32
        model, hw = bench.model_step_flops(bench.SMALL, r["tokens_target"] + r["tokens_refs"], 32, r["checkpointing"])
        assert r["model_tflop_per_step"] * 1e12 == pytest.approx(model)
        assert r["hw_tflop_per_step"] * 1e12 == pytest.approx(hw)
        assert (hw > model) == r["checkpointing"]
    assert table["config"]["num_layers"] == 2 and table["machine"]["device"] == "cpu"
    assert "bf16" in proc.stdout and "nf4-bnb" in proc.stdout
