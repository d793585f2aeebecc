"""The learning-rate schedules by SimpleTuner's names against their formulas, their config rules, and both
gradient clipping methods."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from shared.config.checks import check_schedule
from shared.config.schema import TrainConfig
from shared.train.schedule import build_scheduler
from shared.train.trainer import Trainer

LR, T, W = 1e-3, 20, 4


def _lrs(name: str, steps: int = T, **kw) -> list[float]:
    cfg = TrainConfig(model_flavour="edit-v2", learning_rate=LR, lr_scheduler=name, lr_warmup_steps=W, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = build_scheduler(cfg, name, opt, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_linear_decay_to_zero():
    lrs = _lrs("linear")
    assert lrs[:W] == pytest.approx([LR * k / W for k in range(W)])
    assert lrs[W] == pytest.approx(LR) and lrs[-1] == pytest.approx(LR / (T - W))


def test_polynomial_decays_to_lr_end_with_lr_power():
    lrs = _lrs("polynomial", lr_end=1e-5, lr_power=2.0)
    for k in range(W, T):
        assert lrs[k] == pytest.approx((LR - 1e-5) * (1 - (k - W) / (T - W)) ** 2 + 1e-5), k


def test_cosine_with_restarts_restarts_lr_num_cycles_times():
    lrs = _lrs("cosine_with_restarts", lr_num_cycles=2)
    half = W + (T - W) // 2
    assert lrs[W] == pytest.approx(LR) and lrs[half] == pytest.approx(LR)  # back at the top: a hard restart
    assert lrs[half - 1] < 0.1 * LR


def test_cosine_is_one_half_cosine():
    lrs = _lrs("cosine")
    for k in range(W, T):
        assert lrs[k] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * (k - W) / (T - W)))), k


def test_sine_is_simpletuners_wave_between_lr_end_and_lr():
    lrs = _lrs("sine", steps=3 * W, lr_end=1e-4)
    for k, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-4 + (LR - 1e-4) * 0.5 * (1 + math.sin(math.pi * k / W))), k
    assert min(lrs) == pytest.approx(1e-4) and max(lrs) == pytest.approx(LR)


def test_schedule_rules_are_config_errors_naming_the_key():
    (p,) = check_schedule(TrainConfig(model_flavour="edit-v2", lr_scheduler="sine"), "config.json")
    assert p.where == "config.json: $.lr_warmup_steps" and "set lr_warmup_steps > 0" in p.message
    (p,) = check_schedule(TrainConfig(model_flavour="edit-v2", lr_scheduler="polynomial", lr_end=1e-3), "c.json")
    assert p.where == "c.json: $.lr_end" and "exceeds learning_rate" in p.message
    assert (
        check_schedule(
            TrainConfig(model_flavour="edit-v2", lr_scheduler="sine", optimizer="adamw_schedulefree"), "c.json"
        )
        == []
    )  # constant lr there


@pytest.mark.parametrize("method", ["norm", "value"])
def test_gradient_clipping_by_norm_or_by_value_reports_the_norm_before(method):
    grads = [torch.tensor([3.0, -0.5]), torch.tensor([[0.2, -4.0]])]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    cfg = TrainConfig(model_flavour="edit-v2", max_grad_norm=1.0, grad_clip_method=method)
    norm = Trainer._clip_gradients(SimpleNamespace(cfg=cfg, params=params, device=torch.device("cpu")))
    before = math.sqrt(9 + 0.25 + 0.04 + 16)
    assert float(norm) == pytest.approx(before)
    if method == "value":  # each element clamped to ±1, the small ones untouched
        assert params[0].grad.tolist() == [1.0, -0.5] and params[1].grad.tolist() == [[pytest.approx(0.2), -1.0]]
    else:  # the direction kept, the length 1
        assert math.sqrt(sum(float((p.grad**2).sum()) for p in params)) == pytest.approx(1.0, rel=1e-5)
        assert params[1].grad[0, 1] / params[0].grad[0] == pytest.approx(-4.0 / 3.0)
