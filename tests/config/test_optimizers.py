"""Every optimizer name: built by its own library, trained on the tiny model, checkpointed and resumed bit for bit;
the CUDA-only names refused on the CPU with their reason; optimizer_config parsed and checked; the table and the
planner read the same specs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from test_training import make_run, trainer_for

from shared.config.optimizers import OPTIMIZERS, optimizer_table_markdown, parse_optimizer_config
from shared.config.schema import TrainConfig
from shared.errors import IntegrityError, InvalidInput
from shared.plan.memory import LORA_STATE_BYTES
from shared.store.checkpoint import load_checkpoint, unflatten
from shared.train.optimizers import (
    accepted_arguments,
    build_optimizer,
    check_device,
    eval_weights,
    is_schedule_free,
    optimizer_class,
)

ROOT = Path(__file__).resolve().parents[2]
CPU_NAMES = [n for n, s in OPTIMIZERS.items() if not s.cuda_only]
CUDA_ONLY = [n for n, s in OPTIMIZERS.items() if s.cuda_only]
CPU = torch.device("cpu")
# The tiny model's gradients are small (norm ~0.006): at make_run's learning_rate 1e-3 the plain-gradient steps (SGD,
# ASGD, Adadelta; RAdam and Ranger in their first, unadapted steps) move the loss by less than a float's resolution.
# Prodigy's lr scales the step size it estimates (1.0 is its default).
_LR = {
    "1.0": ["torch-sgd", "optimi-sgd", "torch-asgd", "torch-adadelta", "prodigy"],
    "1e-2": ["torch-radam", "optimi-radam", "optimi-ranger"],
}
EXTRA = {name: [f"learning_rate={lr}"] for lr, names in _LR.items() for name in names}
# rank 64 makes every LoRA matrix 64x64 = 4096 values: the size from which bitsandbytes and torchao quantize the state
RANK = 64


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model_flavour="edit-v2", **kw)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_models):
    """One encoded dataset for every run here (each run has its own output_dir, hence its own run id)."""
    root = tmp_path_factory.mktemp("optimizers")
    cfg, store = make_run(root, tiny_models, refs=1, n=2, max_train_steps=3, checkpoint_step_interval=2, lora_rank=RANK)
    return cfg, store, root


@pytest.fixture(scope="module")
def untrained_losses(encoded):
    """The losses of a run whose weights do not move (lr 1e-30 on a zero-initialised lora_B): the data and noise
    of each step are fixed by the seed, so any optimizer's loss differs from these only by what it learned."""
    cfg, store, root = encoded
    return (
        trainer_for(cfg, store, "optimizer=torch-sgd", "learning_rate=1e-30", f"output_dir={root / 'untrained'}")
        .train()
        .losses
    )


def _ao_state(kind: str):
    def check(optimizer: dict) -> None:  # torchao's tensor subclasses, rebuilt from their inner tensors
        state = optimizer["state"][0]
        assert type(state["exp_avg"]).__name__ == kind and torch.is_tensor(state["exp_avg"].codes)

    return check


def _bnb_state(optimizer: dict) -> None:  # bitsandbytes' uint8 codes with their scales
    quant = optimizer["state"][0]["__bnb_optimizer_quant_state__"]
    assert quant["state1"].dtype == torch.uint8 and quant["absmax1"].dtype == torch.float32


def _prodigy_state(optimizer: dict) -> None:  # its step-size estimate, floats in the param group
    group = optimizer["param_groups"][0]
    assert group["k"] == 2 and group["d_numerator"] > 0 and group["growth_rate"] == float("inf")


def _schedule_free_state(optimizer: dict) -> None:  # saved in train mode, with the training weights
    assert optimizer["param_groups"][0]["train_mode"] is True


STORED_STATE = {
    "ao-adamw8bit": _ao_state("OptimState8bit"),
    "ao-adamw4bit": _ao_state("OptimState4bit"),
    "ao-adamfp8": _ao_state("OptimStateFp8"),
    "ao-adamwfp8": _ao_state("OptimStateFp8"),
    "bnb-adamw8bit": _bnb_state,
    "bnb-lion8bit": _bnb_state,
    "bnb-ademamix8bit": _bnb_state,
    "prodigy": _prodigy_state,
    "adamw_schedulefree": _schedule_free_state,
}


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.lora_state().items()}  # lora_state aliases fp32 CPU parameters


@pytest.mark.parametrize("name", CPU_NAMES)
def test_every_cpu_optimizer_trains_and_resumes_bit_for_bit(encoded, untrained_losses, name):
    cfg, store, root = encoded
    args = [f"optimizer={name}", f"output_dir={root / name.replace('+', '_')}", *EXTRA.get(name, [])]
    full = trainer_for(cfg, store, *args)
    spec = OPTIMIZERS[name]
    assert (
        type(full.optimizer).__module__.startswith(spec.import_name)
        and type(full.optimizer).__name__ == spec.target.rsplit(".", 1)[1]
    )
    assert all(p.dtype == (torch.bfloat16 if spec.weights == "bf16" else torch.float32) for p in full.params)
    s = full.train()
    assert s.checkpoints == [2] and s.steps == 3
    assert s.losses[0] == untrained_losses[0]  # nothing learned before the first step ...
    changed = [a != b for a, b in zip(s.losses[1:], untrained_losses[1:], strict=True)]
    assert all(changed), (s.losses, untrained_losses)  # ... then
    weights = _snapshot(full)
    if name in STORED_STATE:
        STORED_STATE[name](load_checkpoint(store, full.prefix, 2).optimizer)
    key = f"{full.prefix}/lora/pytorch_lora_weights.safetensors"
    exported = store.get_tensors(key)[0]

    if spec.schedule_free:  # the file holds the averaged (eval-mode) weights, not the ones training steps from
        with eval_weights(full.optimizer):
            averaged = _snapshot(full)
        assert all(torch.equal(exported["transformer." + k], v) for k, v in averaged.items())
        assert any(not torch.equal(averaged[k], weights[k]) for k in weights)
        assert all(torch.equal(v, weights[k]) for k, v in full.lora_state().items())  # put back exactly
        assert full.optimizer.param_groups[0]["train_mode"]
    else:
        assert all(torch.equal(exported["transformer." + k], v) for k, v in weights.items())

    resumed = trainer_for(cfg, store, *args, "resume_from_checkpoint=2")
    assert resumed.step == 2
    rest = resumed.train()
    assert rest.losses == s.losses[2:]  # bitwise
    assert all(torch.equal(v, weights[k]) for k, v in _snapshot(resumed).items())
    again = store.get_tensors(key)[0]
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_bf16_weights_with_ema_export_the_ema_and_resume_exactly(encoded):
    cfg, store, root = encoded
    args = ["optimizer=adamw_bf16", "use_ema=true", "ema_decay=0.5", f"output_dir={root / 'bf16-ema'}"]
    full = trainer_for(cfg, store, *args)
    s = full.train()
    ema = full.lora_state(ema=True)
    exported = store.get_tensors("runs/bf16-ema/lora/pytorch_lora_weights.safetensors")[0]
    assert all(torch.equal(exported["transformer." + k], v) for k, v in ema.items())
    assert all(p.dtype == torch.bfloat16 for p in full.params) and all(v.dtype == torch.float32 for v in ema.values())
    weights = _snapshot(full)
    resumed = trainer_for(cfg, store, *args, "resume_from_checkpoint=2")
    assert resumed.train().losses == s.losses[2:]
    assert all(torch.equal(v, weights[k]) for k, v in _snapshot(resumed).items())
    assert all(torch.equal(v, ema[k]) for k, v in resumed.lora_state(ema=True).items())


def test_a_checkpoint_cannot_make_the_loader_import_a_class():
    skel = {"__subclass__": "evil_module_xyz.Payload", "inner": {}, "ctx": [], "size": [1], "stride": [1]}
    with pytest.raises(IntegrityError, match="does not load"):
        unflatten(skel, {})
    assert "evil_module_xyz" not in sys.modules


def test_a_checkpoint_written_before_the_scheduler_was_flattened_still_loads(tmp_path):
    from shared.store.local import LocalStore

    store = LocalStore(tmp_path)
    prefix = "runs/old/checkpoints/step-3"
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(2)
    opt.step()
    from shared.store.checkpoint import capture_rng, flatten

    tensors: dict[str, torch.Tensor] = {}
    skel = flatten(opt.state_dict(), tensors)
    rng_t, rng = capture_rng()
    plain_scheduler = {"base_lrs": [0.001], "last_epoch": 3, "_step_count": 4, "lr_lambdas": [None]}
    keys = [
        store.put_tensors(f"{prefix}/lora.safetensors", {"a": torch.zeros(1)}).key,
        store.put_tensors(f"{prefix}/optimizer.safetensors", tensors).key,
        store.put_json(f"{prefix}/optimizer.json", skel).key,
        store.put_tensors(f"{prefix}/rng.safetensors", rng_t).key,
        store.put_json(
            f"{prefix}/state.json", {"step": 3, "scheduler": plain_scheduler, "loader": {}, "rng": rng, "extra": {}}
        ).key,
    ]
    store.commit(prefix, keys)
    ck = load_checkpoint(store, "runs/old", 3)
    assert ck.scheduler == plain_scheduler and ck.optimizer["state"][0]["step"] == 1


# ------------------------------------------------------------------------------------------- device checks
@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_only_names_are_refused_on_the_cpu_with_their_reason(name):
    with pytest.raises(InvalidInput) as e:
        build_optimizer(_cfg(optimizer=name), _params(), CPU)
    assert str(e.value).startswith(f"optimizer {name} needs CUDA (paged memory: bitsandbytes pages the state")
    assert str(e.value).endswith(f"use {OPTIMIZERS[name].cpu_instead} on the CPU")


def test_the_trainer_refuses_a_cuda_only_optimizer_before_training(encoded):
    cfg, store, root = encoded
    with pytest.raises(InvalidInput, match="bnb-adamw8bit-paged needs CUDA .*use bnb-adamw8bit or adamw on the CPU"):
        trainer_for(cfg, store, "optimizer=bnb-adamw8bit-paged", f"output_dir={root / 'paged'}")


@pytest.mark.parametrize("name", ["ao-adamfp8", "ao-adamwfp8"])
def test_fp8_states_need_compute_capability_8_9_on_cuda(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(InvalidInput, match="compute capability 8.9 or newer .*A100 has 8.0: use ao-adamw8bit"):
        check_device(name, OPTIMIZERS[name], torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device(name, OPTIMIZERS[name], torch.device("cuda"))  # H100


@pytest.mark.parametrize(
    "module,name,pip",
    [
        ("optimi", "optimi-lion", "torch-optimi"),
        ("bitsandbytes", "bnb-lion8bit", "bitsandbytes"),
        ("schedulefree", "adamw_schedulefree", "schedulefree"),
        ("prodigyopt", "prodigy", "prodigyopt"),
    ],
)
def test_a_missing_library_names_the_package_to_install(monkeypatch, module, name, pip):
    for m in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when the package is absent
    with pytest.raises(InvalidInput) as e:
        build_optimizer(_cfg(optimizer=name), _params(), CPU)
    assert f"optimizer {name} needs the {pip} package" in str(e.value) and str(e.value).endswith(f"pip install {pip}")


# ------------------------------------------------------------------------------------------ arguments
def test_optimizer_config_values_are_parsed():
    assert parse_optimizer_config("weight_decay=0.0,eps=1e-6, d0=-1e5 ,k=6,x=True,y=false,z=None,g=inf,m=abc,") == {
        "weight_decay": 0.0,
        "eps": 1e-6,
        "d0": -1e5,
        "k": 6,
        "x": True,
        "y": False,
        "z": None,
        "g": float("inf"),
        "m": "abc",
    }
    assert isinstance(parse_optimizer_config("k=6")["k"], int) and parse_optimizer_config("n=-3")["n"] == -3
    assert parse_optimizer_config(None) == {} and parse_optimizer_config("") == {}
    for bad, message in [
        ("eps", "not key=value"),
        ("=1", "not key=value"),
        ("eps=", "not key=value"),
        ("eps=1,eps=2", "given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_optimizer_config(bad)


def test_the_arguments_each_name_gets():
    opt = build_optimizer(
        _cfg(
            optimizer="optimi-lion",
            optimizer_config="weight_decay=0.1,lr=0.5",
            optimizer_beta1=0.8,
            optimizer_beta2=0.95,
        ),
        _params(),
        CPU,
    )
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["beta1"], g["beta2"]) == (0.5, 0.1, 0.8, 0.95)
    adam = build_optimizer(
        _cfg(optimizer="bnb-adamw8bit", adam_beta1=0.85, adam_epsilon=1e-7, adam_weight_decay=0.2), _params(), CPU
    ).param_groups[0]
    assert (adam["betas"], adam["eps"], adam["weight_decay"]) == ((0.85, 0.999), 1e-7, 0.2)
    adan = build_optimizer(_cfg(optimizer="optimi-adan", optimizer_beta1=0.9, optimizer_beta2=0.9), _params(), CPU)
    assert (adan.param_groups[0]["beta1"], adan.param_groups[0]["beta3"]) == (0.9, 0.999)  # the third beta kept
    sf = build_optimizer(_cfg(optimizer="adamw_schedulefree+aggressive", lr_warmup_steps=7), _params(), CPU)
    assert sf.param_groups[0]["warmup_steps"] == 7 and sf.param_groups[0]["weight_decay"] == 1e-3
    assert sf.param_groups[0]["train_mode"] and is_schedule_free(sf)
    assert [n for n in OPTIMIZERS if OPTIMIZERS[n].schedule_free] == [
        n for n in OPTIMIZERS if n.startswith("adamw_schedulefree")
    ]


def test_optimizer_config_errors_name_the_key_and_what_is_accepted():
    with pytest.raises(InvalidInput) as e:
        build_optimizer(_cfg(optimizer="optimi-lion", optimizer_config="weight_decay=0.1,momentum=0.9"), _params(), CPU)
    assert str(e.value).startswith(
        "optimizer_config: momentum is not an argument of optimi-lion (optimi.Lion); it takes "
    )
    assert "weight_decay" in str(e.value) and "kahan_sum" in str(e.value)
    for kw, message in [
        ({"optimizer_config": "eps"}, "optimizer_config: 'eps' is not key=value"),
        ({"optimizer_config": "betas=0.9"}, "use optimizer_beta1 and optimizer_beta2"),
        ({"optimizer_beta1": 0.9}, "give both or neither"),
        (
            {"optimizer": "bnb-adagrad", "optimizer_beta1": 0.9, "optimizer_beta2": 0.99},
            "bnb-adagrad .* takes no betas",
        ),
        ({"optimizer": "torch-sgd", "optimizer_config": "momentum=-1"}, "refused its arguments"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            build_optimizer(_cfg(**kw), _params(), CPU)


def test_prodigy_takes_lr_1_unless_learning_rate_is_set(caplog):
    assert build_optimizer(_cfg(optimizer="prodigy"), _params(), CPU).param_groups[0]["lr"] == 1.0
    with caplog.at_level(logging.WARNING):
        assert (
            build_optimizer(_cfg(optimizer="prodigy", learning_rate=1e-3), _params(), CPU).param_groups[0]["lr"] == 1e-3
        )
    assert "prodigy: lr 0.001 is far from 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert (
            build_optimizer(_cfg(optimizer="prodigy", optimizer_config="lr=1e-4"), _params(), CPU).param_groups[0]["lr"]
            == 1e-4
        )
    assert "prodigy: lr 0.0001 is far from 1" in caplog.text
    assert build_optimizer(_cfg(optimizer="adamw"), _params(), CPU).param_groups[0]["lr"] == 1e-4


def test_every_spec_names_a_real_class_and_arguments_it_takes():
    for name, spec in OPTIMIZERS.items():
        cls = optimizer_class(name, spec)
        assert issubclass(cls, torch.optim.Optimizer), name
        accepted = accepted_arguments(cls)
        assert set(spec.defaults) | set(spec.cuda_defaults) <= set(accepted), name
        if spec.adam_args:
            assert {"betas", "eps", "weight_decay"} <= set(accepted), name
        if not spec.cuda_only:
            assert is_schedule_free(build_optimizer(_cfg(optimizer=name), _params(), CPU)) == spec.schedule_free
    assert OPTIMIZERS["adamw8bit"].target == OPTIMIZERS["bnb-adamw8bit"].target


def test_the_table_the_planner_and_the_readme_read_the_same_specs():
    table = optimizer_table_markdown()
    assert all(f"| `{n}` |" in table for n in OPTIMIZERS) and len(table.splitlines()) == len(OPTIMIZERS) + 2
    assert (
        "| `bnb-lion-paged` | bitsandbytes: `bitsandbytes.optim.PagedLion` | no: needs CUDA (paged memory); "
        "use bnb-lion |" in table
    )
    assert table in (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    assert LORA_STATE_BYTES.keys() == OPTIMIZERS.keys()
    assert (
        LORA_STATE_BYTES["adamw"],
        LORA_STATE_BYTES["adamw8bit"],
        LORA_STATE_BYTES["bnb-lion"],
        LORA_STATE_BYTES["ao-adamw4bit"],
        LORA_STATE_BYTES["prodigy"],
        LORA_STATE_BYTES["adamw_bf16"],
    ) == (16, 10, 12, 9, 24, 10)
