"""Unary latency while clients hold Watch streams open: the server as it was (32 threads, no bound on streams)
against the server as it is (64 threads, at most 48 streams, the rest refused RESOURCE_EXHAUSTED with a retry hint).

    .venv/bin/python bench/streams.py [--streams 200] [--calls 200]

Each mode: a real encoder servicer over a job manager with one queued job (it never finishes, so its watchers
stay), ``--streams`` WatchJob calls opened over 10 channels, then ``--calls`` GetJob calls one after another with a
2 s deadline each. Prints, per mode, the streams held open and refused, the unary p50/p99 and the calls that did
not get an answer (DEADLINE_EXCEEDED). "before" builds the previous server setup itself; "after" is build_server.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoder_svc.service import EncoderServicer
from shared.rpc import encoder_pb2, encoder_pb2_grpc
from shared.rpc.client import make_channel
from shared.rpc.interceptors import ErrorInterceptor, MetricsInterceptor
from shared.rpc.server import ServiceConfig, build_server
from shared.service.common import ServerPaths
from shared.service.jobs import JobManager
from shared.store.local import LocalStore


def never_runs(job, ctx):
    raise AssertionError("not started")


def serve(mode: str, servicer: EncoderServicer) -> tuple[object, int, callable]:
    if mode == "before":  # the server of the previous release: 32 threads, every stream holding one
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            interceptors=[MetricsInterceptor(CollectorRegistry()), ErrorInterceptor()],
        )
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, port, lambda: server.stop(0)
    config = ServiceConfig(host="127.0.0.1", port=0, grace_s=0)
    running = build_server(
        config,
        lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s),
        ["edittuner.encoder.v1.EncoderService"],
        registry=CollectorRegistry(),
    )
    return running.server, running.port, lambda: running.stop(0)


def run_mode(mode: str, n_streams: int, n_calls: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        jobs = JobManager(LocalStore(Path(tmp)), "encoder", never_runs)
        job = jobs.submit("encode", {}, "held")
        servicer = EncoderServicer(jobs, SimpleNamespace(paths=ServerPaths()), keepalive_s=15.0)
        _, port, stop = serve(mode, servicer)
        channels = [make_channel(f"127.0.0.1:{port}") for _ in range(10)]
        lock, outcome = threading.Lock(), {"open": 0, "refused": 0, "other": 0}
        calls: list[grpc.Future] = []

        def watch(i: int) -> None:
            call = encoder_pb2_grpc.EncoderServiceStub(channels[i % 10]).WatchJob(
                encoder_pb2.WatchJobRequest(job_id=job.job_id)
            )
            with lock:
                calls.append(call)
            try:
                next(call)
                with lock:
                    outcome["open"] += 1
                for _ in call:
                    pass
            except grpc.RpcError as e:
                with lock:
                    key = "refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "other"
                    outcome[key] += 1 if e.code() != grpc.StatusCode.CANCELLED else 0
            except StopIteration:
                pass

        threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(n_streams)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and outcome["open"] + outcome["refused"] < n_streams:
            time.sleep(0.05)  # settle: every stream answered, or 5 s (before: the rest wait for a thread forever)
        stub = encoder_pb2_grpc.EncoderServiceStub(make_channel(f"127.0.0.1:{port}"))
        latencies, failed = [], 0
        for _ in range(n_calls):
            t0 = time.perf_counter()
            try:
                stub.GetJob(encoder_pb2.GetJobRequest(job_id=job.job_id), timeout=2.0)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError:
                failed += 1
        with lock:
            for c in calls:
                c.cancel()
        jobs.shutdown(wait=False)
        stop()
        q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
        return {
            "mode": mode,
            **outcome,
            "answered": len(latencies),
            "failed": failed,
            "p50_ms": 1000 * q[49],
            "p99_ms": 1000 * q[98],
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    print(
        f"# {platform.machine()}, {platform.python_version()}, grpcio {grpc.__version__}; {args.streams} Watch "
        f"streams opened, then {args.calls} GetJob calls (2 s deadline each)"
    )
    print(
        f"{'mode':<7} {'streams open':>12} {'refused':>8} {'unary ok':>9} {'unary failed':>13} {'p50 ms':>8} "
        f"{'p99 ms':>8}"
    )
    for mode in ("before", "after"):
        r = run_mode(mode, args.streams, args.calls)
        print(
            f"{r['mode']:<7} {r['open']:>12} {r['refused']:>8} {r['answered']:>9} {r['failed']:>13} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
        )


if __name__ == "__main__":
    main()
