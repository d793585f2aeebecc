"""The ``edittuner`` command line.

Bad input never ends in a traceback: every EditTunerError is printed as its message (all problems listed) and
the command exits 1. Warnings (ignored config keys, orphan references) are printed once, before the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.cli.common import DEFAULT_STORE, ProgressBars, load_from_args, store_from_args
from shared.cli.jobs import cmd_data_push, cmd_jobs, cmd_runs_pull, cmd_runs_report, remote_job
from shared.config.flavours import FLAVOURS
from shared.errors import EditTunerError, InvalidInput
from shared.logs import quiet_call_noise, quiet_import_noise
from shared.train.events import TrainEvent, WorkerResult

if TYPE_CHECKING:
    from shared.config.schema import RunConfig


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.json (SimpleTuner style; // comments allowed)")
    p.add_argument("--data", help="multidatabackend.json (default: the config's data_backend_config)")
    p.add_argument(
        "--store",
        help=f"object store: a directory (default {DEFAULT_STORE}, or $EDITTUNER_STORE), "
        "or s3://bucket with EDITTUNER_S3_* variables",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys (learning_rate=1e-4, model_kwargs.match_target_res=true) or "
        "example=NAME for a bundled preset",
    )


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        help="HOST:PORT of the service; default EDITTUNER_SERVER, else start the three "
        "services locally for this command",
    )
    p.add_argument("--in-process", action="store_true", help="no services: run everything in this process")


# ------------------------------------------------------------------------------------------------ commands
def adapter_lines(run: RunConfig) -> list[str]:
    """``edittuner check``'s lines on the LoRA files a run loads beside its base."""
    from shared.config.validation_adapters import adapter_runs

    t = run.train
    lines = []
    if t.init_lora:
        start = t.init_lora_step if t.init_lora_step is not None else "its global_step metadata, else 0"
        lines.append(f"init    {t.init_lora} (the run counts from step {start})")
    if t.assistant_lora:
        lines.append(
            f"assist  {t.assistant_lora}: strength {t.assistant_lora_strength:g} in training, "
            f"{t.assistant_lora_inference_strength:g} in previews"
        )
    for r in adapter_runs(t):
        files = ", ".join(f"{f} ×{s:g}" for _, f, s in r.adapters)
        steps = r.steps or t.validation_num_inference_steps
        guidance = r.guidance if r.guidance is not None else t.validation_guidance
        lines.append(
            f"preview {r.label!r} ({t.validation_adapter_mode}): {files}; {steps} steps, guidance {guidance:g}"
            + (f", scheduler {dict(r.scheduler)}" if r.scheduler else "")
        )
    return lines


def transformer_line(run: RunConfig) -> str:
    """``edittuner check``'s line on ``pretrained_transformer_model_name_or_path``: a file's types and bytes (read
    from its header, checked against the flavour's transformer), or the folder it loads from."""
    from shared.config.schema import is_single_file
    from shared.model.loading import inspect_transformer_source
    from shared.model.location import locate_model

    t = run.train
    value = t.pretrained_transformer_model_name_or_path
    assert value
    if not is_single_file(value):
        sub = t.pretrained_transformer_subfolder or "the folder itself"
        return f"transformer {value} ({sub}): {locate_model(value).where}"
    tf = inspect_transformer_source(t.model_path, t.model_flavour, value)
    kept = (
        ""
        if not tf.quantized
        else (
            "; its Linears keep the file's types"
            + (
                f" (base_model_precision {t.base_model_precision} is not applied)"
                if t.base_model_precision != "no_change"
                else ""
            )
        )
    )
    return f"transformer {tf.path}: {tf.describe()}{kept}"


def cmd_check(args: argparse.Namespace) -> int:
    from shared.data.pairing import pair_datasets
    from shared.encode.cache import Manifests, cache_status, plan, settings_for

    run = load_from_args(args)
    t = run.train
    paired, warnings = pair_datasets(run, store_from_args(args))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    store = store_from_args(args)
    items = plan(run, paired, settings_for(run))
    manifests = Manifests(store)
    from shared.model.location import locate_model

    print(f"config  {run.config_source}: {t.model_flavour}, model {t.model_path}, {t.base_model_precision}")
    print(f"model   {t.model_path}: {locate_model(t.model_path).where}")
    if t.pretrained_transformer_model_name_or_path:
        print(transformer_line(run))
    print(f"data    {run.data.source}")
    for ds in paired:
        refs = run.data.references_of(ds.config)
        per = (
            len(refs)
            if t.conditioning_multidataset_sampling == "combined" or len(refs) == 1
            else f"1 of {len(refs)} (random)"
        )
        buckets = ", ".join(f"{w}x{h} ×{n}" for (w, h), n in ds.buckets().items()) or "none"
        print(
            f"dataset {ds.config.id!r} ({ds.role}): {len(ds.samples)} samples, {per} reference(s) per sample"
            f" [{', '.join(r.id for r in refs)}]"
            + (f", {len(ds.skipped)} skipped" if ds.skipped else "")
            + (f", {len(ds.filtered)} left out by size rules" if ds.filtered else "")
        )
        mask = run.data.mask_of(ds.config)
        if mask is not None:
            print(f"  loss mask: {mask.id!r}, masked_loss_probability {t.masked_loss_probability:g}")
        if ds.filtered and args.verbose:
            for name, why in ds.filtered:
                print(f"  left out: {name}: {why}")
        print(f"  buckets: {buckets}")
        status = cache_status([i for i in items if i.dataset is ds], manifests)
        print("  cached:  " + ", ".join(f"{k} {c}/{n}" for k, (c, n) in sorted(status.items())))
    for line in adapter_lines(run):
        print(line)
    print(f"store   {store.describe()}")
    print("ok: configuration and datasets are valid")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from shared.plan.gpus import parse_size
    from shared.plan.predict import plan_run
    from shared.plan.report import format_plan

    memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    _materialize(args)  # a tiny preset's model is generated on first use, as for encode and train
    plan = plan_run(load_from_args(args), memory, args.gpu, gpus=args.gpus)
    print(format_plan(plan))
    return 0 if plan.fits else 2


def cmd_encode(args: argparse.Namespace) -> int:
    _materialize(args)
    return cmd_encode_in_process(args) if args.in_process else remote_job(args, "encoder")


def cmd_encode_in_process(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shared.encode.encoder import DatasetEncoder, EncodeStats

    run = load_from_args(args)
    store = store_from_args(args)
    enc = DatasetEncoder(run, store)
    if args.finalize:
        keys = enc.finalize(args.finalize)
        print(f"merged the manifests of {args.finalize} encoder replicas; index: {', '.join(keys)}")
        return 0
    shard = _shard(args.shard) if args.shard else None
    bar = tqdm(desc="encode", unit="item", disable=args.quiet)
    started = time.perf_counter()

    def progress(stats: EncodeStats, total: int) -> None:
        bar.total = total
        bar.n = stats.total
        bar.set_postfix(encoded=stats.encoded, cached=stats.cached, failed=stats.failed)
        bar.refresh()

    try:
        stats, _ = enc.encode_with_index(progress, shard=shard)
    finally:
        bar.close()
        enc.release()
    print(
        f"encoded {stats.encoded}, cached {stats.cached}, failed {stats.failed} "
        f"in {time.perf_counter() - started:.1f}s; store {store.describe()}"
    )
    for f in stats.failures:
        print(f"failed: {f}", file=sys.stderr)
    return 0


def _shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise InvalidInput(f"--shard {text!r}: expected I/N with 0 <= I < N (this replica's place among N)")
    return int(i), int(n)


def _materialize(args: argparse.Namespace) -> None:
    from shared.cli.demo import materialize_preset

    for o in args.overrides:
        if o.startswith("example="):
            materialize_preset(o.partition("=")[2])


def cmd_train(args: argparse.Namespace) -> int:
    _materialize(args)
    return cmd_train_in_process(args) if args.in_process else remote_job(args, "trainer")


def cmd_train_in_process(args: argparse.Namespace) -> int:
    from shared.cli.launch import train_processes
    from shared.train import previews
    from shared.train.distributed import is_distributed
    from shared.train.runner import train_run

    run = load_from_args(args)
    store = store_from_args(args)
    bar = ProgressBars(args.quiet)

    def events(e: TrainEvent) -> None:
        bar.show(e.phase, e.step, e.total, e.loss or 0.0, e.seconds_per_step or 0.0, e.message)

    stop = threading.Event()

    def on_ctrl_c(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        bar.tqdm.write("stopping after this step, with a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        if is_distributed(run.train):
            return _report_processes(
                *train_processes(
                    args, run, store, args.store or os.environ.get("EDITTUNER_STORE") or DEFAULT_STORE, events, stop
                ),
                store,
            )
        result = train_run(
            run,
            store,
            events=events,
            previews=previews.NONE if args.no_validation else previews.IN_THIS_PROCESS,
            stop=stop,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    s = result.summary
    if s.interrupted:
        print(
            f"stopped run {s.run_id!r} at step {s.steps} with a checkpoint; continue it with the same command and "
            "resume_from_checkpoint=latest"
        )
        return 130
    print(
        f"encoded {result.encode.encoded}, cached {result.encode.cached}; trained run {s.run_id!r} to step "
        f"{s.steps} in {s.seconds:.1f}s (data wait {100 * s.data_wait_fraction:.1f}% of step time)"
    )
    if s.losses:
        print(f"loss: first {s.losses[0]:.4f}, last {s.losses[-1]:.4f}")
    print(f"store {store.describe()}: runs/{s.run_id}/ (checkpoints {', '.join(map(str, s.checkpoints)) or 'none'})")
    for name, path in result.outputs.items():
        print(f"{name}: {path}")
    return 0


def _report_processes(stats: Any, result: WorkerResult, outputs: dict[str, str], store: Any) -> int:
    if result.interrupted:
        print(
            f"stopped run {result.run_id!r} with a checkpoint; continue it with the same command and "
            "resume_from_checkpoint=latest"
        )
        return 130
    print(
        f"encoded {stats.encoded}, cached {stats.cached}; trained run {result.run_id!r} to step "
        f"{result.steps} on {result.processes} processes"
    )
    if result.final_loss is not None:
        print(f"loss: last {result.final_loss:.4f}")
    print(
        f"store {store.describe()}: runs/{result.run_id}/ (checkpoints "
        f"{', '.join(map(str, result.checkpoints)) or 'none'})"
    )
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Replace this process with the service's own entry point (``python -m <service>_svc``): the same process a
    container runs, with signals reaching it directly, and no import of a service from the core."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", f"{args.service}_svc"])


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from shared.model.tiny_model import save_tiny_model

    if args.trained and not FLAVOURS[args.flavour].tiny_trained:
        trained = " and ".join(name for name, f in FLAVOURS.items() if f.tiny_trained)
        print(
            f"make-tiny-model: --trained exists for {trained} ({args.flavour}'s model is not trained); drop "
            f"--trained for a random-weight {args.flavour} model",
            file=sys.stderr,
        )
        return 2
    path = save_tiny_model(args.dir, args.flavour, seed=args.seed, trained=args.trained)
    print(f"tiny {'trained' if args.trained else 'random-weight'} {args.flavour} model written to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from shared.cli.demo import run_demo

    run_demo(Path(args.output), flavour=args.flavour, samples=args.samples, steps=args.steps)
    return 0


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edittuner", description="LoRA training for Qwen-Image-Edit.")
    sub = parser.add_subparsers(dest="command", required=True)
    from shared.cli.init import add_parser as add_init

    add_init(sub)
    p = sub.add_parser("check", help="validate config + datasets, pair them, show buckets and cache status")
    _add_run_args(p)
    p.add_argument("--verbose", action="store_true", help="name every image a size rule leaves out")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser(
        "plan",
        help="predict GPU memory and step time per service; exit 0 if the trainer fits, "
        "2 if not (with overrides that fit)",
    )
    _add_run_args(p)
    p.add_argument("--gpu", default="H100", help="GPU for memory and timing: H100, H200, A100, L40S, RTX4090, RTX3090")
    p.add_argument("--gpu-memory", help="memory to fit, e.g. 24GiB or 80GB (default: the --gpu's)")
    p.add_argument(
        "--gpus",
        type=int,
        help="data parallel processes (default: num_processes x num_machines): "
        "memory per GPU, the step time with the gradient all-reduce",
    )
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("encode", help="encode the datasets into the cache (VAE latents, caption embeddings)")
    _add_run_args(p)
    _add_server_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="with --in-process: encode only replica I's share of N (its own "
        "manifests, no index); then run --finalize N once",
    )
    p.add_argument(
        "--finalize", type=int, metavar="N", help="with --in-process: merge N replicas' manifests and write the index"
    )
    p.set_defaults(func=cmd_encode)
    p = sub.add_parser("train", help="encode what is missing, train the LoRA, render validation previews")
    _add_run_args(p)
    _add_server_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-validation", action="store_true", help="skip validation previews")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("jobs", help="list, get, watch or cancel a service's jobs")
    p.add_argument("action", choices=["list", "get", "watch", "cancel"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--service", choices=["encoder", "trainer", "eval"], default="trainer")
    p.add_argument("--server", help="HOST:PORT of the service (or EDITTUNER_SERVER / EDITTUNER_<SERVICE>_ADDR)")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("runs", help="runs in the store")
    rs = p.add_subparsers(dest="runs_action", required=True)
    q = rs.add_parser("pull", help="copy a run's LoRA, previews and checkpoints out of the store")
    q.add_argument("run_id")
    q.add_argument("dir")
    q.add_argument("--server", help="HOST:PORT of a service: fetch through it, no store credentials needed")
    q.add_argument("--store", help="read the store directly instead (a directory, or s3://bucket with EDITTUNER_S3_*)")
    q.add_argument("--no-checkpoints", action="store_true")
    q.set_defaults(func=cmd_runs_pull)
    q = rs.add_parser("report", help="write a run's report (curves, validation metrics, previews, config) into DIR")
    q.add_argument("run_id")
    q.add_argument("dir")
    q.add_argument("--server", help="HOST:PORT of a service: fetch the run's files through it")
    q.add_argument("--store", help="read the store directly instead (a directory, or s3://bucket with EDITTUNER_S3_*)")
    q.set_defaults(func=cmd_runs_report)
    p = sub.add_parser("data", help="datasets in the services' store")
    ds = p.add_subparsers(dest="data_action", required=True)
    q = ds.add_parser("push", help="upload a dataset folder (only what the store lacks) and print its entry")
    q.add_argument("dir")
    q.add_argument("--server", help="HOST:PORT of a service (default EDITTUNER_SERVER)")
    q.add_argument("--name", help="the upload's name (default: the folder's name and a hash of its path)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_data_push)
    p = sub.add_parser("serve", help="run one service in the foreground (configured by EDITTUNER_* variables)")
    p.add_argument("service", choices=["encoder", "trainer", "eval"])
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("make-tiny-model", help="write a tiny model in the real Hugging Face layout")
    p.add_argument("dir")
    p.add_argument("--flavour", choices=sorted(FLAVOURS), default="edit-v2")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (the text side's, with --trained)")
    p.add_argument(
        "--trained",
        action="store_true",
        help="with the shipped trained VAE and transformer (the demo's model: python -m shared.train.tiny made them)",
    )
    p.set_defaults(func=cmd_make_tiny_model)
    from shared.cli.doctor.command import add_parser as add_doctor

    add_doctor(sub)
    p = sub.add_parser("demo", help="trained tiny model + generated pairs: a LoRA learns an edit, on a CPU")
    p.add_argument("--output", default="demo-out")
    p.add_argument("--flavour", choices=sorted(n for n, f in FLAVOURS.items() if f.tiny_trained), default="edit-v2")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_import_noise()
    quiet_call_noise()
    for noisy in ("diffusers", "transformers"):  # their warnings are about a model being loaded, not the user's
        logging.getLogger(noisy).setLevel(logging.ERROR)
    parser = build_parser()
    # key=value overrides may come before or after options: argparse hands the later ones back as extras
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        func: Callable[[argparse.Namespace], int] = args.func  # set_defaults(func=cmd_...) on each subparser
        return func(args)
    except EditTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
