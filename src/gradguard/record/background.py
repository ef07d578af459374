"""Sinks are written on one background thread, so a slow tracker never stalls a training step."""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Sequence
from typing import Any

# Flushes waiting for the thread before submit() blocks: back-pressure on a sink that cannot
# keep up, instead of host memory growing without bound.
MAX_PENDING = 4


class SinkWriter:
    """Delivers each flush to every sink in order, on a daemon thread; see :meth:`submit`.

    A sink whose ``write`` raises is dropped with one ``RuntimeWarning`` (raised in the
    training thread, at the next :meth:`submit` or at :meth:`close`): like a full disk for
    the store, a broken tracker is not a reason to stop training.
    """

    def __init__(self, sinks: Sequence[Any]) -> None:
        self.sinks = list(sinks)
        self.failed: list[tuple[Any, BaseException]] = []
        self._reported = 0
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue(maxsize=MAX_PENDING)
        self._thread = threading.Thread(target=self._run, name="gradguard-sinks", daemon=True)
        self._thread.start()

    def submit(self, rows: Any, findings: Any) -> None:
        """Queue one flush (blocks only while ``MAX_PENDING`` flushes are still being written)."""
        self._report()
        if self.sinks:
            self._queue.put((rows, findings))

    def drain(self) -> None:
        """Wait until every queued flush has been written."""
        self._queue.join()
        self._report()

    def close(self) -> None:
        """Write what is queued, stop the thread, then close each sink that has ``close()``."""
        self._queue.put(None)
        self._thread.join()
        self._report()
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                for sink in list(self.sinks):
                    try:
                        sink.write(*item)
                    except Exception as err:  # reported from the training thread
                        self.sinks.remove(sink)
                        self.failed.append((sink, err))
            finally:
                self._queue.task_done()

    def _report(self) -> None:
        for sink, err in self.failed[self._reported :]:
            warnings.warn(
                f"gradguard: the sink {type(sink).__name__} failed ({type(err).__name__}: {err}) and gets no "
                "more rows; training goes on, and Watch.trace and the store keep recording.",
                RuntimeWarning,
                stacklevel=4,
            )
        self._reported = len(self.failed)
