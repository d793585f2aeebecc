"""Speed and memory of one edit-training step on the real-size Qwen-Image-Edit transformer (random weights).

    python3 bench/gpu_step.py [--cases bf16,int8-quanto,nf4-bnb] [--steps 3] [--json out.json]   # from a checkout
    python3 bench/gpu_step.py --cases '*:*:*:*' --steps 5                                         # the whole grid
    python3 bench/gpu_step.py --small --device cpu --steps 1      # CPU smoke run of the same code

Builds QwenImageTransformer2DModel with the real config directly on the device in bf16 (no download, no fp32 copy
anywhere), quantizes it (shared.model.quantize), attaches a rank-16 LoRA in fp32 (shared.model.lora) with AdamW,
and times flow-matching steps (shared.model.flow) for edit-v1 (1 reference) and edit-v2 (3 references) at
512/768/1024 px, with and without gradient checkpointing; then the largest resolution again under a 24 GiB cap
(what fits a 24 GB card). Token counts are the planner's for the same run (references at ~1 MP as the pipelines
size them, the text with the references the VL encoder sees), and each row carries the planner's prediction.
Before timing a precision, one real-width block checks its numerics against bf16 (``edittuner doctor``'s check):
a precision that computes the wrong function is reported "wrong", never timed as "ok".
``--cases`` entries are ``precision[:flavour[:resolution[:ckpt]]]``, e.g. ``bf16,nf4-bnb:edit-v1:1024:on``; the
default is the three shipped precisions at edit-v2, 1024, checkpointing on (a few minutes on an H100).
The FLOP count (model_step_flops) is derived in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from shared import errors
from shared.model.device import free_gpu_memory
from shared.model.lora import attach_lora
from shared.model.quantize import check_precision, quantize_transformer
from shared.plan.probe import build_transformer
from shared.plan.step import step_inputs, time_steps
from shared.plan.tokens import Tokens

REAL = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
    zero_cond_t=False,
)  # edit-v1 / edit-v2 (edit-v3 differs only by zero_cond_t)
SMALL = dict(
    REAL, num_layers=2, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(8, 12, 12)
)
PRECISIONS = {
    "bf16": "no_change",
    "int8-quanto": "int8-quanto",
    "nf4-bnb": "nf4-bnb",
    "fp8-quanto": "fp8-quanto",
    "int4-quanto": "int4-quanto",
    "int8-bnb": "int8-bnb",
}
DEFAULT_CASES = "bf16:edit-v2:1024:on,int8-quanto:edit-v2:1024:on,nf4-bnb:edit-v2:1024:on"
FLAVOURS = {"edit-v1": 1, "edit-v2": 3}  # flavour -> references, each at the target's size
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s; first matching substring of the device name wins.
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),
]
GiB = 2**30


# ------------------------------------------------------------------------------------------------------ FLOPs
def linear_params(cfg: dict) -> tuple[int, int]:
    """(image-stream, text-stream) parameters of the Linears that act on tokens, biases included.

    Per block and stream: q, k, v, out (4·(d² + d)) and the MLP d→4d→d (8d² + 5d) = 12d² + 9d. Image stream adds
    img_in and proj_out, text stream txt_in. The modulation Linears (img_mod, txt_mod, norm_out.linear,
    time_text_embed: ~6.8B of the 20.4B parameters) act on one timestep vector per sample, not on tokens."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    block = 12 * d * d + 9 * d
    out = cfg["patch_size"] ** 2 * cfg["out_channels"]
    p_img = cfg["num_layers"] * block + (cfg["in_channels"] * d + d) + (d * out + out)
    p_txt = cfg["num_layers"] * block + (cfg["joint_attention_dim"] * d + d)
    return p_img, p_txt


def forward_flops(cfg: dict, img_tokens: int, txt_tokens: int) -> tuple[int, int]:
    """(Linear, attention) FLOPs of one forward: 2·P·T per stream, and 4·T²·d per block for QK^T and AV over the
    joint sequence (T = image + text tokens)."""
    p_img, p_txt = linear_params(cfg)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    total = img_tokens + txt_tokens
    return 2 * (p_img * img_tokens + p_txt * txt_tokens), 4 * total * total * d * cfg["num_layers"]


def model_step_flops(cfg: dict, img_tokens: int, txt_tokens: int, checkpointing: bool) -> tuple[int, int]:
    """(model, hardware) FLOPs of one training step on a frozen base with LoRA.

    Backward computes activation gradients only (the base is frozen; LoRA's weight gradients are <1%): 1x the
    forward for a Linear (dX = dY·W), 2x for attention (dQ, dK from dS; dV, dP from dO). Model FLOPs (for MFU) =
    forward + backward = 2·F_lin + 3·F_attn; hardware FLOPs add the recomputed forward of checkpointing."""
    lin, attn = forward_flops(cfg, img_tokens, txt_tokens)
    model = 2 * lin + 3 * attn
    return model, model + (lin + attn if checkpointing else 0)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if device.type != "cuda":
        return None, f"{device.type}: MFU skipped"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, f"{name} ({peak / 1e12:g} TFLOP/s bf16 dense)"
    return None, f"unknown card {name!r}: MFU skipped (pass --peak-tflops)"


# ------------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    precision: str
    flavour: str
    resolution: int
    checkpointing: bool
    cap_gib: float | None = None


@dataclass
class Row:
    precision: str
    flavour: str
    resolution: int
    checkpointing: bool
    cap_gib: float | None
    status: str  # "ok", "OOM", "wrong" (numerics against bf16 failed: not timed) or "failed" (an error, in note)
    s_per_step: float | None
    peak_mem_gib: float | None  # allocated
    memory_source: str
    tokens_target: int
    tokens_refs: int
    tokens_text: int
    tokens_total: int
    model_tflop_per_step: float
    hw_tflop_per_step: float
    mfu: float | None
    peak_reserved_gib: float | None = None  # what the caching allocator held: what the card must have
    predicted_gib: float | None = None  # the planner's trainer total for the same run (real model only)
    predicted_s_per_step: float | None = None
    note: str = ""


def parse_filters(spec: str) -> list[list[str]]:
    filters = [[f for f in item.strip().split(":")] for item in spec.split(",") if item.strip()]
    unknown = sorted({f[0] for f in filters} - set(PRECISIONS) - {"*", ""})
    if unknown:
        raise SystemExit(f"--cases: unknown precision(s) {', '.join(unknown)}; known: {', '.join(PRECISIONS)}")
    return filters


def matches(case: Case, filters: list[list[str]]) -> bool:
    fields = [case.precision, case.flavour, str(case.resolution), "on" if case.checkpointing else "off"]
    return any(all(want in ("", "*", have) for want, have in zip(f, fields, strict=False)) for f in filters)


def plan_cases(precision: str, resolutions: list[int], filters: list[list[str]], cap_gib: float | None) -> list[Case]:
    grid = [Case(precision, fl, res, ck) for fl in FLAVOURS for res in resolutions for ck in (False, True)]
    cases = [c for c in grid if matches(c, filters)]
    if cap_gib:  # the largest resolution again under the cap
        cases += [
            Case(c.precision, c.flavour, c.resolution, c.checkpointing, cap_gib)
            for c in cases
            if c.resolution == max(resolutions)
        ]
    return cases


# ---------------------------------------------------------------------------------------------- model, inputs
def build_model(cfg: dict, precision: str, device: torch.device, quantize_via: str) -> Any:
    """The transformer, initialised in bf16 where it is built (the device, or the CPU with quantize_via=cpu), then
    quantized/frozen, then a rank-16 fp32 LoRA attached."""
    where = torch.device("cpu") if quantize_via == "cpu" else device
    model = build_transformer(cfg, where)
    model = quantize_transformer(
        model, PRECISIONS[precision], device=device, compute_dtype=torch.bfloat16, quantize_via=quantize_via
    )
    attach_lora(model, rank=16, alpha=16.0, dropout=0.0, target_modules=LORA_TARGETS, seed=0, dtype=torch.float32)
    return model.train()


def case_tokens(case: Case, small: bool, text_len: int) -> tuple[int, int, int, Any]:
    """(target, all references, text) tokens and the planner's Plan (None with --small) of ``case``.

    The real model's cases take the planner's counts for the same run: references at ~1 MP each as the pipelines
    size them, the caption plus the reference images the VL encoder reads as text tokens. --small keeps toy counts
    (references at the target's size, ``text_len`` tokens): the planner describes the real model only."""
    tgt = (case.resolution // 16) ** 2
    if small:
        return tgt, tgt * FLAVOURS[case.flavour], text_len, None
    from shared.plan.step import gpu_name, planned

    plan = planned(
        PRECISIONS[case.precision],
        flavour=case.flavour,
        resolution=case.resolution,
        references=FLAVOURS[case.flavour],
        checkpointing=case.checkpointing,
        gpu=gpu_name(torch.device("cuda")) if torch.cuda.is_available() else "H100",
    )
    t = plan.tokens
    return t.target, t.per_reference * t.references, t.text, plan


def make_inputs(cfg: dict, case: Case, tokens: tuple[int, int, int], device: torch.device):
    """The batch, noise and sigma of ``tokens`` (target, all references, text) from seed 0 (shared.plan.step)."""
    tgt, refs, text = tokens
    n = FLAVOURS[case.flavour]
    return step_inputs(Tokens(tgt, refs // n, n, text, 0), cfg["joint_attention_dim"], device)


# -------------------------------------------------------------------------------------------------- timing
def run_case(
    model: Any,
    opt: torch.optim.Optimizer,
    cfg: dict,
    case: Case,
    args: argparse.Namespace,
    device: torch.device,
    peak: float | None,
) -> Row:
    if case.checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    small = getattr(args, "small", True)
    tgt, refs, text, plan = case_tokens(case, small, args.text_len)
    model_f, hw_f = model_step_flops(cfg, tgt + refs, text, case.checkpointing)
    cuda = device.type == "cuda"
    if cuda:
        free_gpu_memory()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, case.cap_gib * GiB / total) if case.cap_gib else 1.0, device
        )
        torch.cuda.reset_peak_memory_stats(device)
    seconds, status, note = None, "ok", ""
    try:
        inputs = make_inputs(cfg, case, (tgt, refs, text), device)
        seconds, _ = time_steps(model, opt, inputs, args.steps, device)
    except torch.OutOfMemoryError as err:
        status = "OOM"
        errors.clear_frames(err)  # its frames hold the step's tensors: dropped before the memory is given back
    except RuntimeError as err:  # a kernel that refuses the shapes, a library error: the row says which
        status, note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        errors.clear_frames(err)
    inputs = None
    opt.zero_grad(set_to_none=True)
    reserved = None
    if cuda:
        mem, source = torch.cuda.max_memory_allocated(device) / GiB, "cuda max_memory_allocated"
        reserved = torch.cuda.max_memory_reserved(device) / GiB
        free_gpu_memory()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    else:
        mem, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu peak RSS (process so far)"
    mfu = model_f / (seconds * peak) if seconds and peak else None
    ok = status == "ok"
    return Row(
        case.precision,
        case.flavour,
        case.resolution,
        case.checkpointing,
        case.cap_gib,
        status,
        seconds,
        mem if ok else None,
        source,
        tgt,
        refs,
        text,
        tgt + refs + text,
        model_f / 1e12,
        hw_f / 1e12,
        mfu,
        reserved if ok else None,
        plan.trainer.total / GiB if plan else None,
        plan.seconds_per_step if plan else None,
        note,
    )


def numerics(precision: str, device: torch.device, small: bool) -> tuple[bool, str]:
    """The doctor's one-block check of ``precision`` against bf16 (relative error, biases, LoRA gradients)."""
    if precision == "bf16":
        return True, ""
    from shared.plan.probe import (
        REAL_BLOCK,
        REAL_TOKENS,
        SMALL_BLOCK,
        SMALL_TOKENS,
        block_inputs,
        build_transformer,
        describe,
        probe_precision,
    )

    cfg, (side, text) = (SMALL_BLOCK, SMALL_TOKENS) if small else (REAL_BLOCK, REAL_TOKENS)
    reference = build_transformer(cfg, device).requires_grad_(False)
    data, problems = probe_precision(PRECISIONS[precision], reference, block_inputs(cfg, side, text, device), device, 1)
    del reference
    free_gpu_memory()
    return not problems, describe(data) + "".join(f"; {p}" for p in problems)


# -------------------------------------------------------------------------------------------------- report
HEADER = (
    f"{'precision':<12} {'flavour':<8} {'res':>5} {'ckpt':<4} {'cap':>6} {'s/step':>8} {'pred':>6} "
    f"{'alloc GiB':>9} {'resv GiB':>9} {'pred GiB':>8} {'tokens (tgt+refs+txt)':>24} {'FLOP model/hw':>15} "
    f"{'MFU':>6}"
)


def si(x: float) -> str:
    """1.065e15 -> '1.07P', 7.4e13 -> '74T'."""
    unit = next(
        ((f, u) for f, u in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if x >= f), (1.0, "")
    )
    return f"{x / unit[0]:.3g}{unit[1]}"


def _num(x: float | None, width: int, fmt: str) -> str:
    return f"{x:>{width}{fmt}}" if x is not None else f"{'-':>{width}}"


def format_row(r: Row) -> str:
    cap = f"{r.cap_gib:g}G" if r.cap_gib else "-"
    toks = f"{r.tokens_target}+{r.tokens_refs}+{r.tokens_text}={r.tokens_total}"
    flops = f"{si(r.model_tflop_per_step * 1e12)}/{si(r.hw_tflop_per_step * 1e12)}"
    head = f"{r.precision:<12} {r.flavour:<8} {r.resolution:>5} {'on' if r.checkpointing else 'off':<4} {cap:>6}"
    pred = f"{_num(r.predicted_s_per_step, 6, '.2f')}"
    pred_gib = _num(r.predicted_gib, 8, ".1f")
    if r.status != "ok":
        return f"{head} {r.status.upper():>8} {pred} {'-':>9} {'-':>9} {pred_gib} {toks:>24} {flops:>15} {'-':>6}" + (
            f"  {r.note}" if r.note else ""
        )
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
    return (
        f"{head} {r.s_per_step:>8.3f} {pred} {r.peak_mem_gib:>9.2f} {_num(r.peak_reserved_gib, 9, '.2f')} "
        f"{pred_gib} {toks:>24} {flops:>15} {mfu:>6}"
    )


def machine(device: torch.device, peak_note: str) -> dict[str, Any]:
    info = {
        "host": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak": peak_note,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, device_memory_gib=round(props.total_memory / GiB, 1), cuda=torch.version.cuda)
    else:
        info["device"] = device.type
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        default=DEFAULT_CASES,
        help="precision[:flavour[:resolution[:ckpt on|off]]],... "
        "('*' for any field; default: the three shipped precisions, edit-v2, 1024, checkpointing)",
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case, after 1 warm-up step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="2 layers, 4 heads of 32, text width 64: a CPU smoke run")
    ap.add_argument(
        "--text-len",
        type=int,
        default=None,
        help="--small's prompt tokens (default 32); the real model's come from the planner",
    )
    ap.add_argument(
        "--cap-gib",
        type=float,
        default=0.0,
        help="repeat the largest-resolution cases under this "
        "memory cap, CUDA only (e.g. 24: what fits a 24 GB card; default 0: none)",
    )
    ap.add_argument("--quantize-via", choices=("accelerator", "cpu"), default="accelerator")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    ap.add_argument("--json", default=None, help="also write the table here as JSON")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # memory-fraction calls want an index
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = SMALL if args.small else REAL
    args.text_len = args.text_len or 32
    resolutions = [64, 128] if args.small else [512, 768, 1024]
    if args.small and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: a second thread only adds barrier stalls (see tests/conftest.py)
    filters = parse_filters(args.cases)
    cap = args.cap_gib if device.type == "cuda" and args.cap_gib else None
    peak, peak_note = peak_flops(device, args.peak_tflops)
    info = machine(device, peak_note)
    print("machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    print(
        f"model: {'SMALL' if args.small else 'real'} {cfg}; LoRA rank 16 on {','.join(LORA_TARGETS)} (fp32), "
        f"AdamW; bf16 compute; text {f'{args.text_len} tokens' if args.small else 'tokens from the planner'}; "
        f"batch 1; {args.steps} timed steps after 1 warm-up"
    )
    rows: list[Row] = []
    skipped: list[dict[str, str]] = []
    builds: list[dict[str, Any]] = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(
                    {
                        "machine": info,
                        "config": {
                            **cfg,
                            "text_len": args.text_len if args.small else None,
                            "steps": args.steps,
                            "small": args.small,
                            "lora_rank": 16,
                            "targets": LORA_TARGETS,
                        },
                        "builds": builds,
                        "rows": [asdict(r) for r in rows],
                        "skipped": skipped,
                    },
                    fh,
                    indent=1,
                )

    def not_timed(cases: list[Case], status: str, note: str) -> None:
        for case in cases:
            tgt, refs, text, plan = case_tokens(case, args.small, args.text_len)
            model_f, hw_f = model_step_flops(cfg, tgt + refs, text, case.checkpointing)
            rows.append(
                Row(
                    case.precision,
                    case.flavour,
                    case.resolution,
                    case.checkpointing,
                    case.cap_gib,
                    status,
                    None,
                    None,
                    "-",
                    tgt,
                    refs,
                    text,
                    tgt + refs + text,
                    model_f / 1e12,
                    hw_f / 1e12,
                    None,
                    None,
                    plan.trainer.total / GiB if plan else None,
                    plan.seconds_per_step if plan else None,
                    note,
                )
            )
            print(format_row(rows[-1]), flush=True)
        save()

    print(HEADER)
    for precision in PRECISIONS:
        cases = plan_cases(precision, resolutions, filters, cap)
        if not cases:
            continue
        try:
            check_precision(PRECISIONS[precision], device)
        except errors.InvalidInput as err:
            print(f"{precision:<12} skipped: {err}")
            skipped.append({"precision": precision, "reason": str(err)})
            continue
        try:
            good, why = numerics(precision, device, args.small)
        except Exception as err:  # noqa: BLE001 - the row says what broke; the other precisions still run
            good, why = False, f"the numerics check failed: {type(err).__name__}: {str(err)[:200]}"
        if not good:
            not_timed(cases, "wrong", why)
            continue
        t0 = time.perf_counter()
        model, failure = None, None
        try:
            model = build_model(cfg, precision, device, args.quantize_via)
        except torch.OutOfMemoryError as err:
            failure = ("OOM", "out of memory while building and quantizing the model")
            errors.clear_frames(err)
        except Exception as err:  # noqa: BLE001
            failure = ("failed", f"build: {type(err).__name__}: {str(err)[:200]}")
            errors.clear_frames(err)
        if failure is not None:  # out of the except block: the error no longer holds the half-built model
            free_gpu_memory()
            not_timed(cases, *failure)
            continue
        weights = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
        builds.append({"precision": precision, "build_s": time.perf_counter() - t0, "weights_gib": weights})
        print(
            f"# {precision}: built in {builds[-1]['build_s']:.1f} s"
            + (f", {weights:.2f} GiB resident (weights + LoRA)" if weights is not None else "")
        )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        for case in cases:
            rows.append(run_case(model, opt, cfg, case, args, device, peak))
            print(format_row(rows[-1]), flush=True)
            save()  # after every row: a run that dies later keeps what it measured
        del model, opt, params
        free_gpu_memory()
    save()


if __name__ == "__main__":
    main()
