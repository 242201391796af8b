"""What several test modules need: the repository root and the one way tests run the `toolkit` CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd: str | Path | None = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """Run `toolkit ARGS` in a fresh interpreter, as a user would, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, **kwargs
    )


def start_cli(*args, stdout: IO, stderr: IO, cwd: str | Path = ROOT) -> subprocess.Popen:
    """Start `toolkit ARGS` in the background (for tests that interrupt or kill it)."""
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=cwd, stdout=stdout, stderr=stderr)
