"""The contracts in protos/: committed stubs are fresh, buf lint and format are clean, no change breaks the
baseline, and every service has the job RPCs with a server-streaming Watch."""

from __future__ import annotations

import json

import pytest
from google.protobuf.descriptor import FieldDescriptor

from shared.rpc import common_pb2, data_pb2, encoder_pb2, eval_pb2, generate, trainer_pb2

SERVICES = [
    (encoder_pb2, "EncoderService", "SubmitEncode"),
    (trainer_pb2, "TrainerService", "StartRun"),
    (eval_pb2, "EvalService", "SubmitRender"),
]
JOB_METHODS = ["GetJob", "ListJobs", "CancelJob", "WatchJob"]


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = generate.generate(tmp_path)
    committed = sorted(p.name for p in generate.STUB_DIR.iterdir() if generate.is_stub(p))
    assert committed == fresh, "stub files differ from what the protos generate: run `make protos`"
    stale = [name for name in fresh if (tmp_path / name).read_text() != (generate.STUB_DIR / name).read_text()]
    assert not stale, f"stale stubs {stale}: run `make protos` and commit the result"


def test_generated_imports_are_package_relative():
    text = (generate.STUB_DIR / "encoder_pb2_grpc.py").read_text()
    assert "from . import encoder_pb2 as" in text
    assert encoder_pb2.SubmitEncodeRequest.__module__ == "shared.rpc.encoder_pb2"
    assert encoder_pb2.DESCRIPTOR.dependencies[0] is common_pb2.DESCRIPTOR


def test_buf_lint_is_clean():
    out = generate.buf("lint")
    assert out.returncode == 0, f"buf lint:\n{out.stdout}{out.stderr}"


def test_buf_format_is_clean():
    out = generate.buf("format", "--diff", "--exit-code")
    assert out.returncode == 0, f"run `buf format -w` in protos/:\n{out.stdout}{out.stderr}"


def test_no_breaking_change_against_the_baseline_and_baseline_is_current():
    assert generate.BASELINE.exists(), "protos/baseline.json is missing: run `make protos`"
    assert generate.breaking_changes() == "", "a change breaks existing clients"
    assert json.loads(generate.BASELINE.read_text()) == json.loads(generate.build_image()), (
        "protos/baseline.json is older than the protos: run `make protos`"
    )


def test_breaking_check_catches_a_renumbered_field(tmp_path):
    """The guard behind "fields are only ever added" really fires (on a copy of the protos)."""
    import shutil

    root = tmp_path / "protos"
    shutil.copytree(generate.PROTO_ROOT, root)
    common = root / "edittuner/common/v1/common.proto"
    unused = max(f.number for f in common_pb2.Job.DESCRIPTOR.fields) + 1
    common.write_text(common.read_text().replace("string job_id = 1;", f"string job_id = {unused};"))
    report = generate.breaking_changes(baseline=generate.BASELINE, proto_root=root)
    assert 'Previously present field "1" with name "job_id" on message "Job" was deleted' in report


@pytest.mark.parametrize("module,service,submit", SERVICES, ids=[s for _, s, _ in SERVICES])
def test_every_service_has_the_job_rpcs(module, service, submit):
    desc = module.DESCRIPTOR.services_by_name[service]
    assert desc.full_name.startswith("edittuner.") and ".v1." in desc.full_name
    methods = {m.name: m for m in desc.methods}
    for name in [submit, *JOB_METHODS]:
        assert name in methods, f"{service} lacks {name}"
    for name, m in methods.items():
        assert not m.client_streaming, f"{service}.{name} must not be client-streaming"
        assert m.server_streaming == (name == "WatchJob"), f"{service}.{name}: only WatchJob streams"
    for name in [submit, "GetJob", "CancelJob", "WatchJob"]:
        job = methods[name].output_type.fields_by_name["job"]
        assert (job.number, job.message_type) == (1, common_pb2.Job.DESCRIPTOR), name
    request = methods[submit].input_type.fields_by_name
    assert request["request_id"].number == 1 and request["request_id"].type == FieldDescriptor.TYPE_STRING
    assert request["files"].message_type is common_pb2.RunConfigFiles.DESCRIPTOR
    listing = methods["ListJobs"].input_type.fields_by_name
    assert listing["state"].enum_type is common_pb2.JobState.DESCRIPTOR


def test_encoder_and_eval_can_release_models_and_the_trainer_has_no_such_rpc():
    names = {s: {m.name for m in mod.DESCRIPTOR.services_by_name[s].methods} for mod, s, _ in SERVICES}
    assert "ReleaseModels" in names["EncoderService"] and "ReleaseModels" in names["EvalService"]
    assert "ReleaseModels" not in names["TrainerService"]


def _messages(file_desc):
    stack = list(file_desc.message_types_by_name.values())
    while stack:
        msg = stack.pop()
        stack.extend(msg.nested_types)
        yield msg


def test_messages_carry_object_keys_never_tensors():
    """No bytes fields: tensors live in the store and messages name their keys. The one exception is the data
    package, whose file transfers carry a file's bytes in ``chunk`` fields and nothing else."""
    for module in (common_pb2, encoder_pb2, trainer_pb2, eval_pb2):
        for msg in _messages(module.DESCRIPTOR):
            for f in msg.fields:
                assert f.type != FieldDescriptor.TYPE_BYTES, f"{msg.full_name}.{f.name} is bytes"
    chunks = {
        f"{m.name}.{f.name}"
        for m in _messages(data_pb2.DESCRIPTOR)
        for f in m.fields
        if f.type == FieldDescriptor.TYPE_BYTES
    }
    assert chunks == {"UploadFileRequest.chunk", "DownloadFileResponse.chunk"}


def test_job_state_numbers_are_the_documented_ones():
    assert {v.name: v.number for v in common_pb2.JobState.DESCRIPTOR.values} == {
        "JOB_STATE_UNSPECIFIED": 0,
        "JOB_STATE_QUEUED": 1,
        "JOB_STATE_RUNNING": 2,
        "JOB_STATE_SUCCEEDED": 3,
        "JOB_STATE_FAILED": 4,
        "JOB_STATE_CANCELLED": 5,
    }
