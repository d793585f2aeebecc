"""config.json + multidatabackend.json: the seed's files verbatim, overrides, and one test per error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from seed_files import SEED_CONFIG, SEED_DATA_V1, SEED_DATA_V2, SEED_EVAL, SEED_MODEL_KWARGS

from shared.config.loading import load_run_config, preset_names
from shared.config.schema import parse_wxh
from shared.errors import ConfigError


def write_project(root: Path, config: str = SEED_CONFIG, data: str = SEED_DATA_V1) -> Path:
    """The seed's layout: config/config.json and config/qwen_edit/multidatabackend.json."""
    (root / "config" / "qwen_edit").mkdir(parents=True, exist_ok=True)
    (root / "config" / "config.json").write_text(config, encoding="utf-8")
    (root / "config" / "qwen_edit" / "multidatabackend.json").write_text(data, encoding="utf-8")
    return root / "config" / "config.json"


def with_model_kwargs(config: str) -> str:
    """The seed's config with its model_kwargs snippet pasted in as the quickstart says."""
    return config.replace(
        '  "model_type"', "  " + SEED_MODEL_KWARGS.rstrip().replace("\n", "\n  ") + ',\n  "model_type"', 1
    )


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(p) for p in excinfo.value.problems]


def test_seed_config_and_v1_data_parse_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path)
    run = load_run_config("config/config.json")
    t = run.train
    assert (t.model_type, t.model_family, t.model_flavour) == ("lora", "qwen_image", "edit-v1")
    assert (t.train_batch_size, t.gradient_accumulation_steps) == (1, 4)
    assert t.validation_size == (1024, 1024) and t.validation_guidance == 4.0
    assert t.validation_num_inference_steps == 30 and t.mixed_precision == "bf16" and t.gradient_checkpointing
    assert (t.base_model_precision, t.quantize_via, t.quantize_activations) == ("int8-quanto", "cpu", False)
    assert t.flow_schedule_shift == pytest.approx(1.73)
    assert t.model_path == "Qwen/Qwen-Image-Edit"
    assert [d.id for d in run.data.datasets] == ["qwen-edit-images", "qwen-edit-reference", "qwen-edit-ref-embeds"]
    main = run.data.get("qwen-edit-images")
    assert main.conditioning_data == ["qwen-edit-reference"] and main.caption_strategy == "textfile"
    assert main.vae_cache_prefix == "cache/vae/qwen-edit-images"
    assert run.data.get("qwen-edit-reference").conditioning_type == "reference_strict"
    assert run.data.text_cache_prefix(main, "edit-v1") == "cache/conditioning_image_embeds/qwen-edit"
    assert run.warnings == ()


def test_seed_v2_data_with_match_target_res(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, with_model_kwargs(SEED_CONFIG), SEED_DATA_V2)
    run = load_run_config("config/config.json", overrides=["model_flavour=edit-v2"])
    assert run.train.model_flavour == "edit-v2" and run.train.model_path == "Qwen/Qwen-Image-Edit-2509"
    assert run.train.model_kwargs.match_target_res is True
    main = run.data.image_datasets[0]
    assert [r.id for r in run.data.references_of(main)] == [
        "qwen-edit-plus-reference-a",
        "qwen-edit-plus-reference-b",
        "qwen-edit-plus-reference-c",
    ]
    assert run.data.get("qwen-edit-plus-reference-b").vae_cache_prefix == "cache/vae/qwen-edit-plus/ref_b"
    assert run.data.text_cache_prefix(main, "edit-v2") == "cache/text/qwen-edit-plus-images"


def test_eval_dataset_id_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = json.loads(SEED_CONFIG.replace('      // ou "edit-v2"', ""))
    cfg.update(json.loads(SEED_EVAL))
    data = json.loads(SEED_DATA_V1)
    val = dict(
        data[0],
        id="qwen-edit-val",
        instance_data_dir="/datasets/qwen-edit/val",
        cache_dir_vae="cache/vae/qwen-edit-val",
        conditioning_image_embeds="qwen-edit-val-embeds",
    )
    embeds = dict(data[2], id="qwen-edit-val-embeds", cache_dir="cache/conditioning_image_embeds/qwen-edit-val")
    write_project(tmp_path, json.dumps(cfg), json.dumps(data + [val, embeds]))
    assert load_run_config("config/config.json").train.eval_dataset_id == "qwen-edit-val"
    write_project(tmp_path, json.dumps(cfg), SEED_DATA_V1)
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    assert any("$.eval_dataset_id" in p and "'qwen-edit-val'" in p for p in problems_of(e))


def test_data_backend_config_found_from_another_directory(tmp_path, monkeypatch):
    write_project(tmp_path)
    monkeypatch.chdir(tmp_path / "config")
    run = load_run_config("config.json")
    assert Path(run.data.source) == tmp_path / "config" / "qwen_edit" / "multidatabackend.json"


def test_overrides_and_dash_prefixed_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, SEED_CONFIG.replace('"train_batch_size"', '"--train_batch_size"'))
    run = load_run_config(
        "config/config.json",
        overrides=[
            "learning_rate=3e-4",
            "lora_rank=8",
            "model_kwargs.match_target_res=true",
            "validation_resolution=768x512",
            "output_dir=out/x",
        ],
    )
    t = run.train
    assert t.learning_rate == pytest.approx(3e-4) and t.lora_rank == 8 and t.effective_lora_alpha == 8.0
    assert t.model_kwargs.match_target_res and t.validation_size == (768, 512) and t.output_dir == "out/x"
    assert t.train_batch_size == 1


def test_unknown_and_no_effect_keys_are_reported_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(
        tmp_path,
        SEED_CONFIG.replace("{", '{"hub_model_id": "me/x", "lora_rnak": 4,', 1),
        SEED_DATA_V1.replace('"type": "local",', '"type": "local", "vae_cache_ondemand": true,', 1),
    )
    run = load_run_config("config/config.json")
    [unknown] = [w for w in run.warnings if w.startswith("ignoring unknown keys")]
    assert "$.lora_rnak (did you mean 'lora_rank'?)" in unknown and "hub_model_id" not in unknown
    [dropped] = [w for w in run.warnings if w.startswith("ignoring keys that change nothing")]
    assert "$.hub_model_id (EditTuner does not upload" in dropped and "$[0].vae_cache_ondemand" in dropped


# ---------------------------------------------------------------------------------------------- errors
def test_json_syntax_error_names_file_line_and_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, SEED_CONFIG.replace('"train_batch_size": 1,', '"train_batch_size" 1,'))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    [p] = problems_of(e)
    assert p.startswith("config/config.json:5:22:") and "JSON syntax error" in p


def test_syntax_error_in_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, data=SEED_DATA_V1.replace('"id": "qwen-edit-reference",', '"id": "qwen-edit-reference"'))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    assert any(p.startswith("config/qwen_edit/multidatabackend.json:14:5:") for p in problems_of(e))


@pytest.mark.parametrize(
    "override,where,words",
    [
        ("model_flavour=edit-v4", "$.model_flavour", "'edit-v4' is not valid"),
        ("base_model_precision=int3-quanto", "$.base_model_precision", "'int3-quanto' is not valid"),
        ("validation_resolution=1024x", "$.validation_resolution", "WIDTHxHEIGHT"),
        ("validation_resolution=1000x1000", "$.validation_resolution", "multiples of 16"),
        ("caption_dropout_probability=1.5", "$.caption_dropout_probability", "between 0 and 1"),
        ("train_batch_size=0", "$.train_batch_size", "must be > 0"),
        ("validation_num_inference_steps=1", "$.validation_num_inference_steps", "at least 2"),
        ("conditioning_multidataset_sampling=mixed", "$.conditioning_multidataset_sampling", "'combined', 'random'"),
        ("quantize_via=gpu", "$.quantize_via", "'cpu', 'accelerator'"),
        ("resume_from_checkpoint=yesterday", "$.resume_from_checkpoint", "latest"),
        ("device=gpu", "$.device", "auto, cpu, cuda or cuda:N"),
        ("adam_beta2=1.0", "$.adam_beta2", "[0, 1)"),
        ("flow_schedule_shift=0", "$.flow_schedule_shift", "must be > 0"),
    ],
)
def test_bad_value_names_the_field(tmp_path, monkeypatch, override, where, words):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json", overrides=[override])
    [p] = problems_of(e)
    assert p.startswith(f"config/config.json: {where}:") and words in p


def test_edit_v1_with_two_conditioning_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = json.loads(SEED_DATA_V1)
    data.append(dict(data[1], id="qwen-edit-reference-2", cache_dir_vae="cache/vae/qwen-edit-reference-2"))
    data[0]["conditioning_data"].append("qwen-edit-reference-2")
    write_project(tmp_path, data=json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    [p] = problems_of(e)
    assert "$[0].conditioning_data" in p and "'qwen-edit-images'" in p and "exactly one reference" in p


@pytest.mark.parametrize("flavour", ["edit-v2", "edit-v3"])
def test_edit_v2_v3_with_four_references(tmp_path, monkeypatch, flavour):
    monkeypatch.chdir(tmp_path)
    data = json.loads(SEED_DATA_V2)
    data.append(dict(data[1], id="qwen-edit-plus-reference-d", cache_dir_vae="cache/vae/qwen-edit-plus/ref_d"))
    data[0]["conditioning_data"].append("qwen-edit-plus-reference-d")
    write_project(tmp_path, data=json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json", overrides=[f"model_flavour={flavour}"])
    [p] = problems_of(e)
    assert "$[0].conditioning_data" in p and "at most 3" in p and "4 reference datasets" in p
    # drawing one reference dataset per sample makes four legitimate
    run = load_run_config(
        "config/config.json", overrides=[f"model_flavour={flavour}", "conditioning_multidataset_sampling=random"]
    )
    assert len(run.data.image_datasets[0].conditioning_data) == 4


def test_conditioning_data_naming_no_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, data=SEED_DATA_V1.replace('["qwen-edit-reference"]', '["qwen-edit-refrence"]'))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    assert any("$[0].conditioning_data[0]" in p and "'qwen-edit-refrence'" in p for p in problems_of(e))


def test_conditioning_image_embeds_naming_no_entry_is_cache_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(
        tmp_path,
        data=SEED_DATA_V1.replace(
            '"conditioning_image_embeds": "qwen-edit-ref-embeds"', '"conditioning_image_embeds": "qwen-edit-embeds"'
        ),
    )
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    [p] = problems_of(e)
    assert "$[0].conditioning_image_embeds" in p and "cache not found" in p and "'qwen-edit-embeds'" in p


def test_two_datasets_sharing_a_vae_cache_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(
        tmp_path, data=SEED_DATA_V1.replace('"cache/vae/qwen-edit-reference"', '"cache/vae/qwen-edit-images"')
    )
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    [p] = problems_of(e)
    assert "$[1].cache_dir_vae" in p and "'qwen-edit-images'" in p and "overwrite" in p


def test_bad_dataset_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, data=SEED_DATA_V1.replace('"resolution": 1024,', '"resolution": "1024px",', 1))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    [p] = problems_of(e)
    assert p.startswith("config/qwen_edit/multidatabackend.json: $[0].resolution:") and "'1024px'" in p


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(
        tmp_path,
        SEED_CONFIG.replace('"int8-quanto"', '"int9"').replace("4.0", '"high"'),
        SEED_DATA_V1.replace('"qwen-edit-ref-embeds",', '"nope",', 1).replace('"local"', '"ftp"', 1),
    )
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    ps = problems_of(e)
    assert len(ps) == 4
    assert any("$.base_model_precision" in p for p in ps) and any("$.validation_guidance" in p for p in ps)
    assert any("$[0].type" in p for p in ps) and any("cache not found" in p for p in ps)
    assert str(e.value).startswith("invalid configuration: 4 problems")


def test_missing_flavour_and_missing_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, SEED_CONFIG.replace('"model_flavour": "edit-v1",      // ou "edit-v2"\n', ""))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json")
    assert any("$.model_flavour: is required" in p for p in problems_of(e))
    with pytest.raises(ConfigError) as e:
        load_run_config("config/config.json", "elsewhere/multidatabackend.json")
    assert any(p.startswith("elsewhere/multidatabackend.json: file not found") for p in problems_of(e))


def test_bad_override_syntax():
    with pytest.raises(ConfigError) as e:
        load_run_config("whatever.json", overrides=["learning_rate"])
    assert "key=value" in str(e.value)


def test_parse_wxh():
    assert parse_wxh("1024x768") == (1024, 768) and parse_wxh(512) == (512, 512) and parse_wxh("768") == (768, 768)
    assert isinstance(parse_wxh("10x10"), str) and isinstance(parse_wxh("axb"), str)


def test_presets_are_bundled_and_real_ones_use_real_model_ids():
    names = preset_names()
    for flavour, preset, model in (
        ("edit-v1", "qwen_image.edit-v1-lora", "Qwen/Qwen-Image-Edit"),
        ("edit-v2", "qwen_image.edit-v2-lora", "Qwen/Qwen-Image-Edit-2509"),
        ("edit-v3", "qwen_image.edit-v3-lora", "Qwen/Qwen-Image-Edit-2511"),
        ("v2.1", "qwen_image.v2.1-edit-lora", "Qwen/Qwen-Image-2.1"),
    ):
        assert preset in names and f"{preset}-tiny" in names
        run = load_run_config(overrides=[f"example={preset}"])
        assert run.train.model_flavour == flavour and run.train.model_path == model
        tiny = load_run_config(overrides=[f"example={preset}-tiny"])
        assert tiny.train.model_flavour == flavour
    with pytest.raises(ConfigError) as e:
        load_run_config(overrides=["example=qwen_image.edit-v2-lroa"])
    assert "did you mean 'qwen_image.edit-v2-lora'" in str(e.value)
