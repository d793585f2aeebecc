"""The training core on the tiny model: LoRA-only gradients, overfitting, every reference used, exact resume."""

from __future__ import annotations

import pytest
import torch

from shared.config.loading import load_run_config
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.errors import FailedPrecondition
from shared.model.flow import flow_matching_loss
from shared.store.local import LocalStore
from shared.train.trainer import Trainer, TrainingDiverged


def make_run(tmp_path, tiny_models, flavour="edit-v2", refs=2, n=4, **overrides):
    root = write_dataset(tmp_path / "data", n=n, references=refs)
    base = dict(
        max_train_steps=6,
        checkpoint_step_interval=3,
        learning_rate=1e-3,
        lora_rank=4,
        seed=7,
        output_dir=str(tmp_path / "out"),
    )
    cfg, _ = write_configs(tmp_path / "cfg", root, tiny_models(flavour), flavour, refs, **(base | overrides))
    store = LocalStore(tmp_path / "store")
    run = load_run_config(cfg)
    DatasetEncoder(run, store).encode()
    return cfg, store


def trainer_for(cfg, store, *overrides, **kw):
    t = Trainer(load_run_config(cfg, overrides=list(overrides)), store, **kw)
    t.setup()
    return t


def test_only_lora_parameters_get_gradients_and_base_weights_stay(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models)
    t = trainer_for(cfg, store)
    base = {n: p.detach().clone() for n, p in t.transformer.named_parameters() if "lora_" not in n}
    t.train_step()
    grads = {n for n, p in t.transformer.named_parameters() if p.grad is not None}
    t.optimizer.zero_grad(set_to_none=False)
    t.forward_backward(t.loader.next_batch(), 2, 0)
    with_grad = {n for n, p in t.transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set() and with_grad and all("lora_" in n for n in with_grad)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in with_grad} >= {"to_q", "to_k", "to_v"}
    t.loader.close()
    for n, p in t.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n


def test_loss_falls_when_overfitting_one_fixed_sample(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=1)
    t = trainer_for(cfg, store, "learning_rate=1e-2", "lora_rank=8")
    batch = t.loader.next_batch()
    t.loader.close()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, batch.latents_BChw.shape[-2] * batch.latents_BChw.shape[-1] // 4, 64, generator=g)
    sigma = torch.tensor([0.7])
    losses = []
    for _ in range(30):
        loss = flow_matching_loss(t.transformer, batch, noise, sigma)
        t.optimizer.zero_grad()
        loss.backward()
        t.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_all_three_references_reach_the_transformer(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, refs=3, n=1)
    t = trainer_for(cfg, store)
    batch = t.loader.next_batch()
    t.loader.close()
    seen = {}

    def hook(module, args, kwargs):
        seen["tokens"] = kwargs["hidden_states"].shape[1]
        seen["img_shapes"] = kwargs["img_shapes"]

    handle = t.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    refs = [r.clone().requires_grad_(True) for r in batch.refs_BChw]
    batch.refs_BChw = refs
    noise = torch.randn(1, batch.latents_BChw[0, 0].numel() // 4, 64, generator=torch.Generator().manual_seed(1))
    flow_matching_loss(t.transformer, batch, noise, torch.tensor([0.5])).backward()
    handle.remove()
    per_image = [x.shape[-2] * x.shape[-1] // 4 for x in [batch.latents_BChw, *refs]]
    assert len(refs) == 3 and seen["tokens"] == sum(per_image)
    assert len(seen["img_shapes"][0]) == 4
    for r in refs:  # each reference changes the prediction for the target
        assert r.grad is not None and r.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "flavour,refs,extra",
    [
        ("edit-v2", 2, ["use_ema=true", "lora_dropout=0.1"]),
        ("edit-v3", 1, ["train_batch_size=2", "gradient_accumulation_steps=2"]),
        ("edit-v1", 1, ["optimizer=adamw8bit", "lr_scheduler=cosine", "lr_warmup_steps=2"]),
        ("v2.1", 3, ["train_batch_size=2", "lora_dropout=0.1", "gradient_checkpointing=true"]),
        ("v2.1", 0, ["train_batch_size=2"]),  # no references: text-to-image
    ],
)
def test_resume_gives_bitwise_the_losses_of_an_uninterrupted_run(tmp_path, tiny_models, flavour, refs, extra):
    cfg, store = make_run(tmp_path, tiny_models, flavour=flavour, refs=refs, n=5)
    full = trainer_for(cfg, store, *extra).train()
    assert full.steps == 6 and full.checkpoints == [3, 6] and len(full.losses) == 6
    # a second run of the same config, stopped after step 4 and resumed from its step-3 checkpoint
    other = str(tmp_path / "out2")
    first = trainer_for(cfg, store, *extra, f"output_dir={other}").train(until_step=4)
    assert first.losses == full.losses[:4] and first.lora_keys == []
    resumed = trainer_for(cfg, store, *extra, f"output_dir={other}", "resume_from_checkpoint=latest")
    assert resumed.step == 3
    rest = resumed.train()
    assert rest.losses == full.losses[3:]  # bitwise: == on floats, no tolerance
    a = store.get_tensors("runs/out/lora/pytorch_lora_weights.safetensors")[0]
    b = store.get_tensors("runs/out2/lora/pytorch_lora_weights.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_over_existing_checkpoints_is_refused(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2)
    trainer_for(cfg, store, "max_train_steps=3").train()
    with pytest.raises(FailedPrecondition) as e:
        trainer_for(cfg, store)
    assert "resume_from_checkpoint=latest" in str(e.value) and "step-3" in str(e.value)


def test_nan_loss_stops_with_step_and_samples(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2)
    key = next(k for k in store.list("cache/vae/demo-images") if k.endswith("0001.safetensors"))
    tensors, meta = store.get_tensors(key)
    store.put_tensors(key, {"latents": torch.full_like(tensors["latents"], float("nan"))}, meta)
    t = trainer_for(cfg, store, "train_batch_size=1")
    with pytest.raises(TrainingDiverged) as e:
        t.train()
    assert "loss is nan at step" in str(e.value) and "demo-images/0001" in str(e.value)


def test_checkpoint_limit_and_final_export(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2)
    s = trainer_for(cfg, store, "checkpoint_step_interval=1", "checkpoints_total_limit=2", "lora_format=both").train()
    assert s.checkpoints == [1, 2, 3, 4, 5, 6]
    from shared.store.checkpoint import committed_steps

    assert committed_steps(store, "runs/out") == [5, 6]
    assert sorted(k.rsplit("/", 1)[1] for k in s.lora_keys) == [
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_comfyui.safetensors",
    ]
    sd = store.get_tensors("runs/out/lora/pytorch_lora_weights.safetensors")[0]
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd
    assert sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 64)
    metrics = store.get_bytes("runs/out/metrics.jsonl").decode().splitlines()
    assert len(metrics) == 6


def _fixed_noise(batch, seed=3):
    h, w = batch.latents_BChw.shape[-2:]
    return torch.randn(
        batch.latents_BChw.shape[0], (h // 2) * (w // 2), 64, generator=torch.Generator().manual_seed(seed)
    )


def test_caption_padding_is_masked_out(tmp_path, tiny_models):
    """A sample's loss is the same alone and batched beside a longer caption (padding must not leak in)."""
    cfg, store = make_run(tmp_path, tiny_models, n=4)
    t = trainer_for(cfg, store, "train_batch_size=2")
    batch = t.loader.next_batch()
    t.loader.close()
    lengths = batch.prompt_mask_BL.sum(1)
    assert lengths[0] != lengths[1]  # the generated captions differ in length: one row is padded
    noise, sigmas = _fixed_noise(batch), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        both = flow_matching_loss(t.transformer, batch, noise, sigmas, reduce=False)
        for i in range(2):
            n = int(lengths[i])
            alone = type(batch)(
                batch.latents_BChw[i : i + 1],
                [r[i : i + 1] for r in batch.refs_BChw],
                batch.prompt_embeds_BLD[i : i + 1, :n],
                batch.prompt_mask_BL[i : i + 1, :n],
                [batch.keys[i]],
            )
            single = flow_matching_loss(t.transformer, alone, noise[i : i + 1], sigmas[i : i + 1], reduce=False)
            torch.testing.assert_close(single[0], both[i], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_and_bf16_on_cpu(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=1)
    grads = []
    for extra in ([], ["gradient_checkpointing=true"]):
        t = trainer_for(cfg, store, *extra, f"output_dir={tmp_path / ('o' + str(len(extra)))}")
        batch = t.loader.next_batch()
        t.loader.close()
        flow_matching_loss(t.transformer, batch, _fixed_noise(batch), torch.tensor([0.5])).backward()
        grads.append({n: p.grad.clone() for n, p in t.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)
    bf16 = ["mixed_precision=bf16", f"output_dir={tmp_path / 'bf16'}"]
    DatasetEncoder(load_run_config(cfg, overrides=bf16), store).encode()  # the encoders run in bf16 too
    t = trainer_for(cfg, store, *bf16)
    assert t.dtype == torch.bfloat16
    assert (
        next(p for n, p in t.transformer.named_parameters() if "lora_" not in n and p.dim() == 2).dtype
        == torch.bfloat16
    )
    assert all(p.dtype == torch.float32 for p in t.params)  # the adapters train in fp32
    r = t.train_step()
    t.loader.close()
    assert torch.isfinite(torch.tensor(r.loss))


def test_ema_is_what_gets_exported(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2)
    t = trainer_for(cfg, store, "use_ema=true", "ema_decay=0.5", "max_train_steps=3")
    t.train()
    raw, ema = t.lora_state(ema=False), t.lora_state(ema=True)
    exported = store.get_tensors("runs/out/lora/pytorch_lora_weights.safetensors")[0]
    k = "transformer_blocks.0.attn.to_q.lora_B.weight"
    assert not torch.equal(raw[k], ema[k])
    assert torch.equal(exported["transformer." + k], ema[k])


def test_compiled_transformer_blocks_train_like_eager(tmp_path, tiny_models):
    cfg, store = make_run(tmp_path, tiny_models, n=2)
    eager = trainer_for(cfg, store, "max_train_steps=2", f"output_dir={tmp_path / 'eager'}").train()
    compiled = trainer_for(
        cfg, store, "max_train_steps=2", "compile_transformer=true", f"output_dir={tmp_path / 'compiled'}"
    ).train()
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5, abs=1e-6)


def test_fp16_training_is_refused_and_external_validation_exports_diffusers(tmp_path, tiny_models):
    from shared.errors import InvalidInput
    from shared.train.previews import external_validator

    cfg, store = make_run(tmp_path, tiny_models, n=2)
    with pytest.raises(InvalidInput) as e:
        trainer_for(cfg, store, "mixed_precision=fp16")
    assert "bf16" in str(e.value)
    events = []
    t = trainer_for(cfg, store, "lora_format=comfyui", "max_train_steps=2", "validation_step_interval=2")
    t.validate = external_validator(events.append)
    s = t.train()
    [ready] = [e for e in events if e.phase == "validation_ready"]
    assert ready.lora_key == "runs/out/validation/step-2/lora/pytorch_lora_weights.safetensors"
    assert store.exists(ready.lora_key) and s.lora_keys == ["runs/out/lora/pytorch_lora_weights_comfyui.safetensors"]


def test_resuming_past_the_end_of_a_changed_dataset_is_a_clear_error(tmp_path, tiny_models):
    from shared.errors import FailedPrecondition

    cfg, store = make_run(tmp_path, tiny_models, n=4)
    t = trainer_for(cfg, store)
    with pytest.raises(FailedPrecondition) as e:
        t.loader.load_state_dict({"epoch": 0, "position": 9})
    assert "dataset or train_batch_size changed" in str(e.value)
