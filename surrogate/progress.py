"""Progress lines for long phases: at most one line every few minutes, with an estimate of the time left.

A loop over many units of work (masks to evaluate, masks a surrogate predicts one by one) makes a
``Ticker`` and calls it with the count done so far. The ticker writes to the ``log`` callable it was given or,
when none was, to the one installed around a block of work by ``reporting(log)`` (``run_experiment(log=...)``
installs its own log that way, so every measurement inside it reports); with neither it is silent. A block
that finishes within ``PROGRESS_SECONDS`` prints nothing.

    with reporting(print):
        evaluate_masks(gated, masks, data, task)   # "S(m) of 512 masks on test: 130/512 (5.0 min so far, ~14.7 min left)"
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

__all__ = ["PROGRESS_SECONDS", "Ticker", "reporting", "say"]

PROGRESS_SECONDS = 300.0  # a long phase reports this often

Log = Callable[[str], None]
_SINK: ContextVar[Log | None] = ContextVar("surrogate_progress_log", default=None)


def say(line: str) -> None:
    """Print a progress line at once (flushed): the default log of a study's long steps."""
    print(line, flush=True)


@contextmanager
def reporting(log: Log | None) -> Iterator[None]:
    """Within the block, tickers made without a log of their own report to ``log`` (None: silent)."""
    token = _SINK.set(log)
    try:
        yield
    finally:
        _SINK.reset(token)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Ticker:
    """``tick(done)`` reports "what: done/total (time so far, ~time left)" if ``every`` seconds (default
    ``PROGRESS_SECONDS``) passed since the last report; the estimate assumes the remaining units cost what the
    finished ones did on average."""

    def __init__(self, what: str, total: int, log: Log | None = None, every: float | None = None):
        self.what, self.total = what, int(total)
        self.log = log if log is not None else _SINK.get()
        self.every = PROGRESS_SECONDS if every is None else float(every)
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        if self.log is None or done <= 0 or done >= self.total:
            return
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        self.log(f"{self.what}: {done}/{self.total} {self.timing(done)}")

    def timing(self, done: int, note: str = "") -> str:
        """"(time so far, ~time left<note>)" after ``done`` of ``total`` units."""
        spent = time.monotonic() - self.start
        left = spent * (self.total - done) / done
        return f"({_duration(spent)} so far, ~{_duration(left)} left{note})"
