"""What the CLI's commands share: the store and config from the arguments, and the progress bars."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shared.config.schema import RunConfig
    from shared.rpc.common_pb2 import Job
    from shared.store.base import ObjectStore

DEFAULT_STORE = ".edittuner/store"


def store_from_args(args: argparse.Namespace) -> ObjectStore:
    from shared.store.url import open_store

    return open_store(args.store or os.environ.get("EDITTUNER_STORE") or DEFAULT_STORE)


def load_from_args(args: argparse.Namespace) -> RunConfig:
    from shared.config.loading import load_run_config

    run = load_run_config(args.config, args.data, args.overrides)
    warn(run)
    return run


def warn(run: RunConfig) -> None:
    """The config's warnings (ignored keys, orphan references), once, before the work."""
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)


class _Bar(Protocol):
    """What ProgressBars uses of a tqdm bar (tqdm has no annotations)."""

    total: float | None
    n: float

    def set_postfix_str(self, s: str) -> None: ...

    def refresh(self) -> None: ...

    def close(self) -> None: ...


class ProgressBars:
    """One tqdm bar per phase, fed by job snapshots from Watch or by in-process training events."""

    def __init__(self, quiet: bool) -> None:
        from tqdm import tqdm

        self.tqdm, self.quiet, self.note = tqdm, quiet, ""
        self.bar: _Bar | None = None
        self.phase: str | None = None

    def update(self, job: Job) -> None:
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
        bar = self.bar
        assert bar is not None  # made with self.phase
        bar.total = total or None
        bar.n = step
        if loss:  # a training step's message says what else it ran (scheduled sampling's forwards)
            note = f", {message}" if phase == "train" and message and message != "training" else ""
            bar.set_postfix_str(f"loss={loss:.4f}, s_step={seconds_per_step:.2f}{note}")
        bar.refresh()

    def bytes(self, label: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback drawing a bar in bytes (uploads, downloads)."""

        def progress(done: int, total: int) -> None:
            if self.quiet:
                return
            if self.phase != f"upload {label}":
                self.close()
                self.phase = f"upload {label}"
                self.bar = self.tqdm(desc=f"upload {label}", total=total, unit="B", unit_scale=True)
            bar = self.bar
            assert bar is not None  # made with self.phase
            bar.total = total
            bar.n = done
            bar.refresh()

        return progress

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.phase = None
