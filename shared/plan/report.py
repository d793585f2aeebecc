"""The plan as text: ``edittuner plan``'s report and docs/PLANNER.md's table (``python -m shared.plan.report``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config.flavours import get_flavour
from shared.plan.gpus import GiB, fmt_gib
from shared.plan.predict import Plan, plan_run

if TYPE_CHECKING:
    from shared.config.schema import RunConfig


# --------------------------------------------------------------------------------------------- report
def format_plan(plan: Plan) -> str:
    tk = plan.tokens
    base = "from the transformer file" if plan.transformer_file else plan.precision
    lines = [
        f"plan: {plan.flavour} ({plan.model}), base {base}, gradient_checkpointing "
        f"{'on' if plan.checkpointing else 'off'}, LoRA rank {plan.lora_rank}, batch {plan.batch}",
        f"GPU: {plan.gpu} (timing), {fmt_gib(plan.gpu_memory_bytes)} to fit",
        "parameters: "
        + ", ".join(f"{k} {v / 1e9:.3f}B" if v >= 1e8 else f"{k} {v / 1e6:.2f}M" for k, v in plan.parameters.items()),
        f"tokens per sample: {tk.target} target + {tk.references} x {tk.per_reference} reference + {tk.text} text "
        f"= {tk.total} (eval step: {plan.eval_tokens.total})"
        + (
            f"; one joint sequence, the references' tokens in {tk.vl_image_tokens} image slots of the prompt "
            f"({tk.vlm} rows from the text encoder)"
            if tk.joint
            else ""
        ),
        *([f"transformer file: {plan.transformer_file}"] if plan.transformer_file else []),
        "",
        f"{'service':<8} {'predicted':>10}  {'fits':<4}  breakdown",
    ]
    for s in plan.services.values():
        parts = ", ".join(f"{k} {fmt_gib(v)}" for k, v in s.breakdown.items())
        lines.append(f"{s.name:<8} {fmt_gib(s.total):>10}  {'yes' if s.fits else 'NO':<4}  {parts}")
    lines += [
        "",
        f"step: {plan.flops_per_step:.3g} FLOPs ({plan.micro_batches} micro-batch(es) of {plan.batch}), "
        f"about {plan.seconds_per_step:.3g} s per optimizer step on {plan.gpu} (MFU {plan.mfu:.3g})",
    ]
    if plan.rollout_forwards:
        lines.append(
            f"of it scheduled sampling: {plan.rollout_forwards:.2g} forwards without gradient per sample "
            "before its training forward"
        )
    if plan.gpus > 1:
        lines.append(
            f"on {plan.gpus} GPUs: the trainer figures are per GPU; each computes "
            f"{plan.micro_batches // plan.gpus if plan.micro_batches % plan.gpus == 0 else '?'} of the "
            f"{plan.micro_batches} micro-batches, the LoRA gradients' all-reduce adds "
            f"{plan.allreduce_seconds * 1000:.1f} ms; the processes of a machine load the base in "
            f"turns (about {fmt_gib(plan.host_load_bytes)} of host RAM at a time)"
        )
    if plan.fits:
        lines.append(f"the trainer fits {fmt_gib(plan.gpu_memory_bytes)}")
    elif plan.recommendation:
        lines.append(
            f"the trainer does NOT fit {fmt_gib(plan.gpu_memory_bytes)}; with these changes it needs about "
            f"{fmt_gib(plan.recommended_bytes or 0)}:"
        )
        lines += [f"  {r}" for r in plan.recommendation]
    else:
        lines.append(
            f"the trainer does NOT fit {fmt_gib(plan.gpu_memory_bytes)}, and no setting searched "
            "(checkpointing, int8-quanto/nf4-bnb/int4-quanto, 768/512, rank 8) makes it fit"
        )
    lines += _services_and_gpus(plan)
    if plan.applied is not None:
        a = plan.applied
        lines += [
            "",
            "with every change above applied: "
            + ", ".join(
                f"{s.name} {fmt_gib(s.total)} ({'fits' if s.fits else 'does NOT fit'})" for s in a.services.values()
            ),
        ]
        lines += [f"  {line}" for line in _services_and_gpus(a)]
    lines += ["assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def _services_and_gpus(plan: Plan) -> list[str]:
    """The encoder's and eval's recommendations, where validations render, and each GPU's phases."""
    lines = []
    for name, changes in plan.service_recommendations.items():
        if changes:
            lines.append(
                f"the {name} does NOT fit {fmt_gib(plan.gpu_memory_bytes)}; after the changes above, "
                "with these it fits:"
            )
            lines += [f"  {c}" for c in changes]
        else:
            guidance = ", validation_guidance" if get_flavour(plan.flavour).joint_sequence else ""
            lines.append(
                f"the {name} does NOT fit {fmt_gib(plan.gpu_memory_bytes)}, and none of its memory options "
                f"(vae_enable_slicing, text_encoder_1_precision, vae_enable_tiling, validation_resolution{guidance}) "
                "makes it fit"
            )
    where = (
        "in the training worker, on its resident transformer (trainer and eval_svc do not fit one GPU together)"
        if plan.validation == "training worker"
        else "in eval_svc"
    )
    lines.append(
        f"validations render {where}: trainer with an in-worker validation {fmt_gib(plan.in_worker_validation_bytes)}"
    )
    for gpu, phases in plan.gpu_totals.items():
        names = [s for s, ids in plan.placement.items() if gpu in ids.split(",")]
        parts = ", ".join(f"{phase} {fmt_gib(v)}" for phase, v in phases.items())
        ok = all(v <= plan.gpu_memory_bytes for v in phases.values())
        lines.append(f"GPU {gpu} ({', '.join(names)}): {parts}: {'fits' if ok else 'does NOT fit'}")
    return lines


# ------------------------------------------------------------------------------------------ docs table
def measured_runs() -> dict[str, Any]:
    """The GPU measurements the planner is checked against (``measured.json``: device, software, rows)."""
    runs: dict[str, Any] = json.loads((Path(__file__).with_name("measured.json")).read_text(encoding="utf-8"))
    return runs


def _measured_cell(rows: list[dict[str, Any]], flavour: str, refs: int, res: int, precision: str, ckpt: bool) -> str:
    for r in rows:
        if (r["flavour"], r["references"], r["resolution"], r["precision"], r["checkpointing"]) == (
            flavour,
            refs,
            res,
            precision,
            ckpt,
        ) and r["cap_gib"] is None:
            mem = (
                f"{r['device_used_gib']:.1f} GiB used"
                if r["device_used_gib"] is not None
                else f"{r['reserved_gib']:.1f} GiB reserved"
            )  # bench/gpu_step.py reads torch's peaks only
            return f"{mem}, {r['s_per_step']:.2f} s (H200)"
    return ""


def docs_table(gpu: str = "H100") -> str:
    """The markdown table of docs/PLANNER.md: the real model (hub ids) at 512/768/1024, edit-v1 and edit-v2 with 3
    references, bf16/int8-quanto/nf4-bnb, with and without gradient checkpointing."""
    from shared.config.loading import load_run_config_text

    head = (
        "| flavour | refs | res | precision | ckpt | tokens | trainer GiB (weights + LoRA / activations) | "
        "encoder GiB | eval GiB | s/step " + gpu + " (predicted) | measured |"
    )
    lines = [head, "|" + "---|" * 11]
    measured = measured_runs()["rows"]
    for flavour, refs in (("edit-v1", 1), ("edit-v2", 3)):
        for res in (512, 768, 1024):
            ids = [f"ref{i}" for i in range(refs)]
            data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": res, "conditioning_data": ids}] + [
                {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": res}
                for i in ids
            ]
            for precision in ("no_change", "int8-quanto", "nf4-bnb"):
                for ckpt in (False, True):
                    cfg = {
                        "model_flavour": flavour,
                        "base_model_precision": precision,
                        "mixed_precision": "bf16",
                        "gradient_checkpointing": ckpt,
                        "train_batch_size": 1,
                        "gradient_accumulation_steps": 1,
                        "validation_resolution": f"{res}x{res}",
                    }
                    run = load_run_config_text(json.dumps(cfg), json.dumps(data))
                    p = plan_run(run, gpu=gpu, recommend=False)
                    b = p.trainer.breakdown
                    acts = sum(v for k, v in b.items() if k in ("saved for backward", "backward working set"))
                    fixed = p.trainer.total - acts
                    lines.append(
                        f"| {flavour} | {refs} | {res} | {'bf16' if precision == 'no_change' else precision}"
                        f" | {'on' if ckpt else 'off'} | {p.tokens.total} | {p.trainer.total / GiB:.1f} "
                        f"({fixed / GiB:.1f} / {acts / GiB:.1f}) | {p.services['encoder'].total / GiB:.1f}"
                        f" | {p.services['eval'].total / GiB:.1f} | {p.seconds_per_step:.1f} | "
                        f"{_measured_cell(measured, flavour, refs, res, precision, ckpt)} |"
                    )
    return "\n".join(lines)


def fit_table(runs: list[tuple[str, RunConfig]], memory: int, gpu: str) -> str:
    """docs/PLANNER.md's table of whether each service and GPU fits ``memory`` for ``runs`` (label, config): as
    configured, and with every change the plan prints applied; then the changes and where validations render.
    Every service on one GPU, compose's default (no EDITTUNER_<SERVICE>_GPU set)."""
    lines = [
        f"| config | service | GiB as configured | GiB with the changes | fits {fmt_gib(memory)} |",
        "|" + "---|" * 5,
    ]
    notes = []
    for label, run in runs:
        plan = plan_run(run, memory, gpu, environ={})
        after = plan.applied or plan
        for name in plan.services:
            lines.append(
                f"| {label} | {name} | {plan.services[name].total / GiB:.1f} | "
                f"{after.services[name].total / GiB:.1f} | {'yes' if after.services[name].fits else 'NO'} |"
            )
        for gid, phases in after.gpu_totals.items():
            names = ", ".join(s for s, ids in after.placement.items() if gid in ids.split(","))
            before = " / ".join(f"{v / GiB:.1f}" for v in plan.gpu_totals[gid].values())
            now = " / ".join(f"{v / GiB:.1f}" for v in phases.values())
            ok = all(v <= memory for v in phases.values())
            lines.append(
                f"| {label} | GPU {gid} ({names}): {' / '.join(phases)} | {before} | {now} | {'yes' if ok else 'NO'} |"
            )
        changes = ", ".join(f"`{c}`" for c in plan.all_recommendations) or "none"
        notes.append(
            f"- {label}: changes {changes}; validations render in "
            f"{'the training worker' if after.validation == 'training worker' else 'eval_svc'}"
        )
    return "\n".join(lines + [""] + notes)


def gpus_table(gpu: str = "H100") -> str:
    """docs/PLANNER.md's data parallel table: edit-v2 with 3 references at 1024, gradient checkpointing, 8
    micro-batches per step, on 1, 2, 4 and 8 GPUs of one machine."""
    from shared.config.loading import load_run_config_text

    lines = [
        f"| precision | GPUs | trainer GiB per GPU | s/step {gpu} (predicted) | of it all-reduce | samples/s | "
        "measured |",
        "|" + "---|" * 7,
    ]
    ids = ["ref0", "ref1", "ref2"]
    data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": 1024, "conditioning_data": ids}] + [
        {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": 1024} for i in ids
    ]
    for precision in ("no_change", "nf4-bnb"):
        for n in (1, 2, 4, 8):
            cfg = {
                "model_flavour": "edit-v2",
                "base_model_precision": precision,
                "mixed_precision": "bf16",
                "gradient_checkpointing": True,
                "train_batch_size": 1,
                "gradient_accumulation_steps": 8,
                "num_processes": n,
            }
            p = plan_run(load_run_config_text(json.dumps(cfg), json.dumps(data)), gpu=gpu, recommend=False)
            lines.append(
                f"| {'bf16' if precision == 'no_change' else precision} | {n} | {p.trainer.total / GiB:.1f} | "
                f"{p.seconds_per_step:.2f} | {p.allreduce_seconds * 1000:.1f} ms | "
                f"{8 / p.seconds_per_step:.2f} | |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ transformer files
FILE_SCHEMES = {None: "model folder (int8-quanto)", "Q8_0": "Q8_0 GGUF", "Q4_K_M": "Q4_K_M GGUF", "fp8": "fp8 e4m3fn"}


def quickstart_run(flavour: str) -> RunConfig:
    """The quickstart's settings for ``flavour`` (edit-v1, edit-v2): the bundled preset ``qwen_image.<flavour>-lora``
    (int8-quanto, gradient checkpointing, 4 VAE images a batch, 1024² with one or three references, validation at
    1024²), as docs/PLANNER.md's quickstart table plans them."""
    from shared.config.loading import load_run_config_text, preset_dir

    d = preset_dir(f"qwen_image.{flavour}-lora")
    config, data = ((d / name).read_text(encoding="utf-8") for name in ("config.json", "multidatabackend.json"))
    return load_run_config_text(config, data)


def file_fit_table(memory: int = 24 * GiB, gpu: str = "RTX4090") -> str:
    """docs/PLANNER.md's table of the quickstart on ``memory`` with the transformer from a Q8_0, Q4_K_M or fp8 file
    (``shared.plan.single_file.synthetic_file``: the real model's shapes) beside the quickstart's own int8-quanto
    base: as configured, then with every change the plan prints; every service on one GPU."""
    lines = [
        "| config | transformer | weights GiB | trainer GiB as configured (weights + LoRA / activations) | "
        "with the changes: trainer / encoder / eval GiB | GPU 0 encoding / training GiB | "
        f"fits {fmt_gib(memory)} | measured |",
        "|" + "---|" * 8,
    ]
    notes = []
    for flavour, label in (("edit-v1", "edit-v1"), ("edit-v2", "edit-v2, 3 refs")):
        run = quickstart_run(flavour)
        for scheme, what in FILE_SCHEMES.items():
            p = plan_run(run, memory, gpu, environ={}, transformer_file=scheme)
            a = p.applied or p
            acts = sum(v for k, v in p.trainer.breakdown.items() if k in ("saved for backward", "backward working set"))
            [phases] = a.gpu_totals.values()
            lines.append(
                f"| {label} | {what} | {p.weight_bytes / GiB:.1f} | {p.trainer.total / GiB:.1f} "
                f"({(p.trainer.total - acts) / GiB:.1f} / {acts / GiB:.1f}) | "
                + " / ".join(f"{s.total / GiB:.1f}" for s in a.services.values())
                + f" | {' / '.join(f'{v / GiB:.1f}' for v in phases.values())} | {'yes' if a.gpus_fit else 'NO'} | |"
            )
            changes = ", ".join(f"`{c}`" for c in p.all_recommendations) or "none"
            where = "the training worker" if a.validation == "training worker" else "eval_svc"
            notes.append(
                f"- {label}, {what}: changes {changes}"
                + ("" if a.all_fit else " (no setting searched makes every service fit)")
                + f"; validations render in {where}"
            )
    return "\n".join(lines + [""] + notes)


# -------------------------------------------------------------------------------------------- Qwen-Image-2.1
def qwen21_run(references: int, resolution: int = 1024, overrides: tuple[str, ...] = ()) -> RunConfig:
    """A v2.1 run of the hub model (the released model's figures): one image dataset at ``resolution`` with
    ``references`` reference datasets, bf16 compute, batch 1, validation at the training resolution; the flavour's
    defaults otherwise (bf16 base, no gradient checkpointing), ``overrides`` on top."""
    from shared.config.loading import load_run_config_text

    ids = [f"ref{i}" for i in range(references)]
    data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": resolution, "conditioning_data": ids}] + [
        {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": resolution} for i in ids
    ]
    cfg = {
        "model_flavour": "v2.1",
        "mixed_precision": "bf16",
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "validation_resolution": f"{resolution}x{resolution}",
    }
    return load_run_config_text(json.dumps(cfg), json.dumps(data), list(overrides))


def qwen21_table(gpu: str = "H100") -> str:
    """docs/PLANNER.md's v2.1 table: 1024 px with 3 and 10 references, bf16/int8-quanto/nf4-bnb, gradient
    checkpointing off and on, and whether the trainer fits 24 GiB and 80 GiB."""
    lines = [
        "| refs | precision | ckpt | tokens | trainer GiB (weights + LoRA / activations) | encoder GiB | "
        f"eval GiB (of it KV cache) | s/step {gpu} (predicted) | trainer fits 24 GiB | fits 80 GiB | measured |",
        "|" + "---|" * 11,
    ]
    for refs in (3, 10):
        for precision in ("no_change", "int8-quanto", "nf4-bnb"):
            for ckpt in (False, True):
                run = qwen21_run(refs, 1024, (f"base_model_precision={precision}", f"gradient_checkpointing={ckpt}"))
                p = plan_run(run, gpu=gpu, recommend=False, environ={})
                acts = sum(
                    v for k, v in p.trainer.breakdown.items() if k in ("saved for backward", "backward working set")
                )
                cache = sum(v for k, v in p.services["eval"].breakdown.items() if k.startswith("prefix KV cache"))
                total = p.trainer.total
                lines.append(
                    f"| {refs} | {'bf16' if precision == 'no_change' else precision} | {'on' if ckpt else 'off'} "
                    f"| {p.tokens.total} | {total / GiB:.1f} ({(total - acts) / GiB:.1f} / {acts / GiB:.1f}) | "
                    f"{p.services['encoder'].total / GiB:.1f} | {p.services['eval'].total / GiB:.1f} "
                    f"({cache / GiB:.1f}) | {p.seconds_per_step:.1f} | {'yes' if total <= 24 * GiB else 'no'} | "
                    f"{'yes' if total <= 80 * GiB else 'no'} | |"
                )
    return "\n".join(lines)


def qwen21_fit_table(memory: int, gpu: str) -> str:
    """docs/PLANNER.md's v2.1 fit tables: the flavour's defaults with 3 and 10 references at 1024 on ``memory``,
    as configured and with the plan's changes (``fit_table``)."""
    return fit_table([(f"v2.1, {n} refs", qwen21_run(n)) for n in (3, 10)], memory, gpu)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--gpus"]:
        print(gpus_table(*(sys.argv[2:3] or ["H100"])))
    elif sys.argv[1:2] == ["--files"]:
        print(file_fit_table())
    elif sys.argv[1:2] == ["--qwen21"]:
        print(qwen21_table(*(sys.argv[2:3] or ["H100"])))
        for memory, card in ((24 * GiB, "RTX4090"), (80 * GiB, "H100")):
            print(f"\n{qwen21_fit_table(memory, card)}")
    else:
        print(docs_table(*(sys.argv[1:2] or ["H100"])))
