"""SimpleTuner's own files (tests/fixtures/simpletuner/, copied at the commit its README names) run unchanged except for
what a user changes: the model family and flavour, and paths. ``edittuner check`` accepts every config and
dataloader block of its QWEN_EDIT, QWEN_IMAGE and FLUX_KONTEXT quickstarts and its qwen_image and kontext
examples; the blocks that use features EditTuner does not have get errors naming them; a tiny ``edittuner train``
runs on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.cli.main import main
from shared.config.loading import load_run_config
from shared.data.synthetic import write_dataset
from shared.errors import ConfigError
from shared.store.checkpoint import committed_steps
from shared.store.local import LocalStore

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "simpletuner"


@pytest.fixture
def datasets(tmp_path):
    """Generated pairs with three reference folders: the quickstarts' /datasets/... paths are replaced by these."""
    root = write_dataset(tmp_path / "data", n=4, references=3)
    return root


def dataloader(name: str, tmp_path: Path, paths: dict[str, Path]) -> Path:
    """``name`` with its dataset paths replaced, written next to the test (comments and trailing commas kept)."""
    text = (DATA / name).read_text(encoding="utf-8")
    for old, new in paths.items():
        assert f'"{old}"' in text, old
        text = text.replace(f'"{old}"', json.dumps(str(new)))
    out = tmp_path / name
    out.write_text(text, encoding="utf-8")
    return out


def edit_paths(root: Path) -> dict[str, Path]:
    return {
        "/datasets/edited-images": root / "images",
        "/datasets/reference-images": root / "reference_a",
        "/datasets/reference-images-a": root / "reference_a",
        "/datasets/reference-images-b": root / "reference_b",
        "/datasets/reference-images-c": root / "reference_c",
    }


def only(paths: dict[str, Path], text_of: str) -> dict[str, Path]:
    text = (DATA / text_of).read_text(encoding="utf-8")
    return {k: v for k, v in paths.items() if f'"{k}"' in text}


def check(capsys, config: Path, data: Path, *overrides: str, store: Path) -> tuple[int, str, str]:
    code = main(["check", "--config", str(config), "--data", str(data), "--store", str(store), *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def user_overrides(tiny_models, flavour: str, tmp_path: Path, family: bool = False) -> list[str]:
    """What a user changes: flavour (and family, for a FLUX file), the model path, the output folder."""
    return [
        *(["model_family=qwen_image"] if family else []),
        f"model_flavour={flavour}",
        f"pretrained_model_name_or_path={tiny_models(flavour)}",
        f"output_dir={tmp_path / 'out'}",
    ]


CASES = [  # (config, dataloader, flavour, the family changes too, overrides of the blocks' own advice)
    ("QWEN_EDIT.config.jsonc", "QWEN_EDIT.edit-v1.multidatabackend.jsonc", "edit-v1", False, ()),
    (
        "QWEN_EDIT.config.jsonc",
        "QWEN_EDIT.edit-v2.multidatabackend.jsonc",
        "edit-v2",
        False,
        ("model_kwargs.match_target_res=true",),
    ),  # QWEN_EDIT.model_kwargs.fragment.jsonc
    ("QWEN_IMAGE.config.json", "QWEN_EDIT.edit-v2.multidatabackend.jsonc", "edit-v2", False, ()),
    ("FLUX_KONTEXT.config.jsonc", "FLUX_KONTEXT.multidatabackend.jsonc", "edit-v2", True, ()),
    ("examples.qwen_image.peft-lora.config.json", "QWEN_EDIT.edit-v2.multidatabackend.jsonc", "edit-v3", False, ()),
    ("examples.kontext.peft-lora.config.json", "FLUX_KONTEXT.multidatabackend.jsonc", "edit-v2", True, ()),
]


@pytest.mark.parametrize("config,data,flavour,family,extra", CASES, ids=[f"{c}+{d}" for c, d, *_ in CASES])
def test_check_accepts_simpletuner_files(capsys, tmp_path, tiny_models, datasets, config, data, flavour, family, extra):
    data_file = dataloader(data, tmp_path, only(edit_paths(datasets), data))
    code, out, err = check(
        capsys,
        DATA / config,
        data_file,
        *user_overrides(tiny_models, flavour, tmp_path, family),
        *extra,
        store=tmp_path / "store",
    )
    assert code == 0, err
    assert "ok: configuration and datasets are valid" in out
    assert "4 samples" in out  # every pair found, by name, under the block's ids
    assert "Traceback" not in err


def test_what_simpletuner_files_say_is_what_the_run_gets(tmp_path, tiny_models, datasets):
    """The values in the files reach the typed config: names mapped, string numbers and booleans read, the
    reference dataset recognised without a dataset_type, top-level resolution as the datasets' default."""
    data_file = dataloader(
        "FLUX_KONTEXT.multidatabackend.jsonc",
        tmp_path,
        only(edit_paths(datasets), "FLUX_KONTEXT.multidatabackend.jsonc"),
    )
    run = load_run_config(DATA / "QWEN_IMAGE.config.json", data_file, user_overrides(tiny_models, "edit-v2", tmp_path))
    t = run.train
    assert (t.optimizer, t.learning_rate, t.gradient_checkpointing) == ("optimi-lion", 1e-4, True)  # "1e-4", "true"
    assert (t.checkpoint_step_interval, t.max_train_steps, t.num_train_epochs) == (500, 1000, 0)
    assert (t.report_to, t.max_grad_norm, t.validation_seed, t.lr_warmup_steps) == ("tensorboard", 0.01, 42, 100)
    edit, ref = run.data.datasets
    assert (edit.dataset_type, ref.dataset_type, ref.conditioning_type) == ("image", "conditioning", "reference_strict")
    assert ref.caption_strategy is None and edit.caption_strategy == "textfile"
    assert edit.vae_cache_prefix == "cache/vae/flux/kontext/edited-images"  # "/cache/vae/…" as a store prefix
    ex = load_run_config(
        DATA / "examples.qwen_image.peft-lora.config.json", data_file, user_overrides(tiny_models, "edit-v2", tmp_path)
    ).train
    assert (ex.checkpoint_step_interval, ex.validation_step_interval, ex.resolution) == (50, 50, 1024)
    assert (ex.base_model_precision, ex.quantize_via, ex.lr_scheduler) == ("int2-quanto", "cpu", "constant_with_warmup")
    dropped = next(
        w
        for w in load_run_config(
            DATA / "examples.qwen_image.peft-lora.config.json",
            data_file,
            user_overrides(tiny_models, "edit-v2", tmp_path),
        ).warnings
        if w.startswith("ignoring keys that change nothing")
    )
    assert "$.hub_model_id" in dropped and "$.validation_prompt (" in dropped
    assert "$.checkpoint_step_interval" not in dropped and "$.num_train_epochs" not in dropped


@pytest.mark.parametrize(
    "data,needle,advice",
    [
        ("FLUX_KONTEXT.validation-split.multidatabackend.json", "$[2].type", "download the dataset into a folder"),
        ("FLUX_KONTEXT.deblur.multidatabackend.jsonc", "$[0].conditioning", "generate the reference images"),
        ("QWEN_IMAGE.multidatabackend.json", "$[0].is_regularisation_data", "not built"),
    ],
)
def test_blocks_using_missing_features_get_errors_naming_them(
    capsys, tmp_path, tiny_models, datasets, data, needle, advice
):
    paths = {
        "/datasets/edit/edited-images": datasets / "images",
        "/datasets/edit/reference-images": datasets / "reference_a",
        "/path/to/sharp-images": datasets / "images",
        "datasets/pseudo-camera-10k": datasets / "images",
        "datasets/dreambooth-subject": datasets / "images",
    }
    data_file = dataloader(data, tmp_path, only(paths, data))
    code, out, err = check(
        capsys,
        DATA / "QWEN_EDIT.config.jsonc",
        data_file,
        *user_overrides(tiny_models, "edit-v2", tmp_path),
        store=tmp_path / "store",
    )
    assert code != 0 and "Traceback" not in err
    line = next(x for x in err.splitlines() if needle in x)
    assert advice in line


def test_values_that_would_change_a_simpletuner_run_are_refused(tmp_path, tiny_models, datasets):
    data_file = dataloader(
        "QWEN_EDIT.edit-v1.multidatabackend.jsonc",
        tmp_path,
        only(edit_paths(datasets), "QWEN_EDIT.edit-v1.multidatabackend.jsonc"),
    )
    base = user_overrides(tiny_models, "edit-v1", tmp_path)
    for override, needle in [
        ("snr_gamma=5", "snr_gamma"),
        ("push_to_hub=true", "push_to_hub"),
        ("lora_type=lycoris", "lora_type"),
        ("num_train_epochs=3", "max_train_steps"),
    ]:
        extra = ["max_train_steps=10"] if override.startswith("num_train_epochs") else []
        with pytest.raises(ConfigError) as e:
            load_run_config(DATA / "QWEN_EDIT.config.jsonc", data_file, [*base, override, *extra])
        assert needle in str(e.value), (override, str(e.value))
    # at SimpleTuner's own default, an option EditTuner lacks changes nothing: reported, not refused
    run = load_run_config(DATA / "QWEN_EDIT.config.jsonc", data_file, [*base, "snr_gamma=null"])
    assert any("$.snr_gamma (SimpleTuner's default" in w for w in run.warnings)


def test_tiny_train_on_simpletuner_files_with_lion_checkpoints_at_3_and_6(capsys, tmp_path, tiny_models, datasets):
    """As a user would on a CPU: the datasets at resolution 64 and the references at 64² too
    (model_kwargs.reference_area, as on a small GPU: three 1 MP references make this run take five minutes rather
    than seconds), and fp32 (a CPU has no fast bf16 matmul); everything else as SimpleTuner's files say:
    optimi-lion, int2-quanto, gradient accumulation 4, tensorboard."""
    data_file = dataloader(
        "QWEN_EDIT.edit-v2.multidatabackend.jsonc",
        tmp_path,
        only(edit_paths(datasets), "QWEN_EDIT.edit-v2.multidatabackend.jsonc"),
    )
    text = data_file.read_text(encoding="utf-8")
    assert text.count('"resolution": 1024') == 4
    data_file.write_text(text.replace('"resolution": 1024', '"resolution": 64'), encoding="utf-8")
    store = tmp_path / "store"
    code = main(
        [
            "train",
            "--in-process",
            "--quiet",
            "--no-validation",
            "--config",
            str(DATA / "QWEN_IMAGE.config.json"),
            "--data",
            str(data_file),
            "--store",
            str(store),
            *user_overrides(tiny_models, "edit-v2", tmp_path),
            "checkpoint_step_interval=3",
            "max_train_steps=6",
            "mixed_precision=fp32",
            "model_kwargs.reference_area=4096",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    runs = [k.split("/")[1] for k in LocalStore(store).list("runs/") if k.endswith("/run.json")]
    assert committed_steps(LocalStore(store), f"runs/{runs[0]}") == [3, 6]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "out" / "logs" / "tensorboard").rglob("events.out.tfevents.*"))


def test_the_option_table_in_the_docs_is_the_registry():
    from shared.config.simpletuner import option_table_markdown, simpletuner_options

    doc = (Path(__file__).resolve().parents[2] / "docs" / "SIMPLETUNER.md").read_text(encoding="utf-8")
    table = doc.split("<!-- simpletuner-options:start -->\n", 1)[1].split("<!-- simpletuner-options:end -->", 1)[0]
    assert table.strip() == option_table_markdown().strip(), "regenerate: python -m shared.config.simpletuner"
    _, options = simpletuner_options()
    assert len(options) > 500 and options["lr_scheduler"][1] == "constant_with_warmup"
    assert "| `checkpoint_step_interval` / `checkpointing_steps` | honoured |" in table
