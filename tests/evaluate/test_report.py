"""A run's report page: written by the trainer when training ends and by eval_svc after each render (so a render
that finishes after training is in it), rendered in a real headless Chromium (every image loads, the curves have
one vertex per step), written by `edittuner runs report` from a store or through the services, user text escaped."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from shared.cli.main import main
from shared.config.loading import load_run_config, read_config_files
from shared.data.synthetic import write_configs, write_dataset
from shared.evaluate.report import (
    FolderRunFiles,
    StoreRunFiles,
    build_report,
    refresh_run_report,
    report_input,
    smoothed,
    write_report_folder,
    write_run_report,
)
from shared.store.local import LocalStore
from shared.train import previews

RUN = "report-run"
STEPS = 6
CAPTION = "<script>document.title='pwned'</script> mirror & <b>flip</b>"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LINES = ("loss-raw", "loss-smoothed", "lr", "grad-norm", "seconds-per-step", "heldout-loss", "psnr-base", "psnr-lora")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models):
    """A tiny run trained as trainer_svc's worker trains it (validation external), then its two validations
    rendered by eval_svc's core after training ended, as the services do. The first sample's caption is HTML."""
    from eval_svc.service import EvalCore
    from shared.encode.encoder import DatasetEncoder
    from shared.service.common import files_to_params
    from shared.service.metrics import Metrics
    from shared.train.runner import train_run

    tmp = tmp_path_factory.mktemp("report")
    root = write_dataset(tmp / "data", n=4, references=1)
    (root / "images" / "0000.txt").write_text(CAPTION + "\n", encoding="utf-8")
    cfg, data = write_configs(
        tmp / "cfg",
        root,
        tiny_models("edit-v2"),
        "edit-v2",
        1,
        max_train_steps=STEPS,
        checkpoint_step_interval=3,
        validation_step_interval=3,
        num_eval_images=2,
        learning_rate=1e-3,
        lora_rank=4,
        seed=7,
        output_dir=str(tmp / "out"),
    )
    store = LocalStore(tmp / "store")
    DatasetEncoder(load_run_config(cfg), store).encode()
    ready = []
    train_run(
        load_run_config(cfg),
        store,
        previews=previews.ON_EVAL_SVC,
        run_id=RUN,
        encode=False,
        copy_to_output_dir=False,
        events=lambda e: ready.append(e) if e.phase == "validation_ready" else None,
    )
    after_training = store.get_bytes(f"runs/{RUN}/report/index.html").decode()
    core = EvalCore(store, Metrics(CollectorRegistry()), idle_release_s=0)
    ctx = SimpleNamespace(progress=lambda **kw: None)
    renders = [
        core.execute(
            SimpleNamespace(
                params=files_to_params(read_config_files(cfg, data))
                | {"run_id": RUN, "step": e.step, "lora_key": e.lora_key}
            ),
            ctx,
        )
        for e in ready
    ]
    return SimpleNamespace(
        store=store,
        tmp=tmp,
        after_training=after_training,
        renders=renders,
        steps=[
            json.loads(line)
            for line in store.get_bytes(f"runs/{RUN}/metrics.jsonl").splitlines()
            if "loss" in json.loads(line)
        ],
    )


class _Page(HTMLParser):
    """The tags, <img> sources and figure captions of a page, as a browser's parser sees them."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.captions: list[str] = []
        self._in_caption = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_caption = tag == "figcaption"
        if self._in_caption:
            self.captions.append("")

    def handle_endtag(self, tag):
        self._in_caption = self._in_caption and tag != "figcaption"

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data


def _pull(store: LocalStore, prefix: str, dest: Path) -> Path:
    for key in store.list(prefix):
        target = dest / key[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, target)
    return dest


def _without_time(page: str) -> str:
    return re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "", page)


# ----------------------------------------------------------------------------------------- written by the run
def test_training_writes_the_report_and_each_later_render_adds_its_validation(run):
    assert [r["step"] for r in run.steps] == list(range(1, STEPS + 1))
    assert "no validation rendered yet" in run.after_training and 'id="loss-raw"' in run.after_training
    assert all(r.report_key == f"runs/{RUN}/report/index.html" for r in run.renders)
    page = run.store.get_bytes(f"runs/{RUN}/report/index.html").decode()
    assert "step 6 · PSNR base" in page and "step 3 · PSNR base" in page
    for gid in LINES:
        assert f'id="{gid}"' in page
    assert "6 of 6" in page  # the steps, of max_train_steps
    parsed = _Page(page)
    assert sorted(parsed.images) == [f"previews/step-{s}/{n}.png" for s in (3, 6) for n in ("0000", "0001")]
    for src in parsed.images:  # byte for byte the grids eval_svc rendered
        step = src.split("/")[1]
        assert run.store.get_bytes(f"runs/{RUN}/report/{src}") == run.store.get_bytes(
            f"runs/{RUN}/validation/{step}/{src.rsplit('/', 1)[1]}"
        )
    first = run.store.stat(f"runs/{RUN}/report/previews/step-3/0000.png")
    write_run_report(run.store, RUN)  # again: the grids are not copied twice
    assert run.store.stat(f"runs/{RUN}/report/previews/step-3/0000.png") == first
    from shared.train.runner import copy_outputs  # a run on this machine: the report lands in output_dir too

    out = copy_outputs(run.store, f"runs/{RUN}", run.tmp / "out")
    assert out["report"] == str(run.tmp / "out" / "report" / "index.html")
    assert (run.tmp / "out" / "report" / "previews" / "step-6" / "0001.png").is_file()


def test_user_text_is_escaped(run):
    page = run.store.get_bytes(f"runs/{RUN}/report/index.html").decode()
    parsed = _Page(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags and "<script>" not in page
    assert sum(c.startswith(f"demo-images/0000: {CAPTION} · PSNR base ") for c in parsed.captions) == 2


# --------------------------------------------------------------------------------------- in a real browser
HARNESS = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="report" src="%s" width="1280" height="2400"></iframe>
<script>
const frame = document.getElementById("report");
frame.addEventListener("load", () => {
  const out = document.getElementById("result");
  try {
    const doc = frame.contentDocument;
    const box = el => { const r = el.getBoundingClientRect(); return {left: r.left, right: r.right}; };
    const lines = {};
    for (const gid of %s) {
      const g = doc.getElementById(gid);
      const path = g && g.querySelector("path");
      lines[gid] = path ? {vertices: (path.getAttribute("d").match(/[ML]/g) || []).length, box: box(path)} : null;
    }
    const axes = {};
    for (const name of ["loss", "heldout-loss"]) {
      const a = doc.getElementById(name + "-axes");
      axes[name] = a ? box(a.querySelector("path")) : null;
    }
    const loss = doc.getElementById("loss-axes").closest("svg");
    out.textContent = JSON.stringify({
      title: doc.title,
      images: [...doc.images].map(i => ({src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth})),
      scripts: doc.querySelectorAll("script").length,
      captions: [...doc.querySelectorAll("figcaption")].map(c => c.textContent),
      xticks: [...loss.querySelectorAll("g[id^=xtick] text")].map(t => t.textContent),
      lines, axes});
  } catch (e) { out.textContent = "error: " + e; }
});
</script></body></html>
"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).is_file(), "chromium is missing: apt-get install chromium (.ci/run does)"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_report_renders_in_chromium_with_every_image_and_one_vertex_per_step(run, tmp_path):
    report = _pull(run.store, f"runs/{RUN}/report", tmp_path / "report")  # as `runs pull` brings it back
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS % ((report / "index.html").as_uri(), json.dumps(LINES)), encoding="utf-8")
    dom = _chromium(
        f"--user-data-dir={tmp_path / 'profile-dom'}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        harness.as_uri(),
    )
    found = re.search(r'<pre id="result">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    assert not found.group(1).startswith(("pending", "error")), found.group(1)
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["title"] == f"run {RUN}" and seen["scripts"] == 0
    assert len(seen["images"]) == 4
    for i in seen["images"]:
        with Image.open(report / i["src"]) as grid:
            assert i["complete"] and i["width"] == grid.width > 0, i
    assert sum(c.startswith(f"demo-images/0000: {CAPTION}") for c in seen["captions"]) == 2
    lines, axes = seen["lines"], seen["axes"]
    for gid in ("loss-raw", "loss-smoothed", "lr", "grad-norm", "seconds-per-step"):
        assert lines[gid]["vertices"] == len(run.steps), gid
    assert lines["heldout-loss"]["vertices"] == lines["psnr-lora"]["vertices"] == 2
    # the curves span the x axis: from step 1 at its left end to the last step at its right end
    for gid, plot in (("loss-raw", "loss"), ("heldout-loss", "heldout-loss")):
        assert abs(lines[gid]["box"]["right"] - axes[plot]["right"]) < 1, gid
    assert abs(lines["loss-raw"]["box"]["left"] - axes["loss"]["left"]) < 1
    assert max(float(t) for t in seen["xticks"]) <= STEPS and str(STEPS) in seen["xticks"]
    shot = report / "screenshot.png"
    _chromium(
        f"--user-data-dir={tmp_path / 'profile-shot'}",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        (report / "index.html").as_uri(),
    )
    with Image.open(shot) as img:
        img.verify()
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        assert len(img.convert("RGB").getcolors(1 << 20)) > 50  # text, curves and previews, not a blank page


# ----------------------------------------------------------------------------------------------- the CLI
def test_runs_report_writes_the_page_and_its_images_into_a_folder(run, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main(["runs", "report", RUN, str(dest), "--store", str(run.store.root)]) == 0
    assert f"{dest / 'index.html'}" in capsys.readouterr().out
    page = (dest / "index.html").read_text(encoding="utf-8")
    stored = run.store.get_bytes(f"runs/{RUN}/report/index.html").decode()
    assert _without_time(page) == _without_time(stored)
    for src in _Page(page).images:
        assert (dest / src).read_bytes() == run.store.get_bytes(f"runs/{RUN}/report/{src}")
    assert main(["runs", "report", "no-such-run", str(tmp_path / "none"), "--store", str(run.store.root)]) == 1
    assert "no-such-run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "damage", "words"),
    [
        ("metrics.jsonl", b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo', "metrics.jsonl line 2 is not valid JSON"),
        ("metrics.jsonl", b'{"loss": 0.5}\n', "metrics.jsonl line 1 has no integer step"),
        ("run.json", b"[1, 2]", "run.json is list, not a JSON object"),
        ("validation/step-3/metrics.json", b"\xff\xfe", "validation/step-3/metrics.json is not valid JSON"),
    ],
)
def test_a_damaged_run_file_is_an_error_naming_it_and_nothing_is_written(run, tmp_path, capsys, name, damage, words):
    store = LocalStore(tmp_path / "store")
    for key in run.store.list(f"runs/{RUN}"):
        if not key.startswith(f"runs/{RUN}/report/"):
            store.put_bytes(key, run.store.get_bytes(key))
    store.put_bytes(f"runs/{RUN}/{name}", damage)
    dest = tmp_path / "out"
    assert main(["runs", "report", RUN, str(dest), "--store", str(store.root)]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (dest / "index.html").exists()
    assert refresh_run_report(store, RUN) is None  # in a run or a render: a warning, never a failure


def test_runs_report_through_the_services_fetches_only_what_the_report_reads(run, tmp_path, monkeypatch, capsys):
    from shared.rpc import data_pb2_grpc
    from shared.rpc.server import ServiceConfig, build_server
    from shared.service.common import ServerPaths
    from shared.service.data import DataServicer

    servicer = DataServicer(run.store, ServerPaths(), tmp_path / "work")
    server = build_server(
        ServiceConfig(host="127.0.0.1", port=0, token="report-token-0123456789", grace_s=0),
        lambda s: data_pb2_grpc.add_DataServiceServicer_to_server(servicer, s),
        ["edittuner.data.v1.DataService"],
        registry=CollectorRegistry(),
    )
    server.set_serving(True)
    monkeypatch.setenv("EDITTUNER_TOKEN", "report-token-0123456789")
    try:
        assert main(["runs", "report", RUN, str(tmp_path / "out"), "--server", server.target]) == 0
    finally:
        server.stop(0)
    assert f"from {server.target}" in capsys.readouterr().out
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert _without_time(page) == _without_time(run.store.get_bytes(f"runs/{RUN}/report/index.html").decode())
    assert len(list((tmp_path / "out" / "previews").rglob("*.png"))) == 4
    assert [n for n in run.store.list(f"runs/{RUN}") if report_input(n[len(f"runs/{RUN}/") :])] == sorted(
        [f"runs/{RUN}/metrics.jsonl", f"runs/{RUN}/run.json"]
        + [f"runs/{RUN}/validation/step-{s}/{n}" for s in (3, 6) for n in ("0000.png", "0001.png", "metrics.json")]
    )


# ------------------------------------------------------------------------------------------------ the parts
def test_smoothing_is_a_debiased_moving_average():
    assert smoothed([1.0, 1.0, 1.0])[0] == pytest.approx([1.0, 1.0, 1.0])
    values, window = smoothed([0.0, 2.0])
    assert window == 2 and values == pytest.approx([0.0, 1.5])  # alpha 2/3: (4/3) / (1 - 1/9)
    assert smoothed([0.0] * 5000)[1] == 100


def test_a_long_run_is_plotted_every_kth_step_and_a_missing_run_is_only_a_warning(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    lines = [
        {"step": s, "loss": 1 / s, "lr": 1e-4, "grad_norm": 0.5, "seconds": 0.1, "data_wait": 0.01}
        for s in range(1, 9001)
    ]
    store.put_bytes("runs/long/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode())
    store.put_json("runs/long/run.json", {"config": {"max_train_steps": 9000, "max_grad_norm": 0.0}})
    page = build_report(StoreRunFiles(store, "long"), "long").html
    path = re.search(r'<g id="loss-raw">\s*<path d="([^"]*)"', page).group(1)
    assert len(re.findall(r"[ML]", path)) == 3001  # steps 1, 4, ..., 8998 and the last, 9000
    assert "(one step in 3)" in page and 'id="grad-norm"' not in page  # no norm without clipping
    assert "9000 of 9000" in page and "no validation rendered yet" in page
    folder = tmp_path / "pulled"
    folder.mkdir()
    (folder / "metrics.jsonl").write_bytes(store.get_bytes("runs/long/metrics.jsonl"))
    assert (
        write_report_folder(FolderRunFiles(folder), "long", tmp_path / "r")
        .read_text(encoding="utf-8")
        .count('id="loss-raw"')
        == 1
    )
    with caplog.at_level("WARNING"):
        assert refresh_run_report(store, "nothing-here") is None
    assert "the report of run nothing-here was not written" in caplog.text
