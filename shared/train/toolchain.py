"""The C compiler torch.compile needs (Inductor's CPU kernels, Triton's CUDA launcher): found, or the option that
needs it refused before the model loads, with what to do.

Without one, ``compile_transformer=true`` and the torchao optimizers (compiled per parameter shape) fail at the
first step, minutes into a run, with a compiler error from deep inside Inductor. The shipped image has gcc; a
slim Python image, a minimal host or a locked-down cluster may not.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from shared.errors import InvalidInput


def c_compiler() -> str | None:
    """What torch.compile will call: ``$CC`` if set (as Inductor and Triton read it), else cc, gcc or clang."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for found in map(shutil.which, names) if found), None)


def python_headers() -> bool:
    """Python.h, which Triton's launcher and Inductor's C++ wrappers include."""
    return (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def require_compiler(option: str, instead: str) -> None:
    """InvalidInput naming ``option`` (and what to use ``instead``) when this host cannot compile what torch.compile
    generates."""
    missing = [
        what
        for what, ok in (
            ("a C compiler (cc, gcc, clang or $CC)", c_compiler()),
            ("Python's headers (Python.h)", python_headers()),
        )
        if not ok
    ]
    if missing:
        raise InvalidInput(
            f"{option} needs torch.compile, which needs {' and '.join(missing)} on the host that "
            f"trains: install them (apt-get install gcc python3-dev; the Docker image has both) or "
            f"{instead}"
        )
