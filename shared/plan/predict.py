"""Predict what a run needs on a GPU — memory per service, tokens, FLOPs, seconds per step — before it starts.

The model, service by service:

- trainer = base weights (bytes per weight by ``base_model_precision``; biases, ``KEEP_HIGH_PRECISION`` modules
  and non-Linear parameters stay in the compute dtype; from a quantized single file, its Linears' own bytes and a
  dequantization working set: ``shared.plan.single_file``) + LoRA (fp32 weights + fp32 grads + AdamW state; EMA
  lives on the CPU) + activations + a fixed CUDA overhead.
- encoder = Qwen2.5-VL text encoder (at ``text_encoder_1_precision``) + VAE (compute dtype) + the larger of the
  VAE's encode working set (a batch of ``vae_batch_size`` images, one with ``vae_enable_slicing``, a 256-pixel tile
  with ``vae_enable_tiling``) and the text encoder's forward.
- eval = transformer at the run's precision (+ the unquantized one with ``validation_on_full_precision``) + VAE +
  the larger of a no-grad denoising step and the VAE decode
  (tiled with ``vae_enable_tiling``); the preview samples' embeddings are cached, so no text encoder — except with
  ``conditioning_multidataset_sampling=random``, whose cache entries see one reference each.
- per GPU (``shared.plan.placement``): the encoder runs alone (the trainer has it release first); while training,
  the trainer and eval_svc share their GPU's memory if they share a GPU. When the two do not fit together,
  validations render inside the training worker on its resident transformer (``validation`` says which): the
  trainer's weights and optimizer state + the VAE + the render's working set, in the memory training's
  activations used between steps.

Everything that is not counted or measured is listed in ``Plan.assumptions``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from shared import errors
from shared.config.flavours import get_flavour
from shared.config.schema import RunConfig
from shared.model.rollout import Rollout
from shared.model.single_file import TransformerFile
from shared.plan import qwen21
from shared.plan.adapters import stacked_bytes
from shared.plan.counts import (
    REAL_QWEN21_TEXT_ENCODER,
    REAL_QWEN21_VAE,
    REAL_TEXT_ENCODER,
    component_params,
    lora_params,
    lora_targets,
    text_encoder_embedding_params,
    transformer_counts,
    vae_config,
)
from shared.plan.flops import MEASURED_MFU, MFU, step_flops
from shared.plan.gpus import fmt_gib, gpu_spec
from shared.plan.memory import (
    CUDA_OVERHEAD,
    LORA_STATE_BYTES,
    VAE_DECODE_BYTES,
    VAE_ENCODE_BYTES,
    dtype_bytes,
    inference_activation_bytes,
    text_encoder_activation_bytes,
    text_encoder_weight_bytes,
    training_activation_bytes,
    transformer_weight_bytes,
    vae_working_bytes,
)
from shared.plan.placement import gpu_groups, gpu_placement, sharing
from shared.plan.recommend import apply_recommendation, recommend_overrides, recommend_service_overrides
from shared.plan.single_file import file_assumption, file_weight_bytes, run_transformer_file
from shared.plan.tokens import CAPTION_TOKENS, VL_PIXELS_PER_TOKEN, Tokens, eval_tokens, training_tokens

NCCL_BUFFER_BYTES = 512 * 2**20
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
    # the encoder's and eval's own searches, like the trainer's: service → overrides (applied after the trainer's)
    service_recommendations: dict[str, list[str]] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)  # service → GPU id(s)
    validation: str = "eval_svc"  # or "training worker": where validations render (see the module docstring)
    in_worker_validation_bytes: int = 0  # the trainer's GPU while a validation renders in the worker
    gpu_totals: dict[str, dict[str, int]] = field(default_factory=dict)  # GPU id → phase → bytes
    applied: Plan | None = None  # the plan again with every recommended change applied
    transformer_file: str = ""  # the quantized single file the base comes from (its types), "" for a model folder
    weight_bytes: int = 0  # the transformer's weights as the trainer holds them (of the trainer's breakdown)

    @property
    def all_recommendations(self) -> list[str]:
        """The trainer's changes, then the encoder's and eval's: what to apply, in this order."""
        return self.recommendation + [c for changes in self.service_recommendations.values() for c in changes]

    @property
    def gpus_fit(self) -> bool:
        """Whether every GPU holds what runs on it at once, in every phase."""
        return all(v <= self.gpu_memory_bytes for phases in self.gpu_totals.values() for v in phases.values())

    @property
    def all_fit(self) -> bool:
        return all(s.fits for s in self.services.values()) and self.gpus_fit

    @property
    def trainer(self) -> ServicePlan:
        return self.services["trainer"]


def _dp_assumptions(machines: int) -> list[str]:
    link = f"the network at {INTER_NODE_BYTES_S / 1e9:g}" if machines > 1 else f"NVLink at {INTRA_NODE_BYTES_S / 1e9:g}"
    return [
        f"data parallel: NCCL buffers {fmt_gib(NCCL_BUFFER_BYTES)} per GPU, assumed; the all-reduce of the fp32 "
        f"LoRA gradients over {link} GB/s bus bandwidth, assumed, not overlapped with the backward (it is in "
        "part)",
        "host RAM while loading: one copy of the base in the compute dtype, as the processes of a machine "
        "load in turns (start-up takes that many loads)",
    ]


def _assumptions(gpu: str, mfu: float, compute_bytes: int, precision: str, joint: bool, caches: int) -> list[str]:
    fp32 = ["mixed_precision fp32: activations taken as twice the bf16 measurement (approximate)"]
    source = (
        "measured on an H200 at edit-v2, 1024 px, three references, checkpointing (17,012 tokens per "
        "sample; optimistic for fewer tokens)"
        if precision in MEASURED_MFU
        else "assumed: not measured at full size for this precision"
    )
    common = [
        f"fixed CUDA overhead {fmt_gib(CUDA_OVERHEAD)} per service (context, workspaces, allocator slack): measured "
        "1.1-2.1 GiB above the device's use on an H200",
        f"seconds/step = hardware FLOPs (with checkpointing's recompute) / ({gpu} peak bf16 x MFU {mfu:.3g}); the "
        f"MFU for {precision} is {source}",
    ]
    model = _qwen21_assumptions(caches) if joint else _edit_assumptions()
    return (
        (fp32 if compute_bytes == 4 else [])
        + common
        + model
        + [
            "a quantized text encoder: every parameter but the token embedding counted as a Linear weight at "
            "text_encoder_1_precision; VAE tiling: one 256x256 tile's working set (the full-size input and output, a "
            "few MB, not counted)",
            "eval_svc releases its models when idle (EDITTUNER_IDLE_RELEASE_S) before the next run's encoding: the "
            "encoding phase counts the encoder alone",
        ]
    )


def _edit_assumptions() -> list[str]:
    return [
        "activation constants measured on CPU kernels (saved tensors + peak live bytes); on an H200 the trainer's "
        "predicted total was 2-10% above the device memory used, for every precision measured",
        f"tokens per sample: caption ~{CAPTION_TOKENS} text tokens + {VL_PIXELS_PER_TOKEN} px per VL image token; "
        "square buckets at each dataset's area (other aspect ratios have about as many tokens)",
        "text encoder activations are an estimate (hidden states of every layer + all-position logits), not measured",
    ]


def _qwen21_assumptions(caches: int) -> list[str]:
    return [
        "v2.1 activation constants measured on CPU kernels like the edit models' (shared.plan.measure_qwen21); no "
        "GPU measurement of v2.1 has been taken, and its MFU is edit-v2's",
        f"v2.1 tokens: ~{CAPTION_TOKENS} caption tokens + the template's 8 + ~6 per reference around its image "
        "slots (estimated: no Qwen3 tokenizer is bundled); a reference of W x H px fills (W/32)(H/32) slots of 4 "
        "latent tokens, the target (W/16)(H/16) tokens; square buckets at each dataset's area",
        "v2.1 attention: the (query run, keys up to its end) rectangles QwenImage21AttnProcessor, the default the "
        "training forward uses, hands SDPA for the block-causal mask; masked text triangles are computed, not "
        "skipped",
        f"v2.1 previews keep a prefix KV cache: one K and V per block per text/reference token in the compute "
        f"dtype, for {caches} prompt(s) ({'true CFG: validation_guidance > 1' if caches > 1 else 'no CFG'})",
        "v2.1 text encoder (Qwen3-VL-8B) activations are an estimate (its input and captured rows, its KV cache, "
        "deepstack features, one layer's or the vision tower's working set), not measured",
    ]


def _rollout_assumptions(rollout: Rollout, forwards: float) -> list[str]:
    return [
        f"scheduled sampling: {forwards:.2g} forwards without gradient per sample (share "
        f"{rollout.prob_end if rollout.ramp_steps > 0 else rollout.probability:g} x mean rollout length, "
        f"{rollout.strategy} up to {rollout.max_step_offset}; after any ramp), counted at the forward's FLOPs: "
        "an upper bound, as a sigma near 1 has fewer inference steps above it; their memory (one forward "
        "without saved activations, before the training forward) is taken to stay under the training step's"
    ]


def processes(run: RunConfig) -> int:
    t = run.train
    return (1 if t.num_processes == "auto" else int(t.num_processes)) * t.num_machines


def allreduce_seconds(lora_params: int, gpus: int, machines: int = 1) -> float:
    """A ring all-reduce of the fp32 LoRA gradients: 2 (N-1)/N of their bytes over the slowest link."""
    if gpus <= 1:
        return 0.0
    bandwidth = INTER_NODE_BYTES_S if machines > 1 else INTRA_NODE_BYTES_S
    return 2 * (gpus - 1) / gpus * lora_params * 4 / bandwidth


def plan_run(
    run: RunConfig,
    gpu_memory_bytes: int | None = None,
    gpu: str = "H100",
    *,
    recommend: bool = True,
    gpus: int | None = None,
    environ: dict[str, str] | None = None,
    transformer_file: TransformerFile | str | None = None,
) -> Plan:
    """Predict memory per service, tokens, FLOPs and seconds per step of ``run`` on ``gpu``; when the trainer does
    not fit ``gpu_memory_bytes`` (default: the GPU's memory), search for overrides that make it fit. ``gpus``
    (default: num_processes x num_machines) data parallel processes: the trainer's memory is per GPU, the step
    time is one GPU's share of the micro-batches plus the gradient all-reduce. ``environ`` (default: this
    process's): the EDITTUNER_<SERVICE>_GPU variables that say which services share a GPU. ``transformer_file``
    (default: the run's ``pretrained_transformer_model_name_or_path`` when it is a single file): a
    ``TransformerFile`` or a ``shared.plan.single_file.synthetic_file`` scheme (Q8_0, Q4_K_M, fp8, fp8_scaled) of the
    model's shapes; a quantized file's base is its own bytes (``single_file.file_weight_bytes``), not
    ``base_model_precision``'s."""
    name, peak_flops, default_memory = gpu_spec(gpu)
    memory = int(gpu_memory_bytes) if gpu_memory_bytes is not None else default_memory
    t = run.train
    flav = get_flavour(t.model_flavour)
    cb = dtype_bytes(t.mixed_precision)
    counts = transformer_counts(t.model_path, t.model_flavour)
    if counts.class_name != flav.transformer_class_name:
        raise errors.InvalidInput(
            f"model_flavour {flav.name} takes a {flav.transformer_class_name}, but {t.model_path}'s transformer is a "
            f"{counts.class_name}: set the flavour of that model"
        )
    targets = lora_targets(counts, list(t.lora_target_modules))
    tokens = training_tokens(run)
    zero_cond = bool(counts.config.get("zero_cond_t", flav.zero_cond_t))

    tf = run_transformer_file(run, counts, transformer_file)
    tf = tf if tf is not None and tf.quantized else None  # a bf16/fp32 file is quantized as a folder's base
    # a quantized file's Linears save no weight and no input for backward: the activations and MFU are bf16's
    precision = "no_change" if tf is not None else t.base_model_precision
    if tf is not None:
        weights = file_weight_bytes(tf, cb)
    else:
        weights = transformer_weight_bytes(counts, t.base_model_precision, cb)
    n_lora = lora_params(targets, t.lora_rank)
    if counts.joint:
        acts = qwen21.training_activation_bytes(
            counts,
            tokens,
            targets,
            t.lora_rank,
            checkpointing=t.gradient_checkpointing,
            precision=precision,
            batch=t.train_batch_size,
        )
    else:
        acts = training_activation_bytes(
            counts,
            tokens,
            targets,
            t.lora_rank,
            checkpointing=t.gradient_checkpointing,
            precision=precision,
            zero_cond=zero_cond,
            batch=t.train_batch_size,
        )
    acts = {k: v * cb // 2 for k, v in acts.items()}  # measured in bf16; fp32 compute: about twice
    stacked_train, stacked_eval, stacked_notes = stacked_bytes(t, n_lora, cb)
    trainer = {
        **weights,
        f"LoRA {n_lora / 1e6:.1f}M params + grads + {t.optimizer}": n_lora * LORA_STATE_BYTES[t.optimizer],
        **({"assistant LoRA (frozen)": stacked_train} if stacked_train else {}),
        **acts,
        "CUDA overhead": CUDA_OVERHEAD,
    }
    n_gpus = gpus or processes(run)
    if n_gpus > 1:  # DDP's buckets are the gradients themselves (gradient_as_bucket_view); NCCL's own buffers
        trainer["NCCL buffers"] = NCCL_BUFFER_BYTES

    te_params, vae_params, base_dim = component_params(t.model_path, t.model_flavour)
    te_bytes = text_encoder_weight_bytes(
        te_params,
        text_encoder_embedding_params(t.model_path, t.model_flavour),
        t.text_encoder_1_precision,
        cb,
        (REAL_QWEN21_TEXT_ENCODER if counts.joint else REAL_TEXT_ENCODER)["hidden"],
    )
    vl_area = t.model_kwargs.vl_reference_area or flav.vl_ref_area
    image_px = 256 * max(tokens.target, tokens.per_reference)  # a batch of the largest images
    if counts.joint:  # Qwen3-VL; the RGBA VAE encodes one image per call, as QwenImage21Pipeline does
        te_acts = qwen21.text_encoder_activation_bytes(tokens)
        vae_encode = vae_working_bytes(
            qwen21.VAE21_ENCODE_BYTES, base_dim, 1, image_px, tiling=t.vae_enable_tiling, slicing=True
        )
    else:
        te_acts = text_encoder_activation_bytes(tokens, tokens.references, vl_area)
        vae_encode = vae_working_bytes(
            VAE_ENCODE_BYTES,
            base_dim,
            t.vae_batch_size,
            image_px,
            tiling=t.vae_enable_tiling,
            slicing=t.vae_enable_slicing,
        )
    encoder = {
        f"text encoder ({t.text_encoder_1_precision})": te_bytes,
        "VAE": vae_params * cb,
        "working set (max of VAE encode, text encoder)": int(max(vae_encode, te_acts)),
        "CUDA overhead": CUDA_OVERHEAD,
    }
    ev_tokens = eval_tokens(run, tokens)
    vw, vh = t.validation_size
    cached_text = t.conditioning_multidataset_sampling != "random"
    caches = 2 if t.validation_guidance > 1 else 1  # true CFG: the prompt's and the negative prompt's
    kv_cache = qwen21.kv_cache_bytes(counts, ev_tokens, cb, caches) if counts.joint else 0
    if counts.joint:  # the cache's own bytes are their own line
        denoise = qwen21.render_step_bytes(counts, ev_tokens, cb, caches) - kv_cache
        dec_dim = int(vae_config(t.model_path).get("decoder_base_dim", REAL_QWEN21_VAE["decoder_base_dim"]))
        decode = vae_working_bytes(
            qwen21.VAE21_DECODE_BYTES, dec_dim, 1, vw * vh, tiling=t.vae_enable_tiling, slicing=False
        )
    else:
        denoise = inference_activation_bytes(counts, ev_tokens)
        decode = vae_working_bytes(VAE_DECODE_BYTES, base_dim, 1, vw * vh, tiling=t.vae_enable_tiling, slicing=False)
    render = int(max(denoise, 0 if cached_text else te_acts, decode))
    text_part = {} if cached_text else {"text encoder": te_bytes}
    cache_part = {f"prefix KV cache ({caches} prompt{'s' if caches > 1 else ''})": kv_cache} if counts.joint else {}
    ev = {
        **{f"transformer {k}": v for k, v in weights.items()},
        "LoRA (compute dtype)": n_lora * cb,
        **({"stacked LoRAs (frozen)": stacked_eval} if stacked_eval else {}),
        **text_part,
        "VAE": vae_params * cb,
        **cache_part,
        "working set (max of denoise step, VAE decode" + ("" if cached_text else ", text encoder") + ")": render,
        "CUDA overhead": CUDA_OVERHEAD,
    }
    # validation_on_full_precision: the folder's unquantized transformer and its copy of the LoRA, beside the base
    full = (
        sum(transformer_weight_bytes(counts, "no_change", cb).values()) + n_lora * cb
        if t.full_precision_previews
        else 0
    )
    if full:
        ev["full-precision transformer + LoRA (validation_on_full_precision)"] = full
    resident = sum(v for k, v in trainer.items() if k not in acts)  # between steps: no activations
    in_worker = max(
        sum(trainer.values()),
        resident + sum(text_part.values()) + vae_params * cb + kv_cache + render + stacked_eval + full,
    )

    flops = step_flops(counts, tokens, targets, t.lora_rank, checkpointing=t.gradient_checkpointing)
    rollout = Rollout.from_config(t)
    rollout_forwards = rollout.expected_steps() if rollout is not None else 0.0
    flops["rollout"] = rollout_forwards * flops["forward"]  # the same forward, at batch size or below
    samples = t.train_batch_size * t.gradient_accumulation_steps
    per_step = sum(flops.values()) * samples
    mfu = MFU[precision]
    services = {
        "trainer": ServicePlan("trainer", trainer, memory),
        "encoder": ServicePlan("encoder", encoder, memory),
        "eval": ServicePlan("eval", ev, memory),
    }
    plan = Plan(
        model=t.model_path,
        flavour=t.model_flavour,
        precision=t.base_model_precision,
        checkpointing=t.gradient_checkpointing,
        lora_rank=t.lora_rank,
        batch=t.train_batch_size,
        micro_batches=t.gradient_accumulation_steps,
        gpu=name,
        gpu_memory_bytes=memory,
        services=services,
        tokens=tokens,
        eval_tokens=ev_tokens,
        parameters={"transformer": counts.total, "text encoder": te_params, "VAE": vae_params, "LoRA": n_lora},
        flops_per_step=per_step,
        model_flops_per_step=(flops["forward"] + flops["backward"]) * samples,
        seconds_per_step=per_step / n_gpus / (peak_flops * mfu) + allreduce_seconds(n_lora, n_gpus, t.num_machines),
        mfu=mfu,
        fits=services["trainer"].fits,
        assumptions=([file_assumption(tf, t.base_model_precision)] if tf is not None else [])
        + _assumptions(name, mfu, cb, precision, counts.joint, caches)
        + (_dp_assumptions(t.num_machines) if n_gpus > 1 else [])
        + (_rollout_assumptions(rollout, rollout_forwards) if rollout is not None else [])
        + stacked_notes,
        gpus=n_gpus,
        allreduce_seconds=allreduce_seconds(n_lora, n_gpus, t.num_machines),
        host_load_bytes=counts.total * cb,
        rollout_forwards=rollout_forwards,
        in_worker_validation_bytes=in_worker,
        transformer_file=tf.describe() if tf is not None else "",
        weight_bytes=sum(weights.values()),
    )
    place(plan, gpu_placement(environ))
    # the recommendation's plans keep the file the plan was asked for
    predict = plan_run if transformer_file is None else functools.partial(plan_run, transformer_file=transformer_file)
    if recommend and not plan.fits:
        plan.recommendation, plan.recommended_bytes = recommend_overrides(run, memory, name, predict)
    if recommend:
        plan.service_recommendations = recommend_service_overrides(run, plan.recommendation, memory, name, predict)
        if plan.all_recommendations:
            plan.applied = predict(
                apply_recommendation(run, plan.all_recommendations),
                memory,
                gpu,
                recommend=False,
                gpus=gpus,
                environ=environ,
            )
    return plan


def place(plan: Plan, placement: dict[str, str]) -> Plan:
    """Where validations render and what each GPU holds in each phase, for services placed as ``placement``
    (service → GPU ids): eval_svc renders when it has its own GPU or fits beside the trainer, else the training
    worker does."""
    sv = {k: s.total for k, s in plan.services.items()}
    together = sharing(placement, "trainer", "eval")
    plan.placement = dict(placement)
    plan.validation = (
        "training worker" if together and sv["trainer"] + sv["eval"] > plan.gpu_memory_bytes else "eval_svc"
    )
    totals: dict[str, dict[str, int]] = {}
    for gpu, names in gpu_groups(placement).items():
        phases: dict[str, int] = {}
        if "encoder" in names:
            phases["encoding"] = sv["encoder"]
        training = 0
        if "trainer" in names:
            training += plan.in_worker_validation_bytes if plan.validation == "training worker" else sv["trainer"]
        if "eval" in names and plan.validation == "eval_svc":
            training += sv["eval"]
        if training:
            phases["training"] = training
        totals[gpu] = phases
    plan.gpu_totals = totals
    return plan


# ----------------------------------------------------------------------------------------- encode batch
def encode_batch_size(run: RunConfig, memory: int) -> int:
    """The largest VAE batch, up to ``vae_batch_size``, with which the planner predicts the encoder fits ``memory``
    (1 when none does: the out-of-memory then says what else to change)."""
    t = run.train
    if getattr(t, "pretrained_transformer_model_name_or_path", None):  # the encoder's figures do not read it
        t = dataclasses.replace(t, pretrained_transformer_model_name_or_path=None)
    for b in range(t.vae_batch_size, 1, -1):
        cand = dataclasses.replace(run, train=dataclasses.replace(t, vae_batch_size=b))
        if plan_run(cand, memory, recommend=False, environ={}).services["encoder"].fits:
            return b
    return 1


# ---------------------------------------------------------------------------------------- validation site
def device_memory(device: torch.device | str) -> int | None:
    """Total memory of CUDA ``device`` (torch.cuda.mem_get_info), None elsewhere."""
    device = torch.device(device)
    return torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None


def validation_site(
    run: RunConfig, device: torch.device | str, *, environ: dict[str, str] | None = None
) -> tuple[str, str]:
    """("eval_svc" or "training worker", the reason as a sentence): where a service-run's validations render.
    The training worker when the trainer and eval_svc share the trainer's GPU (EDITTUNER_*_GPU) and the planner
    predicts the two do not fit its memory together; eval_svc otherwise, and off a GPU."""
    total = device_memory(device)
    if total is None:
        return "eval_svc", f"{torch.device(device)} is not a GPU: eval_svc renders"
    plan = plan_run(run, total, recommend=False, environ=environ)
    tr, ev = plan.trainer.total, plan.services["eval"].total
    if plan.validation == "training worker":
        return plan.validation, (
            f"trainer {fmt_gib(tr)} + eval {fmt_gib(ev)} do not fit {fmt_gib(total)} of GPU "
            f"{plan.placement['trainer']} together: validations render in the training worker "
            f"on its transformer (predicted {fmt_gib(plan.in_worker_validation_bytes)})"
        )
    if sharing(plan.placement, "trainer", "eval"):
        return "eval_svc", f"trainer {fmt_gib(tr)} + eval {fmt_gib(ev)} fit {fmt_gib(total)} together: eval_svc renders"
    return "eval_svc", f"eval_svc has its own GPU ({plan.placement['eval']}): eval_svc renders"


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
    advice = (
        "try " + " ".join(plan.recommendation) + f" (predicted {fmt_gib(plan.recommended_bytes or 0)}); "
        if plan.recommendation
        else "no searched setting fits this GPU; "
    )
    raise errors.ResourceExhausted(
        f"the run will not fit on {device}: the trainer needs about {fmt_gib(tr.total)} of GPU memory ({parts}) but "
        f"{device} has {fmt_gib(total_bytes)} in total. {advice}or pass skip_fit_check=true to try anyway "
        "(see `edittuner plan` for the full prediction)"
    )
