"""``edittuner init DIR``: a starter ``config/config.json`` and ``config/qwen_edit/multidatabackend.json`` under DIR,
as SimpleTuner's ``configure`` gives a new user, in the quickstart's shape (SimpleTuner's option names).

Both files start from the flavour's bundled preset (``qwen_image.<flavour>-lora``): the same settings, the same
dataset entries as templates. What changes: the model (``--model``, else the flavour's default id from the
registry), the output folder (under DIR), the image size moved to the top-level ``resolution`` (the default of every
image dataset, so one ``resolution=N`` override sizes them all), and the datasets, which describe ``--data``:

- ``DATA/images/`` (or ``targets``, ``edited``, …): the edited images, with a ``<name>.txt`` edit instruction each;
- ``DATA/reference_a/``, ``DATA/reference_b/`` … (or ``reference``, ``control``, ``source``, …): one folder per
  reference, files named as their targets (the extension may differ).

Datasets are read recursively, so the references cannot sit in a sub-folder of the targets' folder; ``--data``
may also name the targets' folder itself when its reference folders are its siblings. Without ``--data`` the
paths are placeholders, and the command names the fields to edit.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import jsonc
from shared.config.flavours import FLAVOURS, Flavour, get_flavour
from shared.config.loading import load_run_config_text, preset_dir
from shared.data.sources import IMAGE_EXTENSIONS
from shared.errors import InvalidInput
from shared.model.location import looks_like_hub_id

CONFIG_FILE = Path("config") / "config.json"
DATA_FILE = Path("config") / "qwen_edit" / "multidatabackend.json"
STORE_DIR = Path(".edittuner") / "store"  # what the default store is when the commands run from DIR
DEFAULT_FLAVOUR = "edit-v2"
PLACEHOLDER_ROOT = Path("/path/to/your/dataset")

TARGET_NAMES = ("images", "image", "targets", "target", "edited", "edits", "after", "output", "outputs")
REFERENCE_NAME = re.compile(
    r"(references?|refs?|controls?|conditioning|conditions?|sources?|before|inputs?)([ _.-]?[a-z0-9]+)?"
)


class Refused(Exception):
    """A file ``init`` would overwrite without --force: exit 2, the message on one line."""


@dataclass(frozen=True)
class Layout:
    """A paired dataset as folders: where the edited images and each reference are."""

    name: str  # the dataset's own name, the stem of every id
    targets: Path
    references: tuple[Path, ...]
    images: int = 0
    uncaptioned: int = 0
    ignored: tuple[Path, ...] = ()
    placeholder: bool = False


@dataclass(frozen=True)
class Written:
    """What ``init`` wrote: both files' paths and JSON values, and the dataset they describe."""

    config_path: Path
    data_path: Path
    config: dict[str, Any]
    entries: list[dict[str, Any]]
    layout: Layout


# ---------------------------------------------------------------------------------------------- the dataset
def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _has_images(folder: Path) -> bool:
    return any(_is_image(p) for p in folder.rglob("*"))


def _folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_reference(d: Path) -> bool:
    return REFERENCE_NAME.fullmatch(d.name.lower()) is not None


def _listed(folders: list[Path]) -> str:
    return ", ".join(d.name for d in folders)


def find_layout(data: str | Path, flavour: Flavour) -> Layout:
    """The edited-image folder and the reference folders of ``data``; InvalidInput naming ``data`` when it is not
    a paired dataset this project reads."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise InvalidInput(f"--data {root}: {'not a folder' if root.exists() else 'no such folder'}")
    root = root.resolve()
    with_images = [d for d in _folders(root) if _has_images(d)]
    targets = [d for d in with_images if d.name.lower() in TARGET_NAMES]
    refs = [d for d in with_images if _is_reference(d)]
    base = root
    if not targets and not refs and _has_images(root):
        if _is_reference(root):
            raise InvalidInput(
                f"--data {root}: this looks like a reference folder; give the folder that holds the edited images "
                "(images/) and the reference folder(s) (reference_a/ …)"
            )
        # --data names the edited images' folder itself: its references are beside it
        base = root.parent
        targets = [root]
        refs = [d for d in _folders(base) if d != root and _is_reference(d) and _has_images(d)]
    if not targets:
        if any(_is_image(p) for p in root.iterdir()):
            raise InvalidInput(
                f"--data {root}: the edited images are at its top level and the references in {_listed(refs)}; "
                "datasets are read recursively, so the references would be read as edited images too: move the "
                f"edited images (and their .txt captions) into {root / 'images'}"
            )
        if not with_images:
            raise InvalidInput(f"--data {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        raise InvalidInput(
            f"--data {root}: no folder of edited images among its sub-folders ({_listed(with_images)}): expected "
            "one named images (or targets, edited, …) beside the reference folder(s) reference_a, … (or control, "
            "source, …)"
        )
    if len(targets) > 1:
        raise InvalidInput(
            f"--data {root}: several folders could hold the edited images ({_listed(targets)}); keep one, or give "
            "--data the one to train on"
        )
    if not refs:
        raise InvalidInput(
            f"--data {root}: found the edited images in {targets[0]} but no reference folder beside them: put the "
            f"references in {base / 'reference_a'} (or reference, control, source, …), named as their edited images"
        )
    flavour.check_ref_count(len(refs), f"--data {root} (reference folders {_listed(refs)})")
    images = _images(targets[0])
    uncaptioned = sum(not p.with_suffix(".txt").is_file() for p in images)
    ignored = tuple(d for d in with_images if d not in targets and d not in refs) if base == root else ()
    return Layout(base.name, targets[0], tuple(refs), len(images), uncaptioned, ignored)


def placeholder_layout(flavour: Flavour) -> Layout:
    """The quickstart's folders under a path that does not exist: one reference (add more for edit-v2/v3)."""
    ref = "reference" if flavour.max_refs == 1 else "reference_a"
    return Layout("my-edits", PLACEHOLDER_ROOT / "images", (PLACEHOLDER_ROOT / ref,), placeholder=True)


# ------------------------------------------------------------------------------------------------ the files
def _slug(name: str) -> str:
    """A folder name as part of a dataset id and a store key: letters, digits, '.', '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")[:40].strip("-.") or "dataset"


def _ids(layout: Layout) -> tuple[str, list[str]]:
    """The image dataset's id and each reference's: the dataset's name and the folder's, unique."""
    base = _slug(layout.name)
    out: list[str] = []
    for folder in (layout.targets, *layout.references):
        rid = f"{base}-{_slug(folder.name)}"
        candidate, n = rid, 2
        while candidate in out:
            candidate, n = f"{rid}-{n}", n + 1
        out.append(candidate)
    return out[0], out[1:]


def _template(entries: list[dict[str, Any]], dataset_type: str) -> dict[str, Any] | None:
    for e in entries:
        if e.get("dataset_type", "image") == dataset_type:
            return dict(e)
    return None


def starter(project: Path, flavour: Flavour, layout: Layout, model: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """config.json and multidatabackend.json as JSON values: the flavour's preset, made to describe ``layout``."""
    pdir = preset_dir(flavour.preset)
    preset: dict[str, Any] = jsonc.load(pdir / "config.json")
    entries: list[dict[str, Any]] = jsonc.load(pdir / "multidatabackend.json")
    image_t, ref_t = _template(entries, "image"), _template(entries, "conditioning")
    embeds_t = _template(entries, "conditioning_image_embeds")
    if image_t is None or ref_t is None:
        raise InvalidInput(f"the bundled preset {pdir} has no image or reference dataset to start from")
    resolution = image_t.pop("resolution", None)
    ref_t.pop("resolution", None)  # references are sized by the pipeline's rule, not by a dataset resolution
    config: dict[str, Any] = {}
    for key, value in preset.items():
        config[key] = value
        if key == "model_flavour":
            config["pretrained_model_name_or_path"] = model
            if resolution is not None:
                config["resolution"] = resolution
    config["output_dir"] = str(project / preset.get("output_dir", f"output/qwen-{flavour.name}-lora"))
    config["data_backend_config"] = str(project / DATA_FILE)

    image_id, ref_ids = _ids(layout)
    base = _slug(layout.name)

    def cache(dataset_id: str) -> str:  # cache/vae/<dataset>/<folder>, as the quickstart's
        return f"cache/vae/{base}/{dataset_id[len(base) + 1 :]}"

    image = {
        **image_t,
        "id": image_id,
        "instance_data_dir": str(layout.targets),
        "conditioning_data": ref_ids,
        "cache_dir_vae": cache(image_id),
    }
    data = [image]
    if embeds_t is not None:  # edit-v1: the references' Qwen2.5-VL embeddings are cached per image dataset
        image["conditioning_image_embeds"] = embeds_id = f"{base}-ref-embeds"
        embeds_t.update(id=embeds_id, cache_dir=f"cache/conditioning_image_embeds/{base}")
    for rid, folder in zip(ref_ids, layout.references, strict=True):
        data.append({**ref_t, "id": rid, "instance_data_dir": str(folder), "cache_dir_vae": cache(rid)})
    if embeds_t is not None:
        data.append(embeds_t)
    return config, data


def _model(value: str | None, flavour: Flavour) -> str:
    if value is None:
        return flavour.default_model_id
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if looks_like_hub_id(value):
        return value
    raise InvalidInput(f"--model {value}: no such folder, and not a Hugging Face hub id (org/name)")


def _text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def write_starter(
    project: str | Path,
    flavour: str = DEFAULT_FLAVOUR,
    data: str | Path | None = None,
    model: str | None = None,
    force: bool = False,
) -> Written:
    """Write both files under ``project``; Refused when one exists and not ``force``. The files are validated as
    ``edittuner check`` reads them before anything is written."""
    fl = get_flavour(flavour)
    root = Path(project).expanduser().resolve()
    config_path, data_path = root / CONFIG_FILE, root / DATA_FILE
    existing = [p for p in (config_path, data_path) if p.exists()]
    if existing and not force:
        raise Refused(
            f"{' and '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --force to overwrite"
        )
    model_id = _model(model, fl)
    layout = find_layout(data, fl) if data is not None else placeholder_layout(fl)
    config, entries = starter(root, fl, layout, model_id)
    config_text, data_text = _text(config), _text(entries)
    load_run_config_text(config_text, data_text, config_name=str(config_path), data_name=str(data_path))
    data_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config_text, encoding="utf-8")
    data_path.write_text(data_text, encoding="utf-8")
    return Written(config_path, data_path, config, entries, layout)


# ------------------------------------------------------------------------------------------------- command
def cmd_init(args: argparse.Namespace) -> int:
    try:
        w = write_starter(args.dir, args.flavour, args.data, args.model, args.force)
    except Refused as err:
        print(f"edittuner init: {err}", file=sys.stderr)
        return 2
    layout, entries = w.layout, w.entries
    print(f"wrote {w.config_path} ({w.config['model_flavour']}, model {w.config['pretrained_model_name_or_path']})")
    print(f"wrote {w.data_path}")
    if layout.placeholder:
        print("the dataset paths are placeholders: edit these fields of multidatabackend.json before training:")
        print(f"  $[0].instance_data_dir  {entries[0]['instance_data_dir']}: the edited images, a <name>.txt each")
        for i, e in enumerate(entries[1:], 1):
            if e.get("dataset_type") == "conditioning":
                print(f"  $[{i}].instance_data_dir  {e['instance_data_dir']}: the reference images, same names")
        print(f"  (or fill them in from a dataset folder: edittuner init {shlex.quote(args.dir)} --data DIR --force)")
    else:
        refs = ", ".join(f"{e['id']!r} {e['instance_data_dir']}" for e in entries[1:] if "instance_data_dir" in e)
        print(f"dataset {entries[0]['id']!r}: {layout.images} edited images in {layout.targets}; references: {refs}")
        if layout.uncaptioned:
            print(
                f"warning: {layout.uncaptioned} of {layout.images} edited images have no <name>.txt caption (the "
                "edit instruction); add them, or set caption_strategy to filename or instanceprompt",
                file=sys.stderr,
            )
        for d in layout.ignored:
            print(
                f"warning: {d} is neither the edited images nor a reference folder by name; left out", file=sys.stderr
            )
    files = (
        f"--config {shlex.quote(str(w.config_path))} --data {shlex.quote(str(w.data_path))} "
        f"--store {shlex.quote(str(w.config_path.parent.parent / STORE_DIR))}"
    )
    print("next:")
    print(f"  edittuner check {files}")
    print(f"  edittuner train {files}")
    print("  (--store keeps the caches (cache_dir_vae) and runs under the project; outputs go to its output_dir)")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "init", help="write a starter config.json + multidatabackend.json for a flavour and a dataset folder"
    )
    p.add_argument("dir", help="the project folder: DIR/config/config.json, DIR/config/qwen_edit/multidatabackend.json")
    p.add_argument(
        "--flavour",
        choices=sorted(FLAVOURS),
        default=DEFAULT_FLAVOUR,
        help=f"the model flavour; its bundled preset (qwen_image.<flavour>-lora) is the start ({DEFAULT_FLAVOUR})",
    )
    p.add_argument(
        "--data",
        help="the dataset folder: images/ (edited images + .txt captions) and reference_a/ … (same file names); "
        "without it the paths are placeholders to edit",
    )
    p.add_argument(
        "--model", help="pretrained_model_name_or_path: a local model folder or a hub id (default: the flavour's)"
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_init)
