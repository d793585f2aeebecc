"""Predict what a run needs on a GPU — memory per service, tokens, FLOPs, seconds per step — before it starts.

The model, service by service:

- trainer = base weights (bytes per weight by ``base_model_precision``; biases, ``KEEP_HIGH_PRECISION`` modules
  and non-Linear parameters stay in the compute dtype) + LoRA (fp32 weights + fp32 grads + AdamW state; EMA lives
  on the CPU) + activations + a fixed CUDA overhead.
- encoder = Qwen2.5-VL text encoder + VAE (compute dtype) + the larger of the VAE's encode working set (one batch
  of ``DatasetEncoder`` images at ~1 MP) and the text encoder's forward.
- eval = transformer at the run's precision + text encoder + VAE + the largest of: no-grad denoising step, text
  encoder forward, VAE decode.

Everything that is not counted or measured is listed in ``Plan.assumptions``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared import errors
from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.model.rollout import Rollout
from shared.plan.counts import component_params, lora_params, lora_targets, transformer_counts
from shared.plan.flops import MFU_BF16, MFU_QUANTIZED, step_flops
from shared.plan.gpus import fmt_gib, gpu_spec
from shared.plan.memory import (
    CUDA_OVERHEAD,
    LORA_STATE_BYTES,
    VAE_DECODE_BYTES,
    VAE_ENCODE_BYTES,
    dtype_bytes,
    inference_activation_bytes,
    text_encoder_activation_bytes,
    training_activation_bytes,
    transformer_weight_bytes,
)
from shared.plan.recommend import recommend_overrides
from shared.plan.tokens import CAPTION_TOKENS, VL_PIXELS_PER_TOKEN, Tokens, eval_tokens, training_tokens

NCCL_BUFFER_BYTES = 512 * 2 ** 20
INTRA_NODE_BYTES_S = 150e9  # NCCL all-reduce bus bandwidth within an NVLink machine: assumed
INTER_NODE_BYTES_S = 20e9  # between machines (200 Gb/s InfiniBand): assumed


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ServicePlan:
    name: str
    breakdown: dict[str, int]
    memory_bytes: int  # the GPU it is compared with

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.memory_bytes


@dataclass
class Plan:
    """What a run needs. ``fits`` and ``recommendation`` are about the trainer, the service that runs out."""

    model: str
    flavour: str
    precision: str
    checkpointing: bool
    lora_rank: int
    batch: int
    micro_batches: int  # gradient_accumulation_steps: one optimizer step runs this many forward/backward passes
    gpu: str
    gpu_memory_bytes: int
    services: dict[str, ServicePlan]
    tokens: Tokens
    eval_tokens: Tokens
    parameters: dict[str, int]
    flops_per_step: float  # hardware FLOPs: with checkpointing's recomputed forward
    model_flops_per_step: float  # forward + backward only: what bench/gpu_step.py divides by for its MFU
    seconds_per_step: float
    mfu: float
    fits: bool
    recommendation: list[str] = field(default_factory=list)
    recommended_bytes: int | None = None  # the trainer's prediction with the recommendation applied
    assumptions: list[str] = field(default_factory=list)
    gpus: int = 1  # data parallel processes (num_processes x num_machines): the trainer's figures are per GPU
    allreduce_seconds: float = 0.0  # of seconds_per_step: the LoRA gradients' all-reduce, once per step
    host_load_bytes: int = 0  # host RAM for the base while loading: the processes of a machine load in turns
    rollout_forwards: float = 0.0  # scheduled sampling: mean forwards without gradient per sample, in the FLOPs

    @property
    def trainer(self) -> ServicePlan:
        return self.services["trainer"]


def _dp_assumptions(machines: int) -> list[str]:
    link = (f"the network at {INTER_NODE_BYTES_S / 1e9:g}" if machines > 1 else
            f"NVLink at {INTRA_NODE_BYTES_S / 1e9:g}")
    return [f"data parallel: NCCL buffers {fmt_gib(NCCL_BUFFER_BYTES)} per GPU, assumed; the all-reduce of the fp32 "
            f"LoRA gradients over {link} GB/s bus bandwidth, assumed, not overlapped with the backward (it is in "
            "part)",
            "host RAM while loading: one copy of the base in the compute dtype, as the processes of a machine "
            "load in turns (start-up takes that many loads)"]


def _assumptions(gpu: str, mfu: float, compute_bytes: int) -> list[str]:
    fp32 = ["mixed_precision fp32: activations taken as twice the bf16 measurement (approximate)"]
    return (fp32 if compute_bytes == 4 else []) + [
        f"fixed CUDA overhead {fmt_gib(CUDA_OVERHEAD)} per service (context, workspaces, allocator slack): assumed",
        f"seconds/step = hardware FLOPs (with checkpointing's recompute) / ({gpu} peak bf16 x MFU {mfu:.2f}); the "
        "MFU is an assumption until bench/gpu_step.py measures it (it reports MFU on model FLOPs, without the "
        "recompute)",
        "activation constants measured on CPU kernels (saved tensors + peak live bytes); CUDA's attention kernels "
        "save the same q/k/v/output/logsumexp, so the same bytes are expected: not yet checked on a GPU",
        f"tokens per sample: caption ~{CAPTION_TOKENS} text tokens + {VL_PIXELS_PER_TOKEN} px per VL image token; "
        "square buckets at each dataset's area (other aspect ratios have about as many tokens)",
        "text encoder activations are an estimate (hidden states of every layer + all-position logits), not measured",
        "eval is planned at the run's base_model_precision; eval_svc loads the pipeline without quantizing today, "
        "so it needs the no_change weight figure until it does",
    ]


def _rollout_assumptions(rollout: Rollout, forwards: float) -> list[str]:
    return [f"scheduled sampling: {forwards:.2g} forwards without gradient per sample (share "
            f"{rollout.prob_end if rollout.ramp_steps > 0 else rollout.probability:g} x mean rollout length, "
            f"{rollout.strategy} up to {rollout.max_step_offset}; after any ramp), counted at the forward's FLOPs: "
            "an upper bound, as a sigma near 1 has fewer inference steps above it; their memory (one forward "
            "without saved activations, before the training forward) is taken to stay under the training step's"]


def processes(run: RunConfig) -> int:
    t = run.train
    return (1 if t.num_processes == "auto" else int(t.num_processes)) * t.num_machines


def allreduce_seconds(lora_params: int, gpus: int, machines: int = 1) -> float:
    """A ring all-reduce of the fp32 LoRA gradients: 2 (N-1)/N of their bytes over the slowest link."""
    if gpus <= 1:
        return 0.0
    bandwidth = INTER_NODE_BYTES_S if machines > 1 else INTRA_NODE_BYTES_S
    return 2 * (gpus - 1) / gpus * lora_params * 4 / bandwidth


def plan_run(run: RunConfig, gpu_memory_bytes: int | None = None, gpu: str = "H100", *,
             recommend: bool = True, gpus: int | None = None) -> Plan:
    """Predict memory per service, tokens, FLOPs and seconds per step of ``run`` on ``gpu``; when the trainer does
    not fit ``gpu_memory_bytes`` (default: the GPU's memory), search for overrides that make it fit. ``gpus``
    (default: num_processes x num_machines) data parallel processes: the trainer's memory is per GPU, the step
    time is one GPU's share of the micro-batches plus the gradient all-reduce."""
    name, peak_flops, default_memory = gpu_spec(gpu)
    memory = int(gpu_memory_bytes) if gpu_memory_bytes is not None else default_memory
    t = run.train
    flav = get_flavour(t.model_flavour)
    cb = dtype_bytes(t.mixed_precision)
    counts = transformer_counts(t.model_path)
    targets = lora_targets(counts, list(t.lora_target_modules))
    tokens = training_tokens(run)
    zero_cond = bool(counts.config.get("zero_cond_t", flav.zero_cond_t))

    weights = transformer_weight_bytes(counts, t.base_model_precision, cb)
    n_lora = lora_params(targets, t.lora_rank)
    acts = training_activation_bytes(counts, tokens, targets, t.lora_rank, checkpointing=t.gradient_checkpointing,
                                     precision=t.base_model_precision, zero_cond=zero_cond,
                                     batch=t.train_batch_size)
    acts = {k: v * cb // 2 for k, v in acts.items()}  # measured in bf16; fp32 compute: about twice
    trainer = {**weights, f"LoRA {n_lora / 1e6:.1f}M params + grads + {t.optimizer}":
               n_lora * LORA_STATE_BYTES[t.optimizer], **acts, "CUDA overhead": CUDA_OVERHEAD}
    n_gpus = gpus or processes(run)
    if n_gpus > 1:  # DDP's buckets are the gradients themselves (gradient_as_bucket_view); NCCL's own buffers
        trainer["NCCL buffers"] = NCCL_BUFFER_BYTES

    te_params, vae_params, base_dim = component_params(t.model_path)
    vl_area = t.model_kwargs.vl_reference_area or flav.vl_ref_area
    te_acts = text_encoder_activation_bytes(tokens, tokens.references, vl_area)
    # a batch of the largest images
    batch_px = run.train.vae_batch_size * 256 * max(tokens.target, tokens.per_reference)
    encoder = {"text encoder": te_params * cb, "VAE": vae_params * cb,
               "working set (max of VAE encode, text encoder)": int(max(VAE_ENCODE_BYTES * base_dim * batch_px,
                                                                        te_acts)),
               "CUDA overhead": CUDA_OVERHEAD}
    ev_tokens = eval_tokens(run, tokens)
    vw, vh = t.validation_size
    ev = {**{f"transformer {k}": v for k, v in weights.items()}, "LoRA (compute dtype)": n_lora * cb,
          "text encoder": te_params * cb, "VAE": vae_params * cb,
          "working set (max of denoise step, text encoder, VAE decode)": int(max(
              inference_activation_bytes(counts, ev_tokens), te_acts, VAE_DECODE_BYTES * base_dim * vw * vh)),
          "CUDA overhead": CUDA_OVERHEAD}

    flops = step_flops(counts, tokens, targets, t.lora_rank, checkpointing=t.gradient_checkpointing)
    rollout = Rollout.from_config(t)
    rollout_forwards = rollout.expected_steps() if rollout is not None else 0.0
    flops["rollout"] = rollout_forwards * flops["forward"]  # the same forward, at batch size or below
    samples = t.train_batch_size * t.gradient_accumulation_steps
    per_step = sum(flops.values()) * samples
    mfu = MFU_BF16 if t.base_model_precision == "no_change" else MFU_QUANTIZED
    services = {"trainer": ServicePlan("trainer", trainer, memory), "encoder": ServicePlan("encoder", encoder, memory),
                "eval": ServicePlan("eval", ev, memory)}
    plan = Plan(model=t.model_path, flavour=t.model_flavour, precision=t.base_model_precision,
                checkpointing=t.gradient_checkpointing, lora_rank=t.lora_rank, batch=t.train_batch_size,
                micro_batches=t.gradient_accumulation_steps, gpu=name,
                gpu_memory_bytes=memory, services=services, tokens=tokens, eval_tokens=ev_tokens,
                parameters={"transformer": counts.total, "text encoder": te_params, "VAE": vae_params,
                            "LoRA": n_lora},
                flops_per_step=per_step, model_flops_per_step=(flops["forward"] + flops["backward"]) * samples,
                seconds_per_step=per_step / n_gpus / (peak_flops * mfu) + allreduce_seconds(n_lora, n_gpus,
                                                                                           t.num_machines), mfu=mfu,
                fits=services["trainer"].fits, assumptions=_assumptions(name, mfu, cb) + (
                    _dp_assumptions(t.num_machines) if n_gpus > 1 else []) + (
                    _rollout_assumptions(rollout, rollout_forwards) if rollout is not None else []),
                gpus=n_gpus, allreduce_seconds=allreduce_seconds(n_lora, n_gpus, t.num_machines),
                host_load_bytes=counts.total * cb, rollout_forwards=rollout_forwards)
    if recommend and not plan.fits:
        plan.recommendation, plan.recommended_bytes = recommend_overrides(run, memory, name, plan_run)
    return plan


# ---------------------------------------------------------------------------------------------- fit check
def check_fits(run: RunConfig, device: torch.device | str, *, total_bytes: int | None = None) -> None:
    """Raise ResourceExhausted when the trainer's prediction exceeds the memory of CUDA ``device`` (its total, from
    torch.cuda.mem_get_info unless ``total_bytes`` is given). No check on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    gpu = "H100"
    if total_bytes is None:
        total_bytes = torch.cuda.mem_get_info(device)[1]
        try:
            gpu = gpu_spec(torch.cuda.get_device_name(device))[0]
        except errors.InvalidInput:
            pass
    plan = plan_run(run, total_bytes, gpu)
    if plan.fits:
        return
    tr = plan.trainer
    parts = ", ".join(f"{k} {fmt_gib(v)}" for k, v in tr.breakdown.items())
    advice = ("try " + " ".join(plan.recommendation) + f" (predicted {fmt_gib(plan.recommended_bytes or 0)}); "
              if plan.recommendation else "no searched setting fits this GPU; ")
    raise errors.ResourceExhausted(
        f"the run will not fit on {device}: the trainer needs about {fmt_gib(tr.total)} of GPU memory ({parts}) but "
        f"{device} has {fmt_gib(total_bytes)} in total. {advice}or pass skip_fit_check=true to try anyway "
        "(see `edittuner plan` for the full prediction)")
