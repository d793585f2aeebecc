"""Regenerate the Python stubs in ``shared/rpc/`` from ``protos/``: ``make protos`` (``python -m shared.rpc.generate``).

protoc writes ``edittuner/<svc>/v1/<svc>_pb2.py`` with absolute imports (``from edittuner.common.v1 import
common_pb2``). We keep one flat folder instead, so the stubs import as ``from shared.rpc import encoder_pb2``:
every file is moved to ``shared/rpc/<name>`` and its ``edittuner.*`` imports become package-relative. That needs
the proto file names to be unique across packages, which ``generate`` checks.

The output depends on the grpcio-tools version (it stamps it into ``*_pb2_grpc.py``), so pyproject.toml pins it;
tests/rpc/test_protos.py regenerates into a temp folder and fails when the committed stubs differ.

Fields are only ever added: ``protos/baseline.json`` is the last accepted contract (a ``buf build`` image).
``make protos`` first runs ``buf breaking`` against it and refuses to go on if a change would break a client;
only then does it write the stubs and refresh the baseline. ``--allow-breaking`` overrides that, for a change
that is meant to break (which normally deserves a new ``v2`` package instead).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
STUB_DIR = Path(__file__).resolve().parent
BASELINE = PROTO_ROOT / "baseline.json"
PACKAGE = "shared.rpc"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# `from edittuner.common.v1 import common_pb2 as ...` → `from . import common_pb2 as ...`
_ABSOLUTE_IMPORT = re.compile(r"^from edittuner(?:\.\w+)+ import (\w+_pb2)\b", re.MULTILINE)
# The module name protoc gives the message classes (their __module__): 'edittuner.common.v1.common_pb2'.
_MODULE_NAME = re.compile(r"'edittuner(?:\.\w+)+\.(\w+_pb2)'")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files under ``proto_root``, relative to it, sorted."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def is_stub(path: Path) -> bool:
    return path.name.endswith(STUB_SUFFIXES)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Compile every proto under ``proto_root`` into ``out_dir`` (flat, package-relative imports).

    Returns the file names written. Raises ``RuntimeError`` when protoc fails or two protos share a name."""
    protos = proto_files(proto_root)
    stems = [p.stem for p in protos]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise RuntimeError(f"proto file names must be unique across packages for the flat stub folder: {clashes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edittuner-protoc-") as tmp:
        well_known = resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[str(p) for p in protos]} (its message is above)")
        for src in sorted(Path(tmp).rglob("*")):
            if not src.is_file() or not is_stub(src):
                continue
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1", src.read_text())
            text = _MODULE_NAME.sub(rf"'{PACKAGE}.\1'", text)
            leftover = re.search(r"^\s*(from|import) edittuner\b.*$", text, re.MULTILINE)
            if leftover:
                raise RuntimeError(f"{src.name}: an import was not rewritten: {leftover.group(0).strip()!r}")
            (out_dir / src.name).write_text(text)
            written.append(src.name)
    return sorted(written)


def buf_path() -> str:
    """The ``buf`` binary (PyPI ``buf-bin`` installs it into the environment's scripts folder, which need not
    be on PATH when Python is run by its full path)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("buf", path=folder)
        if found:
            return found
    found = shutil.which("buf")
    if found is None:
        raise RuntimeError("buf is not installed: pip install -e '.[dev]' (package buf-bin)")
    return found


def buf(*args: str, proto_root: Path = PROTO_ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``buf <args>`` in ``proto_root`` (where buf.yaml is), capturing its output."""
    return subprocess.run([buf_path(), *args], cwd=proto_root, capture_output=True, text=True, timeout=120, check=False)


def build_image(proto_root: Path = PROTO_ROOT) -> str:
    """The contract as a JSON ``buf build`` image (descriptors, no comments), pretty-printed for review."""
    out = buf("build", "--exclude-source-info", "-o", "-#format=json", proto_root=proto_root)
    if out.returncode != 0:
        raise RuntimeError(f"buf build failed:\n{out.stdout}{out.stderr}")
    return json.dumps(json.loads(out.stdout), indent=1) + "\n"


def breaking_changes(baseline: Path = BASELINE, proto_root: Path = PROTO_ROOT) -> str:
    """buf's list of changes that would break clients of ``baseline`` ("" when there are none)."""
    if not baseline.exists():
        return ""
    out = buf("breaking", "--against", str(baseline.resolve()), proto_root=proto_root)
    if out.returncode not in (0, 100):
        raise RuntimeError(f"buf breaking failed:\n{out.stdout}{out.stderr}")
    return (out.stdout + out.stderr).strip() if out.returncode == 100 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.rpc.generate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--allow-breaking",
        action="store_true",
        help="write the stubs and the baseline even when buf reports breaking changes",
    )
    args = parser.parse_args(argv)
    broken = breaking_changes()
    if broken and not args.allow_breaking:
        print(
            f"these changes break clients of {BASELINE.relative_to(REPO_ROOT)} (fields are only ever added; "
            f"reserve removed numbers and names):\n{broken}\n"
            "nothing written; add a new field or a v2 package instead, or rerun with --allow-breaking",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="edittuner-stubs-") as tmp:
        fresh = generate(Path(tmp))
        stale = [p for p in STUB_DIR.iterdir() if is_stub(p) and p.name not in fresh]
        for path in stale:
            path.unlink()
            print(f"removed {path.relative_to(REPO_ROOT)} (no proto generates it any more)")
        for name in fresh:
            shutil.copyfile(Path(tmp) / name, STUB_DIR / name)
    BASELINE.write_text(build_image())
    print(
        f"wrote {len(fresh)} stub files to {STUB_DIR.relative_to(REPO_ROOT)}/ from {len(proto_files())} protos, "
        f"and {BASELINE.relative_to(REPO_ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
