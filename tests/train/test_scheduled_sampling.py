"""Scheduled sampling (rollout) on the tiny model: off is bit-identical, the rollout is diffusers' own k-step
denoise from the inference schedule, resume stays bit-exact, bad settings are config errors naming the field."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from test_config import problems_of, write_project
from test_distributed import _equal, _lora, _losses, _train, _train_here
from test_training import make_run, trainer_for

from shared.config.loading import load_run_config
from shared.errors import ConfigError
from shared.evaluate.sampling import make_scheduler
from shared.model.flow import predict_velocity, sample_sigmas, step_generator
from shared.model.latents import pack_latents
from shared.model.rollout import Rollout, rollout_sigmas

pytestmark = pytest.mark.slow  # trains with rollouts, on one process and two

ON = [
    "scheduled_sampling_max_step_offset=3",
    "scheduled_sampling_probability=1.0",
    "scheduled_sampling_reflexflow=false",
    "validation_num_inference_steps=12",
]


def losses_of(cfg, store, tmp_path, name, *overrides):
    t = trainer_for(cfg, store, f"output_dir={tmp_path / name}", *overrides)
    results = [t.train_step() for _ in range(3)]
    t.loader.close()
    return [r.loss for r in results], [r.rollout_forwards for r in results]


def test_offset_0_or_probability_0_trains_bit_identically_to_no_rollout(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, refs=1, n=3, gradient_accumulation_steps=2)
    plain, _ = losses_of(cfg, store, tmp_path, "plain")
    off, off_fwd = losses_of(
        cfg, store, tmp_path, "off", "scheduled_sampling_max_step_offset=0", "scheduled_sampling_probability=1.0"
    )
    never, never_fwd = losses_of(
        cfg, store, tmp_path, "never", "scheduled_sampling_max_step_offset=5", "scheduled_sampling_probability=0"
    )
    rolled, rolled_fwd = losses_of(cfg, store, tmp_path, "rolled", *ON)
    assert off == plain and never == plain  # bitwise
    assert off_fwd == never_fwd == [0, 0, 0]
    assert sum(rolled_fwd) > 0 and rolled != plain


def _explicit_denoise(name, path, x0_1LC, noise_1LC, velocity):
    """k steps of the diffusers scheduler itself over ``path`` (the rollout's sigmas), from the interpolation at
    its first sigma."""
    sig = np.array(path, dtype=np.float32)
    if name == "euler":
        solver = FlowMatchEulerDiscreteScheduler(shift=1.0)
    else:
        cls = UniPCMultistepScheduler if name == "unipc" else DPMSolverMultistepScheduler
        solver = cls(solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    if name == "dpm":  # its set_timesteps takes no sigmas: the schedule in the form set_timesteps leaves it
        solver.set_timesteps(num_inference_steps=len(sig))
        solver.sigmas = torch.from_numpy(np.append(sig, np.float32(0)))
        solver.timesteps = torch.from_numpy(sig * 1000).long()
    else:
        solver.set_timesteps(sigmas=sig)
    solver.set_begin_index(0)
    start = solver.sigmas[0]
    x = (1 - start) * x0_1LC + start * noise_1LC
    for r in range(len(path) - 1):
        x = solver.step(velocity(x, solver.sigmas[r].view(1)).float(), solver.timesteps[r], x).prev_sample
    return x


def _draws(t, batch, step):
    """The micro-step's noise, sigmas and rollout lengths, drawn as the trainer draws them."""
    g = step_generator(t.cfg.seed, step, 0)
    B, _, h, w = batch.latents_BChw.shape
    noise = torch.randn(B, (h // 2) * (w // 2), 64, generator=g)
    sigmas = sample_sigmas(B, t.cfg.flow_schedule_shift, g)
    return noise, sigmas, t.rollout.draw_steps(B, step - 1, g)


def _preview_sigmas(t, batch):
    """The sigmas a preview of this batch's size denoises through (shared.evaluate.sampling's scheduler)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(t.cfg.model_path, subfolder="scheduler")
    tokens = batch.latents_BChw[0, 0].numel() // 4
    sched, _ = make_scheduler(
        SimpleNamespace(scheduler=scheduler), t.cfg.validation_num_inference_steps, tokens, torch.device("cpu")
    )
    return sched.sigmas[:-1]


def _step_drawing(t, batch, schedule, lengths):
    """A step whose draws give these rollout lengths (sorted), each with as many inference sigmas above it."""
    for step in range(1, 200):
        _, sigmas, k = _draws(t, batch, step)
        if sorted(k.tolist()) in lengths and all((schedule > s).sum() >= n for s, n in zip(sigmas, k, strict=True)):
            return step
    raise AssertionError("no such step")


def _forward_inputs(t, batch, step: int) -> list[torch.Tensor]:
    """The transformer's hidden_states at each of its forwards in the step's forward_backward."""
    inputs = []
    hook = t.transformer.register_forward_pre_hook(
        lambda m, a, kw: inputs.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    t.forward_backward(batch, step, 0)
    hook.remove()
    return inputs


@pytest.mark.parametrize("sampler", ["unipc", "euler", "dpm"])
def test_the_training_input_is_the_solvers_own_k_step_denoise_from_the_preview_schedule(tmp_path, tiny_models, sampler):
    cfg, store = make_run(
        tmp_path, tiny_models, flavour="edit-v3", refs=2, n=2, lora_dropout=0.1, gradient_checkpointing=True
    )
    t = trainer_for(cfg, store, *ON, f"scheduled_sampling_sampler={sampler}", "validation_num_inference_steps=12")
    batch = t.loader.next_batch()
    t.loader.close()
    schedule = _preview_sigmas(t, batch)
    step = _step_drawing(t, batch, schedule, [[3]])
    noise, sigmas, _ = _draws(t, batch, step)
    inputs = _forward_inputs(t, batch, step)
    L = noise.shape[1]
    path = [*schedule[schedule > sigmas[0]][-3:].tolist(), float(sigmas[0])]
    assert len(path) == 4 and t.rollout_forwards == 3 and len(inputs) == 4  # 3 rollout forwards, then training

    t.transformer.eval()
    with torch.no_grad():
        expected = _explicit_denoise(
            sampler,
            path,
            pack_latents(batch.latents_BChw).float(),
            noise,
            lambda x, s: predict_velocity(t.transformer, batch, x, s, torch.float32),
        )
    assert torch.equal(inputs[-1][:, :L], expected)
    x0, s = pack_latents(batch.latents_BChw), sigmas[0]
    assert not torch.allclose(expected, (1 - s) * x0 + s * noise, atol=1e-3)  # not the exact interpolation
    for x_in in inputs[:-1]:  # each rollout forward saw the sample's references after its tokens
        assert x_in.shape == inputs[-1].shape and torch.equal(x_in[:, L:], inputs[-1][:, L:])


def test_samples_of_a_batch_roll_out_their_own_lengths_in_shared_forwards(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, refs=1, n=4, train_batch_size=2)
    t = trainer_for(cfg, store, *ON, "scheduled_sampling_sampler=euler")
    batch = t.loader.next_batch()
    t.loader.close()
    schedule = _preview_sigmas(t, batch)
    step = _step_drawing(t, batch, schedule, [[1, 3], [2, 3]])
    noise, sigmas, k = _draws(t, batch, step)
    inputs = _forward_inputs(t, batch, step)
    assert t.rollout_forwards == 3 and [x.shape[0] for x in inputs] == [2, 2 if min(k) >= 2 else 1, 1, 2]
    L = noise.shape[1]
    t.transformer.eval()
    for i in range(2):
        one = batch.take([i])
        path = rollout_sigmas(schedule, float(sigmas[i]), int(k[i]))
        assert len(path) == int(k[i]) + 1
        with torch.no_grad():
            expected = _explicit_denoise(
                "euler",
                path,
                pack_latents(one.latents_BChw).float(),
                noise[i : i + 1],
                lambda x, s, one=one: predict_velocity(t.transformer, one, x, s, torch.float32),
            )
        torch.testing.assert_close(inputs[-1][i : i + 1, :L], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flavour,refs,extra",
    [
        ("edit-v2", 2, ["gradient_accumulation_steps=2", "lora_dropout=0.1", "scheduled_sampling_sampler=unipc"]),
        ("v2.1", 3, ["train_batch_size=2", "scheduled_sampling_sampler=euler"]),  # the joint-sequence forward
        (
            "edit-v1",
            1,
            [
                "base_model_precision=int8-quanto",
                "gradient_checkpointing=true",
                "scheduled_sampling_sampler=dpm",
                "scheduled_sampling_ramp_steps=3",
                "scheduled_sampling_prob_start=0.5",
                "scheduled_sampling_prob_end=1.0",
            ],
        ),
    ],
)
def test_resume_with_rollout_gives_bitwise_the_losses_of_an_uninterrupted_run(
    tmp_path, tiny_models, flavour, refs, extra
):
    cfg, store = make_run(
        tmp_path, tiny_models, flavour=flavour, refs=refs, n=3, max_train_steps=4, checkpoint_step_interval=2
    )
    full = trainer_for(cfg, store, *ON, *extra).train()
    other = str(tmp_path / "out2")
    trainer_for(cfg, store, *ON, *extra, f"output_dir={other}").train(until_step=3)
    rest = trainer_for(cfg, store, *ON, *extra, f"output_dir={other}", "resume_from_checkpoint=latest").train()
    assert rest.losses == full.losses[2:]  # bitwise
    forwards = [
        h["rollout_forwards"]
        for h in trainer_for(cfg, store, *ON, *extra, "resume_from_checkpoint=latest").history
        if "loss" in h
    ]
    assert len(forwards) == 4 and sum(forwards) > 0


def test_two_processes_roll_out_what_one_process_does(tmp_path, tiny_models):
    """Each rank rolls out its own micro-batches from (seed, step, micro): the losses, the LoRA and the step's
    rollout forwards (summed over the ranks) are one process's, bit for bit."""
    cfg, store = make_run(
        tmp_path, tiny_models, refs=1, n=4, max_train_steps=2, checkpoint_step_interval=2, gradient_accumulation_steps=2
    )
    args = [*ON, "lora_dropout=0.1"]
    _train_here(cfg, store, "one", *args)
    assert _train(cfg, store, "two", *args, "num_processes=2")["processes"] == 2
    assert _losses(store, "two") == _losses(store, "one") and _equal(_lora(store, "two"), _lora(store, "one"))
    history = {
        r: map(json.loads, store.get_bytes(f"runs/{r}/metrics.jsonl").decode().splitlines()) for r in ("one", "two")
    }
    forwards = [[h["rollout_forwards"] for h in steps if "loss" in h] for steps in history.values()]
    assert forwards[0] == forwards[1] and sum(forwards[0]) > 0


def test_the_planner_counts_the_rollout_forwards():
    """k up to 5 at probability 1: 2.5 forwards per sample on average, at a forward's FLOPs (what checkpointing's
    recompute adds), and no memory."""
    from seed_files import SEED_CONFIG, SEED_DATA_V2

    from shared.config.loading import load_run_config_text
    from shared.plan.predict import plan_run
    from shared.plan.report import format_plan

    def plan(*overrides):
        return plan_run(load_run_config_text(SEED_CONFIG, SEED_DATA_V2, ["model_flavour=edit-v2", *overrides]))

    off, on = plan(), plan("scheduled_sampling_max_step_offset=5", "scheduled_sampling_probability=1.0")
    forward = off.flops_per_step - plan("gradient_checkpointing=false").flops_per_step  # one per sample
    assert off.rollout_forwards == 0 and on.rollout_forwards == 2.5
    assert on.flops_per_step - off.flops_per_step == pytest.approx(2.5 * forward, rel=1e-9)
    assert on.seconds_per_step / off.seconds_per_step == pytest.approx(on.flops_per_step / off.flops_per_step)
    assert on.trainer.total == off.trainer.total and on.model_flops_per_step == off.model_flops_per_step
    assert "scheduled sampling: 2.5 forwards without gradient per sample" in format_plan(on)


def test_probability_ramp_and_draws_follow_simpletuner():
    r = Rollout(4, 0.9, ramp_steps=10, start_step=5, prob_start=0.2, prob_end=0.7)
    assert [r.probability_at(d) for d in (0, 5, 10, 15, 40)] == pytest.approx([0.2, 0.2, 0.45, 0.7, 0.7])
    cos = Rollout(4, 0.9, ramp_steps=10, prob_start=0.0, prob_end=1.0, ramp_shape="cosine")
    assert cos.probability_at(5) == pytest.approx(0.5) and cos.probability_at(2) < 0.2
    assert Rollout(4, 0.3).probability_at(1000) == 0.3
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    k = Rollout(4, 1.0).draw_steps(4000, 0, g())
    assert set(k.tolist()) == {0, 1, 2, 3, 4} and k.float().mean() == pytest.approx(2.0, abs=0.1)
    assert not Rollout(4, 0.0).draw_steps(100, 0, g()).any()
    half = Rollout(4, 0.5).draw_steps(4000, 0, g())
    assert (half > 0).float().mean() == pytest.approx(0.5 * 4 / 5, abs=0.03)
    early = Rollout(4, 1.0, strategy="biased_early")
    late = Rollout(4, 1.0, strategy="biased_late")
    assert early.draw_steps(4000, 0, g()).float().mean() == pytest.approx(early.expected_steps(), abs=0.1)
    assert late.draw_steps(4000, 0, g()).float().mean() == pytest.approx(late.expected_steps(), abs=0.1)
    assert early.expected_steps() < 2.0 < late.expected_steps() and Rollout(4, 0.5).expected_steps() == 1.0
    schedule = torch.tensor([1.0, 0.75, 0.5, 0.25])  # exact in float32
    assert rollout_sigmas(schedule, 0.625, 5) == [1.0, 0.75, 0.625]  # fewer near the schedule's start
    assert rollout_sigmas(schedule, 0.375, 2) == [0.75, 0.5, 0.375] and rollout_sigmas(schedule, 0.375, 0) == [0.375]


@pytest.mark.parametrize(
    "override,field,words",
    [
        ("scheduled_sampling_max_step_offset=-1", "scheduled_sampling_max_step_offset", ">= 0"),
        ("scheduled_sampling_probability=1.5", "scheduled_sampling_probability", "between 0 and 1"),
        ("scheduled_sampling_probability=-0.1", "scheduled_sampling_probability", "between 0 and 1"),
        ("scheduled_sampling_prob_end=2", "scheduled_sampling_prob_end", "between 0 and 1"),
        ("scheduled_sampling_sampler=ddim", "scheduled_sampling_sampler", "'unipc', 'euler', 'dpm'"),
        ("scheduled_sampling_order=4", "scheduled_sampling_order", "order 1, 2 or 3"),
        ("scheduled_sampling_strategy=random", "scheduled_sampling_strategy", "'biased_early'"),
        ("scheduled_sampling_reflexflow=true", "scheduled_sampling_reflexflow", "ReflexFlow"),
        ("scheduled_sampling_reflexflow_alpha=2.0", "scheduled_sampling_reflexflow_alpha", "ReflexFlow is not built"),
        ("scheduled_sampling_reflexflow_beta1=5", "scheduled_sampling_reflexflow_beta1", "ReflexFlow is not built"),
    ],
)
def test_bad_rollout_settings_are_config_errors_naming_the_field(tmp_path, monkeypatch, override, field, words):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json", overrides=["scheduled_sampling_max_step_offset=5", override])
    problems = problems_of(e)
    assert len(problems) == 1 and f"$.{field}" in problems[0] and words in problems[0], problems


def test_rollout_settings_that_change_nothing_or_differ_from_simpletuner_are_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path)
    quiet = load_run_config("config/config.json", overrides=ON)
    assert quiet.warnings == () and Rollout.from_config(quiet.train) == Rollout(3, 1.0, inference_steps=12)
    run = load_run_config(
        "config/config.json",
        overrides=["scheduled_sampling_max_step_offset=5", "scheduled_sampling_reflexflow_beta2=1.0"],
    )
    text = "\n".join(run.warnings)
    assert "$.scheduled_sampling_probability: is 0" in text and "turns ReflexFlow on" in text
    assert "scheduled_sampling_reflexflow_beta2 (ReflexFlow is not built" in text
