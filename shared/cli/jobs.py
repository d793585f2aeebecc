"""The CLI's commands that talk to the services: train and encode as jobs (uploading the datasets the services
cannot read), jobs list/get/watch/cancel, runs pull and report, data push."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shared.cli.common import DEFAULT_STORE, ProgressBars, store_from_args, warn


def remote_job(args: argparse.Namespace, service: str) -> int:
    """Submit a train or encode job to the services (--server, EDITTUNER_*) or to a local stack started here."""
    from shared.cli.remote import ask_cancel_or_detach, describe, new_request_id, resolve_address, wait_for_validations
    from shared.cli.transfer import datasets_for_server
    from shared.config.loading import read_run_files
    from shared.rpc import encoder_pb2, trainer_pb2
    from shared.rpc.client import Client
    from shared.service.common import files_to_proto, state_name
    from shared.service.local_stack import start_local_stack
    from shared.service.outputs import RenderOutputs

    files, run = read_run_files(args.config, args.data, args.overrides)  # the one parse of this process
    warn(run)
    address = resolve_address(service, args.server)
    stack = None
    store_url = args.store or os.environ.get("EDITTUNER_STORE") or DEFAULT_STORE
    if address is None:
        stack = start_local_stack(
            str(Path(store_url).resolve()) if "://" not in store_url else store_url, Path(".edittuner/logs")
        )
        address = stack.addresses[service]
        print(
            f"started local services ({', '.join(f'{k} {v}' for k, v in stack.addresses.items())}); "
            f"store {store_url}; logs .edittuner/logs/",
            file=sys.stderr,
        )
    client = Client(service, address)
    bar = ProgressBars(args.quiet)
    job = None
    try:
        data = Client("data", address)
        try:  # the datasets the server cannot read go into its store first
            files = datasets_for_server(
                data,
                files,
                Path.cwd(),
                report=lambda m: print(m, file=sys.stderr),
                progress=None if args.quiet else bar.bytes,
            )
        finally:
            data.close()
            bar.close()
        if service == "trainer":
            job = client.call(
                "StartRun", trainer_pb2.StartRunRequest(request_id=new_request_id(), files=files_to_proto(files))
            ).job
        else:
            job = client.call(
                "SubmitEncode",
                encoder_pb2.SubmitEncodeRequest(request_id=new_request_id(), files=files_to_proto(files)),
            ).job
        print(f"submitted job {job.job_id} to {service}_svc at {address}", file=sys.stderr)
        try:
            job = client.watch(job.job_id, bar.update)
        except KeyboardInterrupt:
            bar.close()
            if stack is not None or ask_cancel_or_detach():
                job = client.cancel(job.job_id)
                print(
                    f"cancelled job {job.job_id}"
                    + (
                        " (the local services stop with this command; continue "
                        "later with resume_from_checkpoint=latest)"
                        if stack is not None
                        else ""
                    ),
                    file=sys.stderr,
                )
            else:
                print(
                    f"detached; follow it with: edittuner jobs watch {job.job_id} --service {service} "
                    f"--server {address}",
                    file=sys.stderr,
                )
            return 130
        if service == "trainer" and state_name(job) == "succeeded":
            eval_address = stack.addresses["eval"] if stack is not None else resolve_address("eval", None)
            for v in wait_for_validations(job, eval_address):
                r = RenderOutputs.from_proto(v.render) if v.HasField("render") else None  # None: the render failed
                print(
                    f"validation {v.job_id}: {state_name(v)}"
                    + (f", PSNR LoRA {r.psnr_lora} dB, base {r.psnr_base} dB" if r else f" {v.error}"),
                    file=sys.stderr,
                )
    finally:
        bar.close()
        client.close()
        if stack is not None:
            stack.stop()
    print(describe(job))
    if state_name(job) != "succeeded":
        return 1
    if service == "trainer" and stack is None:
        print(
            f"the run's LoRA and previews are in the services' store under runs/{job.train.run_id}/; fetch "
            f"them with: edittuner runs pull {job.train.run_id} DIR --server {address}",
            file=sys.stderr,
        )
    elif service == "trainer":  # a run started on this machine: its files go where the config says
        from shared.store.url import open_store
        from shared.train.runner import copy_outputs

        outputs = copy_outputs(open_store(store_url), f"runs/{job.train.run_id}", Path(run.train.output_dir))
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from shared.cli.remote import describe, resolve_address
    from shared.rpc.client import Client

    address = resolve_address(args.service, args.server)
    if address is None:
        print(
            f"error: give --server HOST:PORT or set EDITTUNER_SERVER / EDITTUNER_{args.service.upper()}_ADDR",
            file=sys.stderr,
        )
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
            bar = ProgressBars(False)
            try:
                job = client.watch(args.job_id, bar.update)
            finally:
                bar.close()
            print(describe(job))
    finally:
        client.close()
    return 0


def cmd_runs_pull(args: argparse.Namespace) -> int:
    """A run's files into DIR: through the services with --server (no store credentials needed), else straight
    from the store (--store, EDITTUNER_STORE, the local default)."""
    dest = Path(args.dir)
    server = args.server or resolve_data_address()
    if server and not args.store:
        from shared.cli.transfer import pull_run
        from shared.rpc.client import Client

        client = Client("data", server)
        try:
            written = pull_run(client, args.run_id, dest, include_checkpoints=not args.no_checkpoints)
        finally:
            client.close()
        print(f"pulled {len(written)} files of run {args.run_id} from {server} into {dest}")
        return 0
    store = store_from_args(args)
    prefix = f"runs/{args.run_id}"
    keys = store.list(prefix)
    if not keys:
        from shared.errors import NotFound

        raise NotFound(f"no run {args.run_id!r} in {store.describe()}")
    for key in keys:
        if args.no_checkpoints and "/checkpoints/" in key:
            continue
        target = dest / key[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, target)
    print(f"pulled {args.run_id} from {store.describe()} into {dest}")
    return 0


def cmd_runs_report(args: argparse.Namespace) -> int:
    """A run's report (``shared.evaluate.report``) made here into DIR, from the run's files: fetched through the
    services with --server (only the files the report reads), else read from the store."""
    from shared.evaluate.report import FolderRunFiles, StoreRunFiles, report_input, write_report_folder

    dest = Path(args.dir)
    server = args.server or resolve_data_address()
    if server and not args.store:
        import tempfile

        from shared.cli.transfer import pull_run
        from shared.rpc.client import Client

        client = Client("data", server)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                pull_run(client, args.run_id, Path(tmp), only=report_input)
                page = write_report_folder(FolderRunFiles(Path(tmp)), args.run_id, dest)
        finally:
            client.close()
        print(f"report of {args.run_id} from {server}: {page}")
        return 0
    store = store_from_args(args)
    page = write_report_folder(StoreRunFiles(store, args.run_id), args.run_id, dest)
    print(f"report of {args.run_id} from {store.describe()}: {page}")
    return 0


def cmd_data_push(args: argparse.Namespace) -> int:
    """Upload a dataset folder into the services' store and print the entry that uses it."""
    import json

    from shared.cli.transfer import push_folder
    from shared.rpc.client import Client

    server = args.server or resolve_data_address()
    if not server:
        print("error: give --server HOST:PORT (any of the three services) or set EDITTUNER_SERVER", file=sys.stderr)
        return 1
    bar = ProgressBars(args.quiet)
    client = Client("data", server)
    try:
        result = push_folder(client, Path(args.dir), args.name, None if args.quiet else bar.bytes(args.dir))
    finally:
        bar.close()
        client.close()
    print(
        f"uploaded {result.sent} of {result.files} files ({result.sent_bytes} bytes; the rest were stored "
        f"already) as {result.upload_id!r}. Use it in multidatabackend.json instead of instance_data_dir:",
        file=sys.stderr,
    )
    print(json.dumps({"type": "store", "store_upload": result.upload_id}))
    return 0


def resolve_data_address() -> str | None:
    """Any service answers DataService: EDITTUNER_SERVER (trainer's port), or a service's own address."""
    from shared.cli.remote import resolve_address

    return next((a for a in (resolve_address(s, None) for s in ("trainer", "encoder", "eval")) if a), None)
