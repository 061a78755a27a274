"""Progress lines for slow steps: announced only once a step has run for a while."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import TLBackwardError

__all__ = ["Progress", "as_progress"]


class Progress:
    """Announces steps that take longer than ``after`` seconds (default 1 s) on ``stream``.

    ``with progress("loading facts-gpt2"):`` prints ``"loading facts-gpt2 ..."`` only once the step
    has run for ``after`` seconds, then ``" done (3.2 s)"`` when it ends; quick steps print nothing.
    ``after <= 0`` announces every step. ``enabled=False`` is silent. ``sink`` (a callable taking
    one line) replaces the stream: it receives ``"step ..."`` and ``"step: done (3.2 s)"``.
    """

    def __init__(self, enabled: bool = True, *, stream: Any = None, after: float = 1.0,
                 sink: Callable[[str], None] | None = None):
        self.enabled = bool(enabled)
        self.stream = stream
        self.after = float(after)
        self.sink = sink

    def _write(self, text: str, end: str) -> None:
        if self.sink is not None:
            self.sink(text)
            return
        stream = self.stream or sys.stderr
        stream.write(text + end)
        stream.flush()

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        shown = threading.Event()
        lock = threading.Lock()

        def announce() -> None:
            with lock:
                if not finished:
                    shown.set()
                    self._write(f"{step} ...", "" if self.sink is None else "\n")

        finished = False
        start = time.perf_counter()
        timer = threading.Timer(self.after, announce)
        timer.daemon = True
        if self.after <= 0:
            announce()  # announce every step, synchronously
        else:
            timer.start()
        try:
            yield
        finally:
            with lock:
                finished = True
                timer.cancel()
            if shown.is_set():
                self._write(f" done ({time.perf_counter() - start:.1f} s)" if self.sink is None
                            else f"{step}: done ({time.perf_counter() - start:.1f} s)", "\n")


def as_progress(progress: Any) -> Progress:
    if isinstance(progress, Progress):
        return progress
    if progress is None or progress is False:
        return Progress(False)
    if progress is True:
        return Progress(True)
    if callable(progress):
        return Progress(True, sink=progress)
    raise TLBackwardError(f"progress must be True/False, a Progress, or a callable taking a line, got "
                          f"{type(progress).__name__}", argument="progress")
