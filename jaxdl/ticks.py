"""Progress inside a compiled epoch: the epoch's program reports every few steps through
``jax.debug.callback`` (``Setup.ticks``), and whoever listens on the host hears
``(steps done, steps in the epoch)``. Listening changes nothing the program computes.

Example::

    with ticks.listen(lambda done, total: print(f"{done}/{total}")):
        state, metrics = epoch(state, train, valid, hp)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_listeners: list[Callable[[int, int], None]] = []


def tick(done, total, *after) -> None:
    """Called by the compiled epoch (on the host): ``done`` of ``total`` steps (``after``:
    values of that step the call waits for, so it comes once the step is computed)."""
    for listener in list(_listeners):
        listener(int(done), int(total))


@contextlib.contextmanager
def listen(listener: Callable[[int, int], None]) -> Iterator[None]:
    """Calls ``listener(done, total)`` for each tick while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
