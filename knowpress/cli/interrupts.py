"""SIGTERM unwinds like Ctrl-C while a command runs (so temporary outputs are cleaned up)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM (a supervisor repeating itself) must not cut the cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt(program: bool) -> Iterator[None]:
    """While a command runs, SIGTERM unwinds like Ctrl-C.

    Python's default SIGTERM action kills the process without unwinding, which would leave
    ``atomic_dir``'s temporary output directories behind; raised as ``KeyboardInterrupt`` it
    runs their cleanup. Once one arrived, further ones stay ignored until a ``program`` (the
    console script) exits, so a supervisor repeating itself cannot turn exit 130 into -15;
    an in-process caller gets its handler back. Left alone: other threads (handlers are the
    main thread's), a SIGTERM the caller chose to ignore, and a handler installed from C.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if (
        threading.current_thread() is not threading.main_thread()
        or previous is signal.SIG_IGN
        or previous is None
    ):
        yield
        return
    signal.signal(signal.SIGTERM, raise_interrupt)
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if not (program and interrupted):
            signal.signal(signal.SIGTERM, previous)
