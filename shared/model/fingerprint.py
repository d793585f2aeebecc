"""What identifies the weights a cache was made with."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from shared.model.location import locate_model

_SAMPLED = 1 << 20  # bytes hashed from the start, middle and end of a large weight file


# ------------------------------------------------------------------------------------------- fingerprints
def _file_fingerprint(path: Path) -> str:
    """sha256 of a small file; of size + header + three sampled MiB for a large one (weights of 16 GB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        if size <= 4 * _SAMPLED:
            h.update(f.read())
        else:
            for offset in (0, size // 2, size - _SAMPLED):
                f.seek(offset)
                h.update(f.read(_SAMPLED))
    return h.hexdigest()


def model_fingerprint(source: str, components: Iterable[str]) -> str:
    """Identifies the weights a cache was made with, by their content only: the files of the model's
    ``components`` (configs, tokenizer, weights: small files whole, large ones by size and three sampled MiB) and
    its model_index.json, wherever the model sits (EDITTUNER_MODEL_DIR, the HF cache, any folder). Hidden files
    (``.cache``, ``.gitattributes``) are left out. A hub id with no local copy is only its id."""
    loc = locate_model(source)
    if not loc.local:
        return "hub:" + source
    path = Path(loc.source)
    h = hashlib.sha256()
    index = path / "model_index.json"
    if index.is_file():
        h.update(b"model_index.json" + _file_fingerprint(index).encode())
    for comp in sorted(components):
        folder = path / comp
        for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
            rel = f.relative_to(folder).as_posix()
            if f.is_file() and not any(part.startswith(".") for part in rel.split("/")):
                h.update(f"{comp}/{rel}".encode())
                h.update(_file_fingerprint(f).encode())
    return h.hexdigest()
