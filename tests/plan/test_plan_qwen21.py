"""The planner for Qwen-Image-2.1 (flavour v2.1): parameter counts of the real classes, the joint sequence's tokens
as the pipeline lays them out, the single-stream blocks' memory and FLOPs, the previews' KV cache, and the plans of
1024 px with 3 and 10 references on 24 and 80 GiB cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared import errors
from shared.cli.main import main
from shared.data.geometry import qwen21_sizes
from shared.model.quantize import keeps_high_precision
from shared.plan import qwen21
from shared.plan.counts import (
    QWEN3_VL_8B_CONFIG,
    REAL_QWEN21_TEXT_ENCODER,
    REAL_QWEN21_VAE,
    component_params,
    counts_for_config,
    lora_params,
    lora_targets,
    text_encoder_embedding_params,
    transformer_counts,
)
from shared.plan.gpus import GiB, parse_size
from shared.plan.predict import plan_run
from shared.plan.recommend import apply_recommendation
from shared.plan.report import format_plan, qwen21_fit_table, qwen21_run, qwen21_table
from shared.plan.tokens import Tokens, training_tokens

HUB = "Qwen/Qwen-Image-2.1"  # a hub id: the released model's figures
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
KV_CACHE = "prefix KV cache (2 prompts)"  # validation_guidance 4 (the default): true CFG, two prompts cached


# ------------------------------------------------------------------------------------------------ counts
def test_transformer_counts_equal_the_class_defaults_on_meta():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

    with torch.device("meta"):
        model = QwenImage21Transformer2DModel()
    counts = transformer_counts(HUB, "v2.1")
    assert counts.total == sum(p.numel() for p in model.parameters()) == 7_115_124_736
    assert counts.joint and (counts.layers, counts.width, counts.heads) == (32, 4096, 32)
    # every block Linear runs on every token of the joint sequence and is quantized: q/k/v/out + the SwiGLU's
    # proj/gate (4096 x 12288) and out; the shared modulation (4096 -> 4 x 4096), time_text_embed and norm_out run
    # once per sample; img_in, txt_in and proj_out on their tokens; these stay as the quantizer leaves them
    assert counts.weights("joint", False) == 32 * (4 * 4096**2 + 3 * 4096 * 12288)
    modulation = next(li for li in counts.linears if li.name == "modulation.1")
    assert (modulation.in_features, modulation.out_features, modulation.stream) == (4096, 4 * 4096, "sample")
    assert modulation.kept == keeps_high_precision("modulation.1")
    assert counts.weights("text", True) == 2 * 4096 * 4096  # txt_in's two Linears, on the VLM rows
    assert counts.weights("image", True) == 64 * 4096  # img_in, on the latent tokens
    assert counts.weights("joint", True) == 4096 * 64  # proj_out
    assert {li.stream for li in counts.linears if li.name.startswith("transformer_blocks.")} == {"joint"}
    assert lora_params(lora_targets(counts, DEFAULT_TARGETS), 16) == 32 * 4 * 16 * (4096 + 4096)


def test_text_encoder_and_vae_counts_equal_the_real_classes_on_meta():
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        te = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**QWEN3_VL_8B_CONFIG))
        vae = AutoencoderKLQwenImage21()
    te_params = sum(p.numel() for p in te.parameters())
    assert te_params == REAL_QWEN21_TEXT_ENCODER["params"] == 8_767_123_696
    assert sum(p.numel() for p in te.model.visual.parameters()) == REAL_QWEN21_TEXT_ENCODER["vision_params"]
    text = te.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (4096, 36, 12288)
    assert text.num_key_value_heads * text.head_dim == REAL_QWEN21_TEXT_ENCODER["kv_width"]
    assert te.model.language_model.embed_tokens.weight.numel() == text_encoder_embedding_params(HUB, "v2.1")
    assert te.lm_head.weight is not te.model.language_model.embed_tokens.weight  # untied: counted twice
    assert sum(p.numel() for p in vae.parameters()) == REAL_QWEN21_VAE["params"] == 337_740_404
    assert (vae.config.base_dim, vae.config.decoder_base_dim, vae.config.z_dim) == (96, 144, 64)
    assert component_params(HUB, "v2.1") == (te_params, REAL_QWEN21_VAE["params"], 96)
    # the edit models' figures stay theirs
    assert component_params("Qwen/Qwen-Image-Edit-2509")[0] == 8_292_166_656


def test_a_local_model_is_counted_from_its_files(tiny_models):
    from shared.model.tiny_qwen21 import build_tiny_qwen21

    tiny = build_tiny_qwen21()
    root = str(tiny_models("v2.1"))
    counts = transformer_counts(root, "v2.1")
    assert counts.total == sum(p.numel() for p in tiny["transformer"].parameters())
    assert counts.joint and counts.config["mlp_ratio"] == 2  # read from transformer/config.json, not the defaults
    te, vae, base_dim = component_params(root, "v2.1")
    assert te == sum(p.numel() for p in tiny["text_encoder"].parameters())
    assert vae == sum(p.numel() for p in tiny["vae"].parameters()) and base_dim == 4


def test_a_flavour_and_a_model_of_another_class_are_refused(tiny_models):
    run = qwen21_run(1, 512, (f"pretrained_model_name_or_path={tiny_models('edit-v2')}",))
    with pytest.raises(errors.InvalidInput, match="takes a QwenImage21Transformer2DModel"):
        plan_run(run, recommend=False, environ={})


# ------------------------------------------------------------------------------------------------ tokens
@pytest.mark.parametrize("n", [1, 3, 10])
def test_tokens_follow_the_pipeline_geometry(n):
    from diffusers.models.transformers.transformer_qwenimage21 import (
        QwenImage21Transformer2DModel,
        _qwenimage21_prefix_segments,
    )

    tokens = training_tokens(qwen21_run(n))
    refs, (tw, th) = qwen21_sizes([(1024, 1024)] * n, 1024)
    assert tokens.joint and tokens.references == n
    assert tokens.target == (tw // 16) * (th // 16) == 4096  # 16x latents, no 2x2 patchify
    assert tokens.per_reference == (refs[0][0] // 16) * (refs[0][1] // 16) == 4096
    assert tokens.vl_image_tokens == n * (refs[0][0] // 32) * (refs[0][1] // 32) == n * 1024  # one slot per 32 px
    assert tokens.text == 64 + 8 + 6 * n  # caption, template, "<imageN><|vision_start|>...<|vision_end|>"
    assert tokens.total == tokens.text + n * 4096 + 4096
    assert tokens.vlm == tokens.text + n * 1024

    # the transformer's own layout: the VLM rows' mask (slots True) plus one slot per 2x2 target tokens, expanded
    # four-fold per slot, is the joint sequence; its image blocks and prefix runs are the planner's
    vlm_mask = torch.cat(
        [torch.full((length // (1 if text else 4),), not text) for length, text in tokens.prefix_segments()]
    )
    assert vlm_mask.numel() == tokens.vlm
    img_mask = torch.cat([vlm_mask, torch.ones(tokens.target // 4, dtype=torch.bool)])
    joint_mask = torch.repeat_interleave(img_mask, torch.where(img_mask, 4, 1))
    assert joint_mask.numel() == tokens.total
    img_shapes = [(1, h // 16, w // 16) for w, h in refs] + [(1, th // 16, tw // 16)]
    image_ids, target = QwenImage21Transformer2DModel.build_token_metadata(joint_mask, img_shapes)
    assert int(target.sum()) == tokens.target
    prefix = tokens.total - tokens.target
    runs = _qwenimage21_prefix_segments(image_ids, prefix)
    assert [(end - start, text) for start, end, text in runs] == tokens.prefix_segments()
    # what QwenImage21AttnProcessor hands SDPA: each run against the keys up to its end, the target against all
    pairs = sum((end - start) * end for start, end, _ in runs) + tokens.target * tokens.total
    assert tokens.attention_pairs() == pairs < tokens.total**2


def test_references_sized_by_reference_area_and_text_to_image():
    small = training_tokens(qwen21_run(3, 768))  # the datasets at 768, references still at reference_area 1 MP
    assert (small.target, small.per_reference) == (48 * 48, 4096)
    packed = training_tokens(qwen21_run(3, 768, ("model_kwargs.reference_area=589824",)))
    assert (packed.per_reference, packed.vl_image_tokens) == (48 * 48, 3 * 24 * 24)
    t2i = training_tokens(qwen21_run(0))
    assert (t2i.references, t2i.text, t2i.total) == (0, 72, 4096 + 72)
    assert t2i.prefix_segments() == [(72, True)]
    one = training_tokens(qwen21_run(3, 1024, ("conditioning_multidataset_sampling=random",)))
    assert one.references == 1


# --------------------------------------------------------------------------------------- memory and FLOPs
def test_more_references_cost_more_memory_and_time():
    plans = [
        plan_run(qwen21_run(n, 1024, ("gradient_checkpointing=true",)), recommend=False, environ={}) for n in (1, 3, 10)
    ]
    for name in ("trainer", "eval"):
        totals = [p.services[name].total for p in plans]
        assert totals[0] < totals[1] < totals[2], name
    # the encoder: the larger of one 1 MP VAE encode (one image per call) and Qwen3-VL's forward, which grows with
    # the references' slots and overtakes it past a few references
    te = [qwen21.text_encoder_activation_bytes(p.tokens) for p in plans]
    assert te[0] < te[1] < te[2]
    encoder = [p.services["encoder"].total for p in plans]
    assert encoder[0] == encoder[1] < encoder[2]
    assert plans[0].flops_per_step < plans[1].flops_per_step < plans[2].flops_per_step
    caches = [p.services["eval"].breakdown[KV_CACHE] for p in plans]
    assert caches[0] < caches[1] < caches[2]
    # the trainer's checkpointed activations grow with the sequence; its weights do not
    weights = {p.trainer.breakdown["base weights (no_change)"] for p in plans}
    assert len(weights) == 1


def test_joint_blocks_memory_is_the_whole_sequence_in_one_stream():
    run = qwen21_run(3)
    p = plan_run(run, recommend=False, environ={})
    counts, tokens = transformer_counts(HUB, "v2.1"), p.tokens
    targets = lora_targets(counts, DEFAULT_TARGETS)
    d, T = 4096, tokens.total
    block = d * T * (qwen21.C21_BLOCK + 3 * qwen21.C21_MLP) + T * 4 * (4096 * 4 + 16 * 4)
    assert qwen21.block_saved_bytes(counts, tokens, targets, 16) == pytest.approx(block)
    saved = p.trainer.breakdown["saved for backward"]
    assert saved == int(32 * block + T * 128 * 4)  # every block at T tokens, no per-stream split; RoPE once
    ckpt = plan_run(qwen21_run(3, 1024, ("gradient_checkpointing=true",)), recommend=False, environ={})
    assert ckpt.trainer.breakdown["saved for backward"] == int(32 * 2 * d * T + 4 * d * T + T * 128 * 4)
    quanto = plan_run(qwen21_run(3, 1024, ("base_model_precision=int8-quanto",)), recommend=False, environ={})
    assert quanto.trainer.breakdown["saved for backward"] > saved  # quanto keeps its inputs


def test_step_flops_count_the_block_causal_attention():
    p = plan_run(qwen21_run(10, 1024, ("gradient_checkpointing=true",)), recommend=False, environ={})
    tokens = p.tokens
    counts = transformer_counts(HUB, "v2.1")
    linear = 2.0 * (counts.weights("joint") * tokens.total + counts.weights("image") * tokens.image)
    linear += 2.0 * (counts.weights("text") * tokens.vlm + counts.weights("sample"))
    attention = 4.0 * tokens.attention_pairs() * 4096 * 32
    lora = 2.0 * 32 * 4 * 16 * 8192 * tokens.total
    forward = linear + attention + lora
    assert p.model_flops_per_step == pytest.approx(forward + linear + 2 * attention + 2 * lora)
    assert p.flops_per_step == pytest.approx(p.model_flops_per_step + forward)  # checkpointing's recompute
    # the block-causal layout: ten references and the target computed as runs, not a 45k x 45k square
    assert 0.5 < tokens.attention_pairs() / tokens.total**2 < 0.6


def test_previews_keep_a_prefix_kv_cache_per_prompt():
    p = plan_run(qwen21_run(10), recommend=False, environ={})
    ev = p.eval_tokens
    prefix = ev.total - ev.target
    assert prefix == 10 * 4096 + ev.text
    assert p.services["eval"].breakdown[KV_CACHE] == 2 * 32 * 2 * prefix * 4096 * 2  # K and V, bf16, 2 prompts
    one = plan_run(qwen21_run(10, 1024, ("validation_guidance=1",)), recommend=False, environ={})
    assert one.services["eval"].breakdown["prefix KV cache (1 prompt)"] == 32 * 2 * prefix * 4096 * 2
    assert p.services["eval"].total - one.services["eval"].total == 32 * 2 * prefix * 4096 * 2
    # the first step's forward over the whole sequence outweighs a cached step over the target's tokens
    render = qwen21.render_step_bytes(transformer_counts(HUB, "v2.1"), ev, 2, 1) - 32 * 2 * prefix * 4096 * 2
    assert render == int(qwen21.inference_bytes_per_token(transformer_counts(HUB, "v2.1")) * ev.total * 4096)


def test_tiny_model_prediction_matches_saved_tensor_bytes():
    """The planner's block model against what autograd keeps in the tiny 2.1 transformer (d = 32, head_dim 16,
    mlp_ratio 2, 2 blocks: none of the probe's shape)."""
    from shared.model.tiny_qwen21 import build_tiny_qwen21
    from shared.plan.measure import prepare_for_training
    from shared.plan.measure_qwen21 import mix_tokens, peak_bytes, saved_bytes

    model = prepare_for_training(build_tiny_qwen21()["transformer"], DEFAULT_TARGETS)
    counts = counts_for_config(dict(model.config), "QwenImage21Transformer2DModel")
    targets = lora_targets(counts, DEFAULT_TARGETS)
    mix = (12, 12, 20, 20)  # text, a 12x12 reference, text, a 20x20 target: 576 tokens
    tokens = Tokens(target=400, per_reference=144, references=1, text=32, vl_image_tokens=36, joint=True)
    assert tokens.total == mix_tokens(mix)
    for checkpointing in (False, True):
        predicted = qwen21.training_activation_bytes(counts, tokens, targets, 16, checkpointing=checkpointing)
        assert predicted["saved for backward"] == pytest.approx(saved_bytes(model, mix, checkpointing), rel=0.10)
        assert sum(predicted.values()) == pytest.approx(peak_bytes(model, mix, checkpointing), rel=0.10)


def test_measured_constants_still_hold():
    """The width-scaled constants re-measured at 1 head (d = 128) against the values fitted at 2 heads."""
    from shared.plan.measure_qwen21 import measure_qwen21_coefficients

    measured = measure_qwen21_coefficients(heads=1, vae_side=128, quick=True)
    for name in ("C21_BLOCK", "C21_MLP", "C21_CKPT_INPUT", "PEAK21_EXTRA_BLOCKS", "VAE21_ENCODE_BYTES"):
        assert measured[name] == pytest.approx(getattr(qwen21, name), rel=0.15), name
    assert measured["VAE21_DECODE_BYTES"] == pytest.approx(qwen21.VAE21_DECODE_BYTES, rel=0.15)


# ----------------------------------------------------------------------------------- plans on 24 and 80 GiB
@pytest.fixture
def files(tmp_path):
    def write(n: int) -> list[str]:
        ids = [f"ref{i}" for i in range(n)]
        data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": 1024, "conditioning_data": ids}] + [
            {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": 1024} for i in ids
        ]
        cfg, dat = tmp_path / "config.json", tmp_path / f"data{n}.json"
        cfg.write_text(json.dumps({"model_flavour": "v2.1", "mixed_precision": "bf16"}))
        dat.write_text(json.dumps(data))
        return ["--config", str(cfg), "--data", str(dat)]

    return write


def test_cli_plans_three_and_ten_references_on_24_and_80_gib(files, capsys):
    for n, memory in ((3, "24GiB"), (3, "80GiB"), (10, "24GiB"), (10, "80GiB")):
        assert main(["plan", *files(n), "--gpu-memory", memory]) == 2  # bf16 without checkpointing fits neither
        out = capsys.readouterr().out
        total = 4096 + n * 4096 + 72 + 6 * n
        assert f"tokens per sample: 4096 target + {n} x 4096 reference + {72 + 6 * n} text = {total}" in out
        assert f"in {n * 1024} image slots of the prompt" in out
        assert "gradient_checkpointing=true" in out and "v2.1 previews keep a prefix KV cache" in out
    assert (
        main(
            ["plan", *files(3), "--gpu-memory", "24GiB", "gradient_checkpointing=true", "base_model_precision=nf4-bnb"]
        )
        == 0
    )


@pytest.mark.parametrize(
    "n,memory,trainer,services",
    [
        (
            3,
            "24GiB",
            ["gradient_checkpointing=true", "base_model_precision=int8-quanto"],
            {"eval": ["vae_enable_tiling=true"]},
        ),
        (3, "80GiB", ["gradient_checkpointing=true"], {}),
        (
            10,
            "24GiB",
            [
                "gradient_checkpointing=true",
                "base_model_precision=nf4-bnb",
                "model_kwargs.reference_area=589824",
                'multidatabackend.json: "resolution": 768 for img, ' + ", ".join(f"ref{i}" for i in range(10)),
            ],
            {"eval": ["vae_enable_tiling=true", "validation_guidance=1"]},
        ),
        (10, "80GiB", ["gradient_checkpointing=true"], {}),
    ],
)
def test_recommendations_that_then_fit(n, memory, trainer, services):
    run = qwen21_run(n)
    plan = plan_run(run, parse_size(memory), "H100", environ={})
    assert not plan.fits and plan.recommendation == trainer
    assert {k: v for k, v in plan.service_recommendations.items() if v} == services
    again = plan_run(
        apply_recommendation(run, plan.all_recommendations), parse_size(memory), "H100", recommend=False, environ={}
    )
    assert again.all_fit and again.trainer.total == plan.applied.trainer.total
    assert "with every change above applied" in format_plan(plan)


def test_at_1024_ten_references_fit_no_24_gib_trainer_three_do_quantized():
    by = {}
    for n in (3, 10):
        for precision in ("no_change", "int8-quanto", "nf4-bnb"):
            run = qwen21_run(n, 1024, (f"base_model_precision={precision}", "gradient_checkpointing=true"))
            by[n, precision] = plan_run(run, recommend=False, environ={}).trainer.total
    assert by[3, "no_change"] > 24 * GiB > by[3, "int8-quanto"] > by[3, "nf4-bnb"]
    assert min(by[10, p] for p in ("no_change", "int8-quanto", "nf4-bnb")) > 24 * GiB
    assert max(by.values()) < 80 * GiB  # with checkpointing every one fits 80 GiB


def test_step_measurement_refuses_v21_by_name():
    from shared.plan.step import real_config

    with pytest.raises(errors.InvalidInput, match="v2.1 .*is not supported"):
        real_config("v2.1")
    assert real_config("edit-v2")["num_layers"] == 60


def test_planner_doc_holds_the_v21_tables():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PLANNER.md").read_text(encoding="utf-8")
    assert qwen21_table() in doc, "regenerate: python -m shared.plan.report --qwen21"
    assert qwen21_fit_table(24 * GiB, "RTX4090") in doc, "regenerate: python -m shared.plan.report --qwen21"
    assert qwen21_fit_table(80 * GiB, "H100") in doc, "regenerate: python -m shared.plan.report --qwen21"
