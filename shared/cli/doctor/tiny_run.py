"""A tiny end-to-end run on the device through the project's own training code, as a user's run would go: the
tiny edit-v2 preset (random-weight model of the real classes, generated pairs) encoded, trained with a quantized
base, EMA, a checkpoint and a validation, exported in both LoRA formats; then resumed from its checkpoint and
compared with the same run done in one go; then the LoRA loaded by diffusers (``load_lora_weights``) into the
pipeline on the device, where it must change the output."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from shared.cli.doctor.rows import Row

PRESET = "qwen_image.edit-v2-lora-tiny"


@contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    """The preset's paths are relative to the working directory, as for ``edittuner train example=...``."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _overrides(device: torch.device, precision: str, out: str, steps: int, *extra: str) -> list[str]:
    bf16 = device.type == "cuda"
    return [
        f"example={PRESET}",
        f"output_dir={out}",
        f"device={device}",
        f"mixed_precision={'bf16' if bf16 else 'no'}",
        f"base_model_precision={precision}",
        "use_ema=true",
        "ema_decay=0.5",
        f"max_train_steps={steps}",
        "checkpoint_step_interval=2",
        "validation_step_interval=4",
        "num_eval_images=1",
        "lora_format=both",
        "validation_num_inference_steps=2",
        *extra,
    ]


def _train(overrides: list[str], store: Any, validate: bool = True) -> Any:
    from shared.config.loading import load_run_config
    from shared.train import previews
    from shared.train.runner import train_run

    where = previews.IN_THIS_PROCESS if validate else previews.NONE
    return train_run(load_run_config(overrides=overrides), store, previews=where)


def tiny_run_rows(device: torch.device, precision: str = "int8-quanto", work: Path | None = None) -> list[Row]:
    from shared.cli.demo import materialize_preset
    from shared.store.local import LocalStore

    if work is None:
        with tempfile.TemporaryDirectory(prefix="edittuner-doctor-") as tmp:
            return tiny_run_rows(device, precision, Path(tmp))
    root = Path(work).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with _in_dir(root):
        materialize_preset(PRESET, root)
        store = LocalStore(root / "store")
        first = _train(_overrides(device, precision, "out/resumed", 4), store)
        s = first.summary
        out = root / "out" / "resumed"
        files = {
            f: (out / f).is_file()
            for f in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors")
        }
        previews = sorted(p.name for p in (out / "validation").glob("step-*")) if (out / "validation").is_dir() else []
        finite = all(math.isfinite(x) for x in s.losses)
        ok = s.steps == 4 and s.checkpoints == [2, 4] and all(files.values()) and previews and finite
        rows.append(
            Row(
                f"tiny run ({precision}, EMA)",
                "pass" if ok else "fail",
                f"{s.steps} steps on {device} in {s.seconds:.1f} s, loss {s.losses[0]:.4f} -> "
                f"{s.losses[-1]:.4f}, checkpoints {s.checkpoints}, previews {previews}, LoRA files "
                + ", ".join(f"{k} {'ok' if v else 'MISSING'}" for k, v in files.items()),
                "" if ok else "the training code does not complete on this device: report this row",
                data={
                    "steps": s.steps,
                    "losses": s.losses,
                    "checkpoints": s.checkpoints,
                    "previews": previews,
                    "files": files,
                    "seconds": s.seconds,
                },
            )
        )
        resumed = _train(
            _overrides(device, precision, "out/resumed", 6, "resume_from_checkpoint=latest"), store, validate=False
        ).summary
        straight = _train(_overrides(device, precision, "out/straight", 6), store, validate=False).summary
        rows.append(_resume_row(resumed, straight, device))
        rows.append(_diffusers_row(root, device, out))
    return rows


def _resume_row(resumed: Any, straight: Any, device: torch.device) -> Row:
    """The resumed run's last steps against the same steps of the run done in one go."""
    tail = resumed.losses[-2:]
    ref = straight.losses[-2:]
    diff = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(tail, ref, strict=True)), default=math.inf)
    data = {"resumed_steps": resumed.steps, "resumed_losses": tail, "straight_losses": ref, "max_rel_diff": diff}
    detail = (
        f"resumed from step 4 to {resumed.steps}: losses {[round(x, 6) for x in tail]}, in one go "
        f"{[round(x, 6) for x in ref]} (largest relative difference {diff:.2e})"
    )
    if resumed.steps != 6 or len(tail) != 2:
        return Row("tiny run resume", "fail", detail, "resume did not continue the run: report this row", data=data)
    if diff > 1e-3:
        return Row(
            "tiny run resume",
            "warn",
            detail,
            f"resume is not exact on {device.type} (kernels that are not "
            "deterministic give other last bits); the CPU suite holds it bit-exact",
            data=data,
        )
    return Row("tiny run resume", "pass", detail, data=data)


def _diffusers_row(root: Path, device: torch.device, out: Path) -> Row:
    """diffusers' own LoRA loader on the device: the pipeline's output with and without the trained file."""
    from PIL import Image

    from shared.model.loading import load_pipeline

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(root / ".edittuner/tiny/edit-v2/model", "edit-v2", device=device, dtype=dtype)
    data_dir = root / ".edittuner/tiny/edit-v2/data"
    refs = [
        Image.open(p).convert("RGB")
        for p in (sorted((data_dir / d).glob("*.png"))[0] for d in ("reference_a", "reference_b"))
    ]
    prompt = sorted((data_dir / "images").glob("*.txt"))[0].read_text().strip()

    def render() -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(0)
        images: torch.Tensor = pipe(
            image=refs,
            prompt=prompt,
            height=64,
            width=64,
            num_inference_steps=2,
            true_cfg_scale=1.0,
            generator=g,
            output_type="pt",
        ).images
        return images.float().cpu()

    base = render()
    pipe.load_lora_weights(str(out))
    with_lora = render()
    diff = float((with_lora - base).abs().max())
    data = {"max_abs_diff": diff, "finite": bool(torch.isfinite(with_lora).all())}
    ok = diff > 0 and data["finite"]
    return Row(
        "diffusers loads the LoRA",
        "pass" if ok else "fail",
        f"load_lora_weights on {device}: output changed by up to {diff:.4f} (images in [0, 1])",
        "" if ok else "the LoRA file does not reach the model in diffusers: report this row",
        data=data,
    )
