"""Checkpoint pieces: optimizer state without pickle, RNG capture, commit markers, pruning."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from shared.errors import InvalidInput, NotFound
from shared.store.checkpoint import (
    CheckpointState,
    capture_rng,
    committed_steps,
    flatten,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    unflatten,
)
from shared.store.local import LocalStore


def adam_state():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    return p, opt


def test_optimizer_state_round_trips_through_json_and_tensors():
    p, opt = adam_state()
    tensors = {}
    skel = json.loads(json.dumps(flatten(opt.state_dict(), tensors)))
    restored = unflatten(skel, tensors)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=1e-3)
    opt2.load_state_dict(restored)
    g = torch.randn_like(p)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)  # the same update: moments and step count were restored exactly
    assert restored["param_groups"][0]["betas"] == (0.9, 0.999) and 0 in restored["state"]


def test_rng_capture_and_restore():
    tensors, state = capture_rng()
    a = (torch.rand(3), np.random.rand(), random.random())
    restore_rng(tensors, json.loads(json.dumps(state)))
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def _state(step):
    p, opt = adam_state()
    t, r = capture_rng()
    return CheckpointState(
        step=step,
        lora={"w.lora_A.weight": torch.full((2, 2), float(step))},
        optimizer=opt.state_dict(),
        scheduler={"last_epoch": step},
        loader={"epoch": 0, "position": step},
        ema=None,
        rng_tensors=t,
        rng=r,
    )


def test_only_committed_checkpoints_are_seen_and_loaded(tmp_path):
    store = LocalStore(tmp_path)
    save_checkpoint(store, "runs/r", _state(2), files={"pytorch_lora_weights.safetensors": b"x"})
    save_checkpoint(store, "runs/r", _state(4))
    # a crash mid-save of step 6: objects written, marker never
    store.put_tensors("runs/r/checkpoints/step-6/lora.safetensors", {"w": torch.zeros(1)})
    assert committed_steps(store, "runs/r") == [2, 4]
    assert resolve_resume(store, "runs/r", "latest") == 4
    assert resolve_resume(store, "runs/r", "step-2") == 2
    with pytest.raises(InvalidInput) as e:
        resolve_resume(store, "runs/r", "6")
    assert "step-6" in str(e.value) and "step-2, step-4" in str(e.value)
    with pytest.raises(NotFound):
        load_checkpoint(store, "runs/r", 6)
    ck = load_checkpoint(store, "runs/r", 4)
    assert ck.loader == {"epoch": 0, "position": 4} and torch.equal(ck.lora["w.lora_A.weight"], torch.full((2, 2), 4.0))


def test_prune_keeps_the_newest(tmp_path):
    store = LocalStore(tmp_path)
    for s in (1, 2, 3, 10):
        save_checkpoint(store, "runs/r", _state(s))
    assert prune_checkpoints(store, "runs/r", 2) == [1, 2]
    assert committed_steps(store, "runs/r") == [3, 10]
    assert store.list("runs/r/checkpoints/step-1") == []
