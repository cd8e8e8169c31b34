"""Live progress on a terminal (a rich bar, or one plain line per epoch) and plain-text
tables of results."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from jaxdl.report.files import scalar

_SHOWN = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
# The names a terminal's bar uses: short, so that the epoch count, the bar, the time
# remaining and all four metrics fit an 80-column line.
_SHORT = {"train_loss": "loss", "train_accuracy": "acc", "val_loss": "val_loss",
          "val_accuracy": "val_acc"}  # fmt: skip
TICKS = 20  # reports per epoch from inside the compiled epoch, when a bar shows them
WIDE = 110  # from this many columns the bar is longer and shows the elapsed time too


def _metrics_text(metrics: Mapping[str, float], short: bool = False) -> str:
    if short:
        return " ".join(f"{_SHORT[k]} {float(metrics[k]):.4f}" for k in _SHOWN if k in metrics)
    return "  ".join(f"{k} {float(metrics[k]):.4f}" for k in _SHOWN if k in metrics)


class Progress:
    """Per-epoch progress: a rich bar on a terminal, one plain line per epoch otherwise.

    Example::

        with Progress(20) as p:
            for epoch in range(1, 21):
                p.update(epoch, {"train_loss": 0.1, "val_accuracy": 0.97})
            p.finish(best_epoch=18)
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        start: int = 0,
        what: str = "",
    ) -> None:
        """``start``: epochs done before (a resumed run), so the count and the time left
        start there; ``what``: a label the plain lines and the closing line carry."""
        self.total = int(total)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.epoch = self.start = int(start)
        self._start = self._last = time.perf_counter()
        self._bar = None
        isatty = getattr(self.stream, "isatty", None)
        if enabled and callable(isatty) and isatty():
            from rich import progress as rp
            from rich.console import Console

            console = Console(file=self.stream)
            wide = console.width >= WIDE
            columns = (
                rp.TextColumn("epoch {task.fields[epoch]}/{task.total}"),
                rp.BarColumn(bar_width=20 if wide else 5),
                *((rp.TimeElapsedColumn(),) if wide else ()),
                rp.TimeRemainingColumn(),
                rp.TextColumn("{task.fields[metrics]}", markup=False),  # the live metrics
            )
            self._bar = rp.Progress(*columns, console=console, transient=False)
            self._task = self._bar.add_task(
                "train", total=self.total, completed=self.start, metrics=what, epoch=self.start
            )

    def __enter__(self) -> Progress:
        self._start = self._last = time.perf_counter()
        if self._bar is not None:
            self._bar.start()
            _live.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            if self in _live:
                _live.remove(self)

    @property
    def ticks(self) -> int:
        """How often an epoch should report its progress (``Setup.ticks``): 20 times with
        a live bar to move, never otherwise."""
        return TICKS if self._bar is not None else 0

    def tick(self, done: int, total: int) -> None:
        """Inside an epoch: ``done`` of its ``total`` steps (``jaxdl.ticks``) move the bar."""
        if self._bar is not None:
            # the epoch under way, and how much of it is done
            done = self.epoch + done / max(total, 1)
            self._bar.update(self._task, completed=done, epoch=self.epoch + 1)

    def elapsed(self) -> float:
        """Seconds since the display started."""
        return time.perf_counter() - self._start

    def update(self, epoch: int, metrics: Mapping[str, float], text: str | None = None) -> None:
        """Reports that ``epoch`` (1-based) epochs are done, with their latest metrics
        (or ``text`` in their place: a sweep's summary of its members)."""
        self.epoch = int(epoch)
        if not self.enabled:
            return
        if self._bar is not None:
            text = _metrics_text(metrics, short=True) if text is None else text
            # Each finished epoch keeps its line on screen, above the live bar (as Keras).
            took = time.perf_counter() - self._last
            line = f"epoch {self.epoch}/{self.total}  {text}  {took:.1f}s"
            self._bar.console.print(line, markup=False, highlight=False)
            self._bar.update(self._task, completed=self.epoch, metrics=text, epoch=self.epoch)
            self._last = time.perf_counter()
            return
        text = _metrics_text(metrics) if text is None else text
        elapsed = self.elapsed()
        eta = elapsed / max(self.epoch - self.start, 1) * max(self.total - self.epoch, 0)
        parts = [f"epoch {self.epoch}/{self.total}", text, f"({elapsed:.1f}s, eta {eta:.1f}s)"]
        print("  ".join(p for p in parts if p), file=self.stream, flush=True)

    def finish(self, stopped_early: bool = False, best_epoch: int | None = None) -> None:
        """Prints a closing line: epochs run, wall time, early stop and best epoch."""
        if not self.enabled:
            return
        n = f"{self.epoch}/{self.total} epochs"
        how = f"stopped early after {n}" if stopped_early else f"done: {n}"
        best = "" if best_epoch is None else f"; best epoch {best_epoch}"
        if self._bar is not None:
            self._bar.stop()  # end the live display first so the line prints below the bar
        print(f"{how} in {self.elapsed():.1f}s{best}", file=self.stream, flush=True)


# The live bars on screen: a message printed while one is live goes above it, through
# its console, rather than into the middle of its line.
_live: list[Progress] = []


def last_words(text: str) -> None:
    """Says ``text`` and takes every live bar off the screen (the cursor back), for a
    process about to exit at once."""
    say(text)
    while _live:
        _live[-1].__exit__(None, None, None)


def say(text: str, stream: TextIO | None = None) -> None:
    """Prints one line of news (above a live bar, if one is on screen)."""
    if _live:
        _live[-1]._bar.console.print(text, markup=False, highlight=False)
    else:
        print(text, file=sys.stderr if stream is None else stream, flush=True)


def number_text(value: Any, short: bool = False) -> str:
    """A setting's value as it is typed: ``0.001``, ``3e-05``, ``16``; ``short``: to 4
    significant digits, for tables and legends (``0.0006422``, not ``0.000642233``)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4g}" if short else f"{value:g}"


def interactive(stream: TextIO | None = None) -> bool:
    """True on a terminal or in a Jupyter kernel: where progress is shown by default."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty()) or _in_jupyter()


def _in_jupyter() -> bool:
    """Whether this process is a running Jupyter kernel (not merely one that imported
    ipykernel, as a test runner executing notebooks may have)."""
    ipython = sys.modules.get("IPython")
    shell = None if ipython is None else ipython.get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def sweep_text(metrics: Mapping[str, Any]) -> str:
    """A sweep's live line: the best and the median (``med``) validation accuracy of the
    members still training this epoch ((members,) arrays, NaN for a frozen member), how
    many those are (``on``), and how many stopped early or diverged
    (``metrics["diverged"]``)."""
    key = "val_accuracy" if "val_accuracy" in metrics else "train_accuracy"
    v = np.asarray(metrics[key], float)
    ok = v[np.isfinite(v)]
    short = "val_acc" if key == "val_accuracy" else "acc"
    diverged = int(np.sum(metrics.get("diverged", 0)))
    done = v.size - ok.size - diverged
    ended = "".join(f", {n} {k}" for k, n in (("stopped", done), ("diverged", diverged)) if n)
    if not ok.size:
        return f"{short}: none training{ended}"
    return (f"{short} best {ok.max():.4f} med {float(np.median(ok)):.4f}; "
            f"{ok.size}/{v.size} on{ended}")  # fmt: skip


def _cell(value: Any) -> str:
    value = scalar(value)
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4f}"
        return f"{value:.3e}"
    return "" if value is None else str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    headers: Mapping[str, str] | None = None,
) -> str:
    """Aligned plain-text table; numbers right-aligned, text left-aligned, missing cells
    blank. ``headers`` names a column other than by its key (a shorter name)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    names = [(headers or {}).get(c, c) for c in columns]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(names)]
    numeric = [
        all(isinstance(scalar(row.get(c)), (int, float)) for row in rows if row.get(c) is not None)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(names), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def sweep_callback(prog: Progress, on_epoch=None):
    """A sweep's per-epoch callback ``(epoch, metrics)``: ``prog``'s live line
    (``sweep_text``), then the user's ``on_epoch``."""

    def each(epoch: int, metrics: Mapping[str, Any]) -> None:
        prog.update(epoch, metrics, text=sweep_text(metrics))
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    return each
