"""`edittuner init`: a starter config.json + multidatabackend.json for a flavour and a dataset folder, that `check`
accepts and `train` trains on, as a user runs them."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from shared.cli.main import main
from shared.config.flavours import FLAVOURS
from shared.config.loading import load_run_config
from shared.data.synthetic import write_dataset
from shared.store.local import LocalStore

# the -tiny presets' settings, as key=value overrides: a CPU, 64 px images, no quantization, two steps
TINY = [
    "resolution=64",
    "mixed_precision=no",
    "base_model_precision=no_change",
    "device=cpu",
    "gradient_accumulation_steps=1",
    "gradient_checkpointing=false",
    "lora_rank=8",
    "learning_rate=1e-3",
    "validation_resolution=64x64",
    "validation_num_inference_steps=2",
    "num_eval_images=1",
    "model_kwargs.match_target_res=true",
    "model_kwargs.vl_reference_area=4096",
    "max_train_steps=2",
    "checkpoint_step_interval=2",
    "validation_step_interval=2",
]


def files(project: Path) -> tuple[Path, Path]:
    return project / "config" / "config.json", project / "config" / "qwen_edit" / "multidatabackend.json"


def next_commands(out: str) -> dict[str, list[str]]:
    """The `edittuner …` commands init printed, by subcommand, as argv for main()."""
    argvs = [shlex.split(line.strip())[1:] for line in out.splitlines() if line.strip().startswith("edittuner ")]
    return {a[0]: a for a in argvs if a[0] in ("check", "train")}


def test_init_then_check_then_train_on_the_tiny_model(tmp_path, tiny_models, capsys):
    data = write_dataset(tmp_path / "my_pairs", n=4, references=2)
    model = tiny_models("edit-v2")
    project = tmp_path / "proj"
    assert main(["init", str(project), "--data", str(data), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    config_path, data_path = files(project)
    assert f"wrote {config_path}" in out and f"wrote {data_path}" in out
    commands = next_commands(out)
    assert commands["check"] == ["check", "--config", str(config_path), "--data", str(data_path)] + [
        "--store",
        str(project / ".edittuner" / "store"),
    ]
    config = json.loads(config_path.read_text())
    assert config["model_flavour"] == "edit-v2" and config["pretrained_model_name_or_path"] == str(model)
    entries = json.loads(data_path.read_text())
    assert [e["id"] for e in entries] == ["my-pairs-images", "my-pairs-reference-a", "my-pairs-reference-b"]
    assert [e["instance_data_dir"] for e in entries] == [
        str(data / d) for d in ("images", "reference_a", "reference_b")
    ]
    assert entries[0]["conditioning_data"] == ["my-pairs-reference-a", "my-pairs-reference-b"]

    assert main(commands["check"]) == 0
    captured = capsys.readouterr()
    assert "ok: configuration and datasets are valid" in captured.out
    assert "4 samples, 2 reference(s) per sample" in captured.out
    assert "warning" not in captured.err and "error" not in captured.err

    assert main([*commands["train"], *TINY, "--quiet", "--in-process"]) == 0
    out = capsys.readouterr().out
    output_dir = project / "output" / "qwen-edit-v2-lora"
    lora = output_dir / "pytorch_lora_weights.safetensors"
    assert f"pytorch_lora_weights.safetensors: {lora}" in out and "to step 2" in out
    weights = load_file(lora)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert all(k.startswith("transformer.transformer_blocks.") for k in weights)
    assert Image.open(output_dir / "validation" / "step-2" / "0000.png").width > 0
    cached = LocalStore(project / ".edittuner" / "store").list("cache/vae/my-pairs/")  # the caches, under DIR
    assert {k.split("/")[3] for k in cached} == {"images", "reference-a", "reference-b"}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_each_flavour_starter_passes_check_with_the_flavours_default_model(tmp_path, flavour, capsys):
    refs = min(2, FLAVOURS[flavour].max_refs)
    data = write_dataset(tmp_path / "pairs", n=2, references=refs)
    assert main(["init", str(tmp_path / "proj"), "--flavour", flavour, "--data", str(data)]) == 0
    commands = next_commands(capsys.readouterr().out)
    config_path, data_path = files(tmp_path / "proj")
    config = json.loads(config_path.read_text())
    assert config["model_flavour"] == flavour
    assert config["pretrained_model_name_or_path"] == FLAVOURS[flavour].default_model_id
    entries = json.loads(data_path.read_text())
    kinds = [e.get("dataset_type", "image") for e in entries]
    assert kinds[: 1 + refs] == ["image"] + ["conditioning"] * refs
    if flavour == "edit-v1":  # the quickstart's conditioning-image-embeds cache
        assert kinds[-1] == "conditioning_image_embeds"
        assert entries[0]["conditioning_image_embeds"] == entries[-1]["id"]
    assert main(commands["check"]) == 0
    captured = capsys.readouterr()
    assert f"{flavour}, model {FLAVOURS[flavour].default_model_id}" in captured.out
    assert f"2 samples, {refs} reference(s) per sample" in captured.out
    assert "warning" not in captured.err


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    data = write_dataset(tmp_path / "pairs", n=2, references=1)
    project = tmp_path / "proj"
    assert main(["init", str(project), "--data", str(data)]) == 0
    config_path, data_path = files(project)
    config_path.write_text("{}\n")  # the user's own edits
    capsys.readouterr()
    assert main(["init", str(project), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(config_path) in err and str(data_path) in err and "--force" in err
    assert config_path.read_text() == "{}\n"
    assert main(["init", str(project), "--data", str(data), "--force"]) == 0
    assert json.loads(config_path.read_text())["model_flavour"] == "edit-v2"


def test_a_data_folder_that_is_missing_or_holds_no_images_is_named(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["init", str(tmp_path / "proj"), "--data", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"--data {missing}: no such folder" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "images" / "0000.txt").write_text("a caption\n")
    assert main(["init", str(tmp_path / "proj"), "--data", str(empty)]) == 1
    assert f"--data {empty} holds no images" in capsys.readouterr().err
    assert not (tmp_path / "proj").exists()


def test_without_data_the_paths_are_placeholders_and_the_fields_to_edit_are_named(tmp_path, capsys):
    project = tmp_path / "proj"
    assert main(["init", str(project), "--flavour", "edit-v3"]) == 0
    out = capsys.readouterr().out
    assert "placeholders" in out and "$[0].instance_data_dir" in out and "$[1].instance_data_dir" in out
    config_path, data_path = files(project)
    entries = json.loads(data_path.read_text())
    assert entries[0]["instance_data_dir"] == "/path/to/your/dataset/images"
    assert entries[1]["instance_data_dir"] == "/path/to/your/dataset/reference_a"
    assert "/path/to/your/dataset/images: the edited images" in out
    run = load_run_config(config_path)  # valid as written: only the folders are missing
    assert run.train.model_flavour == "edit-v3" and run.data.source == str(data_path)
    assert main(next_commands(out)["check"]) == 1
    assert "/path/to/your/dataset" in capsys.readouterr().err


def test_layouts_the_pairing_reads_and_those_it_cannot(tmp_path, capsys):
    # the targets' own folder as --data, its references beside it, named "control"
    root = tmp_path / "kontext"
    write_dataset(root, n=2, references=1)
    (root / "reference_a").rename(root / "control")
    assert main(["init", str(tmp_path / "p1"), "--data", str(root / "images")]) == 0
    entries = json.loads(files(tmp_path / "p1")[1].read_text())
    assert [(e["id"], e["instance_data_dir"]) for e in entries] == [
        ("kontext-images", str(root / "images")),
        ("kontext-control", str(root / "control")),
    ]
    # two reference folders for edit-v1, which takes one
    two = write_dataset(tmp_path / "two", n=2, references=2)
    assert main(["init", str(tmp_path / "p2"), "--flavour", "edit-v1", "--data", str(two)]) == 1
    err = capsys.readouterr().err
    assert str(two) in err and "reference_a, reference_b" in err and "edit-v1 takes 1 reference" in err
    # targets at the top level with the references in a sub-folder: read recursively, so refused with the fix
    flat = tmp_path / "flat"
    write_dataset(flat, n=2, references=1)
    for p in (flat / "images").iterdir():
        p.rename(flat / p.name)
    (flat / "images").rmdir()
    assert main(["init", str(tmp_path / "p3"), "--data", str(flat)]) == 1
    assert f"move the edited images (and their .txt captions) into {flat / 'images'}" in capsys.readouterr().err
