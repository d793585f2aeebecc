"""Datasets into the services' store and run files out, through DataService on a real server (port 0, the
production interceptors, a token): incremental and resumable uploads, names with '..', oversize files, a wrong
token, files announced with one hash and sent with another, downloads verified on arrival."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry

from shared import errors
from shared.cli.transfer import dataset_files, datasets_for_server, pull_run, push_folder, server_sees
from shared.config.loading import load_run_config_text, read_config_files
from shared.data.pairing import pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.rpc import data_pb2, data_pb2_grpc
from shared.rpc.client import Client
from shared.rpc.server import ServiceConfig, build_server
from shared.service.common import ServerPaths
from shared.service.data import DataServicer
from shared.store.local import LocalStore
from shared.store.uploads import blob_key, read_manifest

TOKEN = "upload-token-0123456789"


@pytest.fixture
def server(tmp_path):
    store = LocalStore(tmp_path / "store")
    visible = tmp_path / "server-datasets"
    visible.mkdir()
    servicer = DataServicer(
        store, ServerPaths(dataset_roots=(str(visible),)), tmp_path / "work", max_file_bytes=200_000
    )
    running = build_server(
        ServiceConfig(host="127.0.0.1", port=0, token=TOKEN, grace_s=0),
        lambda s: data_pb2_grpc.add_DataServiceServicer_to_server(servicer, s),
        ["edittuner.data.v1.DataService"],
        registry=CollectorRegistry(),
    )
    running.set_serving(True)
    client = Client("data", running.target, token=TOKEN)
    yield SimpleNamespace(store=store, client=client, address=running.target, visible=visible, tmp=tmp_path)
    client.close()
    running.stop(0)


def folder(tmp_path: Path, name: str = "images", n: int = 4) -> Path:
    root = write_dataset(tmp_path / name, n=n, references=1)
    return root / "images"


def test_a_folder_uploads_once_then_nothing_then_only_the_changed_image(server):
    images = folder(server.tmp)
    files = dataset_files(images)
    first = push_folder(server.client, images, "demo")
    assert (first.files, first.sent) == (len(files), len(files)) and first.sent_bytes == sum(
        f.stat().st_size for f in files
    )
    manifest = read_manifest(server.store, "demo")
    assert sorted(manifest) == [f.relative_to(images).as_posix() for f in files]
    for rel, entry in manifest.items():  # stored by content, byte for byte
        assert server.store.get_bytes(blob_key(entry.sha256)) == (images / rel).read_bytes()
    again = push_folder(server.client, images, "demo")
    assert (again.files, again.sent, again.sent_bytes) == (len(files), 0, 0)
    changed = next(f for f in files if f.suffix == ".png")
    changed.write_bytes(changed.read_bytes() + b"\0")  # still a PNG: trailing bytes are ignored by decoders
    third = push_folder(server.client, images, "demo")
    assert third.sent == 1 and read_manifest(server.store, "demo")[changed.name].size == changed.stat().st_size


def test_an_interrupted_upload_stores_nothing_of_the_broken_file_and_resumes(server):
    images = folder(server.tmp)
    files = [f for f in dataset_files(images)]
    sent: list[str] = []
    real = server.client.call_stream

    def breaks_on_the_third(method, request, **kw):
        if method == "UploadFile" and len(sent) == 2:

            def cut(messages):
                yield next(messages)  # the header, then half of the bytes, then the connection drops
                raise ConnectionResetError("the network went away")

            with pytest.raises(errors.EditTunerError):  # the client stream broke
                real(method, cut(request), **kw)
            raise KeyboardInterrupt  # the user's upload stops here
        sent.append(method)
        return real(method, request, **kw)

    server.client.call_stream = breaks_on_the_third
    with pytest.raises(KeyboardInterrupt):
        push_folder(server.client, images, "resume")
    server.client.call_stream = real
    with pytest.raises(errors.NotFound):
        read_manifest(server.store, "resume")  # not committed: unusable as a dataset yet
    stored = {k.rsplit("/", 1)[1] for k in server.store.list("uploads/blobs")}
    assert len(stored) == 2  # the two complete files; nothing of the third
    resumed = push_folder(server.client, images, "resume")
    assert resumed.sent == len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) - 2
    assert len(read_manifest(server.store, "resume")) == len(files)


@pytest.mark.parametrize("path", ["../escape.png", "/etc/passwd", "a/../../b.png", "a\\b.png", "", "x/" * 600])
def test_names_that_leave_the_dataset_are_refused_before_a_byte_is_stored(server, path):
    entry = data_pb2.UploadEntry(path=path, size=3, sha256=hashlib.sha256(b"abc").hexdigest())
    for call in (
        lambda: server.client.call("PlanUpload", data_pb2.PlanUploadRequest(files=[entry])),
        lambda: server.client.call_stream(
            "UploadFile", iter([data_pb2.UploadFileRequest(file=entry), data_pb2.UploadFileRequest(chunk=b"abc")])
        ),
        lambda: server.client.call("CommitUpload", data_pb2.CommitUploadRequest(upload_id="x", files=[entry])),
    ):
        with pytest.raises(errors.InvalidInput, match="not a relative path inside the dataset"):
            call()
    assert server.store.list("uploads") == []
    with pytest.raises(errors.InvalidInput, match="upload_id"):
        server.client.call("CommitUpload", data_pb2.CommitUploadRequest(upload_id="../x", files=[]))


def test_an_oversize_file_and_a_wrong_hash_are_refused_and_nothing_is_kept(server):
    big = b"x" * 200_001
    entry = data_pb2.UploadEntry(path="big.png", size=len(big), sha256=hashlib.sha256(big).hexdigest())
    with pytest.raises(errors.InvalidInput, match="at most 200000 bytes"):
        server.client.call_stream(
            "UploadFile", iter([data_pb2.UploadFileRequest(file=entry), data_pb2.UploadFileRequest(chunk=big)])
        )
    liar = data_pb2.UploadEntry(path="a.png", size=3, sha256=hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(errors.InvalidInput, match="announced 3 bytes"):
        server.client.call_stream(
            "UploadFile", iter([data_pb2.UploadFileRequest(file=liar), data_pb2.UploadFileRequest(chunk=b"abd")])
        )
    with pytest.raises(errors.InvalidInput, match="more than the announced"):
        server.client.call_stream(
            "UploadFile", iter([data_pb2.UploadFileRequest(file=liar), data_pb2.UploadFileRequest(chunk=b"abcd")])
        )
    assert server.store.list("uploads") == [] and not list((server.tmp / "work" / "transfers").glob(".up-*"))
    with pytest.raises(errors.FailedPrecondition, match="not in the store yet"):
        server.client.call("CommitUpload", data_pb2.CommitUploadRequest(upload_id="x", files=[liar]))


def test_a_wrong_token_gets_nothing(server):
    stranger = Client("data", server.address, token="wrong")
    try:
        with pytest.raises(grpc.RpcError) as info:
            stranger.stub.PlanUpload(data_pb2.PlanUploadRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(errors.EditTunerError, match="UNAUTHENTICATED"):
            push_folder(stranger, folder(server.tmp), "demo")
    finally:
        stranger.close()
    assert server.store.list("uploads") == []


def test_the_server_says_which_files_it_reads_itself_and_nothing_outside_its_folders(server):
    shared_copy = folder(server.visible, "shared")  # inside the server's dataset root
    assert server_sees(server.client, str(shared_copy), shared_copy)
    private = folder(server.tmp, "private")  # outside it: the server does not even look
    assert not server_sees(server.client, str(private), private)
    reply = server.client.call(
        "StatFiles",
        data_pb2.StatFilesRequest(
            paths=["/etc/hostname", str(server.visible / ".." / "private" / "images" / "0000.png")]
        ),
    )
    assert [f.readable for f in reply.files] == [False, False] and reply.files[0].sha256 == ""
    with pytest.raises(errors.InvalidInput, match="at most 64"):
        server.client.call("StatFiles", data_pb2.StatFilesRequest(paths=["/x"] * 65))


def test_a_config_whose_folders_the_server_cannot_read_is_sent_pointing_at_uploads(server, tiny_models):
    root = write_dataset(server.tmp / "client-data", n=3, references=1)
    cfg, data = write_configs(server.tmp / "cfg", root, tiny_models("edit-v2"), "edit-v2", 1)
    files = read_config_files(cfg, data)
    messages: list[str] = []
    sent = datasets_for_server(server.client, files, Path.cwd(), report=messages.append)
    entries = json.loads(sent.data_text)
    assert [e["type"] for e in entries] == ["store", "store"] and all("instance_data_dir" not in e for e in entries)
    assert len(messages) == 2 and all("uploaded" in m for m in messages)
    run = load_run_config_text(sent.config_text, sent.data_text)
    [ds], _ = pair_datasets(run, server.store)  # the server side pairs the uploaded copies like the folders
    assert [s.key for s in ds.samples] == ["0000", "0001", "0002"] and ds.samples[0].caption
    again = datasets_for_server(server.client, files, Path.cwd(), report=messages.append)
    assert again.data_text == sent.data_text and "uploaded 0 of" in messages[-1]


def test_run_files_come_back_verified_and_only_from_runs(server, tmp_path):
    server.store.put_bytes("runs/r1/lora/pytorch_lora_weights.safetensors", b"lora" * 1000)
    server.store.put_bytes("runs/r1/checkpoints/step-2/lora.safetensors", b"ckpt")
    server.store.put_bytes("jobs/trainer/secret.json", b"{}")
    written = pull_run(server.client, "r1", tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == ["lora/pytorch_lora_weights.safetensors"]
    assert (tmp_path / "out/lora/pytorch_lora_weights.safetensors").read_bytes() == b"lora" * 1000
    assert len(pull_run(server.client, "r1", tmp_path / "all", include_checkpoints=True)) == 2
    for key in ("jobs/trainer/secret.json", "runs/../jobs/x", "runs/a/../../etc"):
        with pytest.raises(errors.InvalidInput):
            list(
                server.client.call_stream(
                    "DownloadFile", data_pb2.DownloadFileRequest(key=key), streaming_response=True
                )
            )
    with pytest.raises(errors.NotFound):
        pull_run(server.client, "nope", tmp_path / "none")
