"""The seed quickstart's config files, pasted verbatim (comments included)."""

SEED_CONFIG = """\
{
  "model_type": "lora",
  "model_family": "qwen_image",
  "model_flavour": "edit-v1",      // ou "edit-v2"
  "train_batch_size": 1,
  "gradient_accumulation_steps": 4,
  "validation_resolution": "1024x1024",
  "validation_guidance": 4.0,
  "validation_num_inference_steps": 30,
  "mixed_precision": "bf16",
  "gradient_checkpointing": true,
  "base_model_precision": "int8-quanto",
  "quantize_via": "cpu",
  "quantize_activations": false,
  "flow_schedule_shift": 1.73,
  "data_backend_config": "config/qwen_edit/multidatabackend.json"
}
"""

SEED_MODEL_KWARGS = """\
"model_kwargs": {
  "match_target_res": true
}
"""

SEED_DATA_V1 = """\
[
  {
    "id": "qwen-edit-images",
    "type": "local",
    "instance_data_dir": "/datasets/qwen-edit/images",
    "caption_strategy": "textfile",
    "resolution": 1024,
    "conditioning_data": ["qwen-edit-reference"],
    "conditioning_image_embeds": "qwen-edit-ref-embeds",
    "cache_dir_vae": "cache/vae/qwen-edit-images"
  },
  {
    "id": "qwen-edit-reference",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "/datasets/qwen-edit/reference",
    "conditioning_type": "reference_strict",
    "resolution": 1024,
    "cache_dir_vae": "cache/vae/qwen-edit-reference"
  },
  {
    "id": "qwen-edit-ref-embeds",
    "type": "local",
    "dataset_type": "conditioning_image_embeds",
    "cache_dir": "cache/conditioning_image_embeds/qwen-edit"
  }
]
"""

SEED_DATA_V2 = """\
[
  {
    "id": "qwen-edit-plus-images",
    "type": "local",
    "instance_data_dir": "/datasets/qwen-edit-plus/images",
    "caption_strategy": "textfile",
    "resolution": 1024,
    "conditioning_data": [
      "qwen-edit-plus-reference-a",
      "qwen-edit-plus-reference-b",
      "qwen-edit-plus-reference-c"
    ],
    "cache_dir_vae": "cache/vae/qwen-edit-plus/images"
  },
  {
    "id": "qwen-edit-plus-reference-a",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "/datasets/qwen-edit-plus/reference_a",
    "conditioning_type": "reference_strict",
    "resolution": 1024,
    "cache_dir_vae": "cache/vae/qwen-edit-plus/ref_a"
  },
  {
    "id": "qwen-edit-plus-reference-b",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "/datasets/qwen-edit-plus/reference_b",
    "conditioning_type": "reference_strict",
    "resolution": 1024,
    "cache_dir_vae": "cache/vae/qwen-edit-plus/ref_b"
  },
  {
    "id": "qwen-edit-plus-reference-c",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "/datasets/qwen-edit-plus/reference_c",
    "conditioning_type": "reference_strict",
    "resolution": 1024,
    "cache_dir_vae": "cache/vae/qwen-edit-plus/ref_c"
  }
]
"""

SEED_EVAL = """\
{
  "eval_dataset_id": "qwen-edit-val"
}
"""


def planner_fit_table() -> str:
    """docs/PLANNER.md's quickstart table: the seed's config, edit-v1 and edit-v2 with three references, on a
    24 GiB card, every service on one GPU (compose's default)."""
    from shared.config.loading import load_run_config_text
    from shared.plan.gpus import parse_size
    from shared.plan.report import fit_table

    runs = [
        ("edit-v1", load_run_config_text(SEED_CONFIG, SEED_DATA_V1)),
        ("edit-v2, 3 refs", load_run_config_text(SEED_CONFIG, SEED_DATA_V2, ["model_flavour=edit-v2"])),
    ]
    return fit_table(runs, parse_size("24GiB"), "RTX4090")


if __name__ == "__main__":  # regenerate docs/PLANNER.md's quickstart table: python tests/seed_files.py
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(planner_fit_table())
