"""The planner with the transformer from a community single file: the bytes of synthetic Q8_0 / Q4_K_M / fp8 files
of the real model, the bytes of a real (tiny) GGUF and fp8 file against what the loader holds, and the prediction of
a run with such a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.config.loading import load_run_config_text
from shared.plan.counts import transformer_counts
from shared.plan.gpus import GiB
from shared.plan.memory import transformer_weight_bytes
from shared.plan.predict import plan_run
from shared.plan.single_file import (
    DEQUANT_LABEL,
    file_weight_bytes,
    gguf_kind,
    run_transformer_file,
    synthetic_file,
)

REAL = "Qwen/Qwen-Image-Edit-2509"  # a hub id: the bundled real config
UNQUANTIZED = ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out.")


@pytest.fixture(scope="module")
def real():
    return transformer_counts(REAL, "edit-v2")


def kinds(tf) -> dict[str, str]:
    return {t.name: t.kind for t in tf.tensors}


# ------------------------------------------------------------------------------------ synthetic files
def test_synthetic_q8_0_bytes_are_the_hand_computed_sum(real):
    tf = synthetic_file(real, "Q8_0")
    by_name = {t.name: t for t in tf.tensors}
    q = by_name["transformer_blocks.0.attn.to_q.weight"]
    assert (q.kind, q.shape, q.nbytes) == ("Q8_0", (3072, 3072), 3072 * 3072 // 32 * 34)
    # by hand from the Linears' shapes: Q8_0 blocks of 32 in 34 bytes, the five unquantized modules in BF16, every
    # bias and RMSNorm weight (1-D) in F32
    q8 = sum(li.in_features * li.out_features for li in real.linears if not f"{li.name}.".startswith(UNQUANTIZED))
    bf16 = sum(li.in_features * li.out_features for li in real.linears if f"{li.name}.".startswith(UNQUANTIZED))
    one_d = sum(li.out_features for li in real.linears if li.bias) + real.other_params
    assert q8 + bf16 + one_d == real.total == 20_430_401_088
    assert sum(t.nbytes for t in tf.tensors) == q8 // 32 * 34 + bf16 * 2 + one_d * 4
    assert len(tf.tensors) == len(set(by_name)) == 1933  # every parameter, once
    assert tf.quantized and tf.format == "gguf" and tf.architecture == "qwen_image"
    # resident: the Q8_0 and BF16 Linears at their file bytes, biases and norms in bf16, one Linear dequantized
    largest = max(li.in_features * li.out_features for li in real.linears)
    assert largest == 3072 * 6 * 3072  # img_mod / txt_mod
    assert file_weight_bytes(tf, 2) == {
        "base weights (file: Q8_0 ×840, BF16 ×6)": q8 // 32 * 34 + bf16 * 2,
        "biases + norms": one_d * 2,
        DEQUANT_LABEL: 2 * largest * 4,
    }
    assert sum(file_weight_bytes(tf, 4).values()) - sum(file_weight_bytes(tf, 2).values()) == one_d * 2


def test_q4_k_m_follows_the_patched_llama_quantize(real):
    k = kinds(synthetic_file(real, "Q4_K_M"))
    assert k["transformer_blocks.5.attn.to_q.weight"] == "Q4_K"
    assert k["transformer_blocks.5.img_mlp.net.0.proj.weight"] == "Q4_K"
    assert k["transformer_blocks.5.img_mod.1.weight"] == "Q4_K"
    for name in ("attn.to_v", "attn.add_v_proj", "img_mlp.net.2", "txt_mlp.net.2"):
        assert k[f"transformer_blocks.5.{name}.weight"] == "Q6_K", name
    for block in (0, 59):  # the first and last blocks: Q5_K, over the Q6_K rule too
        assert k[f"transformer_blocks.{block}.attn.to_q.weight"] == "Q5_K"
        assert k[f"transformer_blocks.{block}.attn.to_v.weight"] == "Q5_K"
        assert k[f"transformer_blocks.{block}.txt_mlp.net.2.weight"] == "Q5_K"
    assert k["transformer_blocks.10.attn.to_q.weight"] == "Q4_K"  # not block 0 or 1's prefix
    assert k["img_in.weight"] == k["proj_out.weight"] == k["norm_out.linear.weight"] == "BF16"
    assert k["transformer_blocks.5.attn.to_q.bias"] == k["transformer_blocks.5.attn.norm_q.weight"] == "F32"
    counts = {kind: list(k.values()).count(kind) for kind in set(k.values())}
    assert counts == {"Q4_K": 58 * 10, "Q6_K": 58 * 4, "Q5_K": 2 * 14, "BF16": 6, "F32": 1087}
    tf = synthetic_file(real, "Q4_K_M")
    nbytes = {t.name: t.nbytes for t in tf.tensors}
    assert nbytes["transformer_blocks.5.attn.to_q.weight"] == 3072 * 3072 // 256 * 144
    assert nbytes["transformer_blocks.5.attn.to_v.weight"] == 3072 * 3072 // 256 * 210
    assert nbytes["transformer_blocks.0.attn.to_q.weight"] == 3072 * 3072 // 256 * 176
    # a row length that is not a multiple of the K-quants' 256 falls back to F16; small and 1-D tensors are F32
    assert gguf_kind("transformer_blocks.3.attn.to_q.weight", (64, 96), "Q4_K_M", 60) == "F16"
    assert gguf_kind("transformer_blocks.3.attn.to_q.weight", (64, 96), "Q8_0", 60) == "Q8_0"
    assert gguf_kind("transformer_blocks.3.attn.to_q.weight", (32, 32), "Q8_0", 60) == "F32"


@pytest.mark.parametrize("scheme", ["fp8", "fp8_scaled"])
def test_synthetic_fp8_is_one_byte_per_linear_weight(real, scheme):
    tf = synthetic_file(real, scheme)
    assert tf.quantized and tf.format == "safetensors" and tf.fp8_scaled == (scheme == "fp8_scaled")
    weights = real.weights()
    rest = real.total - weights
    assert {k: n for k, (n, _) in tf.kinds().items()} == {"float8_e4m3fn": 846, "BF16": 1087}
    assert sum(t.nbytes for t in tf.tensors) == weights + rest * 2
    fw = file_weight_bytes(tf, 2)
    assert fw["base weights (file: float8_e4m3fn ×846)"] == weights
    assert fw["biases + norms"] == rest * 2


def test_synthetic_files_of_qwen_image_21():
    counts = transformer_counts("Qwen/Qwen-Image-2.1", "v2.1")
    k = kinds(synthetic_file(counts, "Q4_K_M"))
    assert k["transformer_blocks.0.attn.to_q.weight"] == k["transformer_blocks.31.attn.to_q.weight"] == "Q5_K"
    assert k["transformer_blocks.5.attn.to_v.weight"] == "Q6_K"
    assert k["transformer_blocks.5.img_mlp.gate_layer.weight"] == "Q4_K"
    tf = synthetic_file(counts, "Q8_0")
    assert sum(t.nbytes for t in tf.tensors) < counts.total * 2 * 34 / 64 + 200e6  # about 8.5 bits, BF16 edges


def test_unknown_scheme_is_refused(real):
    from shared import errors

    with pytest.raises(errors.InvalidInput, match="Q4_K_M"):
        synthetic_file(real, "Q3_K_S")


# --------------------------------------------------------------------------------- real (tiny) files
@pytest.fixture(scope="module")
def tiny_sd(tiny_models):
    from safetensors.torch import load_file

    folder = Path(tiny_models("edit-v2")) / "transformer"
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.fixture(scope="module")
def tiny_gguf(tiny_sd, tmp_path_factory):
    from shared.model.tiny_files import write_gguf

    path = tmp_path_factory.mktemp("files") / "tiny-Q8_0.gguf"
    written = write_gguf(tiny_sd, path, "Q8_0")
    return path, written


def _tiny_counts(tiny_models):
    return transformer_counts(str(tiny_models("edit-v2")), "edit-v2")


def _loaded_bytes(tf, tiny_models) -> int:
    from shared.model.single_file import load_transformer_file

    model = load_transformer_file(tf, "edit-v2", _tiny_counts(tiny_models).config, dtype=torch.bfloat16)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_file_weight_bytes_of_a_tiny_gguf(tiny_models, tiny_sd, tiny_gguf):
    from shared.model.single_file import inspect_transformer_file

    path, written = tiny_gguf
    assert set(written.values()) == {"Q8_0", "F32"}
    tf = inspect_transformer_file(path, "edit-v2", _tiny_counts(tiny_models).config)
    q8 = sum(tiny_sd[n].numel() // 32 * 34 for n, kind in written.items() if kind == "Q8_0")
    f32 = sum(tiny_sd[n].numel() for n, kind in written.items() if kind == "F32")
    largest = max(tiny_sd[n].numel() for n, kind in written.items() if kind == "Q8_0")
    assert q8 == sum(t.nbytes for t in tf.tensors if t.kind == "Q8_0")
    for cb in (2, 4):
        fw = file_weight_bytes(tf, cb)
        assert sum(fw.values()) == q8 + f32 * cb + 2 * largest * 4
        assert fw[DEQUANT_LABEL] == 2 * largest * 4
    # what the loader holds: every parameter's bytes, the Q8_0 Linears' blocks included
    fw = file_weight_bytes(tf, 2)
    assert _loaded_bytes(tf, tiny_models) == sum(fw.values()) - fw[DEQUANT_LABEL]


def test_a_gguf_linear_in_f16_is_cast_and_one_in_bf16_kept(tiny_models, tiny_sd, tmp_path):
    from shared.model.single_file import inspect_transformer_file, load_transformer_file
    from shared.model.tiny_files import write_gguf

    f16, bf16 = "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.attn.to_k.weight"
    path = tmp_path / "mixed.gguf"
    written = write_gguf(tiny_sd, path, "Q8_0", overrides={f16: "F16", bf16: "BF16"})
    tf = inspect_transformer_file(path, "edit-v2", _tiny_counts(tiny_models).config)
    q8 = sum(tiny_sd[n].numel() // 32 * 34 for n, kind in written.items() if kind == "Q8_0")
    f32 = sum(tiny_sd[n].numel() for n, kind in written.items() if kind == "F32")
    fw = file_weight_bytes(tf, 4)  # fp32 compute: the F16 weight is cast to 4 bytes, the BF16 one kept at 2
    assert fw["base weights (file: Q8_0 ×32, BF16 ×1)"] == q8 + tiny_sd[bf16].numel() * 2
    assert fw["Linear weights in the compute dtype (file: F16 ×1)"] == tiny_sd[f16].numel() * 4
    assert fw["biases + norms"] == f32 * 4
    model = load_transformer_file(tf, "edit-v2", _tiny_counts(tiny_models).config, dtype=torch.float32)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == sum(fw.values()) - fw[DEQUANT_LABEL]


def test_file_weight_bytes_of_a_tiny_fp8_safetensors(tiny_models, tiny_sd, tmp_path):
    from shared.model.single_file import inspect_transformer_file
    from shared.model.tiny_files import write_comfy_safetensors

    path = tmp_path / "tiny_fp8_scaled.safetensors"
    write_comfy_safetensors(tiny_sd, path, "fp8_scaled")
    tf = inspect_transformer_file(path, "edit-v2", _tiny_counts(tiny_models).config)
    assert tf.quantized and tf.fp8_scaled
    linear = sum(v.numel() for n, v in tiny_sd.items() if v.ndim == 2)
    rest = sum(v.numel() for n, v in tiny_sd.items() if v.ndim != 2)
    fw = file_weight_bytes(tf, 2)
    assert sum(fw.values()) - fw[DEQUANT_LABEL] == linear + rest * 2 == _loaded_bytes(tf, tiny_models)


# ------------------------------------------------------------------------------------------ the plan
def tiny_run(tiny_models, *overrides: str):
    ids = ["ref0", "ref1"]
    data = [{"id": "img", "instance_data_dir": "/d/img", "resolution": 512, "conditioning_data": ids}] + [
        {"id": i, "dataset_type": "conditioning", "instance_data_dir": f"/d/{i}", "resolution": 512} for i in ids
    ]
    config = {"model_flavour": "edit-v2", "pretrained_model_name_or_path": str(tiny_models("edit-v2"))}
    return load_run_config_text(json.dumps(config), json.dumps(data), list(overrides))


def test_a_run_with_a_gguf_differs_from_no_change_by_the_weights_alone(tiny_models, tiny_gguf):
    path, _ = tiny_gguf
    counts = _tiny_counts(tiny_models)
    plain = plan_run(tiny_run(tiny_models), recommend=False, environ={})
    # int8-quanto is not applied to a quantized file: its activations are bf16's, not quanto's
    run = tiny_run(tiny_models, f"pretrained_transformer_model_name_or_path={path}", "base_model_precision=int8-quanto")
    tf = run_transformer_file(run, counts)
    assert tf is not None and tf.path == str(path.resolve())
    with_file = plan_run(run, recommend=False, environ={})
    diff = sum(file_weight_bytes(tf, 2).values()) - sum(transformer_weight_bytes(counts, "no_change", 2).values())
    assert diff < 0  # Q8_0 blocks are smaller than bf16
    assert with_file.trainer.total - plain.trainer.total == diff
    assert with_file.services["eval"].total - plain.services["eval"].total == diff
    assert with_file.services["encoder"].total == plain.services["encoder"].total
    assert with_file.weight_bytes - plain.weight_bytes == diff
    for k in ("saved for backward", "backward working set"):
        assert with_file.trainer.breakdown[k] == plain.trainer.breakdown[k]
    assert with_file.seconds_per_step == plain.seconds_per_step
    quanto = plan_run(tiny_run(tiny_models, "base_model_precision=int8-quanto"), recommend=False, environ={})
    assert quanto.trainer.breakdown["saved for backward"] > plain.trainer.breakdown["saved for backward"]
    assert with_file.transformer_file.startswith("GGUF (qwen_image): Q8_0")
    assert any(a.startswith(f"transformer file {tf.path}") for a in with_file.assumptions)


def test_a_bf16_file_is_planned_at_base_model_precision(tiny_models, tiny_sd, tmp_path):
    from shared.model.tiny_files import write_comfy_safetensors

    path = tmp_path / "tiny_bf16.safetensors"
    write_comfy_safetensors(tiny_sd, path, "bf16")
    over = "base_model_precision=int8-quanto"
    folder = plan_run(tiny_run(tiny_models, over), recommend=False, environ={})
    file = plan_run(
        tiny_run(tiny_models, over, f"pretrained_transformer_model_name_or_path={path}"), recommend=False, environ={}
    )
    assert file.trainer.breakdown == folder.trainer.breakdown and not file.transformer_file


def test_the_real_models_plan_at_a_synthetic_scheme(real):
    from shared.plan.recommend import apply_recommendation
    from shared.plan.report import format_plan, quickstart_run

    run = quickstart_run("edit-v2")
    folder = plan_run(run, 24 * GiB, "RTX4090", recommend=False, environ={})
    q4 = plan_run(run, 24 * GiB, "RTX4090", environ={}, transformer_file="Q4_K_M")
    tf = synthetic_file(real, "Q4_K_M")
    assert q4.weight_bytes == sum(file_weight_bytes(tf, 2).values())
    assert folder.weight_bytes == sum(transformer_weight_bytes(real, "int8-quanto").values())
    # the activations of a bf16 base: neither quanto's saved inputs (int8-quanto is set) nor a saved weight
    nochange = plan_run(apply_recommendation(run, ["base_model_precision=no_change"]), recommend=False, environ={})
    q4_only = plan_run(run, recommend=False, environ={}, transformer_file="Q4_K_M")
    acts = ("saved for backward", "backward working set")
    for k in acts:
        assert q4_only.trainer.breakdown[k] == nochange.trainer.breakdown[k] <= folder.trainer.breakdown[k]
    assert sum(map(q4_only.trainer.breakdown.get, acts)) < sum(map(folder.trainer.breakdown.get, acts))
    # the recommendation keeps the file, and changes no base_model_precision (it does not apply to one)
    assert q4.recommendation and not any(r.startswith("base_model_precision") for r in q4.all_recommendations)
    assert q4.applied is not None and q4.applied.transformer_file == q4.transformer_file
    assert q4.applied.trainer.fits
    text = format_plan(q4)
    assert "base from the transformer file" in text and "transformer file: GGUF (qwen_image): Q4_K ×580" in text


def test_the_quickstart_runs_are_the_seeds():
    from seed_files import SEED_CONFIG, SEED_DATA_V1, SEED_DATA_V2

    from shared.plan.report import quickstart_run

    for flavour, data, over in (("edit-v1", SEED_DATA_V1, []), ("edit-v2", SEED_DATA_V2, ["model_flavour=edit-v2"])):
        seed = plan_run(load_run_config_text(SEED_CONFIG, data, over), 24 * GiB, "RTX4090", environ={})
        preset = plan_run(quickstart_run(flavour), 24 * GiB, "RTX4090", environ={})
        assert {k: s.total for k, s in seed.services.items()} == {k: s.total for k, s in preset.services.items()}
        assert seed.all_recommendations == preset.all_recommendations


def test_planner_doc_holds_the_generated_file_table():
    from shared.plan.report import file_fit_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PLANNER.md").read_text(encoding="utf-8")
    assert file_fit_table() in doc, "regenerate: python -m shared.plan.report --files"


def test_the_encoders_batch_does_not_read_the_transformer_file(tiny_models):
    from shared import errors
    from shared.plan.predict import encode_batch_size

    run = tiny_run(tiny_models, "pretrained_transformer_model_name_or_path=/nowhere/qwen-image-Q8_0.gguf")
    with pytest.raises(errors.InvalidInput, match="was not found"):
        plan_run(run, recommend=False, environ={})
    assert encode_batch_size(run, 24 * GiB) == run.train.vae_batch_size  # the encoder never holds it


def test_previews_on_full_precision_add_the_unquantized_transformer_to_eval(tiny_models, tiny_gguf):
    path, _ = tiny_gguf
    counts = _tiny_counts(tiny_models)
    over = [f"pretrained_transformer_model_name_or_path={path}"]
    alone = plan_run(tiny_run(tiny_models, *over), recommend=False, environ={})
    both = plan_run(tiny_run(tiny_models, *over, "validation_on_full_precision=true"), recommend=False, environ={})
    full = both.services["eval"].breakdown["full-precision transformer + LoRA (validation_on_full_precision)"]
    lora = alone.services["eval"].breakdown["LoRA (compute dtype)"]
    assert full == sum(transformer_weight_bytes(counts, "no_change", 2).values()) + lora
    assert both.services["eval"].total - alone.services["eval"].total == full
    assert both.trainer.total == alone.trainer.total  # training holds one transformer
    # on an unquantized base the option adds nothing: the previews are already full precision
    plain = plan_run(tiny_run(tiny_models, "validation_on_full_precision=true"), recommend=False, environ={})
    assert not any("full-precision" in k for k in plain.services["eval"].breakdown)
