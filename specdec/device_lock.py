"""CUDA graph captures and the rest of our device work, kept apart across threads.

A capture in one thread while another thread runs forwards (allocating, freeing, launching) can
crash the process inside ``torch.cuda.graph``'s ``capture_end`` (seen on an H100 with four threads
calling ``generate(compile=True)``): thread-local capture mode keeps other threads' kernels out of
the graph, but not their allocator traffic. So every ``generate()`` call holds this lock *shared*
while it runs, and a capture holds it *exclusive*: captures wait for running calls to leave
(they are rare: once per model and shape), and new calls wait for a pending capture.

A thread that holds the lock shared and needs a capture (a call capturing its graphs) gives up its
share while it waits, so two such threads never wait on each other; a thread that waits for
something another call must hand back (a static runner) steps out with :func:`released`.
Device work outside ``specdec.generate`` (your own threads) is not covered.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SharedExclusive:
    """A readers-writer lock, writers first, reentrant per thread, with upgrade and step-out."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0                    # threads holding a share
        self._writer: int | None = None      # the thread holding it exclusive
        self._writers_waiting = 0
        self._local = threading.local()      # this thread's share depth

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold a share (nested holds in one thread count once)."""
        depth = self._depth()
        if depth == 0 and self._writer != threading.get_ident():
            self._join()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0 and self._writer != threading.get_ident():
                self._leave()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold it alone; this thread's own share, if any, is given up meanwhile."""
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        held = self._depth() > 0
        with self._cond:
            if held:
                self._readers -= 1
                self._cond.notify_all()
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                if held:
                    self._readers += 1
                self._cond.notify_all()

    @contextmanager
    def released(self) -> Iterator[None]:
        """Step out of this thread's share (if any) while waiting on another thread."""
        depth = self._depth()
        if depth == 0:
            yield
            return
        self._local.depth = 0
        self._leave()
        try:
            yield
        finally:
            self._join()
            self._local.depth = depth

    def _join(self) -> None:
        with self._cond:
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _leave(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()


DEVICE = SharedExclusive()   # one per process: captures on any device exclude our work on every device
