"""What several test modules need: the repository root, the one way tests run the `toolkit` CLI (in the foreground,
in the background with output to files, under `accelerate launch`), how close two adapters' weights are, calls made
all at once from threads, and a live server (a module-level name, so any test module can import it; every conftest.py is
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


def start_cli_logged(log: Path, *args) -> subprocess.Popen:
    """Start `toolkit ARGS` with output to LOG.out / LOG.err (an unread pipe could fill up and block the process)."""
    out, err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
    return start_cli(*args, stdout=out, stderr=err)


def accelerate_train(recipe: Path, *sets: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of `toolkit train RECIPE --set ...` with the shipped DDP config and 2 processes (gloo on a
    machine without GPUs), as the README documents the multi-GPU command."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        ROOT / "recipes" / "accelerate" / "ddp.yaml",
        "--num_processes",
        "2",
        "-m",
        "cli",
        "train",
        recipe,
        *[arg for s in sets for arg in ("--set", s)],
    ]
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def same_weights(a: Path, b: Path) -> float:
    """Largest difference between two adapters' tensors, relative to the largest weight."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    scale = max(float(t.abs().max()) for t in wa.values())
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa) / scale


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


def kill_at_checkpoint(process: subprocess.Popen, checkpoint: Path, log: Path, timeout: float = 300) -> None:
    """SIGKILL a training run once `checkpoint` (a trainer_state.json) is written whole (no handler runs: what
    survives is what it wrote). Not on its mere existence: a kill while the Trainer was still writing it left a
    checkpoint that --resume rightly refuses as cut short (seen once in CI, test_preference_train's simpo)."""
    import json
    import os
    import signal

    def written() -> bool:
        try:
            return "global_step" in json.loads(checkpoint.read_text())
        except (OSError, ValueError):
            return False

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not written():
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, log.with_suffix(".err").read_text()[-2000:]


def write_rows(folder: Path, name: str, rows: list) -> Path:
    """A .jsonl file of rows (dicts, or raw lines given as strings) in `folder`."""
    import json

    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
