"""One run's validation previews, rendered the same way wherever they are made.

The training worker (with its training transformer in the pipeline, ``shared.train.previews``) and eval_svc (with
the LoRA file loaded into its resident pipeline) both call ``RunValidation.render``: the eval set paired once, the
settings of the renders after one that ran out of GPU memory made smaller, the grids and ``metrics.json`` written,
the run's report refreshed. What differs between the two is only how the LoRA's weights get into the pipeline: the
``weights`` context manager the caller passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from shared.config.schema import RunConfig
from shared.data.pairing import pair_datasets
from shared.encode.cache import index_key, settings_for
from shared.evaluate.preview import (
    EvalSet,
    ValidationResult,
    eval_set,
    out_of_memory,
    render_validation,
    validation_settings,
)
from shared.evaluate.report import refresh_run_report
from shared.store.base import ObjectStore


class RunValidation:
    """The previews of run ``run_id``: ``index_keys`` are the cache indexes of its datasets (from the encode job;
    by default the ones the run's settings name); ``out_of_memory`` counts its renders that ran out of GPU memory,
    each making the next one's settings smaller."""

    def __init__(
        self,
        run: RunConfig,
        store: ObjectStore,
        run_id: str,
        index_keys: Sequence[str] = (),
        out_of_memory: int = 0,
    ):
        self.run, self.store, self.run_id = run, store, run_id
        self.index_keys = list(index_keys)
        self.out_of_memory = out_of_memory
        self.report_key: str | None = None  # the report the last render refreshed
        self._eval: EvalSet | None = None

    def eval_set(self) -> EvalSet:
        """The preview samples, their references and cached embeddings (paired on first use, then kept)."""
        if self._eval is None:
            paired, _ = pair_datasets(self.run, self.store)
            keys = self.index_keys or [
                index_key(self.run, ds.id, settings_for(self.run)) for ds in self.run.data.image_datasets
            ]
            self._eval = eval_set(self.run, paired, self.store, keys)
        return self._eval

    def render(
        self,
        pipe: Any,
        step: int,
        weights: AbstractContextManager[object],
        *,
        what: str,
        next_one: str,
        detail_on_oom: bool = False,
        full: Any = None,
    ) -> ValidationResult:
        """Render step ``step``'s previews with ``pipe`` while ``weights`` holds the LoRA's weights in it, write
        them under ``runs/<run>/validation/step-N/`` and refresh the run's report. Out of GPU memory: the weights
        are taken out again (``weights`` exits), the memory is freed, and ResourceExhausted says what ``next_one``
        (the run's next render) renders with; ``what`` names this one, ``detail_on_oom`` adds torch's message.
        ``full``: the full-precision transformer the previews also render on (``validation_on_full_precision``),
        holding the LoRA while ``weights`` is entered."""
        ev = self.eval_set()
        vrun, changes = validation_settings(pipe, self.run, self.out_of_memory)
        try:
            with weights:
                result = render_validation(
                    pipe,
                    vrun,
                    ev.samples,
                    step=step,
                    store=self.store,
                    prefix=f"runs/{self.run_id}/validation",
                    loss_index=ev.entries,
                    eval_label=ev.label,
                    conditioning=ev.conditioning,
                    full=full,
                )
        except torch.OutOfMemoryError as err:  # the render's tensors go with err's frames (out_of_memory)
            self.out_of_memory += 1
            detail = f" ({str(err).splitlines()[0][:200]})" if detail_on_oom else ""
            raise out_of_memory(err, self.run, self.out_of_memory, changes, what, next_one, detail) from err
        self.report_key = refresh_run_report(self.store, self.run_id)
        return result
