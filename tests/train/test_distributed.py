"""Data parallel training on the CPU with gloo: the training worker under torchrun (as trainer_svc and
``edittuner train --in-process`` start it) computes what one process computes.

Every run here is a real worker process with one thread (torchrun gives each rank one; matmul results depend on
the thread count), so the single-process runs they are compared with are worker processes with one thread too.
With gradient_accumulation_steps equal to the number of processes the sums are the same floating-point
operations, so losses and LoRA are bit-identical; with more micro-batches than processes they add in another
order (within rtol 1e-5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_training import make_run

from shared.config.loading import load_run_config
from shared.errors import ConfigError
from shared.service.supervisor import WorkerFailed, run_worker
from shared.store.checkpoint import load_checkpoint
from shared.store.local import LocalStore
from shared.train.distributed import launch_command
from shared.train.events import TrainEvent
from shared.train.trainer import Trainer

pytestmark = pytest.mark.slow  # runs torchrun with two ranks

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
WORKER = [sys.executable, "-m", "shared.service.worker"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("ddp")
    cfg, store = make_run(
        root, tiny_models, refs=1, n=4, max_train_steps=4, checkpoint_step_interval=2, gradient_accumulation_steps=2
    )
    return cfg, store


def _command(cfg: Path, store: LocalStore, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    run = load_run_config(cfg, overrides=list(overrides))
    return launch_command(
        [
            *WORKER,
            "--config",
            str(cfg),
            "--store",
            str(store.root),
            "--no-encode",
            "--no-validation",
            *flags,
            *overrides,
        ],
        run.train,
    )


def _train(cfg: Path, store: LocalStore, run: str, *overrides: str, flags: tuple[str, ...] = ()) -> dict:
    cmd = _command(cfg, store, f"output_dir={run}", *overrides, flags=flags)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    result = next((m["result"] for m in lines if "result" in m), None)
    assert p.returncode == 0 and result is not None, (cmd, p.stdout[-2000:], p.stderr[-4000:])
    return result


def _losses(store: LocalStore, run: str) -> list[float]:
    history = store.get_bytes(f"runs/{run}/metrics.jsonl").decode().splitlines()
    return [h["loss"] for h in map(json.loads, history) if "loss" in h]


def _lora(store: LocalStore, run: str, step: int | None = None) -> dict[str, torch.Tensor]:
    if step is not None:
        return load_checkpoint(store, f"runs/{run}", step).lora
    return store.get_tensors(f"runs/{run}/lora/pytorch_lora_weights.safetensors")[0]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_launch_command(encoded):
    cfg, store = encoded
    assert _command(cfg, store)[:3] == [*WORKER]  # one process: the worker itself
    two = _command(cfg, store, "num_processes=2")
    assert two[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0", "--standalone"]
    assert two[6:8] == ["-m", "shared.service.worker"]
    nodes = _command(
        cfg,
        store,
        "num_processes=2",
        "num_machines=2",
        "machine_rank=1",
        "main_process_ip=10.0.0.5",
        "gradient_accumulation_steps=4",
        "main_process_port=29400",
    )
    assert {
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.5:29400",
        "--rdzv-conf=is_host=false,join_timeout=3600",
    } <= set(nodes) and "--standalone" not in nodes


def test_settings_that_cannot_run_are_config_errors(encoded):
    cfg, _ = encoded
    for overrides, where, needle in [
        (["num_processes=4"], "gradient_accumulation_steps", "2 does not split over 4 processes"),
        (["num_processes=0"], "num_processes", "expected a number of processes"),
        (["num_machines=2"], "main_process_ip", "is required with num_machines > 1"),
        (["num_machines=2", "machine_rank=2", "main_process_ip=h"], "machine_rank", "numbered 0 to 1"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_run_config(cfg, overrides=overrides)
        assert any(p.where.endswith(f"$.{where}") and needle in p.message for p in e.value.problems), str(e.value)


def test_a_cuda_run_joins_a_group_that_also_serves_host_tensors(monkeypatch):
    """The trainer all-reduces CPU tensors (its stop flag, the data wait) beside CUDA ones; "nccl" alone maps only
    cuda. The group a CUDA run asks for maps cpu to gloo and cuda to nccl, as torch reads the string; a CPU run
    keeps gloo (which the multi-process tests here run)."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from shared.train import distributed

    cuda = distributed.process_group_backend(torch.device("cuda", 1))
    assert BackendConfig(Backend(cuda)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert distributed.process_group_backend(torch.device("cpu")) == "gloo"
    asked: list[str] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: asked.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for device in (torch.device("cuda", 1), torch.device("cpu")):
        assert distributed.init(device) == distributed.Dist(rank=1, world=2, local_rank=1)
    assert asked == ["cpu:gloo,cuda:nccl", "gloo"]


def _train_here(cfg: Path, store: LocalStore, run: str, *overrides: str) -> dict:
    """One process: this one, on one thread like the workers (the same kernels, so the same bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_run_config(cfg, overrides=[f"output_dir={run}", *overrides]), store)
        trainer.setup()
        s = trainer.train()
    finally:
        torch.set_num_threads(threads)
    return {"run_id": s.run_id, "steps": s.steps, "processes": 1, "checkpoints": s.checkpoints}


@pytest.fixture(scope="module")
def baseline(encoded):
    """One process, run "one"."""
    cfg, store = encoded
    return _train_here(cfg, store, "one", "lora_dropout=0.1")


def test_two_processes_compute_what_one_does_and_either_resumes_the_other(encoded, baseline):
    """lora_dropout on: its masks come from (seed, step, micro-batch) like the noise, on whichever rank. Two
    ranks stop at step 2; one process resumes their checkpoint to the end."""
    cfg, store = encoded
    one = baseline
    assert one["processes"] == 1 and one["checkpoints"] == [2, 4]
    half = _train(cfg, store, "two", "lora_dropout=0.1", "num_processes=2", flags=("--until-step=2",))
    assert half["processes"] == 2 and half["steps"] == 2 and half["checkpoints"] == [2]
    assert _losses(store, "two") == _losses(store, "one")[:2]  # bitwise: the all-reduced losses
    assert _equal(_lora(store, "two", 2), _lora(store, "one", 2))
    assert load_checkpoint(store, "runs/two", 2).loader == load_checkpoint(store, "runs/one", 2).loader
    rest = _train(cfg, store, "two", "lora_dropout=0.1", "resume_from_checkpoint=latest")
    assert rest["steps"] == 4 and rest["processes"] == 1
    assert _losses(store, "two") == _losses(store, "one")
    assert _equal(_lora(store, "two"), _lora(store, "one"))


def test_two_machines_on_loopback_compute_what_one_process_does(encoded, baseline):
    """Two torchrun agents meeting at a c10d rendezvous (machine 0 hosts it), one process each."""
    from shared.service.local_stack import free_port

    cfg, store = encoded
    port = free_port()
    procs = [
        subprocess.Popen(
            _command(
                cfg,
                store,
                "output_dir=nodes",
                "lora_dropout=0.1",
                "num_machines=2",
                f"machine_rank={m}",
                "main_process_ip=127.0.0.1",
                f"main_process_port={port}",
            ),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    results = [json.loads(line)["result"] for out, _ in outs for line in out.splitlines() if '"result"' in line]
    assert len(results) == 1 and results[0]["processes"] == 2  # rank 0 reports, on whichever machine it is
    assert _losses(store, "nodes") == _losses(store, "one") and _equal(_lora(store, "nodes"), _lora(store, "one"))


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb", "gguf-Q8_0"])
def test_quantized_bases_with_four_micro_batches_over_two_processes(encoded, precision, tmp_path):
    """Each rank quantizes its own base (DDP's broadcast would not sync quantized weights; the fingerprints are
    compared across ranks instead), with gradient checkpointing; gguf-Q8_0: each rank loads the GGUF file, whose
    packed weights DDP leaves alone as it does every frozen tensor. Four micro-batches over two ranks add in
    another order: rtol 1e-5."""
    cfg, store = encoded
    base = [f"base_model_precision={precision}"]
    if precision.startswith("gguf-"):
        from safetensors.torch import load_file

        from shared.model.tiny_files import write_gguf

        folder = Path(load_run_config(cfg).train.model_path)
        sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        write_gguf(sd, tmp_path / "t.gguf", precision.removeprefix("gguf-"))
        base = [f"pretrained_transformer_model_name_or_path={tmp_path / 't.gguf'}"]
    args = [
        *base,
        "gradient_accumulation_steps=4",
        "max_train_steps=1",
        "gradient_checkpointing=true",
    ]  # DDP with diffusers' non-reentrant checkpointing
    # the baseline in this process (two threads): within rtol 1e-5 the thread count does not matter
    trainer = Trainer(load_run_config(cfg, overrides=[*args, f"output_dir={precision}-1"]), store)
    trainer.setup()
    trainer.train()
    _train(cfg, store, f"{precision}-2", *args, "num_processes=2")
    torch.testing.assert_close(
        torch.tensor(_losses(store, f"{precision}-2")),
        torch.tensor(_losses(store, f"{precision}-1")),
        rtol=1e-5,
        atol=0,
    )
    one, two = _lora(store, f"{precision}-1"), _lora(store, f"{precision}-2")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)


def _rank_pid(parent: int, rank: int, timeout_s: float = 120.0) -> int:
    """The pid of a torchrun agent's worker process with RANK=rank."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under {parent}")


def test_a_rank_killed_with_sigkill_fails_the_run_by_name_and_leaves_nothing_running(encoded, tmp_path):
    cfg, store = encoded
    cmd = _command(
        cfg, store, "output_dir=killed", "num_processes=2", "max_train_steps=100000", "checkpoint_step_interval=100000"
    )
    started = threading.Event()
    pids: list[int] = []

    def on_event(e: TrainEvent) -> None:
        if e.phase == "train" and e.step >= 1 and not started.is_set():
            started.set()

    def kill_rank_1() -> None:
        started.wait(300)
        agent = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_agent(int(p), "output_dir=killed"))
        pids.extend([agent, _rank_pid(agent, 0), _rank_pid(agent, 1)])
        pids.append(time.monotonic())
        os.kill(pids[2], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    with pytest.raises(WorkerFailed) as e:
        run_worker(cmd, on_event=on_event, cancelled=threading.Event(), env=ENV, log_path=tmp_path / "worker.log")
    failed_after = time.monotonic() - pids[3]
    assert "rank 1 killed by SIGKILL" in str(e.value), str(e.value)
    assert failed_after < 30, failed_after
    for pid in pids[:3]:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _is_agent(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"torch.distributed.run" in cmdline and marker.encode() in cmdline


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb"])
def test_the_replica_fingerprint_sees_the_quantized_base_and_the_lora(tiny_models, precision):
    """What check_replicas compares across ranks: equal for the same files, precision and seed; a changed base
    value (quantized data or scale) or another LoRA seed changes its digest."""
    from shared.model.loading import load_transformer
    from shared.model.lora import attach_lora
    from shared.model.quantize import quantize_transformer
    from shared.train.distributed import _fingerprint

    def model(seed: int = 0):
        m = quantize_transformer(
            load_transformer(tiny_models("edit-v2"), "edit-v2"),
            precision,
            device="cpu",
            compute_dtype=torch.float32,
            quantize_via="cpu",
            quantize_activations=False,
        )
        attach_lora(m, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=seed)
        return m

    a, b = model(), model()
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(model(seed=1))[1] != _fingerprint(a)[1] and _fingerprint(model(seed=1))[0] == _fingerprint(a)[0]
    frozen = next(p for n, p in b.named_parameters() if not p.requires_grad and "to_q" in n and "weight" in n)
    inner = getattr(frozen, "_data", frozen)
    with torch.no_grad():
        inner.view(-1)[0] += 1
    assert _fingerprint(b)[0] != _fingerprint(a)[0]


def test_sigterm_stops_both_ranks_at_one_step_with_a_checkpoint_and_the_run_resumes_exactly(encoded):
    """torchrun passes SIGTERM to every rank; they agree on the step to stop at (one all-reduce per step), rank 0
    writes its checkpoint, and the resumed run ends where an uninterrupted one does (lr constant: the length of
    the run changes no step)."""
    cfg, store = encoded
    args = ("lora_dropout=0.1", "num_processes=2", "checkpoint_step_interval=1000")
    cmd = _command(cfg, store, "output_dir=stopped", *args, "max_train_steps=100000")
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for line in proc.stdout:  # the first step's event: training is under way on both ranks
        if '"phase": "train"' in line and '"loss"' in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    result = next((json.loads(line)["result"] for line in out.splitlines() if '"result"' in line), None)
    assert result is not None and result["interrupted"], err[-3000:]
    k = result["steps"]
    assert k >= 1 and load_checkpoint(store, "runs/stopped", k).step == k
    end = f"max_train_steps={k + 2}"
    _train(cfg, store, "stopped", *args, end, "resume_from_checkpoint=latest")
    _train_here(cfg, store, "through", "lora_dropout=0.1", "checkpoint_step_interval=1000", end)
    assert len(_losses(store, "stopped")) == k + 2
    assert _losses(store, "stopped") == _losses(store, "through")
    assert _equal(_lora(store, "stopped"), _lora(store, "through"))


def test_qwen21_two_processes_compute_what_one_does(tmp_path, tiny_models):
    """Qwen-Image-2.1's joint-sequence forward under DDP: two ranks with four references per sample (captions
    dropped to the empty prompt's embeddings half the time) give the losses and the LoRA one process gives, bit
    for bit."""
    cfg, store = make_run(
        tmp_path,
        tiny_models,
        flavour="v2.1",
        refs=4,
        n=4,
        max_train_steps=2,
        checkpoint_step_interval=2,
        gradient_accumulation_steps=2,
        caption_dropout_probability=0.5,
    )
    _train_here(cfg, store, "one")
    assert _train(cfg, store, "two", "num_processes=2")["processes"] == 2
    assert len(_losses(store, "one")) == 2 and _losses(store, "two") == _losses(store, "one")
    assert _equal(_lora(store, "two"), _lora(store, "one"))
