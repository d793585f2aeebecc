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
from pathlib import Path
from typing import Sequence

from shared.errors import EditTunerError

DEFAULT_STORE = ".edittuner/store"


def _store(args: argparse.Namespace):
    from shared.store.url import open_store

    return open_store(args.store or os.environ.get("EDITTUNER_STORE") or DEFAULT_STORE)


def _load(args: argparse.Namespace):
    from shared.config.loading import load_run_config

    run = load_run_config(args.config, args.data, args.overrides)
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return run


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.json (SimpleTuner style; // comments allowed)")
    p.add_argument("--data", help="multidatabackend.json (default: the config's data_backend_config)")
    p.add_argument("--store", help=f"object store: a directory (default {DEFAULT_STORE}, or $EDITTUNER_STORE), "
                                   "or s3://bucket with EDITTUNER_S3_* variables")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys (learning_rate=1e-4, model_kwargs.match_target_res=true) or "
                        "example=NAME for a bundled preset")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="HOST:PORT of the service; default EDITTUNER_SERVER, else start the three "
                                    "services locally for this command")
    p.add_argument("--in-process", action="store_true", help="no services: run everything in this process")


# ------------------------------------------------------------------------------------------------ commands
def cmd_check(args: argparse.Namespace) -> int:
    from shared.data.pairing import pair_datasets
    from shared.encode.cache import Manifests, cache_status, plan, settings_for
    from shared.model.device import resolve_device, resolve_dtype

    run = _load(args)
    t = run.train
    paired, warnings = pair_datasets(run)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    store = _store(args)
    items = plan(run, paired, settings_for(run, resolve_dtype(t.mixed_precision, resolve_device(t.device))))
    manifests = Manifests(store)
    print(f"config  {run.config_source}: {t.model_flavour}, model {t.model_path}, {t.base_model_precision}")
    print(f"data    {run.data.source}")
    for ds in paired:
        refs = run.data.references_of(ds.config)
        per = len(refs) if t.conditioning_multidataset_sampling == "combined" or len(refs) == 1 else \
            f"1 of {len(refs)} (random)"
        buckets = ", ".join(f"{w}x{h} ×{n}" for (w, h), n in ds.buckets().items()) or "none"
        print(f"dataset {ds.config.id!r} ({ds.role}): {len(ds.samples)} samples, {per} reference(s) per sample"
              f" [{', '.join(r.id for r in refs)}]" + (f", {len(ds.skipped)} skipped" if ds.skipped else ""))
        print(f"  buckets: {buckets}")
        status = cache_status([i for i in items if i.dataset is ds], manifests)
        print("  cached:  " + ", ".join(f"{k} {c}/{n}" for k, (c, n) in sorted(status.items())))
    print(f"store   {store.describe()}")
    print("ok: configuration and datasets are valid")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from shared.plan.gpus import parse_size
    from shared.plan.predict import plan_run
    from shared.plan.report import format_plan

    memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    _materialize(args)  # a tiny preset's model is generated on first use, as for encode and train
    plan = plan_run(_load(args), memory, args.gpu)
    print(format_plan(plan))
    return 0 if plan.fits else 2


def cmd_encode(args: argparse.Namespace) -> int:
    _materialize(args)
    return cmd_encode_in_process(args) if args.in_process else _remote_job(args, "encoder")


def cmd_encode_in_process(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shared.encode.encoder import DatasetEncoder

    run = _load(args)
    store = _store(args)
    enc = DatasetEncoder(run, store)
    bar = tqdm(desc="encode", unit="item", disable=args.quiet)
    started = time.perf_counter()

    def progress(stats, total):
        bar.total = total
        bar.n = stats.total
        bar.set_postfix(encoded=stats.encoded, cached=stats.cached, failed=stats.failed)
        bar.refresh()

    try:
        stats = enc.encode(progress)
    finally:
        bar.close()
        enc.release()
    print(f"encoded {stats.encoded}, cached {stats.cached}, failed {stats.failed} "
          f"in {time.perf_counter() - started:.1f}s; store {store.describe()}")
    for f in stats.failures:
        print(f"failed: {f}", file=sys.stderr)
    return 0


def _materialize(args: argparse.Namespace) -> None:
    from shared.cli.demo import materialize_preset

    for o in args.overrides:
        if o.startswith("example="):
            materialize_preset(o.partition("=")[2])


def cmd_train(args: argparse.Namespace) -> int:
    _materialize(args)
    return cmd_train_in_process(args) if args.in_process else _remote_job(args, "trainer")


def cmd_train_in_process(args: argparse.Namespace) -> int:
    from shared.train.runner import train_run

    run = _load(args)
    store = _store(args)
    bar = _Bar(args.quiet)

    def events(e: dict) -> None:
        bar.show(e.get("phase", ""), e.get("step", 0), e.get("total", 0), e.get("loss", 0.0),
                 e.get("seconds_per_step", 0.0), e.get("message", ""))

    stop = threading.Event()

    def on_ctrl_c(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        bar.tqdm.write("stopping after this step, with a checkpoint (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        result = train_run(run, store, events=events, validate=not args.no_validation, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    s = result.summary
    if s.interrupted:
        print(f"stopped run {s.run_id!r} at step {s.steps} with a checkpoint; continue it with the same command and "
              "resume_from_checkpoint=latest")
        return 130
    print(f"encoded {result.encode.encoded}, cached {result.encode.cached}; trained run {s.run_id!r} to step "
          f"{s.steps} in {s.seconds:.1f}s (data wait {100 * s.data_wait_fraction:.1f}% of step time)")
    if s.losses:
        print(f"loss: first {s.losses[0]:.4f}, last {s.losses[-1]:.4f}")
    print(f"store {store.describe()}: runs/{s.run_id}/ (checkpoints {', '.join(map(str, s.checkpoints)) or 'none'})")
    for name, path in result.outputs.items():
        print(f"{name}: {path}")
    return 0


class _Bar:
    """One tqdm bar per phase, fed by job snapshots from Watch or by in-process training events."""

    def __init__(self, quiet: bool):
        from tqdm import tqdm

        self.tqdm, self.quiet, self.bar, self.phase, self.note = tqdm, quiet, None, None, ""

    def update(self, job) -> None:
        p = job.progress
        self.show(p.phase, p.step, p.total, p.loss, p.seconds_per_step, p.message)

    def show(self, phase: str, step: int, total: int, loss: float, seconds_per_step: float, message: str) -> None:
        """Encode and train get a bar (one at a time); other phases a line each."""
        if self.quiet or not phase:
            return
        if phase not in ("encode", "train"):
            if message != self.note:
                self.note = message
                self.tqdm.write(f"[{phase}] {message}")
            return
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = self.tqdm(desc=phase, total=total or None, unit="step" if phase == "train" else "item")
        self.bar.total = total or None
        self.bar.n = step
        if loss:
            self.bar.set_postfix(loss=f"{loss:.4f}", s_step=f"{seconds_per_step:.2f}")
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------- through services
def _remote_job(args: argparse.Namespace, service: str) -> int:
    """Submit a train or encode job to the services (--server, EDITTUNER_*) or to a local stack started here."""
    from shared.cli.remote import ask_cancel_or_detach, describe, new_request_id, resolve_address, wait_for_validations
    from shared.config.loading import read_config_files
    from shared.rpc import encoder_pb2, trainer_pb2
    from shared.rpc.client import Client
    from shared.service.common import files_to_proto, state_name
    from shared.service.local_stack import start_local_stack

    files = read_config_files(args.config, args.data, args.overrides)
    run = _load(args)
    address = resolve_address(service, args.server)
    stack = None
    store_url = args.store or os.environ.get("EDITTUNER_STORE") or DEFAULT_STORE
    if address is None:
        stack = start_local_stack(str(Path(store_url).resolve()) if "://" not in store_url else store_url,
                                  Path(".edittuner/logs"))
        address = stack.addresses[service]
        print(f"started local services ({', '.join(f'{k} {v}' for k, v in stack.addresses.items())}); "
              f"store {store_url}; logs .edittuner/logs/", file=sys.stderr)
    client = Client(service, address)
    bar = _Bar(args.quiet)
    job = None
    try:
        if service == "trainer":
            job = client.call("StartRun", trainer_pb2.StartRunRequest(request_id=new_request_id(),
                                                                      files=files_to_proto(files))).job
        else:
            job = client.call("SubmitEncode", encoder_pb2.SubmitEncodeRequest(request_id=new_request_id(),
                                                                              files=files_to_proto(files))).job
        print(f"submitted job {job.job_id} to {service}_svc at {address}", file=sys.stderr)
        try:
            job = client.watch(job.job_id, bar.update)
        except KeyboardInterrupt:
            bar.close()
            if stack is not None or ask_cancel_or_detach():
                job = client.cancel(job.job_id)
                print(f"cancelled job {job.job_id}" + (" (the local services stop with this command; continue "
                      "later with resume_from_checkpoint=latest)" if stack is not None else ""), file=sys.stderr)
            else:
                print(f"detached; follow it with: edittuner jobs watch {job.job_id} --service {service} "
                      f"--server {address}", file=sys.stderr)
            return 130
        if service == "trainer" and state_name(job) == "succeeded":
            eval_address = stack.addresses["eval"] if stack is not None else resolve_address("eval", None)
            for v in wait_for_validations(job, eval_address):
                print(f"validation {v.job_id}: {state_name(v)}" + (f", PSNR LoRA {v.outputs['psnr_lora']} dB, "
                      f"base {v.outputs['psnr_base']} dB" if "psnr_lora" in v.outputs else f" {v.error}"),
                      file=sys.stderr)
    finally:
        bar.close()
        client.close()
        if stack is not None:
            stack.stop()
    print(describe(job))
    if state_name(job) != "succeeded":
        return 1
    if service == "trainer" and stack is None and not args.store:
        print(f"the run's LoRA and previews are in the server's store under runs/{job.outputs['run_id']}/; copy them "
              "with: edittuner runs pull " + job.outputs["run_id"] + " DIR --store URL", file=sys.stderr)
    elif service == "trainer" and "://" not in store_url:
        from shared.store.url import open_store
        from shared.train.runner import copy_outputs

        outputs = copy_outputs(open_store(store_url), f"runs/{job.outputs['run_id']}", Path(run.train.output_dir))
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from shared.cli.remote import describe, resolve_address
    from shared.rpc.client import Client

    address = resolve_address(args.service, args.server)
    if address is None:
        print("error: give --server HOST:PORT or set EDITTUNER_SERVER / EDITTUNER_"
              f"{args.service.upper()}_ADDR", file=sys.stderr)
        return 1
    client = Client(args.service, address)
    try:
        if args.action == "list":
            for job in client.list(args.state):
                print(describe(job))
        elif args.action == "get":
            print(describe(client.get(args.job_id)))
        elif args.action == "cancel":
            print(describe(client.cancel(args.job_id)))
        else:
            bar = _Bar(False)
            try:
                job = client.watch(args.job_id, bar.update)
            finally:
                bar.close()
            print(describe(job))
    finally:
        client.close()
    return 0


def cmd_runs_pull(args: argparse.Namespace) -> int:
    store = _store(args)
    prefix = f"runs/{args.run_id}"
    keys = store.list(prefix)
    if not keys:
        from shared.errors import NotFound

        raise NotFound(f"no run {args.run_id!r} in {store.describe()}")
    dest = Path(args.dir)
    for key in keys:
        if args.no_checkpoints and "/checkpoints/" in key:
            continue
        target = dest / key[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, target)
    print(f"pulled {args.run_id} from {store.describe()} into {dest}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Replace this process with the service's own entry point (``python -m <service>_svc``): the same process a
    container runs, with signals reaching it directly, and no import of a service from the core."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", f"{args.service}_svc"])


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from shared.model.tiny_model import save_tiny_model

    path = save_tiny_model(args.dir, args.flavour, seed=args.seed)
    print(f"tiny {args.flavour} model written to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from shared.cli.demo import run_demo

    run_demo(Path(args.output), flavour=args.flavour, samples=args.samples)
    return 0


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edittuner", description="LoRA training for Qwen-Image-Edit.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate config + datasets, pair them, show buckets and cache status")
    _add_run_args(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("plan", help="predict GPU memory and step time per service; exit 0 if the trainer fits, "
                                    "2 if not (with overrides that fit)")
    _add_run_args(p)
    p.add_argument("--gpu", default="H100", help="GPU for memory and timing: H100, H200, A100, L40S, RTX4090, RTX3090")
    p.add_argument("--gpu-memory", help="memory to fit, e.g. 24GiB or 80GB (default: the --gpu's)")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("encode", help="encode the datasets into the cache (VAE latents, caption embeddings)")
    _add_run_args(p)
    _add_server_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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
    q.add_argument("--store")
    q.add_argument("--no-checkpoints", action="store_true")
    q.set_defaults(func=cmd_runs_pull)
    p = sub.add_parser("serve", help="run one service in the foreground (configured by EDITTUNER_* variables)")
    p.add_argument("service", choices=["encoder", "trainer", "eval"])
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight model in the real Hugging Face layout")
    p.add_argument("dir")
    p.add_argument("--flavour", choices=["edit-v1", "edit-v2", "edit-v3"], default="edit-v2")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)
    p = sub.add_parser("demo", help="tiny model + generated pairs, end to end on a CPU")
    p.add_argument("--output", default="demo-out")
    p.add_argument("--flavour", choices=["edit-v1", "edit-v2", "edit-v3"], default="edit-v2")
    p.add_argument("--samples", type=int, default=8)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("bitsandbytes", "diffusers", "transformers"):
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
        return args.func(args)
    except EditTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
