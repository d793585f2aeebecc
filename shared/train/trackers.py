"""Experiment trackers (``report_to``): a run's TensorBoard event files and offline W&B run.

``RunTracker`` is fed the event dicts the Trainer emits (the same ones trainer_svc turns into Prometheus
metrics) and the results of in-process validations. It writes them with each tool's own writer into a local
folder, and at every checkpoint and at the end copies what changed into the store under ``runs/<run>/logs/``,
so ``edittuner runs pull`` brings the logs back with the rest of the run. Nothing here uses the network: W&B runs
in offline mode, and ``wandb sync`` uploads a pulled run folder later.

Layout under ``logs/`` (in the store; for a run on this machine also ``<output_dir>/<logging_dir>``)::

    tensorboard/<run name>/events.out.tfevents.*                           training scalars (one file per start)
    tensorboard/<run name>/validation/events.out.tfevents.<step>.validation  one file per validation
    wandb/offline-run-<time>-<run id>/run-<run id>.wandb                   one folder per start (a resume adds one)

Tags, the same in TensorBoard and W&B:

    train/loss               mean loss over the optimizer step's accumulation window
    train/learning_rate      the rate the step used
    train/grad_norm          before clipping (only with max_grad_norm > 0: without clipping it is not computed)
    train/data_wait          fraction of the step spent waiting for batches
    train/seconds_per_step
    gpu/allocated_gib, gpu/reserved_gib, gpu/peak_gib   (CUDA only)
    checkpoint/save_seconds
    validation/psnr_lora, validation/psnr_base           mean PSNR (dB) of the previews against their targets
    validation/heldout_loss  held-out flow-matching loss, mean over the sigmas; ``_sigma_<s>``: at one sigma
    validation/seconds
    validation/<sample>      the preview grid (references | base | LoRA | target), named as its PNG in the store
    validation/step          W&B only: the step a validation is of, the x axis of the validation/* charts

Service runs: eval_svc renders a validation while the worker trains on. eval_svc writes each render's TensorBoard
file into the run's logs itself (``publish_validation``), whenever it finishes. The worker logs the renders
whose ``validation/step-N/metrics.json`` it finds at later steps (every ``POLL_S``) and at its end to W&B; a
render that finishes after the worker has ended is in TensorBoard but not in the W&B run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config.schema import RunConfig, TrainConfig, report_targets
from shared.errors import InvalidInput
from shared.store.base import ObjectStore
from shared.train.events import TrainEvent

log = logging.getLogger(__name__)
Validator = Callable[[Any, int], dict[str, Any]]  # (trainer, step) → result, as Trainer.validate
GIB = float(1 << 30)
POLL_S = 30.0  # how often a service run's worker looks for renders eval_svc has finished (one HEAD each)
PARTIAL = ".partial-"  # a file being moved into place: never read or copied


# --------------------------------------------------------------------------------------------- where files go
def logs_prefix(run_id: str) -> str:
    return f"runs/{run_id}/logs"


def logs_dir(output_dir: str | Path, logging_dir: str) -> Path:
    """A run's tracker folder on this machine: ``logging_dir``, under output_dir unless absolute."""
    path = Path(logging_dir).expanduser()
    return path if path.is_absolute() else Path(output_dir) / path


def run_name(cfg: TrainConfig, run_id: str) -> str:
    return cfg.tracker_run_name or run_id


def tensorboard_folder(cfg: TrainConfig, run_id: str) -> str:
    """The TensorBoard run folder under ``logs/``: the run name as one path segment."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name(cfg, run_id)).strip("-.")
    return f"tensorboard/{name or run_id}"


# ------------------------------------------------------------------------------------ events → tag values
def train_scalars(e: TrainEvent) -> dict[str, float]:
    """The tag values of a Trainer event: a finished step or a checkpoint; {} for any other event."""
    if e.phase == "checkpoint" and e.seconds is not None:
        return {"checkpoint/save_seconds": e.seconds}
    if not e.is_step:
        return {}
    out = {
        "train/loss": float(e.loss or 0.0),
        "train/learning_rate": float(e.lr or 0.0),
        "train/seconds_per_step": float(e.seconds_per_step or 0.0),
    }
    if e.grad_norm is not None:
        out["train/grad_norm"] = e.grad_norm
    if e.seconds_per_step:
        out["train/data_wait"] = e.data_wait_fraction
    for kind in ("allocated", "reserved", "peak"):
        if f"gpu_{kind}_bytes" in e.gpu:
            out[f"gpu/{kind}_gib"] = e.gpu[f"gpu_{kind}_bytes"] / GIB
    return out


def validation_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The tag values of a validation result (``ValidationResult.to_json``, as metrics.json holds it)."""
    out = {
        f"validation/{k}": float(result[k]) for k in ("psnr_lora", "psnr_base", "seconds") if result.get(k) is not None
    }
    if result.get("heldout_loss_mean") is not None:
        out["validation/heldout_loss"] = float(result["heldout_loss_mean"])
    for sigma, value in (result.get("heldout_loss") or {}).items():
        out[f"validation/heldout_loss_sigma_{sigma}"] = float(value)
    return out


@dataclass
class Preview:
    tag: str
    image: Any  # PIL RGB image
    caption: str


def previews(store: ObjectStore, result: dict[str, Any]) -> list[Preview]:
    """The preview grids a validation result names, read back from the store."""
    from PIL import Image

    out = []
    for s in result.get("samples") or []:
        name = s["grid"].rsplit("/", 1)[-1].removesuffix(".png")
        image = Image.open(io.BytesIO(store.get_bytes(s["grid"]))).convert("RGB")
        out.append(
            Preview(
                f"validation/{name}",
                image,
                f"{s['dataset']}/{s['key']}: {s['caption']} (PSNR base "
                f"{s['psnr_base']:.2f} dB, LoRA {s['psnr_lora']:.2f} dB)",
            )
        )
    return out


def write_validation_events(folder: Path, step: int, scalars: dict[str, float], images: list[Preview]) -> Path:
    """One validation as its own TensorBoard event file, ``events.out.tfevents.<step>.validation``: moved into
    place whole (a reader never sees half of it; a second render of the step replaces it), and named so that the
    files of a run sort by step, the order TensorBoard reads them in."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"events.out.tfevents.{step:010d}.validation"
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        try:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            for p in images:
                writer.add_image(p.tag, np.asarray(p.image), step, dataformats="HWC")
        finally:
            writer.close()
        [written] = Path(tmp).glob("events.out.tfevents.*")
        partial = folder / f"{PARTIAL}{final.name}"
        shutil.copyfile(written, partial)
        os.replace(partial, final)
    return final


def publish_validation(store: ObjectStore, run: RunConfig, run_id: str, result: dict[str, Any]) -> str | None:
    """eval_svc: a render's TensorBoard file into the run's logs in the store (where the worker's files go too),
    when report_to has tensorboard. Returns its key, or None."""
    if "tensorboard" not in report_targets(run.train.report_to):
        return None
    step = int(result["step"])
    with tempfile.TemporaryDirectory() as tmp:
        path = write_validation_events(Path(tmp), step, validation_scalars(result), previews(store, result))
        key = f"{logs_prefix(run_id)}/{tensorboard_folder(run.train, run_id)}/validation/{path.name}"
        store.put_file(key, path)
    return key


# -------------------------------------------------------------------------------------------- the backends
def _require(target: str, report_to: str) -> None:
    """Import a tracker's package now, at setup: a missing one is a user error naming report_to, not a traceback
    at the first step."""
    try:
        if target == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (raises without tensorboard)
        else:
            import wandb  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything else on import
        raise InvalidInput(
            f"report_to={report_to!r}: {target} cannot be imported ({type(e).__name__}: {e}); "
            f"install it (pip install {target}) or drop {target} from report_to"
        ) from None


class _TensorBoard:
    name = "tensorboard"
    external_validations = False  # eval_svc writes those files itself (publish_validation)

    def __init__(self, root: Path, cfg: TrainConfig, run_id: str, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = root / tensorboard_folder(cfg, run_id)
        # A resumed run redoes the steps after its checkpoint: purge_step hides what the earlier start logged there
        self.writer = SummaryWriter(str(self.folder), flush_secs=30, purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("config", "```\n" + json.dumps(dataclasses.asdict(cfg), indent=2) + "\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def validation(self, step: int, scalars: dict[str, float], images: list[Preview], at_step: int) -> None:
        write_validation_events(self.folder / "validation", step, scalars, images)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextmanager
def _wandb_env(root: Path, private: Path) -> Iterator[None]:
    """The environment wandb (and the wandb-core process it starts, which inherits it) runs in: offline, quiet,
    no error reporting to W&B's servers, no git probing, and its cache/config/data folders in ``private`` rather
    than the user's home. Restored afterwards, so nothing else in the process sees these values."""
    values = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DIR": str(root),
        **{f"WANDB_{k}_DIR": str(private / k.lower()) for k in ("CACHE", "CONFIG", "DATA", "ARTIFACT")},
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Wandb:
    name = "wandb"
    external_validations = True  # the worker picks up eval_svc's finished renders (RunTracker._poll)

    def __init__(self, root: Path, cfg: TrainConfig, run_id: str, step: int):
        import wandb

        self.private = Path(tempfile.mkdtemp(prefix="edittuner-wandb-"))
        settings = wandb.Settings(
            mode="offline",
            silent=True,
            console="off",
            disable_git=True,
            save_code=False,
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
        )
        try:  # x_disable_meta: wandb-metadata.json would record argv, the store URL with it
            with _wandb_env(root, self.private):
                self.run = wandb.init(
                    project=cfg.tracker_project_name,
                    name=run_name(cfg, run_id),
                    id=run_id,
                    resume="allow",
                    dir=str(root),
                    config=dataclasses.asdict(cfg),
                    settings=settings,
                )
        except BaseException:
            shutil.rmtree(self.private, ignore_errors=True)
            raise
        self.run.define_metric("validation/*", step_metric="validation/step")
        self.root, self.folder = root, Path(self.run.dir).parent

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def validation(self, step: int, scalars: dict[str, float], images: list[Preview], at_step: int) -> None:
        import wandb

        media = {p.tag: wandb.Image(p.image, caption=p.caption) for p in images}
        self.run.log({"validation/step": step, **scalars, **media}, step=max(step, at_step))  # W&B steps only grow

    def flush(self) -> None:
        pass  # wandb-core writes the .wandb file as it goes; finish() completes it

    def close(self) -> None:
        import wandb

        try:
            with _wandb_env(self.root, self.private):
                self.run.finish()
                wandb.teardown()  # stops wandb-core now, not at interpreter exit
        finally:
            shutil.rmtree(self.private, ignore_errors=True)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb}


# ----------------------------------------------------------------------------------------------- the tracker
class RunTracker:
    """The trackers report_to names, for one run: ``tracker(event)`` for each Trainer event, ``wrap`` around an
    in-process validator, ``close()`` at the end (also after a failure). Construction imports the trackers' packages
    and ``start`` opens them, both raising InvalidInput; afterwards a tracker failure is logged and training goes
    on. ``local_dir``: the folder to write in (None: a temporary one, removed once copied to the store)."""

    def __init__(
        self,
        run: RunConfig,
        store: ObjectStore,
        run_id: str,
        local_dir: Path | None = None,
        poll_s: float | None = None,
    ):
        self.targets = list(dict.fromkeys(report_targets(run.train.report_to)))
        for target in self.targets:
            _require(target, run.train.report_to)
        self.cfg, self.store, self.run_id = run.train, store, run_id
        self.prefix = logs_prefix(run_id)
        self.local_dir, self.poll_s = local_dir, POLL_S if poll_s is None else poll_s
        self.dir: Path | None = None
        self.backends: list[Any] = []
        self.step = 0
        self._pending: set[int] = set()  # validation steps handed to eval_svc, not yet logged
        self._last_poll = time.monotonic()
        self._synced: dict[str, tuple[int, int]] = {}  # relative path → (size, mtime) last copied
        self._failures: dict[str, int] = {}
        self._closed = False

    def start(self, step: int = 0) -> None:
        """Open the writers (after the Trainer's setup, so a refused run leaves no log files); ``step``: the step
        training resumes from."""
        self.step = step
        if self.local_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"edittuner-logs-{self.run_id}-"))
        else:
            self.dir = self.local_dir
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InvalidInput(
                    f"logging_dir: cannot create {self.dir} for report_to={self.cfg.report_to!r}: {e}"
                ) from None
            self._synced = {rel: sig for rel, sig in self._files()}  # a previous start's files are not ours
        for target in self.targets:
            try:
                self.backends.append(_BACKENDS[target](self.dir, self.cfg, self.run_id, step))
            except Exception as e:  # noqa: BLE001 - a tracker that cannot start is the config's error
                self._abort()
                raise InvalidInput(
                    f"report_to={self.cfg.report_to!r}: could not start {target} in {self.dir} "
                    f"({type(e).__name__}: {e}); fix that or drop {target} from report_to"
                ) from None
        self._announce()

    def _announce(self) -> None:
        """Where the files are and how to use them, in words a user can paste."""
        here = self.local_dir is not None
        assert self.dir is not None  # start() sets it before announcing
        log.info(
            "report_to: tracker files %s, copied to %s in %s at each checkpoint and at the end%s",
            f"in {self.dir}" if here else "in a temporary folder",
            self.prefix,
            self.store.describe(),
            "" if here else f" (fetch them with: edittuner runs pull {self.run_id} DIR; they land in DIR/logs)",
        )
        logs = self.dir if here else Path("DIR/logs")
        for b in self.backends:
            if b.name == "tensorboard":
                log.info(
                    "report_to: TensorBoard run %s; view it with: tensorboard --logdir %s",
                    tensorboard_folder(self.cfg, self.run_id),
                    logs / "tensorboard",
                )
            else:
                log.info(
                    "report_to: offline W&B run %s (nothing is uploaded from here); upload it later with: "
                    "wandb sync %s",
                    b.folder.name,
                    logs / "wandb" / "offline-run-*",
                )

    def __call__(self, event: TrainEvent) -> None:
        if not self.backends:
            return
        if event.phase == "validation_ready":
            if any(b.external_validations for b in self.backends):
                self._pending.add(event.step)
            return
        values = train_scalars(event)
        if event.is_step:
            self.step = event.step
        for b in self.backends:
            if values:
                self._safely(f"{b.name}: logging scalars", b.scalars, values, event.step)
        if event.phase == "checkpoint":
            self.sync()
        if self._pending and time.monotonic() - self._last_poll >= self.poll_s:
            self._safely("reading finished validations", self._poll)

    def wrap(self, validate: Validator) -> Validator:
        """An in-process validator that also logs its result."""

        def tracked(trainer: Any, step: int) -> dict[str, Any]:
            result = validate(trainer, step)
            self.log_validation(step, result)
            return result

        return tracked

    def log_validation(self, step: int, result: dict[str, Any], only_external: bool = False) -> None:
        if result.get("external") or "error" in result:
            return  # handed to eval_svc (see _poll), or failed: nothing to log
        backends = [b for b in self.backends if b.external_validations or not only_external]
        if not backends:
            return
        scalars, images = validation_scalars(result), []
        self._safely("reading the preview grids", lambda: images.extend(previews(self.store, result)))
        for b in backends:
            self._safely(f"{b.name}: logging a validation", b.validation, step, scalars, images, max(step, self.step))

    def _poll(self) -> None:
        self._last_poll = time.monotonic()
        for step in sorted(self._pending):
            key = f"runs/{self.run_id}/validation/step-{step}/metrics.json"
            if self.store.exists(key):
                self._pending.discard(step)
                self.log_validation(step, self.store.get_json(key), only_external=True)

    # ------------------------------------------------------------------------------------ into the store
    def _files(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """(relative path, (size, mtime)) of the plain files under the folder; links (wandb's latest-run) and
        files being moved into place are left out."""
        assert self.dir is not None
        for folder, _, names in os.walk(self.dir):  # does not follow links to folders
            for name in sorted(names):
                path = Path(folder) / name
                if name.startswith(PARTIAL) or path.is_symlink() or not path.is_file():
                    continue
                st = path.stat()
                yield path.relative_to(self.dir).as_posix(), (st.st_size, st.st_mtime_ns)

    def sync(self) -> bool:
        """Copy every file that changed since the last copy into the store; True when all arrived."""
        if self.dir is None:
            return True
        for b in self.backends:
            self._safely(f"{b.name}: flushing", b.flush)
        ok = True
        with tempfile.TemporaryDirectory() as tmp:
            snapshot = Path(tmp) / "file"
            for rel, sig in list(self._files()):
                if self._synced.get(rel) == sig:
                    continue
                try:  # from a copy: wandb-core may be appending to the file, and a store hashes before it uploads
                    shutil.copyfile(self.dir / rel, snapshot)
                    self.store.put_file(f"{self.prefix}/{rel}", snapshot)
                    self._synced[rel] = sig  # as it was before the copy: grown since, it goes again next time
                except Exception:  # noqa: BLE001 - trackers must never stop training
                    ok = False
                    self._warn("copying tracker files to the store")
        return ok

    def close(self) -> None:
        """Finish the trackers and copy their files to the store; idempotent."""
        if self._closed or self.dir is None:
            return
        self._closed = True
        if self._pending:
            self._safely("reading finished validations", self._poll)
            if self._pending:
                log.info(
                    "report_to: the validations of steps %s were still rendering when training ended: they are "
                    "not in the W&B run%s",
                    sorted(self._pending),
                    " (eval_svc writes them to TensorBoard)" if "tensorboard" in self.targets else "",
                )
        for b in self.backends:
            self._safely(f"{b.name}: closing", b.close)
        self.backends = []
        ok = self.sync()
        if self._failures:
            log.warning(
                "report_to: tracker operations failed during the run (%s); the first traceback of each is above",
                ", ".join(f"{what}: {n}x" for what, n in self._failures.items()),
            )
        if self.local_dir is None:
            if ok:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                log.warning("report_to: some tracker files did not reach the store; they are kept in %s", self.dir)

    def _abort(self) -> None:
        """A tracker failed to start: close the others, copy nothing, remove a temporary folder."""
        for b in self.backends:
            self._safely(f"{b.name}: closing", b.close)
        self.backends, self._closed = [], True
        if self.local_dir is None and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _safely(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - trackers must never stop training
            self._warn(what)

    def _warn(self, what: str) -> None:
        """A tracker failure costs logs, never the run: warned with its traceback the first time, then counted."""
        self._failures[what] = self._failures.get(what, 0) + 1
        if self._failures[what] == 1:
            log.warning("report_to: %s failed; training goes on", what, exc_info=True)


def open_tracker(run: RunConfig, store: ObjectStore, run_id: str, local_dir: Path | None = None) -> RunTracker | None:
    """The run's tracker, or None for report_to none."""
    return RunTracker(run, store, run_id, local_dir) if report_targets(run.train.report_to) else None
