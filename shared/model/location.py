"""Where a model's weights are: the weights an operator placed under ``EDITTUNER_MODEL_DIR`` first, then the
Hugging Face cache, then the hub (where the host can reach it).

For a hub id ``org/name`` the places looked at, in order:

1. ``$EDITTUNER_MODEL_DIR/org/name`` and ``$EDITTUNER_MODEL_DIR/name`` — a folder with ``model_index.json``
   (what ``huggingface-cli download org/name --local-dir $EDITTUNER_MODEL_DIR/org/name`` writes);
2. ``$EDITTUNER_MODEL_DIR/models--org--name/snapshots/<revision>`` — the Hugging Face cache layout, when the
   model folder is a copied cache;
3. the Hugging Face cache of this host (``HF_HOME``);
4. the hub itself, at load time.

``EDITTUNER_MODEL_DIR`` is read here, like ``HF_HOME`` by the hub library: every process that loads a model (a
service, its worker, the CLI) sees the operator's one setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared import errors

INDEX = "model_index.json"


@dataclass(frozen=True)
class ModelLocation:
    source: str  # what from_pretrained gets: a local directory, or the hub id when no local copy was found
    where: str  # for logs and `edittuner check`: where the weights were found
    searched: tuple[str, ...]  # every place looked at, for the error when nothing is there
    local: bool

    def missing_error(self, model: str, cause: object) -> errors.InvalidInput:
        """The one error for a model found nowhere: the places looked at and the command that downloads it."""
        target = os.environ.get("EDITTUNER_MODEL_DIR") or "./models"
        places = "; ".join(self.searched) if self.searched else "nowhere on this host"
        return errors.InvalidInput(
            f"model {model!r} was not found: looked in {places}, and the hub did not answer ({cause}). Download it "
            f"where the services look: `huggingface-cli download {model} --local-dir {target}/{model}` (with "
            "EDITTUNER_MODEL_DIR set to that folder), or give pretrained_model_name_or_path a local directory"
        )


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` with no path syntax; anything else not on disk is a missing local directory."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def _snapshot(cache: Path) -> Path | None:
    """The snapshot ``refs/main`` points at in a Hugging Face cache folder, else the newest one."""
    snapshots = cache / "snapshots"
    ref = cache / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip() / INDEX).is_file():
        return snapshots / ref.read_text().strip()
    found = sorted((p for p in snapshots.glob("*") if (p / INDEX).is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def locate_model(source: str, model_dir: str | None = None) -> ModelLocation:
    """Where ``source`` (a local directory or a hub id) is on this host; see the module docstring for the order."""
    path = Path(source).expanduser()
    if path.is_dir() or not looks_like_hub_id(source):
        return ModelLocation(str(path), f"local directory {path}", (str(path),), True)
    model_dir = os.environ.get("EDITTUNER_MODEL_DIR") if model_dir is None else model_dir
    org, name = source.split("/")
    searched: list[str] = []
    if model_dir:
        root = Path(model_dir)
        for candidate in (root / org / name, root / name):
            searched.append(str(candidate))
            if (candidate / INDEX).is_file():
                return ModelLocation(str(candidate), f"EDITTUNER_MODEL_DIR: {candidate}", tuple(searched), True)
        cache = root / f"models--{org}--{name}"
        searched.append(str(cache))
        snapshot = _snapshot(cache)
        if snapshot is not None:
            return ModelLocation(
                str(snapshot), f"EDITTUNER_MODEL_DIR (Hugging Face cache layout): {snapshot}", tuple(searched), True
            )
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(source, local_files_only=True))
        if (cached / INDEX).is_file():
            return ModelLocation(str(cached), f"the Hugging Face cache: {cached}", tuple(searched), True)
    except Exception:  # noqa: BLE001 - not in this host's cache
        pass
    searched.append(f"the Hugging Face cache ({os.environ.get('HF_HOME') or '~/.cache/huggingface'})")
    return ModelLocation(
        source, f"the hub ({source}; not found on this host, downloaded on first use)", tuple(searched), False
    )
