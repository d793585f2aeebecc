import os
import sys
from pathlib import Path

# Every process a test starts (the CLI, the services, the training worker, DDP ranks) computes on one intra-op
# thread, as the tests' own process does (one_cpu_thread below): results a test compares across processes must not
# depend on the machine's core count, whose thread split changes the last bits of a reduction. Set before torch is
# imported anywhere, and inherited by every subprocess.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

ROOT = Path(__file__).resolve().parents[1]
# The tests mirror the packages (tests/config/ for shared.config, ...); the helpers beside this file (rpcfake,
# s3server, ...) and the test modules other tests build on (test_training's make_run, ...) import by name.
for p in (ROOT, ROOT / "tests", *sorted(d for d in (ROOT / "tests").iterdir() if d.is_dir() and d.name.isidentifier())):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pytest  # noqa: E402 - after the path set-up above


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """flavour → directory of a tiny random-weight model in the real layout, built once per session."""
    from shared.model.tiny_model import get_tiny_model

    root = tmp_path_factory.getbasetemp() / "tiny-models"  # shared with test_tiny_model / test_encode_ops
    return lambda flavour, seed=0: get_tiny_model(flavour, root, seed)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto, its own process) on loopback: yields its endpoint URL."""
    from s3server import start_s3_server

    endpoint, stop = start_s3_server()
    try:
        yield endpoint
    finally:
        stop()


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """Tiny-model math on one intra-op thread. Each op is far too small to gain from a second thread, and with two
    the thousands of per-op barriers stall whenever the host is busy (measured on a loaded 2-core host: 12 s
    instead of 0.13 s per 8-step test)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
