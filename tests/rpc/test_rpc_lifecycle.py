"""The shared gRPC server layer's lifecycle, over real servers on port 0: auth, health, reflection, the client
helpers, configuration from the environment, TLS and graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from rpcfake import LIMIT, ROOT, SERVICE, handled, rpc_error, start

from shared import errors
from shared.rpc import encoder_pb2, encoder_pb2_grpc
from shared.rpc.client import call, make_channel, wait_for_serving
from shared.rpc.server import ServiceConfig, build_server

pytestmark = pytest.mark.slow  # starts and stops service processes


@pytest.fixture(scope="module")
def server():
    running, registry = start()
    running.set_serving(True)
    channel = make_channel(running.target, max_message_bytes=4 * LIMIT)
    yield running, registry, encoder_pb2_grpc.EncoderServiceStub(channel)
    channel.close()
    running.stop(0)


# --------------------------------------------------------------------------------------------------- auth
def test_bearer_token_required_accepted_and_health_and_reflection_stay_open():
    running, registry = start(token="s3cret")
    try:
        anonymous = make_channel(running.target)
        stub = encoder_pb2_grpc.EncoderServiceStub(anonymous)
        err = rpc_error(stub.GetJob, encoder_pb2.GetJobRequest(job_id="a"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in err.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.WatchJob(encoder_pb2.WatchJobRequest(job_id="2:"), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = encoder_pb2_grpc.EncoderServiceStub(make_channel(running.target, token="guess"))
        assert rpc_error(wrong.GetJob, encoder_pb2.GetJobRequest(job_id="a")).code() == grpc.StatusCode.UNAUTHENTICATED

        good = encoder_pb2_grpc.EncoderServiceStub(make_channel(running.target, token="s3cret"))
        assert good.GetJob(encoder_pb2.GetJobRequest(job_id="a"), timeout=5).job.job_id == "a"
        assert len(list(good.WatchJob(encoder_pb2.WatchJobRequest(job_id="2:"), timeout=5))) == 2
        # Errors still map behind auth.
        assert (
            rpc_error(good.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="NotFound")).code()
            == grpc.StatusCode.NOT_FOUND
        )

        reply = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert SERVICE in list_services(anonymous)
    finally:
        running.stop(0)
    assert handled(registry, "GetJob", "UNAUTHENTICATED") == 2
    assert handled(registry, "WatchJob", "UNAUTHENTICATED", "server_stream") == 1
    assert handled(registry, "GetJob", "OK") == 1


# ----------------------------------------------------------------------------------- health and reflection
def list_services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return [s.name for s in reply.list_services_response.service]


def test_reflection_lists_the_service_and_serves_its_descriptor(server):
    running, _, _ = server
    channel = make_channel(running.target)
    assert set(list_services(channel)) == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
    [reply] = stub.ServerReflectionInfo(iter([request]), timeout=5)
    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in reply.file_descriptor_response.file_descriptor_proto
    ]
    assert "edittuner/encoder/v1/encoder.proto" in [f.name for f in files]


def test_health_goes_not_serving_then_serving_then_not_serving_on_stop():
    running, _ = start()
    channel = make_channel(running.target)
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(errors.Unavailable, match="not SERVING after 0.3s .last: NOT_SERVING"):
        wait_for_serving(channel, SERVICE, timeout=0.3)
    seen: list[int] = []
    got = threading.Condition()

    def watch():
        try:
            for reply in health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10):
                with got:
                    seen.append(reply.status)
                    got.notify_all()
        except grpc.RpcError:
            pass  # the server cancels the stream when the grace period ends

    def wait_for(n: int) -> None:
        with got:
            assert got.wait_for(lambda: len(seen) >= n, timeout=5), seen

    thread = threading.Thread(target=watch)
    thread.start()
    wait_for(1)
    running.set_serving(True)
    wait_for(2)
    wait_for_serving(channel, SERVICE, timeout=2)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=running.stop, args=(0.3,))
    stopper.start()
    wait_for(3)
    stopper.join(5)
    thread.join(5)
    S = health_pb2.HealthCheckResponse
    assert seen == [S.NOT_SERVING, S.SERVING, S.NOT_SERVING]
    running.set_serving(True)  # ignored after shutdown began
    assert running.wait_for_termination(timeout=1)


def test_wait_for_serving_rejects_an_unknown_service(server):
    running, _, _ = server
    with pytest.raises(errors.NotFound, match="does not know 'nope.v1.Nope'"):
        wait_for_serving(make_channel(running.target), "nope.v1.Nope", timeout=2)


# ------------------------------------------------------------------------------------------------- client
def test_call_passes_a_deadline_and_raises_the_domain_error(server):
    _, _, stub = server
    assert call(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="ok")).job.job_id == "j1"
    with pytest.raises(errors.InvalidInput) as info:
        call(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="ConfigError"))
    assert "$.learning_rate" in str(info.value) and "$[0].instance_data_dir" in str(info.value)
    with pytest.raises(errors.Unavailable, match="did not answer in time"):
        call(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="slow"), timeout=0.1)
    with pytest.raises(errors.IntegrityError):
        call(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="IntegrityError"))
    with pytest.raises(ValueError, match="positive deadline"):
        call(stub.SubmitEncode, encoder_pb2.SubmitEncodeRequest(request_id="ok"), timeout=0)


# ------------------------------------------------------------------------------------------ configuration
def test_service_config_from_env_reads_per_service_then_shared_names():
    env = {
        "EDITTUNER_ENCODER_PORT": "6001",
        "EDITTUNER_ENCODER_METRICS_PORT": "9101",
        "EDITTUNER_PORT": "1",
        "EDITTUNER_STORE": "minio://minio:9000/edittuner",
        "EDITTUNER_TOKEN": "shared",
        "EDITTUNER_ENCODER_TOKEN": "mine",
        "EDITTUNER_DEVICE": "cuda",
        "EDITTUNER_ENCODER_GRACE_S": "2.5",
    }
    config = ServiceConfig.from_env("EDITTUNER_ENCODER", env)
    assert (config.port, config.metrics_port, config.store_url, config.token, config.device, config.grace_s) == (
        6001,
        9101,
        "minio://minio:9000/edittuner",
        "mine",
        "cuda",
        2.5,
    )
    assert config.max_message_bytes == 16 * 1024 * 1024 and config.host == "127.0.0.1"  # loopback by default
    assert ServiceConfig.from_env("EDITTUNER_ENCODER", {**env, "EDITTUNER_HOST": "0.0.0.0"}).host == "0.0.0.0"
    assert ServiceConfig.from_env("EDITTUNER_EVAL", {}, default_port=50053).port == 50053
    assert ServiceConfig.from_env("EDITTUNER_EVAL", {"EDITTUNER_EVAL_PORT": "0"}).port == 0


def test_service_config_reports_every_bad_value_at_once():
    with pytest.raises(errors.ConfigError) as info:
        ServiceConfig.from_env("EDITTUNER_TRAINER", {"EDITTUNER_TRAINER_PORT": "http", "EDITTUNER_GRACE_S": "soon"})
    assert [p.where for p in info.value.problems] == ["$EDITTUNER_TRAINER_PORT", "$EDITTUNER_GRACE_S"]
    with pytest.raises(errors.ConfigError) as info:
        ServiceConfig(port=70000, tls_cert="cert.pem")
    assert [p.where for p in info.value.problems] == ["port", "tls_cert"]


def test_a_taken_port_is_refused():
    running, _ = start()
    try:
        with pytest.raises(errors.Unavailable, match="cannot listen on 127.0.0.1:"):
            build_server(
                ServiceConfig(host="127.0.0.1", port=running.port),
                lambda s: None,
                [SERVICE],
                registry=CollectorRegistry(),
            )
    finally:
        running.stop(0)


# ---------------------------------------------------------------------------------------------------- TLS
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_with_token(tmp_path):
    cert, key = _self_signed(tmp_path)
    running, _ = start(tls_cert=str(cert), tls_key=str(key), token="t")
    try:
        target = f"localhost:{running.port}"
        secure = encoder_pb2_grpc.EncoderServiceStub(make_channel(target, tls_ca=cert, token="t"))
        assert secure.GetJob(encoder_pb2.GetJobRequest(job_id="a"), timeout=5).job.job_id == "a"
        plain = encoder_pb2_grpc.EncoderServiceStub(make_channel(target, token="t"))
        assert rpc_error(plain.GetJob, encoder_pb2.GetJobRequest(job_id="a")).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


def test_unreadable_tls_files_are_a_config_error(tmp_path):
    config = ServiceConfig(
        host="127.0.0.1", port=0, tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key")
    )
    with pytest.raises(errors.ConfigError, match="tls_cert: cannot read .*no.pem"):
        build_server(config, lambda s: None, [SERVICE], registry=CollectorRegistry())


# ------------------------------------------------------------------------------------------------ SIGTERM
SERVE = textwrap.dedent("""
    import sys, time
    from prometheus_client import CollectorRegistry
    from shared.rpc import encoder_pb2_grpc
    from shared.rpc.server import ServiceConfig, build_server, install_sigterm

    class Slow(encoder_pb2_grpc.EncoderServiceServicer):
        def GetJob(self, request, context):
            print("call started", flush=True)
            time.sleep(0.5)
            from shared.rpc import common_pb2, encoder_pb2
            return encoder_pb2.GetJobResponse(job=common_pb2.Job(job_id="done"))

    running = build_server(ServiceConfig(host="127.0.0.1", port=0, grace_s=5),
                           lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(Slow(), s),
                           ["edittuner.encoder.v1.EncoderService"], registry=CollectorRegistry())
    install_sigterm(running)
    running.set_serving(True)
    print(running.port, flush=True)
    running.wait_for_termination()
    print("exited cleanly", flush=True)
""")


def test_sigterm_lets_the_running_call_finish_then_exits():
    proc = subprocess.Popen([sys.executable, "-c", SERVE], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(f"127.0.0.1:{port}"))
        future = stub.GetJob.future(encoder_pb2.GetJobRequest(job_id="a"), timeout=5)
        assert proc.stdout.readline().strip() == "call started"  # the call is running
        proc.send_signal(signal.SIGTERM)
        assert future.result().job.job_id == "done"  # finished within the grace period
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "exited cleanly" in out


def test_a_local_stack_whose_port_was_taken_starts_again_on_new_ports(tmp_path, monkeypatch):
    """Between free_port() and a service's bind another process can take the port (an outgoing connection's
    ephemeral port): the service exits at once, and the stack is started again rather than waited on."""
    import socket

    from shared.service import local_stack

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = local_stack.free_port
    monkeypatch.setattr(local_stack, "free_port", lambda: next(ports, None) or real())
    try:
        with local_stack.start_local_stack(
            str(tmp_path / "store"), tmp_path / "logs", services=("encoder",), timeout_s=60
        ) as stack:
            assert stack.addresses["encoder"] != f"127.0.0.1:{taken.getsockname()[1]}"
            assert stack.procs["encoder"].poll() is None
        assert "cannot listen on" in (tmp_path / "logs" / "encoder.log").read_text()  # the first try's exit
    finally:
        taken.close()
