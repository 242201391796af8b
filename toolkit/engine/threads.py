"""Intra-op threads for the engine's thread: one by default, all of them for the big ops.

Why: a parallel region started from a thread other than the process's main one costs ~80 us to wake its team
on a 2-core machine (measured on the engine's thread: a 256x256 int4 matmul 10 us on one thread, 100 us on two;
a 1x256 @ 256x2048 float32 matmul 14 us from the main thread, 90-110 us from another), more than most ops of a
decoding step take. So the engine's thread runs on one thread and hands to all of them only what is big enough
to gain: prefill forwards, the 262k-row LM head, sampling over many rows of a large vocabulary, attention over
long rows (the 270M's LM head: 61 ms on one thread, 31 ms on two).

The cost is the thread's, not OpenMP's: from a process's main thread GNU OpenMP wakes its team cheaply. Measured on
the AMD EPYC (2 cores), the 270M's 72 int4 matmuls of a one-row decoding step: 2.4-2.5 ms on one thread from a
side thread and 4.5-5.1 ms on two; from the main thread 2.7-3.0 on one and 2.0 on two. So where one row's
projections are big enough to split (lean_decode.PARALLEL_MATMUL_MAIN), `toolkit serve`'s engine process runs the
engine's loop on its main thread (Engine.prefers_main_thread, Engine.run_here) and sends those calls to every
thread; the one-thread rule holds elsewhere, and for an engine on a thread of its own (in-process: chat, eval,
rollouts).
"""

from __future__ import annotations

import torch  # imported lazily by the engine, never at toolkit import time

PARALLEL_ELEMENTS = 1 << 22  # a matrix (or logits block) at least this big runs on every thread


class parallel:  # noqa: N801 (used as a context manager, like a function)
    """Run the block on `threads` intra-op threads (when `enabled`), then go back to what was set.

    A class, not contextlib.contextmanager: a decoding step enters this about a hundred times, mostly disabled, and
    a generator-based manager's enter and exit cost ~1.5 us where this costs a fraction."""

    __slots__ = ("threads", "enabled", "before")

    def __init__(self, threads: int, enabled: bool = True) -> None:
        self.threads, self.enabled = threads, enabled

    def __enter__(self) -> None:
        if self.enabled:
            self.before = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            torch.set_num_threads(self.before)
