"""The deadline of the call being served, so that a retry loop deep below it stops before the client stops waiting.

The server's interceptor (``shared.rpc.interceptors.DeadlineInterceptor``) runs each unary-response handler
inside ``serving(context.time_remaining())``; a retry loop (the object store's, ``shared.store.s3``) asks
``budget(its_own_s)`` how long it may keep trying. Outside a call (a job's thread, a CLI, a test) there is no
deadline and a loop keeps its own budget: long work belongs in jobs, where the budget is the job's::

    with serving(4.7):
        budget(120.0)   # → (3.7, True): one second is kept to send the answer
    budget(120.0)       # → (120.0, False)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_DEADLINE: ContextVar[float | None] = ContextVar("edittuner_call_deadline", default=None)
ANSWER_MARGIN_S = 1.0  # kept back from a call's deadline to build and send the answer
RETRY_HINT_S = 5.0  # what a server tells the client that asked with too short a deadline to wait before asking again


@contextmanager
def serving(time_remaining_s: float | None) -> Iterator[None]:
    """The code inside serves a call whose client gives up in ``time_remaining_s`` seconds (None: never)."""
    token = _DEADLINE.set(None if time_remaining_s is None else time.monotonic() + time_remaining_s)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds until the served call's client gives up, or None when no call with a deadline is being served."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def budget(own_s: float) -> tuple[float, bool]:
    """``(seconds, bounded)``: how long a retry loop with its own budget ``own_s`` may run now, and whether the
    served call's deadline (less ``ANSWER_MARGIN_S``, or a fifth of what is left when that is shorter) is what
    bounds it."""
    left = remaining()
    if left is None:
        return own_s, False
    allowed = max(0.0, left - min(ANSWER_MARGIN_S, 0.2 * max(left, 0.0)))
    return (allowed, True) if allowed < own_s else (own_s, False)
