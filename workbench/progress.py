"""Progress of long batch work (cells of a notebook, points of a sweep): a tqdm bar on a terminal,
plain lines where the output goes to a file, a pipe or a CI log (a bar's carriage returns would
pile up there as one unreadable line)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 10 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """``done`` of ``total`` units of one piece of work, with the elapsed time and an ETA.

    On a terminal (``stream.isatty()``) it is a tqdm bar and notes go above it; elsewhere each
    update prints one line, ``[workbench] <desc>: 3/8 points, 1 min 20 s elapsed, ETA 2 min 13 s``,
    at most every ``min_interval`` seconds (the last unit and every note always print).
    ``plain`` forces one form or the other.
    """

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO | None = None, plain: bool | None = None,
                 min_interval: float = 0.0, eta: bool = True) -> None:
        self.total, self.desc, self.unit, self.eta = total, desc, unit, eta
        self.stream = stream if stream is not None else sys.stdout
        self.plain = not _isatty(self.stream) if plain is None else plain
        self.min_interval = min_interval
        self.done = 0
        self.started = time.perf_counter()
        self._last_line = -float("inf")
        self._bar = None if self.plain else tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                                                 dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more units done; ``note`` (one line) is shown with the count."""
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            if note:
                self._bar.write(f"[workbench] {note}", file=self.stream)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if note or self.done >= self.total or now - self._last_line >= self.min_interval:
            self._last_line = now
            print(self.line(note, now), file=self.stream, flush=True)

    def line(self, note: str | None = None, now: float | None = None) -> str:
        """The plain line for the count so far (at ``now``, a ``time.perf_counter()`` reading)."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        text = f"[workbench] {self.desc}: {self.done}/{self.total} {self.unit}s, {format_seconds(elapsed)} elapsed"
        if self.eta and 0 < self.done < self.total:
            text += f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        return text + (f" -- {note}" if note else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
