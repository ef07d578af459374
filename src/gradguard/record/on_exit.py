"""Keep a recorded run's buffered steps when the process ends: at interpreter exit and on SIGTERM.

A :class:`~gradguard.Watch` with a store holds up to ``flush_every`` steps in memory between
commits. Python runs ``atexit`` handlers and ``finally`` blocks on a normal exit, but a SIGTERM
(what ``kill``, schedulers and ``torchrun`` send first) ends it at once by default. While a Watch
with a store is open, SIGTERM therefore raises ``SystemExit(143)`` in the main thread (128 + the
signal number, the status a shell reports for it): ``with`` blocks and ``finally`` clauses run,
and an ``atexit`` handler closes every Watch still open, so the buffered steps are committed.
A SIGTERM that arrives during a flush is held until the flush ends, so that a commit is never
cut in two. A SIGTERM handler the program installed itself is left alone; the default disposition comes back
when the last such Watch closes. Child processes (forked data loader workers) are not affected.
SIGKILL cannot be caught: a killed run keeps the steps of its last commit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref
from collections.abc import Callable
from functools import wraps
from types import FrameType
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

_open: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_state: dict[str, Any] = {"atexit": False, "handler": False, "pid": None, "depth": 0, "pending": None}


def holds_sigterm(fn: _F) -> _F:
    """Decorator: a SIGTERM that arrives while ``fn`` runs takes effect when it returns."""

    @wraps(fn)
    def held(*args: Any, **kwargs: Any) -> Any:
        _state["depth"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _state["depth"] -= 1
            pending = _state["pending"]
            if pending is not None and _state["depth"] == 0:
                _state["pending"] = None
                raise SystemExit(128 + pending)

    return held  # type: ignore[return-value]


def track(watch: Any) -> None:
    """Close ``watch`` at exit and on SIGTERM until :func:`untrack` is called."""
    with _lock:
        _open.add(watch)
        if not _state["atexit"]:
            atexit.register(_close_all)
            _state["atexit"] = True
        if _state["handler"] or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _on_sigterm):
            signal.signal(signal.SIGTERM, _on_sigterm)
            _state["handler"], _state["pid"] = True, os.getpid()


def untrack(watch: Any) -> None:
    """Forget ``watch``; the last one gone restores SIGTERM's default disposition."""
    with _lock:
        _open.discard(watch)
        if _open or not _state["handler"] or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _state["handler"] = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A forked child, or no Watch open: behave as if nothing had been installed. The second
    # happens when a framework saved this handler and put it back after the last Watch closed
    # (Lightning's signal connector does, around fit).
    if os.getpid() != _state["pid"] or not _open:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise SystemExit(128 + signum)


def _close_all() -> None:
    for watch in list(_open):
        with contextlib.suppress(Exception):  # one failing close must not stop the others
            watch.close()
