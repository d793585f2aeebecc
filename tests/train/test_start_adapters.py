"""A run started from someone else's LoRA (``init_lora``, ``init_lora_step``) and a run beside an assistant LoRA
(``assistant_lora_path``): the step-0 adapter is the file, a file that does not fit is refused by its keys, the
assistant changes the losses and never reaches the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training import make_run, trainer_for

from shared.errors import InvalidInput
from shared.model.lora import lora_state_dict


def _lora_file(store, tmp_path: Path, run: str = "out") -> Path:
    """The LoRA a finished run exported, copied out of the store as a user would have it."""
    path = tmp_path / f"{run}.safetensors"
    path.write_bytes(store.get_bytes(f"runs/{run}/lora/pytorch_lora_weights.safetensors"))
    return path


@pytest.fixture
def trained(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, refs=1, n=3, max_train_steps=3, checkpoint_step_interval=3)
    trainer_for(cfg, store).train()
    return cfg, store, _lora_file(store, tmp_path)


def test_init_lora_starts_from_the_files_weights(trained, tmp_path):
    cfg, store, file = trained
    t = trainer_for(cfg, store, f"init_lora={file}", f"output_dir={tmp_path / 'b'}")
    t.loader.close()
    assert t.step == 0
    start = {f"transformer.{k}": v for k, v in lora_state_dict(t.transformer).items()}
    weights = load_file(str(file))
    assert start.keys() == weights.keys() and all(torch.equal(start[k], weights[k]) for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # a trained LoRA, not the init
    # another lora_alpha: B rescaled so the adapter's B·A·alpha/r is the file's
    t2 = trainer_for(cfg, store, f"init_lora={file}", "lora_alpha=8", f"output_dir={tmp_path / 'c'}")
    t2.loader.close()
    scaled = lora_state_dict(t2.transformer)
    key = next(k for k in scaled if k.endswith("lora_B.weight"))
    assert torch.equal(scaled[key] * 2, weights[f"transformer.{key}"])  # file: alpha 4 / r 4; here 8 / 4


def test_init_lora_step_counts_from_the_given_step_or_the_files_metadata(trained, tmp_path):
    cfg, store, file = trained
    t = trainer_for(cfg, store, f"init_lora={file}", "init_lora_step=2", f"output_dir={tmp_path / 'b'}")
    summary = t.train()
    assert summary.steps == 3 and len(summary.losses) == 1  # only step 3 was trained
    tagged = tmp_path / "tagged.safetensors"
    save_file(load_file(str(file)), str(tagged), metadata={"global_step": "2"})
    t = trainer_for(cfg, store, f"init_lora={tagged}", f"output_dir={tmp_path / 'c'}")
    t.loader.close()
    assert t.step == 2
    with pytest.raises(InvalidInput, match="init_lora_step: 0"):
        trainer_for(cfg, store, f"init_lora={tagged}", "max_train_steps=2", f"output_dir={tmp_path / 'd'}")


def test_a_lora_of_another_rank_or_other_layers_is_refused_by_name(trained, tmp_path):
    cfg, store, file = trained
    with pytest.raises(InvalidInput, match="has LoRA rank 4; set lora_rank to it"):
        trainer_for(cfg, store, f"init_lora={file}", "lora_rank=8", f"output_dir={tmp_path / 'b'}")
    with pytest.raises(InvalidInput, match=r"not trained here: .*to_out\.0"):
        trainer_for(
            cfg,
            store,
            f"init_lora={file}",
            'lora_target_modules=["to_q","to_k","to_v"]',
            f"output_dir={tmp_path / 'c'}",
        )


def test_an_assistant_lora_changes_training_and_stays_out_of_the_export(trained, tmp_path):
    cfg, store, file = trained
    plain = trainer_for(cfg, store, f"output_dir={tmp_path / 'plain'}").train()
    helped = trainer_for(cfg, store, f"assistant_lora_path={file}", f"output_dir={tmp_path / 'helped'}").train()
    assert helped.losses != plain.losses  # the assistant is in every training forward
    off = trainer_for(
        cfg, store, f"assistant_lora_path={file}", "disable_assistant_lora=true", f"output_dir={tmp_path / 'off'}"
    ).train()
    assert off.losses == plain.losses  # bitwise: disabled means absent
    a = store.get_tensors(f"runs/{(tmp_path / 'plain').name}/lora/pytorch_lora_weights.safetensors")[0]
    b = store.get_tensors(f"runs/{(tmp_path / 'helped').name}/lora/pytorch_lora_weights.safetensors")[0]
    assert a.keys() == b.keys()  # only the trained adapter's keys
    assert not any("assistant" in k for k in b)


def test_the_services_load_adapter_files_only_from_their_model_folders(trained, tmp_path):
    from shared.config.loading import load_run_config
    from shared.errors import ConfigError
    from shared.service.common import ServerPaths

    cfg, _, file = trained
    run = load_run_config(cfg, overrides=[f"init_lora={file}", "assistant_lora_path=/srv/other/lora.safetensors"])
    model = run.train.pretrained_model_name_or_path
    paths = ServerPaths(dataset_roots=("/",), model_roots=(str(model), str(file.parent)))
    with pytest.raises(ConfigError) as e:
        paths.check(run)
    [problem] = e.value.problems
    assert problem.where.endswith("$.assistant_lora_path") and "EDITTUNER_MODEL_DIR" in problem.message


def test_previews_run_the_assistant_at_its_inference_strength(trained, tmp_path):
    """In-worker previews: with assistant_lora_inference_strength 0 the base cell is the bare base (the run's
    assistant switched off for rendering), above 0 the assistant is in it; training's adapters come back after."""
    from shared.train.previews import in_process_validator

    cfg, store, file = trained
    psnr_base = {}
    for strength in ("0", "1"):
        name = f"assist{strength}"
        overrides = [f"assistant_lora_path={file}", f"assistant_lora_inference_strength={strength}"]
        t = trainer_for(cfg, store, *overrides, f"output_dir={tmp_path / name}")
        t.loader.close()
        trainable = {n for n, p in t.transformer.named_parameters() if p.requires_grad}
        result = in_process_validator(t.run, store)(t, 0)
        psnr_base[strength] = result["psnr_base"]
        assert {n for n, p in t.transformer.named_parameters() if p.requires_grad} == trainable
    plain = trainer_for(cfg, store, f"output_dir={tmp_path / 'bare'}")
    plain.loader.close()
    assert in_process_validator(plain.run, store)(plain, 0)["psnr_base"] == psnr_base["0"]
    assert psnr_base["1"] != psnr_base["0"]
