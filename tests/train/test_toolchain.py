"""torch.compile's C compiler: compile_transformer and the torchao optimizers are refused before the model loads on
a host without one (the slim image the project used to ship), with what to do; found, they pass."""

from __future__ import annotations

import pytest

from shared.config.schema import TrainConfig
from shared.errors import InvalidInput
from shared.train import optimizers, toolchain


def test_compiler_lookup_follows_cc(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "my-cc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert toolchain.c_compiler() == str(fake)
    monkeypatch.setenv("CC", str(tmp_path / "absent-cc"))
    assert toolchain.c_compiler() is None  # $CC is what Inductor calls: another compiler on PATH does not help
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert toolchain.c_compiler() is None


def test_ao_optimizer_without_a_compiler_is_refused_before_loading(monkeypatch) -> None:
    monkeypatch.setattr(toolchain, "c_compiler", lambda: None)
    import torch

    with pytest.raises(
        InvalidInput,
        match=r"optimizer=ao-adamw8bit needs torch.compile, which needs a C compiler.*"
        r"apt-get install gcc.*bnb-adamw8bit",
    ):
        optimizers.check_optimizer_args(
            TrainConfig(model_flavour="edit-v2", optimizer="ao-adamw8bit"), torch.device("cpu")
        )
    optimizers.check_optimizer_args(
        TrainConfig(model_flavour="edit-v2", optimizer="adamw"), torch.device("cpu")
    )  # needs none


def test_missing_python_headers_are_named(monkeypatch) -> None:
    monkeypatch.setattr(toolchain, "python_headers", lambda: False)
    with pytest.raises(InvalidInput, match=r"compile_transformer=true needs .*Python's headers \(Python.h\)"):
        toolchain.require_compiler("compile_transformer=true", "set compile_transformer=false")


def test_compile_transformer_without_a_compiler_fails_before_the_model_loads(monkeypatch, tmp_path) -> None:
    from shared.config.loading import load_run_config
    from shared.store.local import LocalStore
    from shared.train import trainer as trainer_module

    monkeypatch.setattr(toolchain, "c_compiler", lambda: None)
    monkeypatch.setattr(
        trainer_module, "resolve_resume", lambda *a: pytest.fail("got past the compiler check")
    )  # the first step after the checks
    run = load_run_config(
        overrides=["example=qwen_image.edit-v2-lora-tiny", "compile_transformer=true", f"output_dir={tmp_path / 'out'}"]
    )
    t = trainer_module.Trainer(run, LocalStore(tmp_path / "store"))
    with pytest.raises(InvalidInput, match="compile_transformer=true needs torch.compile.*compile_transformer=false"):
        t.setup()
