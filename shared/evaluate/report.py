"""A run's report: one static HTML page of its training curves, validation metrics, preview grids, config and
timings, that opens from file:// with nothing else (plots inline SVG, the previews PNG files beside the page).

It is read from the run's files under ``runs/<run>/``: ``metrics.jsonl`` (the trainer's history: a line per
optimizer step and one per validation), ``run.json`` (config, device, dtype, start time) and each
``validation/step-N/metrics.json`` with the grids it names. ``write_run_report`` puts the page at
``runs/<run>/report/index.html`` and the grids under ``report/previews/``: the training worker writes it when
training ends (and after each validation it renders itself), eval_svc after each render, so the last one written
has every validation. ``write_report_folder`` writes the same page into a local folder (``edittuner runs report``).

Every plotted line is an SVG group with an id (``loss-raw``, ``loss-smoothed``, ``lr``, ``grad-norm``,
``seconds-per-step``, ``data-wait``, ``heldout-loss``, ``psnr-base``, ``psnr-lora``), each plot's axes background
``<plot>-axes``, and the plots keep their text as text, so a browser can check the rendered page.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from shared.errors import InvalidInput, NotFound
from shared.store.base import ObjectStore, validate_key

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

log = logging.getLogger(__name__)
MAX_POINTS = 4000  # more steps than this are plotted every k-th step: the page stays small and quick to draw
_STEP_FOLDER = re.compile(r"validation/step-(\d+)/metrics\.json")
_PLOT_LOCK = threading.Lock()  # matplotlib's rcParams are process-wide; eval_svc may write from several threads
# The settings a reader of the config looks for first; the whole config follows below them.
KEY_SETTINGS = (
    "model_flavour",
    "pretrained_model_name_or_path",
    "base_model_precision",
    "mixed_precision",
    "lora_rank",
    "lora_alpha",
    "optimizer",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "num_train_epochs",
    "max_grad_norm",
    "resolution",
    "use_ema",
    "seed",
    "validation_step_interval",
)


# ------------------------------------------------------------------------------------------- the run's files
class RunFiles(Protocol):
    """A run's files by their name under ``runs/<run>/`` (``metrics.jsonl``, ``validation/step-2/0000.png``)."""

    def read(self, name: str) -> bytes | None: ...  # None: no such file

    def exists(self, name: str) -> bool: ...

    def names(self, folder: str) -> list[str]: ...  # every file under ``folder``/, sorted


class StoreRunFiles:
    def __init__(self, store: ObjectStore, run_id: str):
        self.store, self.prefix = store, f"runs/{run_id}"

    def read(self, name: str) -> bytes | None:
        try:
            return self.store.get_bytes(f"{self.prefix}/{name}")
        except NotFound:
            return None

    def exists(self, name: str) -> bool:
        return self.store.exists(f"{self.prefix}/{name}")

    def names(self, folder: str) -> list[str]:
        return [k[len(self.prefix) + 1 :] for k in self.store.list(f"{self.prefix}/{folder}")]


class FolderRunFiles:
    """A run's files in a local folder, laid out as ``edittuner runs pull`` writes them."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def read(self, name: str) -> bytes | None:
        path = self.root / validate_key(name)
        return path.read_bytes() if path.is_file() else None

    def exists(self, name: str) -> bool:
        return (self.root / validate_key(name)).is_file()

    def names(self, folder: str) -> list[str]:
        base = self.root / folder
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())


def report_input(name: str) -> bool:
    """Whether the report reads the run file ``name``: the two run-level files, and the validations' metrics and
    grids (not their LoRA files)."""
    return (
        name in ("metrics.jsonl", "run.json")
        or re.fullmatch(r"validation/step-\d+/[^/]+\.(png|json)", name) is not None
    )


# ---------------------------------------------------------------------------------------------- what it shows
@dataclass
class RunData:
    run_id: str
    run_doc: dict[str, Any]  # run.json; {} before the trainer wrote it
    steps: list[dict[str, Any]]  # metrics.jsonl's step lines (step, loss, lr, grad_norm, seconds, data_wait)
    failed: list[tuple[int, str]]  # validations that raised: (step, error)
    validations: list[dict[str, Any]]  # the metrics.json files, by step

    @property
    def config(self) -> dict[str, Any]:
        return self.run_doc.get("config") or {}


def _parse(run_id: str, name: str, text: bytes | str, line: int | None = None) -> dict[str, Any]:
    """One JSON object of a run's files, or an error naming the file (and line) that is not one."""
    where = f"run {run_id!r}: {name}" + (f" line {line}" if line is not None else "")
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(
            f"{where} is not valid JSON ({e}); the run's files are damaged: rewrite or remove "
            "the file and make the report again"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{where} is {type(doc).__name__}, not a JSON object; the run's files are damaged")
    return doc


def _steps_of(run_id: str, raw: bytes) -> tuple[dict[int, dict[str, Any]], list[tuple[int, str]]]:
    by_step: dict[int, dict[str, Any]] = {}
    failed = []
    for n, line in enumerate(raw.decode(errors="replace").splitlines(), 1):
        entry = _parse(run_id, "metrics.jsonl", line, n) if line.strip() else {}
        try:
            if "loss" in entry:
                by_step[int(entry["step"])] = entry  # a resumed run's lines of a step: the later one counts
            elif isinstance(entry.get("validation"), dict) and "error" in entry["validation"]:
                failed.append((int(entry["step"]), str(entry["validation"]["error"])))
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(
                f"run {run_id!r}: metrics.jsonl line {n} has no integer step; the run's files are damaged"
            ) from None
    return by_step, failed


def load_run(files: RunFiles, run_id: str) -> RunData:
    raw_run = files.read("run.json")
    run_doc = _parse(run_id, "run.json", raw_run) if raw_run else {}
    by_step, failed = _steps_of(run_id, files.read("metrics.jsonl") or b"")
    validations = []
    for name in files.names("validation"):
        if _STEP_FOLDER.fullmatch(name) and (raw := files.read(name)):
            doc = _parse(run_id, name, raw)
            if not isinstance(doc.get("step"), int):
                raise InvalidInput(f"run {run_id!r}: {name} has no integer step; the run's files are damaged")
            validations.append(doc)
    if not (run_doc or by_step or validations):
        raise NotFound(f"run {run_id!r} has no run.json, metrics.jsonl or validation metrics to report")
    return RunData(
        run_id,
        run_doc,
        [by_step[s] for s in sorted(by_step)],
        failed,
        sorted(validations, key=lambda v: int(v["step"])),
    )


def smoothed(values: Sequence[float]) -> tuple[list[float], int]:
    """An exponential moving average of ``values`` over a window of about a tenth of them (2 to 100 values),
    debiased at the start as TensorBoard's smoothing is; returns it and the window."""
    window = max(2, min(100, len(values) // 10))
    alpha = 2.0 / (window + 1)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out, window


# ------------------------------------------------------------------------------------------------- the plots
@dataclass(frozen=True)
class Series:
    gid: str
    label: str
    x: Sequence[float]
    y: Sequence[float]
    markers: bool = False


def svg_plot(name: str, title: str, series: Sequence[Series], xlim: tuple[float, float]) -> str:
    """One plot as an inline ``<svg>``: text as text, each line a group with its ``gid``, the axes background
    ``<name>-axes``, every vertex kept (no path simplification), x from ``xlim``."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rc: dict[RcKeyType, Any] = {
        "svg.fonttype": "none",
        "svg.hashsalt": name,
        "path.simplify": False,
        "font.size": 9,
        "axes.formatter.useoffset": False,
    }
    with _PLOT_LOCK, matplotlib.rc_context(rc):
        fig = Figure(figsize=(8.4, 2.4))
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.09, right=0.985, bottom=0.19, top=0.88)  # fixed: a layout engine doubles the cost
        ax = fig.add_subplot()
        ax.patch.set_gid(f"{name}-axes")
        for s in series:
            (line,) = ax.plot(s.x, s.y, label=s.label, linewidth=1.2, marker="o" if s.markers else None, markersize=3.5)
            line.set_gid(s.gid)
        ax.set_xlim(*xlim)
        ax.set_title(title, loc="left")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best", frameon=False)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML declaration and doctype do not belong inside HTML
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


def _x_range(*steps: Sequence[float]) -> tuple[float, float]:
    values = [s for seq in steps for s in seq]
    lo, hi = min(values), max(values)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _every(n: int) -> tuple[list[int], int]:
    """The indices of at most MAX_POINTS of n rows (every k-th, and the last); returns them and k."""
    k = -(-n // MAX_POINTS)
    return [*range(0, n, k)] + ([n - 1] if (n - 1) % k else []), k


def training_plots(data: RunData) -> list[str]:
    if not data.steps:
        return []
    picked, k = _every(len(data.steps))
    rows = [data.steps[i] for i in picked]
    x = [r["step"] for r in rows]
    xlim = _x_range(x, [v["step"] for v in data.validations])
    every = f" (one step in {k})" if k > 1 else ""
    smooth, window = smoothed([r["loss"] for r in data.steps])
    smooth = [smooth[i] for i in picked]
    plots = [
        svg_plot(
            "loss",
            f"training loss{every}",
            [
                Series("loss-raw", "loss", x, [r["loss"] for r in rows]),
                Series("loss-smoothed", f"EMA over ~{window} steps", x, smooth),
            ],
            xlim,
        ),
        svg_plot("lr", f"learning rate{every}", [Series("lr", "learning rate", x, [r["lr"] for r in rows])], xlim),
    ]
    if float(data.config.get("max_grad_norm", 1.0)) > 0:  # else the trainer does not compute it (zeros)
        plots.append(
            svg_plot(
                "grad-norm",
                f"gradient norm before clipping{every}",
                [Series("grad-norm", "grad norm", x, [r.get("grad_norm", 0.0) for r in rows])],
                xlim,
            )
        )
    plots.append(
        svg_plot(
            "seconds-per-step",
            f"seconds per step{every}",
            [
                Series("seconds-per-step", "step", x, [r["seconds"] for r in rows]),
                Series("data-wait", "of it waiting for data", x, [r.get("data_wait", 0.0) for r in rows]),
            ],
            xlim,
        )
    )
    return plots


def validation_plots(data: RunData) -> list[str]:
    vals = data.validations
    if not vals:
        return []
    xlim = _x_range([v["step"] for v in vals], [r["step"] for r in data.steps[:1] + data.steps[-1:]])
    plots = []
    with_loss = [v for v in vals if v.get("heldout_loss_mean") is not None]
    if with_loss:
        on = (vals[-1].get("settings") or {}).get("eval_samples")  # "held out of training", "eval dataset", ...
        plots.append(
            svg_plot(
                "heldout-loss",
                f"held-out loss, mean over sigmas{f' ({on})' if on else ''}",
                [
                    Series(
                        "heldout-loss",
                        "held-out loss",
                        [v["step"] for v in with_loss],
                        [v["heldout_loss_mean"] for v in with_loss],
                        markers=True,
                    )
                ],
                xlim,
            )
        )
    with_psnr = [v for v in vals if v.get("psnr_lora") is not None]
    if with_psnr:
        steps = [v["step"] for v in with_psnr]
        plots.append(
            svg_plot(
                "psnr",
                "PSNR of the previews against their targets (dB)",
                [
                    Series("psnr-base", "base", steps, [v["psnr_base"] for v in with_psnr], markers=True),
                    Series("psnr-lora", "LoRA", steps, [v["psnr_lora"] for v in with_psnr], markers=True),
                ],
                xlim,
            )
        )
    labels = sorted({a["label"] for v in vals for a in v.get("adapters") or [] if a.get("retention") is not None})
    if labels:  # validation_adapter_mode comparison: how much of the LoRA's change survives each adapter run
        series = []
        for i, label in enumerate(labels):
            kept = [
                (v["step"], a["retention"])
                for v in vals
                for a in v.get("adapters") or []
                if a["label"] == label and a.get("retention") is not None
            ]
            series.append(Series(f"retention-{i}", label, [x for x, _ in kept], [y for _, y in kept], markers=True))
        title = "effect retention under the adapter runs (1: all of the LoRA's change survives)"
        plots.append(svg_plot("retention", title, series, xlim))
    return plots


# -------------------------------------------------------------------------------------------------- the page
@dataclass
class Report:
    html: str
    images: dict[str, str] = field(default_factory=dict)  # file under report/ → the run file it is a copy of


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {s:02d} s"


def _table(rows: Sequence[tuple[str, Any]], cls: str = "") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>' if cls else f"<table>{body}</table>"


def timing_rows(data: RunData) -> list[tuple[str, Any]]:
    cfg, doc, steps = data.config, data.run_doc, data.steps
    rows: list[tuple[str, Any]] = []
    if doc.get("created"):
        rows.append(("started", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(doc["created"])))))
    if doc.get("device"):
        rows.append(("device", f"{doc['device']}, {doc.get('dtype', '')}".rstrip(", ")))
    total = cfg.get("max_train_steps") or None
    if steps:
        seconds = [float(r["seconds"]) for r in steps]
        wait = sum(float(r.get("data_wait", 0.0)) for r in steps)
        rows += [
            ("steps", f"{steps[-1]['step']}" + (f" of {total}" if total else "")),
            ("training time (sum of step times)", _duration(sum(seconds))),
            (
                "seconds per step",
                f"mean {statistics.fmean(seconds):.3f}, median {statistics.median(seconds):.3f}, "
                f"first step {seconds[0]:.3f}",
            ),
            ("data wait", f"{100 * wait / sum(seconds):.1f}% of step time" if sum(seconds) > 0 else "-"),
            (
                "loss",
                f"first {steps[0]['loss']:.4f}, last {steps[-1]['loss']:.4f}, last smoothed "
                f"{smoothed([r['loss'] for r in steps])[0][-1]:.4f}",
            ),
        ]
    else:
        rows.append(("steps", "no step recorded yet (metrics.jsonl is written at checkpoints and at the end)"))
    if data.validations:
        last = data.validations[-1]
        render = sum(float(v.get("seconds", 0)) for v in data.validations)
        rows.append(("validations", f"{len(data.validations)}, {_duration(render)} rendering"))
        if last.get("psnr_lora") is not None:
            rows.append(
                (f"PSNR at step {last['step']}", f"base {last['psnr_base']:.2f} dB, LoRA {last['psnr_lora']:.2f} dB")
            )
    return rows


def _previews(data: RunData, files: RunFiles, images: dict[str, str]) -> str:
    prefix = f"runs/{data.run_id}/"
    parts = []
    for v in reversed(data.validations):  # the newest first: what a reader looks for
        head = [f"step {v['step']}"]
        if v.get("psnr_lora") is not None:
            head.append(f"PSNR base {v['psnr_base']:.2f} dB, LoRA {v['psnr_lora']:.2f} dB")
        if v.get("heldout_loss_mean") is not None:
            head.append(f"held-out loss {v['heldout_loss_mean']:.4f}")
        for a in v.get("adapters") or []:
            kept = f", retention {a['retention']:.2f}" if a.get("retention") is not None else ""
            head.append(f"{_e(a['label'])}: {a.get('steps') or 'same'} steps{kept}")
        cells = []
        for s in v.get("samples", []):
            grid = str(s.get("grid", ""))
            source = grid[len(prefix) :] if grid.startswith(prefix) else ""
            caption = (
                f"{s.get('dataset', '')}/{s.get('key', '')}: {s.get('caption', '')} · PSNR base "
                f"{s.get('psnr_base', 0):.2f} dB, LoRA {s.get('psnr_lora', 0):.2f} dB"
            )
            if source and files.exists(source):
                name = f"previews/step-{int(v['step'])}/{source.rsplit('/', 1)[1]}"
                images[name] = source
                # toy-sized previews (a CPU run's 64 px) are shown enlarged, pixel for pixel
                zoom = max(1, min(4, 192 // max(1, int(s.get("width") or 192))))
                style = f' class="small" style="zoom:{zoom}"' if zoom > 1 else ""
                img = f'<img src="{_e(quote(name))}" alt="{_e(caption)}" loading="eager"{style}>'
            else:
                img = f'<p class="missing">grid {_e(grid)} is not in the run\'s files</p>'
            cells.append(f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>")
        settings = v.get("settings") or {}
        how = ", ".join(f"{k} {settings[k]}" for k in ("width", "height", "steps", "guidance", "seed") if k in settings)
        parts.append(
            f'<section class="step" id="step-{int(v["step"])}"><h3>{_e(" · ".join(head))}</h3>'
            + (f'<p class="note">rendered with {_e(how)}</p>' if how else "")
            + "".join(cells)
            + "</section>"
        )
    return "".join(parts) or "<p>no validation rendered yet</p>"


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse}th,td{text-align:left;padding:2px 12px 2px 0;vertical-align:top}th{font-weight:600}
.plot svg{max-width:100%;height:auto}figure{margin:8px 0 16px}figure img{max-width:100%;image-rendering:auto}
figure img.small{image-rendering:pixelated}
figcaption,.note{color:#555;font-size:13px}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
.error{color:#a00}.missing{color:#a00}
"""


def build_report(files: RunFiles, run_id: str) -> Report:
    """The page of run ``run_id`` from its files, and the grids to copy beside it."""
    data = load_run(files, run_id)
    images: dict[str, str] = {}
    cfg = data.config
    plots = training_plots(data)
    vplots = validation_plots(data)
    failed = "".join(f'<p class="error">validation at step {s} failed: {_e(err)}</p>' for s, err in data.failed)
    settings = [(k, cfg[k]) for k in KEY_SETTINGS if k in cfg]
    body = [
        f"<h1>run {_e(data.run_id)}</h1>",
        f'<p class="note">{_e(data.run_doc.get("config_source", ""))}</p>' if data.run_doc.get("config_source") else "",
        "<h2>summary</h2>",
        _table(timing_rows(data), "summary"),
        "<h2>training</h2>",
        "".join(f'<div class="plot">{p}</div>' for p in plots) or "<p>no training steps yet</p>",
        "<h2>validation</h2>",
        failed,
        "".join(f'<div class="plot">{p}</div>' for p in vplots) or "<p>no validation metrics yet</p>",
        "<h2>previews</h2>",
        _previews(data, files, images),
        "<h2>config</h2>",
        _table(settings, "settings") if settings else "<p>no run.json yet</p>",
    ]
    if cfg:
        body.append(f"<details><summary>the whole config</summary><pre>{_e(json.dumps(cfg, indent=2))}</pre></details>")
    if data.run_doc.get("data"):
        body.append(
            f"<details><summary>datasets</summary><pre>{_e(json.dumps(data.run_doc['data'], indent=2))}</pre></details>"
        )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>run {_e(data.run_id)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(body)}"
        f'<p class="note">written {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}</p></body></html>\n'
    )
    return Report(page, images)


# ----------------------------------------------------------------------------------------------- writing it
def write_run_report(store: ObjectStore, run_id: str) -> str:
    """The run's report into the store: ``runs/<run>/report/index.html`` and its grids; returns the page's key.
    A grid the report holds already (same sha256) is not copied again."""
    report = build_report(StoreRunFiles(store, run_id), run_id)
    prefix = f"runs/{run_id}/report"
    for name, source in report.images.items():
        src, dst = store.stat(f"runs/{run_id}/{source}"), f"{prefix}/{name}"
        try:
            if store.stat(dst).sha256 == src.sha256:
                continue
        except NotFound:
            pass
        store.put_bytes(dst, store.get_bytes(src.key), content_type="image/png")
    return store.put_bytes(f"{prefix}/index.html", report.html.encode(), content_type="text/html; charset=utf-8").key


def refresh_run_report(store: ObjectStore, run_id: str) -> str | None:
    """``write_run_report`` for the trainer and eval_svc, where a report is not worth a run or a render: a failure
    is logged as a warning; returns the page's key, or None."""
    try:
        return write_run_report(store, run_id)
    except Exception:
        log.warning("the report of run %s was not written", run_id, exc_info=True)
        return None


def write_report_folder(files: RunFiles, run_id: str, dest: Path) -> Path:
    """The run's report into the local folder ``dest``: ``index.html`` and ``previews/``; returns the page."""
    report = build_report(files, run_id)
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInput(f"cannot write the report into {dest}: {e}") from e
    for name, source in report.images.items():
        data = files.read(source)
        if data is None:
            raise NotFound(f"the run file {source} disappeared while its report was written")
        target = dest / validate_key(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    page = dest / "index.html"
    page.write_text(report.html, encoding="utf-8")
    return page
