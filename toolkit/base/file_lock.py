"""One process at a time on a folder that is written once and then shared: a built base, a checkpoint's repack.

A DDP launch starts every rank on the same recipe at the same moment (and a trainer and a server may start
together): without this, each would build or repack the folder and replace it while another was loading from it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold `<target>.lock` (an OS file lock, released if the process dies) while the block runs; say so when
    another process holds it, since its work (a 27B repack) can take minutes. The block re-checks whether the
    other process already did the work."""
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process's {what} ({target})", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
