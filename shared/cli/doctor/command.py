"""``edittuner doctor [--device cuda] [--full] [--json FILE]``: the checks in order, every row printed as it comes,
exit 1 when any fails."""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from shared.cli.doctor.block import block_rows
from shared.cli.doctor.full import FULL_PRECISIONS, full_rows
from shared.cli.doctor.host import host_rows
from shared.cli.doctor.rows import Check, Report, Row
from shared.cli.doctor.tiny_run import tiny_run_rows
from shared.plan.probe import BLOCK_PRECISIONS


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this host before training: device, libraries per precision, the "
        "process group, numerics per precision, a tiny run on the device",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument(
        "--full",
        action="store_true",
        help="also one real-size step per precision beside the "
        "planner's prediction (a GPU with 40+ GiB: the 20B transformer is built in bf16 first)",
    )
    p.add_argument("--json", help="write every row here (rewritten after each row)")
    p.add_argument("--model", help="the model to look for (default: every flavour's hub id)")
    p.add_argument("--precisions", help=f"block rows, comma-separated (default {','.join(BLOCK_PRECISIONS)})")
    p.add_argument("--full-precisions", help=f"--full rows (default {','.join(FULL_PRECISIONS)}; bf16 is no_change)")
    p.add_argument("--small", action="store_true", help="the small block (128 wide) on a GPU too; the CPU's default")
    p.add_argument("--skip", default="", help="comma-separated groups to leave out: host, block, tiny")
    p.add_argument("--work-dir", help="where the tiny run writes (default: a new temporary directory)")
    p.set_defaults(func=cmd_doctor)


def _precisions(text: str | None, default: tuple[str, ...], known: tuple[str, ...]) -> tuple[str, ...]:
    from shared.errors import InvalidInput

    if not text:
        return default
    names = tuple("no_change" if p.strip() == "bf16" else p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in known]
    if unknown:
        raise InvalidInput(f"unknown precision(s) {', '.join(unknown)}: expected some of {', '.join(known)}")
    return names


def cmd_doctor(args: argparse.Namespace) -> int:
    from shared.model.device import resolve_device
    from shared.model.quantize import PRECISIONS

    device = resolve_device(args.device or "auto")
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 4))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    block_precisions = _precisions(args.precisions, BLOCK_PRECISIONS, PRECISIONS[1:])
    full_precisions = _precisions(args.full_precisions, FULL_PRECISIONS, PRECISIONS)
    header = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": str(device),
    }
    report = Report(args.json, header=header)
    print(f"edittuner doctor on {platform.node()}, device {device}")
    checks: list[Check] = []
    if "host" not in skip:
        checks += host_rows(device, args.model)
    if "block" not in skip:
        checks += block_rows(device, small=args.small or device.type == "cpu", precisions=block_precisions)
    if "tiny" not in skip:
        checks.append(("tiny run", lambda: tiny_run_rows(device, work=args.work_dir)))
    if args.full:
        checks += full_rows(device, full_precisions)
    elif device.type != "cuda":
        checks.append(
            (
                "full",
                lambda: Row(
                    "real-size steps",
                    "skip",
                    "need a GPU and --full: one real 20B step per precision beside the planner's prediction",
                ),
            )
        )
    for name, fn in checks:
        report.run(name, fn)
    failed = report.failed
    counts = {s: sum(r.status == s for r in report.rows) for s in ("pass", "warn", "fail", "skip")}
    print(
        f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed, {counts['skip']} skipped"
        + (f"; failed: {', '.join(r.check for r in failed)}" if failed else "")
    )
    return 1 if failed else 0
