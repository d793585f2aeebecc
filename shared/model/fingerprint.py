"""What identifies the weights a cache was made with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

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
    """Identifies the weights a cache was made with: content of a local model's component folders, or the
    hub id plus the locally cached snapshot's revision when there is one."""
    path = Path(source).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not cached locally: the id is all we know, the loader will fetch it
            return "hub:" + source
    h = hashlib.sha256()
    for comp in sorted(components):
        for f in sorted((path / comp).rglob("*")) if (path / comp).is_dir() else []:
            if f.is_file():
                h.update(f"{comp}/{f.relative_to(path / comp).as_posix()}".encode())
                h.update(_file_fingerprint(f).encode())
    return h.hexdigest()
