"""What backward keeps with a frozen GGUF / fp8 base: one training step (forward + backward) of the real
``QwenImageTransformer2DModel`` class, random weights, at a width where the weights outweigh the activations, with a
rank-16 LoRA (fp32 adapters) on to_q,to_k,to_v,to_out.0 and bf16 compute, for

- ``Q8_0``, ``Q4_0``: the model written to a GGUF and loaded by ``load_transformer_file`` (``FrozenGGUFLinear``:
  the weight is dequantized again in backward, nothing weight-sized is saved);
- ``Q8_0 stock``: the same file with diffusers' own ``GGUFLinear.forward`` bound back on every such layer
  (``F.linear`` over the dequantized weight: autograd saves it, as ``W.t()``, in each layer whose input needs grad);
- ``fp8_scaled``: ComfyUI's fp8_scaled safetensors (``Fp8Linear``);
- ``bf16``: the plain model (no file) as the reference,

each without and with gradient checkpointing. Per case: the bytes autograd saves for backward (a saved-tensors
pack hook, each storage once, parameters and buffers excluded, tensor subclasses included), the part of it shaped
like a Linear's weight ((out, in) or (in, out)), the peak bytes above the resident model during the step (CPU: the
``live_bytes`` dispatch-mode tracker; CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what
was allocated before the step) and the median wall time of ``--steps`` steps. The LoRA gradients of ``Q8_0`` and
``Q8_0 stock`` are asserted equal (max |diff| <= 1e-6 of the largest gradient).

    .venv/bin/python bench/frozen_linear.py [--heads 4] [--blocks 4] [--joint-dim 64] [--image-tokens 144]
                                            [--text-tokens 32] [--steps 5] [--threads 2] [--device auto]

Random weights, files written to a temporary folder (no download); prints figures with the machine they came from.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shared.model.lora import attach_lora
from shared.model.single_file import inspect_transformer_file, load_transformer_file
from shared.model.tiny_files import write_comfy_safetensors, write_gguf
from shared.plan.measure import _storage_ptrs, live_bytes

FLAVOUR = "edit-v2"  # a QwenImageTransformer2DModel flavour: what inspect_transformer_file checks the file against
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CASES = ("bf16", "Q8_0", "Q8_0 stock", "Q4_0", "fp8_scaled")
MIB = 2**20


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def random_model(args: argparse.Namespace) -> Any:
    """The real class, ``heads`` x 128 wide, random weights (fp32, diffusers' own init)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        num_layers=args.blocks,
        attention_head_dim=128,
        num_attention_heads=args.heads,
        joint_attention_dim=args.joint_dim,
        axes_dims_rope=(16, 56, 56),
    )


def build(case: str, base: Any, files: dict[str, Path], rank: int, device: torch.device) -> tuple[Any, int]:
    """``case``'s model as the trainer leaves it (frozen bf16-compute base, fp32 LoRA, train mode) on ``device``,
    and the number of layers given back diffusers' stock forward."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    config = dict(base.config)
    if case == "bf16":
        model = bf16_copy(base)
    else:
        path = files[case.split()[0]]
        model = load_transformer_file(
            inspect_transformer_file(path, FLAVOUR, config), FLAVOUR, config, dtype=torch.bfloat16
        )
    attach_lora(model, rank, float(rank), 0.0, TARGETS, seed=0, dtype=torch.float32)
    # B = 0 at init would leave every A gradient zero: a small random B (the same in every case) makes the
    # gradient comparison cover both matrices and the LoRA path a live one, as after a few optimizer steps.
    g = torch.Generator().manual_seed(1)
    for n, p in sorted(model.named_parameters()):
        if p.requires_grad and "lora_B" in n:
            p.data = 0.01 * torch.randn(p.shape, generator=g)
    stock = 0
    if case.endswith("stock"):
        for m in model.modules():
            if isinstance(m, GGUFLinear):
                m.forward = GGUFLinear.forward.__get__(m)  # type: ignore[method-assign]
                stock += 1
    return model.to(device).train(), stock


def bf16_copy(base: Any) -> Any:
    """A bf16 copy of ``base`` (the reference: no file, plain ``nn.Linear``)."""
    import copy

    return copy.deepcopy(base).to(torch.bfloat16).requires_grad_(False)


def step_inputs(model: Any, img: int, txt: int, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    side = math.isqrt(img)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(1, img, model.config.in_channels, generator=g).bfloat16().to(device),
        encoder_hidden_states=torch.randn(1, txt, model.config.joint_attention_dim, generator=g).bfloat16().to(device),
        encoder_hidden_states_mask=torch.ones(1, txt, dtype=torch.bool, device=device),
        timestep=torch.tensor([0.5]).bfloat16().to(device),
        img_shapes=[[(1, side, side)]],
        return_dict=False,
    )
    target = torch.randn(1, img, model.config.out_channels * 4, generator=g).to(device)
    return kwargs, target


def train_step(
    model: Any, inputs: dict[str, Any], target: torch.Tensor, saved: Callable[[], Any] | None = None
) -> None:
    """Forward (under ``saved``'s context when given) and backward of a flow-matching-style MSE."""
    if saved is None:
        out = model(**inputs)[0]
    else:
        with saved():
            out = model(**inputs)[0]
    (out.float() - target).square().mean().backward()


def resident(model: Any) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: Any, inputs: dict[str, Any], target: torch.Tensor, device: torch.device) -> dict:
    """One case at the model's current checkpointing setting: saved bytes, weight-shaped saved bytes, peak bytes
    above the resident model and the LoRA gradients of the first step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # first step: warm-up (allocator, kernel choice) and the gradients compared across cases
    train_step(model, inputs, target)
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in named if p.grad is not None}
    assert len(grads) == len(named), "every LoRA parameter gets a gradient"
    model.zero_grad(set_to_none=True)

    # what autograd saves: each storage once, parameters and buffers (and the GGUF/fp8 bytes) excluded; no type
    # filter, so a dequantized weight that comes back as a tensor subclass still counts
    skip = {p for t in [*model.parameters(), *model.buffers()] for p in _storage_ptrs(t)}
    shapes: set[tuple[int, ...]] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            shapes |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
    saved: dict[int, int] = {}
    weight_like: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr = s.data_ptr()
        if ptr in skip:
            return t
        saved[ptr] = max(saved.get(ptr, 0), s.nbytes())
        if tuple(t.shape) in shapes:
            weight_like.add(ptr)
        return t

    train_step(model, inputs, target, lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    model.zero_grad(set_to_none=True)

    # peak bytes above the resident model
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, inputs, target)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        mode = live_bytes([*model.parameters(), *model.buffers()])
        with mode:
            train_step(model, inputs, target)
        peak = mode.peak
    model.zero_grad(set_to_none=True)
    return dict(saved=sum(saved.values()), weight=sum(saved[p] for p in weight_like), peak=peak, grads=grads)


def timed_step(model: Any, inputs: dict[str, Any], target: torch.Tensor, ckpt: bool, device: torch.device) -> float:
    (model.enable_gradient_checkpointing if ckpt else model.disable_gradient_checkpointing)()
    sync(device)
    t0 = time.perf_counter()
    train_step(model, inputs, target)
    sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over every LoRA gradient, relative to the largest |a|."""
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    assert scale > 0, "all-zero gradients compare nothing"
    return diff / scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=4, help="width = heads x 128")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--joint-dim", type=int, default=64, help="text embedding width (joint_attention_dim)")
    ap.add_argument("--image-tokens", type=int, default=144, help="a square")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--steps", type=int, default=5, help="timed rounds: one step of every case and setting each; medians"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    args = ap.parse_args()
    if math.isqrt(args.image_tokens) ** 2 != args.image_tokens:
        ap.error("--image-tokens must be a square (the image is side x side patches)")
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    from diffusers.quantizers.gguf import utils as gguf_utils
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the bf16 reference's ``.to(bfloat16)`` warns about fp32 modules (none)

    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, device {device}{gpu}"
    )
    if device.type == "cuda" and gguf_utils.ops is not None:
        print("note: diffusers' GGUF CUDA kernels are loaded: 'Q8_0 stock' runs its fused forward_cuda, not F.linear")

    base = random_model(args)
    d = 128 * args.heads
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear)]
    dims = {x for m in linears for x in (m.in_features, m.out_features)}
    clash = {args.image_tokens, args.text_tokens, args.image_tokens + args.text_tokens} & dims
    if clash:
        print(f"warning: token count(s) {sorted(clash)} equal a Linear dimension: activations may count as weights")
    n_weights = sum(m.weight.numel() for m in linears)
    print(
        f"setup: QwenImageTransformer2DModel, {args.blocks} blocks, width {d} ({args.heads} heads of 128), "
        f"joint_attention_dim {args.joint_dim}, {n_weights / 1e6:.1f}M Linear weights ({2 * n_weights / MIB:.1f} MiB "
        f"bf16); {args.image_tokens} image + {args.text_tokens} text tokens, batch 1; LoRA rank {args.rank} fp32 on "
        f"{','.join(TARGETS)}; bf16 compute; {args.steps} timed steps per case after 1 warm-up, in interleaved rounds"
    )

    results: dict[tuple[str, bool], dict] = {}
    t_start = time.perf_counter()
    models: dict[str, tuple[Any, dict[str, Any], torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sd = {k: v.detach() for k, v in base.state_dict().items()}
        files = {"Q8_0": Path(tmp) / "q8_0.gguf", "Q4_0": Path(tmp) / "q4_0.gguf"}
        for kind, path in files.items():
            write_gguf(sd, path, kind)
        files["fp8_scaled"] = Path(tmp) / "fp8_scaled.safetensors"
        write_comfy_safetensors(sd, files["fp8_scaled"], "fp8_scaled")
        for case in CASES:
            model, stock = build(case, base, files, args.rank, device)
            if case.endswith("stock"):
                print(f"'{case}': diffusers' GGUFLinear.forward bound back on {stock} layers")
            inputs, target = step_inputs(model, args.image_tokens, args.text_tokens, device)
            models[case] = model, inputs, target
    for case, (model, inputs, target) in models.items():
        for ckpt in (False, True):
            (model.enable_gradient_checkpointing if ckpt else model.disable_gradient_checkpointing)()
            results[case, ckpt] = measure(model, inputs, target, device)
            results[case, ckpt]["resident"] = resident(model)
            results[case, ckpt]["times"] = []
    # timing in interleaved rounds (one step of every case and setting per round), medians of single steps: a
    # shared machine's load drifts over a run, and timing one case after the other puts that drift into the ratios
    for _ in range(args.steps):
        for case, (model, inputs, target) in models.items():
            for ckpt in (False, True):
                results[case, ckpt]["times"].append(timed_step(model, inputs, target, ckpt, device))
    for r in results.values():
        r["seconds"] = statistics.median(r["times"])
    elapsed = time.perf_counter() - t_start

    peak_what = "max_memory_allocated above the resident model" if device.type == "cuda" else "live_bytes peak"
    print(f"\nper step; saved: autograd's saved tensors (parameters excluded); peak: {peak_what}")
    header = (
        f"{'case':<11} {'ckpt':<4} {'model MiB':>9} {'saved MiB':>9} {'weight-shaped':>13} {'peak MiB':>9} "
        f"{'ms/step':>8} {'peak / bf16':>11}"
    )
    print(header)
    for ckpt in (False, True):
        for case in CASES:
            r = results[case, ckpt]
            ref = results["bf16", ckpt]
            print(
                f"{case:<11} {'on' if ckpt else 'off':<4} {r['resident'] / MIB:>9.1f} {r['saved'] / MIB:>9.2f} "
                f"{r['weight'] / MIB:>13.2f} {r['peak'] / MIB:>9.2f} {1000 * r['seconds']:>8.1f} "
                f"{r['peak'] / ref['peak']:>11.2f}"
            )
    print("\nQ8_0: diffusers' stock GGUFLinear against ours (FrozenGGUFLinear)")
    for ckpt in (False, True):
        ours, stock = results["Q8_0", ckpt], results["Q8_0 stock", ckpt]
        rel = grad_diff(stock["grads"], ours["grads"])
        print(
            f"  checkpointing {'on ' if ckpt else 'off'}: saved stock / ours {stock['saved'] / ours['saved']:.2f} "
            f"({(stock['saved'] - ours['saved']) / MIB:+.2f} MiB, of which weight-shaped "
            f"{(stock['weight'] - ours['weight']) / MIB:+.2f}); peak stock / ours {stock['peak'] / ours['peak']:.2f} "
            f"({(stock['peak'] - ours['peak']) / MIB:+.2f} MiB); time ours / stock "
            f"{ours['seconds'] / stock['seconds']:.2f}; LoRA gradients max |diff| {rel:.2e} of the largest"
        )
        assert rel <= 1e-6, f"ours and stock LoRA gradients differ: {rel:.3e} relative"
    print(f"\ntotal {elapsed:.0f} s")


if __name__ == "__main__":
    main()
