"""The training worker: ``python -m shared.service.worker --config C [--data D] --store S [key=value ...]``.

trainer_svc and ``edittuner train --in-process`` on several GPUs start this as a child process (``COMMAND``;
torchrun starts the same entrypoint on several GPUs), so that a crash or an out-of-memory fails the run and not
the service. It prints the protocol of ``shared.train.events`` on stdout, one message per line: ``TrainEvent``s
while it runs, then a ``WorkerResult`` or a ``WorkerError``. Exit status 0 on success (also
when stopped by SIGTERM/SIGINT at a step boundary with a checkpoint: ``"interrupted": true``), 1 on a user error
(bad config, missing cache, diverged loss, out of memory), 2 on anything unexpected.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback

import torch

from shared import errors
from shared.config.loading import load_run_config
from shared.logs import quiet_call_noise, quiet_import_noise
from shared.model.device import resolve_device
from shared.service.supervisor import OOM_ADVICE, OOM_MARKERS, exit_with_parent
from shared.store.url import open_store
from shared.train import distributed, previews
from shared.train.events import WorkerError, WorkerMessage, WorkerResult, encode_line
from shared.train.runner import train_run

RANK = distributed.current()
# How a supervisor starts the worker (``shared.service.supervisor.run_worker``), torchrun's ``-m`` included.
COMMAND = [sys.executable, "-m", __name__]


def _emit(message: WorkerMessage) -> None:
    """Rank 0 reports events and the result; any rank its error (named, when there are several)."""
    if not RANK.main and not isinstance(message, WorkerError):
        return
    if RANK.active and isinstance(message, WorkerError):
        message = WorkerError(f"rank {RANK.rank}: {message.message}", message.code, message.kind, RANK.rank)
    print(encode_line(message), flush=True)


def _error(err: BaseException, message: str) -> None:
    _emit(WorkerError.of(err, message))


def _stop_on_signals() -> threading.Event:
    """SIGTERM (the service stopping, a Kubernetes eviction) or SIGINT: finish the step, checkpoint, exit 0 with
    ``interrupted``. A second signal exits at once."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        logging.getLogger(__name__).info("%s: stopping after this step, with a checkpoint", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    return stop


def _configure_logging() -> None:
    """INFO on stderr (trainer_svc keeps it as the run's worker.log); errors only from the libraries that announce
    their import or warn on every call (shared.logs)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    quiet_import_noise()
    quiet_call_noise()


def _out_of_memory(e: BaseException) -> int:
    """Report an out-of-memory error (exit 1): its line that says so, else its first, else its class."""
    where = "host" if isinstance(e, MemoryError) else "GPU"
    lines = str(e).splitlines()
    said = next((line for line in lines if OOM_MARKERS.search(line)), lines[0] if lines else type(e).__name__)
    traceback.print_exc()
    message = f"out of {where} memory in the training worker: {said.strip()[:300]}; {OOM_ADVICE}"
    _error(errors.ResourceExhausted(message), message)
    return 1


def main(argv: list[str] | None = None) -> int:
    exit_with_parent()  # a killed trainer_svc leaves no worker behind writing checkpoints
    stop = _stop_on_signals()
    ap = argparse.ArgumentParser(prog="shared.service.worker")
    ap.add_argument("--config")
    ap.add_argument("--data")
    ap.add_argument("--store", required=True)
    ap.add_argument("--no-encode", action="store_true", help="the caches exist already (encoder_svc made them)")
    ap.add_argument("--no-validation", action="store_true")
    ap.add_argument(
        "--external-validation",
        action="store_true",
        help="export the LoRA at validation steps and emit validation_ready events (trainer_svc), "
        "unless the planner says trainer and eval_svc do not fit their GPU together: then "
        "validate here",
    )
    ap.add_argument("--run-id")
    ap.add_argument("--until-step", type=int, help="stop after this step (the run can be resumed)")
    ap.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="DATASET=KEY",
        help="the cache index of a dataset, as the encoder reported it",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    _configure_logging()
    try:
        run = load_run_config(args.config, args.data, args.overrides)
        distributed.init(distributed.rank_device(resolve_device(run.train.device), RANK))
        result = train_run(
            run,
            open_store(args.store),
            events=_emit,
            previews=previews.NONE
            if args.no_validation
            else previews.AUTO
            if args.external_validation
            else previews.IN_THIS_PROCESS,
            until_step=args.until_step,
            encode=not args.no_encode,
            run_id=args.run_id,
            stop=stop,
            copy_to_output_dir=False,
            index_keys=dict(i.split("=", 1) for i in args.index) if args.index else None,
        )
    except errors.EditTunerError as e:
        _error(e, str(e))
        return 1
    except (torch.OutOfMemoryError, MemoryError) as e:
        return _out_of_memory(e)
    except Exception as e:  # noqa: BLE001 - the supervisor reports a generic failure; the traceback goes to the log
        if OOM_MARKERS.search(str(e)):  # a CUDA library's failed allocation, raised as a RuntimeError
            return _out_of_memory(e)
        traceback.print_exc()
        _error(e, f"internal error in the training worker: {type(e).__name__}")
        return 2
    finally:
        distributed.shutdown()  # after train_run dropped its DDP wrapper (a live one can abort the exit)
    s = result.summary
    _emit(
        WorkerResult(
            run_id=s.run_id,
            steps=s.steps,
            processes=RANK.world,
            final_loss=s.losses[-1] if s.losses else None,
            lora=list(s.lora_keys),
            checkpoints=list(s.checkpoints),
            interrupted=s.interrupted,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
