"""The edittuner command line: summaries, counts, exit codes, and no traceback for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli.main import main
from shared.data.synthetic import write_configs, write_dataset
from shared.store.local import LocalStore


@pytest.fixture
def project(tmp_path, tiny_models):
    root = write_dataset(tmp_path / "data", n=4, references=2)
    cfg, data = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 2)
    return tmp_path, root, cfg, data


def test_check_prints_summary_then_encode_counts_then_check_shows_cached(project, capsys):
    tmp, root, cfg, data = project
    store = str(tmp / "store")
    assert main(["check", "--config", str(cfg), "--store", store]) == 0
    out = capsys.readouterr().out
    assert "dataset 'demo-images' (train): 4 samples, 2 reference(s) per sample" in out
    assert "buckets: 64x64 ×2, 96x64 ×2" in out and "cached:  text 0/4, vae 0/12" in out
    assert main(["encode", "--config", str(cfg), "--data", str(data), "--store", store, "--quiet", "--in-process"]) == 0
    assert "encoded 16, cached 0, failed 0" in capsys.readouterr().out
    assert main(["encode", "--config", str(cfg), "--store", store, "--quiet", "--in-process"]) == 0
    assert "encoded 0, cached 16, failed 0" in capsys.readouterr().out
    assert main(["check", "--config", str(cfg), "--store", store]) == 0
    assert "cached:  text 4/4, vae 12/12" in capsys.readouterr().out


def test_check_lists_every_problem_and_exits_1(project, capsys):
    tmp, root, cfg, data = project
    entries = json.loads(data.read_text())
    entries[0]["conditioning_data"].append("nope")
    data.write_text(json.dumps(entries))
    assert main(["check", "--config", str(cfg), "base_model_precision=int3", "lora_rank=-1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration: 3 problems")
    assert "$.base_model_precision" in err and "$.lora_rank" in err and "'nope'" in err


def test_missing_reference_makes_check_fail_before_any_encoding(project, capsys):
    tmp, root, cfg, data = project
    (root / "reference_a" / "0001.png").unlink()
    assert main(["encode", "--config", str(cfg), "--store", str(tmp / "store"), "--quiet", "--in-process"]) == 1
    err = capsys.readouterr().err
    assert "Control tensor list length does not match batch size" in err and "0001.png" in err
    assert LocalStore(tmp / "store").list() == []  # nothing was encoded


def test_console_script_reports_bad_json_without_traceback(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_flavour": "edit-v2",\n "lora_rank": 4 4}')
    exe = Path(sys.executable).with_name("edittuner")
    proc = subprocess.run([str(exe), "check", "--config", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"{cfg}:2:17: JSON syntax error" in proc.stderr


def test_make_tiny_model_writes_the_real_layout(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--flavour", "edit-v3"]) == 0
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())["zero_cond_t"] is True


def _job(kind: str, state: str, outputs, error: str = ""):
    """A Job as a service sends it for a record whose executor returned (or, running, set) ``outputs``, with the
    deprecated ``outputs`` map cleared: what the CLI prints comes from the typed fields alone."""
    from shared.service.common import job_to_proto
    from shared.service.records import JobRecord, JobState

    record = JobRecord("0123456789ab", "r", kind, JobState(state), {}, 1.0, 2.0, attempt=1, error=error)
    record.result, record.outputs = outputs.to_json(), outputs.flat(complete=state == "succeeded")
    job = job_to_proto(record)
    job.ClearField("outputs")
    return job


def test_a_jobs_results_print_as_they_did_from_the_outputs_map():
    """`edittuner jobs get|list|watch` and the end of `train`/`encode` print a job's results as the `key: value`
    lines of the old comma-joined map, now from the typed fields."""
    from shared.cli.remote import describe
    from shared.service.outputs import EncodeOutputs, MissedValidation, RenderOutputs, TrainOutputs, Validation

    validations = [Validation(2, "aaaaaaaaaaaa"), Validation(4, "bbbbbbbbbbbb")]
    missed = [MissedValidation(6, "eval_svc unavailable (UNAVAILABLE: eval_svc is restarting)")]
    train = TrainOutputs("r1", 6, 0.125, ["runs/r1/lora/pytorch_lora_weights.safetensors"], [3, 6], validations, missed)
    assert describe(_job("train", "succeeded", train)) == (
        "job 0123456789ab (train): succeeded\n"
        "  checkpoints: 3,6\n"
        "  final_loss: 0.125\n"
        "  lora: runs/r1/lora/pytorch_lora_weights.safetensors\n"
        "  missed_validations: step 6: eval_svc unavailable (UNAVAILABLE: eval_svc is restarting)\n"
        "  run_id: r1\n"
        "  steps: 6\n"
        "  validations: 2:aaaaaaaaaaaa,4:bbbbbbbbbbbb"
    )
    failed = TrainOutputs("r1", validations=validations[:1])  # what a run had when it failed
    assert describe(_job("train", "failed", failed, error="the worker died")) == (
        "job 0123456789ab (train): failed\n  error (): the worker died\n  validations: 2:aaaaaaaaaaaa"
    )
    assert describe(_job("train", "running", TrainOutputs("r1"))) == "job 0123456789ab (train): running"
    encode = EncodeOutputs(5, 7, 1, ["cache/index/ds/1.json", "cache/index/refs/2.json"])
    assert describe(_job("encode", "succeeded", encode)) == (
        "job 0123456789ab (encode): succeeded\n"
        "  cached: 7\n"
        "  encoded: 5\n"
        "  failed: 1\n"
        "  index: cache/index/ds/1.json,cache/index/refs/2.json"
    )
    render = RenderOutputs("r1", 2, 21.5, None, "runs/r1/validation/step-2/metrics.json", ["g/a.png", "g/b.png"])
    assert describe(_job("render", "succeeded", render)) == (
        "job 0123456789ab (render): succeeded\n"
        "  grids: g/a.png,g/b.png\n"
        "  metrics: runs/r1/validation/step-2/metrics.json\n"
        "  psnr_base: None\n"
        "  psnr_lora: 21.5"
    )
    render.report_key, render.tensorboard_key = "runs/r1/report/index.html", "runs/r1/logs/tb/events.out"
    assert describe(_job("render", "succeeded", render)).endswith(
        "  report: runs/r1/report/index.html\n  tensorboard: runs/r1/logs/tb/events.out"
    )
