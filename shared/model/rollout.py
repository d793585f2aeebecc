"""Scheduled sampling (rollout): a training step's noisy input made by the model itself, as plain functions.

Legend: B batch, L target tokens, C 64 channels (packed latents), N inference steps.

Teacher forcing trains on the exact interpolation x_s = (1 - s)·x0 + s·noise, but inference feeds the model its
own outputs, so its errors compound (exposure bias). For a rolled-out sample the training sigma s stays as drawn;
the rollout starts k steps earlier on the inference schedule (the N sigmas a preview at this resolution denoises
through), at the exact interpolation with the step's own noise, and denoises down to s with the current weights
(no gradient, eval mode) using one of diffusers' solvers. The loss then asks the usual velocity, noise - x0, of
that self-made input. Option names, defaults and the probability ramp are SimpleTuner's; its ReflexFlow terms
are not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.model.flow import EditBatch, pack_for, predict_velocity, resolution_mu

SOLVERS = ("unipc", "euler", "dpm")
NUDGE = 1e-6  # a multistep solver's log(alpha) is -inf at sigma 1: UniPC moves its first sigma this far below 1


@dataclass(frozen=True)
class Rollout:
    """Scheduled sampling's settings (``scheduled_sampling_*`` of the config) and its per-sample draws."""

    max_step_offset: int
    probability: float
    ramp_steps: int = 0
    start_step: int = 0
    prob_start: float = 0.0
    prob_end: float = 0.5
    ramp_shape: str = "linear"
    strategy: str = "uniform"
    sampler: str = "unipc"
    order: int = 2
    inference_steps: int = 30  # validation_num_inference_steps: the schedule previews denoise through

    def __post_init__(self) -> None:
        if self.sampler not in SOLVERS:
            raise ValueError(f"scheduled_sampling_sampler {self.sampler!r}: expected one of {', '.join(SOLVERS)}")
        if self.strategy not in ("uniform", "biased_early", "biased_late"):
            raise ValueError(
                f"scheduled_sampling_strategy {self.strategy!r}: expected uniform, biased_early or biased_late"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> Rollout | None:
        """The settings of a TrainConfig; None when scheduled sampling is off (max_step_offset 0)."""
        if cfg.scheduled_sampling_max_step_offset <= 0:
            return None
        return cls(
            cfg.scheduled_sampling_max_step_offset,
            cfg.scheduled_sampling_probability,
            cfg.scheduled_sampling_ramp_steps,
            cfg.scheduled_sampling_start_step,
            cfg.scheduled_sampling_prob_start,
            cfg.scheduled_sampling_prob_end,
            cfg.scheduled_sampling_ramp_shape,
            cfg.scheduled_sampling_strategy,
            cfg.scheduled_sampling_sampler,
            cfg.scheduled_sampling_order,
            cfg.validation_num_inference_steps,
        )

    def probability_at(self, done: int) -> float:
        """The share of samples rolled out in the step after ``done`` optimizer steps: ``probability``, or with
        ``ramp_steps`` from prob_start (until start_step) to prob_end, linearly or along a half cosine."""
        if self.ramp_steps <= 0:
            return self.probability
        progress = min(1.0, max(0.0, (done - self.start_step) / self.ramp_steps))
        if self.ramp_shape == "cosine":
            progress = 0.5 - 0.5 * math.cos(math.pi * progress)
        return self.prob_start + (self.prob_end - self.prob_start) * progress

    def draw_steps(self, batch: int, done: int, generator: torch.Generator) -> torch.Tensor:
        """Each sample's rollout length k_B (0: the exact interpolation). Drawn from the micro-step's generator
        after its noise and sigmas, so they are a function of (seed, step, micro) like those: the same on any
        rank and after a resume. The same draws happen whatever the probability."""
        chosen_B = torch.rand(batch, generator=generator) < self.probability_at(done)
        if self.strategy == "uniform":
            k_B = torch.randint(0, self.max_step_offset + 1, (batch,), generator=generator)
        else:
            u2_B = torch.rand(batch, generator=generator) ** 2
            k_B = torch.round((u2_B if self.strategy == "biased_early" else 1 - u2_B) * self.max_step_offset).long()
        return k_B * chosen_B

    def expected_steps(self) -> float:
        """Mean rollout steps (forwards without gradient) per sample at the share after any ramp: an upper bound,
        since a sigma near the schedule's start has fewer inference steps above it."""
        K = self.max_step_offset
        share = self.prob_end if self.ramp_steps > 0 else self.probability
        if self.strategy == "uniform":
            return share * K / 2
        # round(u² K) = j for u² in [(j - ½)/K, (j + ½)/K)
        early = sum(j * (math.sqrt(min(1.0, (j + 0.5) / K)) - math.sqrt(max(0.0, (j - 0.5) / K))) for j in range(K + 1))
        return share * (early if self.strategy == "biased_early" else K - early)


def inference_sigmas(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The N sigmas (float32, from 1 down, without the terminal 0) that a preview at ``image_seq_len`` target tokens
    denoises through: the pipelines' linspace through the model's scheduler and its resolution shift, as
    ``shared.evaluate.sampling.make_scheduler`` sets them."""
    # diffusers' classes from their modules: mypy reads ``from diffusers import`` as its dummy placeholders
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=resolution_mu(image_seq_len, scheduler_config)
    )
    sigmas_N: torch.Tensor = scheduler.sigmas[:-1].float()  # diffusers types the scheduler loosely
    return sigmas_N


def rollout_sigmas(schedule_N: torch.Tensor, sigma: float, steps: int) -> list[float]:
    """One rollout's sigmas: the ``steps`` inference sigmas just above ``sigma`` (fewer near the schedule's
    start), then ``sigma`` itself. A single value: no step to take."""
    above = schedule_N[schedule_N > sigma].tolist()
    return above[max(0, len(above) - steps) :] + [sigma]


def make_solver(name: str, order: int = 2) -> Any:
    """A fresh diffusers scheduler for one rollout, with flow-matching settings and no shift of its own (the
    sigmas it is given are the inference schedule's, already shifted)."""
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=1.0)
    flow = dict(solver_order=order, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    if name == "unipc":
        return UniPCMultistepScheduler(**flow)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**flow)
    raise ValueError(f"unknown rollout solver {name!r}; expected one of {', '.join(SOLVERS)}")


def set_sigmas(solver: Any, sigmas: list[float]) -> None:
    """Give ``solver`` exactly this schedule (state reset, stepping from index 0; the terminal 0 follows the last
    sigma, which is never stepped from). Euler and UniPC take custom sigmas in ``set_timesteps``; diffusers' DPM
    multistep does not, so its schedule is set in the form its ``set_timesteps`` leaves one, with UniPC's nudge
    below sigma 1."""
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    sig = np.array(sigmas, dtype=np.float32)
    if not isinstance(solver, DPMSolverMultistepScheduler):
        solver.set_timesteps(sigmas=sig)
    else:
        solver.set_timesteps(num_inference_steps=len(sig))  # resets the multistep history
        sig[0] = min(sig[0], np.float32(1 - NUDGE))
        solver.sigmas = torch.from_numpy(np.append(sig, np.float32(0.0)))
        solver.timesteps = torch.from_numpy(sig * solver.config.num_train_timesteps).to(torch.int64)
    solver.set_begin_index(0)


@torch.no_grad()
def roll_out(
    transformer: torch.nn.Module,
    batch: EditBatch,
    noise_BLC: torch.Tensor,
    sigmas_B: torch.Tensor,
    steps_B: torch.Tensor,
    schedule_N: torch.Tensor,
    *,
    sampler: str = "unipc",
    order: int = 2,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, int]:
    """The noisy target tokens of ``batch`` with each sample's ``steps_B[i]`` rollout steps taken, and the number
    of transformer forwards that took; (None, 0) when no sample has a step to take (the caller keeps the exact
    interpolation). Every sample is denoised with its own references and caption; the samples still rolling out
    share one forward per step. The latents stay in fp32 between steps, as the training input is made."""
    paths = [rollout_sigmas(schedule_N, s, k) for s, k in zip(sigmas_B.tolist(), steps_B.tolist(), strict=True)]
    rows = [i for i, p in enumerate(paths) if len(p) > 1]
    if not rows:
        return None, 0
    x0_BLC = pack_for(batch, batch.latents_BChw).float()
    noise_BLC = noise_BLC.float()
    s_B11 = sigmas_B.to(x0_BLC.device).view(-1, 1, 1).float()
    noisy_BLC = (1 - s_B11) * x0_BLC + s_B11 * noise_BLC  # the exact interpolation, kept where nothing rolls out
    solvers, x_1LC = {}, {}
    for i in rows:
        solvers[i] = make_solver(sampler, order)
        set_sigmas(solvers[i], paths[i])
        start = solvers[i].sigmas[0].to(x0_BLC.device)
        x_1LC[i] = (1 - start) * x0_BLC[i : i + 1] + start * noise_BLC[i : i + 1]
    was_training = transformer.training
    transformer.eval()  # as inference runs it: no LoRA dropout
    forwards = 0
    try:
        for r in range(max(len(paths[i]) for i in rows) - 1):
            active = [i for i in rows if len(paths[i]) - 1 > r]
            part = batch if active == list(range(len(paths))) else batch.take(active)
            sig_A = torch.stack([solvers[i].sigmas[r] for i in active]).to(x0_BLC.device)
            v_ALC = predict_velocity(transformer, part, torch.cat([x_1LC[i] for i in active]), sig_A, dtype)
            forwards += 1
            for j, i in enumerate(active):
                x_1LC[i] = solvers[i].step(
                    v_ALC[j : j + 1].float(), solvers[i].timesteps[r], x_1LC[i], return_dict=False
                )[0]
    finally:
        transformer.train(was_training)
    for i in rows:
        noisy_BLC[i] = x_1LC[i][0]
    return noisy_BLC, forwards
