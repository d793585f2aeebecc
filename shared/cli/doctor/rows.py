"""The doctor's rows: one per check, printed as it finishes and written to ``--json`` after every row, so a run
cut short (a timeout, a crash of the driver) keeps everything it measured."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

STATUSES = ("pass", "warn", "fail", "skip", "info")


@dataclass
class Row:
    check: str  # e.g. "device", "block int8-quanto"
    status: str  # one of STATUSES; "skip" says why in detail (most often: needs a GPU)
    detail: str  # what was found, with its figures
    fix: str = ""  # what to do, for warn and fail
    data: dict[str, Any] = field(default_factory=dict)  # the figures, for --json
    seconds: float = 0.0


# A check for ``Report.run``: its name and the function that returns its row(s).
Check = tuple[str, Callable[[], Row | list[Row]]]


class Report:
    """Collects rows; prints each one as it comes and rewrites ``json_path`` after it."""

    def __init__(
        self, json_path: str | Path | None = None, out: TextIO | None = None, header: dict[str, Any] | None = None
    ) -> None:
        self.rows: list[Row] = []
        self.json_path = Path(json_path) if json_path else None
        self.out = out or sys.stdout
        self.header = header or {}

    def add(self, row: Row) -> Row:
        assert row.status in STATUSES, row.status
        self.rows.append(row)
        mark = {"pass": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip", "info": "info"}[row.status]
        print(
            f"[{mark:>4}] {row.check}: {row.detail}" + (f"\n       -> {row.fix}" if row.fix else ""),
            file=self.out,
            flush=True,
        )
        self.save()
        return row

    def run(self, check: str, fn: Callable[[], Row | list[Row]], fix: str = "") -> list[Row]:
        """``fn`` returns its row(s); anything it raises becomes a fail row naming the exception (the doctor never
        stops at its first problem: the rows after it are what a user needs to see)."""
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as err:  # noqa: BLE001 - every failure is a row, with the evidence
            last = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
            where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
            got = Row(check, "fail", f"{type(err).__name__}: {str(err)[:600]}{where}", fix)
        rows = got if isinstance(got, list) else [got]
        for r in rows:
            r.seconds = r.seconds or round(time.perf_counter() - t0, 2)
            self.add(r)
        return rows

    def save(self) -> None:
        if self.json_path is None:
            return
        tmp = self.json_path.with_suffix(self.json_path.suffix + ".tmp")
        tmp.write_text(json.dumps({**self.header, "rows": [asdict(r) for r in self.rows]}, indent=1, default=str))
        tmp.replace(self.json_path)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "fail"]
