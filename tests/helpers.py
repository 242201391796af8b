"""What several test modules need: the repository root, the one way tests run the `toolkit` CLI, calls made all at
once from threads, and a live server (a module-level name, so any test module can import it; every conftest.py is
imported as `conftest`)."""

from __future__ import annotations

import subprocess
import sys
import time
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


def all_at_once(fn, items: list) -> list:
    """`fn` over `items`, every call in its own thread at once (requests a server batches together, processes
    starting together on one file), results in `items`' order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


class LiveServer:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, state) -> None:
        import socket
        import threading

        import uvicorn

        from toolkit.serve.app import create_app

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.state = state
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.engine.close()
