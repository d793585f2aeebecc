"""Which GPU each service runs on, and so which services share one: from the environment compose sets.

compose.yaml reserves ``EDITTUNER_{ENCODER,TRAINER,EVAL}_GPU`` (default 0: all three on GPU 0) for each service
and passes the three variables to every service, so the trainer and ``edittuner plan`` see the whole placement.
Unset, a service counts as on GPU 0: the local processes ``edittuner`` starts share the GPU they all see.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SERVICES: tuple[str, ...] = ("encoder", "trainer", "eval")


def gpu_placement(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """service → the GPU id(s) it reserves (``"0"``, ``"1,2"``), as written in its EDITTUNER_<SERVICE>_GPU."""
    env = os.environ if env is None else env
    return {
        s: ",".join(p.strip() for p in env.get(f"EDITTUNER_{s.upper()}_GPU", "0").split(",") if p.strip()) or "0"
        for s in SERVICES
    }


def sharing(placement: Mapping[str, str], a: str, b: str) -> bool:
    """Whether services ``a`` and ``b`` have a GPU in common."""
    return bool(set(placement[a].split(",")) & set(placement[b].split(",")))


def gpu_groups(placement: Mapping[str, str]) -> dict[str, list[str]]:
    """GPU id → the services on it, in SERVICES order."""
    groups: dict[str, list[str]] = {}
    for s in SERVICES:
        for gpu in placement[s].split(","):
            groups.setdefault(gpu, []).append(s)
    return groups
