"""The engine in a process of its own, as vLLM V1 runs its EngineCore: how `toolkit serve` runs it by default.

Why: in one process the server's event loop (HTTP parsing, validation, the chat template, JSON) and the engine's
thread share one GIL. The engine releases and retakes the GIL around every torch op, hundreds per decoding step
on a small model, and each retake waits for whatever Python the loop is running, so HTTP work slowed the model
itself (measured in docs/BENCHMARKS.md, "Serving load"). In its own process the engine never waits for HTTP.

The child process loads the base and the adapters and runs the ordinary `Engine`, unchanged. The server holds an
`EngineClient`, the part of Engine's interface it uses: `submit`, `waiting`, `stats`, `stop_ids`, `run`, `close`.
Messages are pickled over a local socket pair (multiprocessing's Connection): the server sends submissions,
cancellations and `run` calls; the child sends the engine's events in batches with its stats (after each round's
sampling, before the forward pass, and at the round's end: Engine.on_events; stats alone only every
STATS_INTERVAL_S while rows run), and the client calls each
request's `on_event` from its reader thread, as the engine's thread does in-process. Grammar constraints travel
as their grammar (structured.GrammarConstraint is recompiled in the child).

What does not cross: the model (the server process holds none: `state.base.model` is None) and exceptions that
do not pickle (they arrive as RuntimeError with the same text).
"""

from __future__ import annotations

import itertools
import pickle
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from toolkit.engine.engine import DEFAULT_MAX_QUEUE, Request, check_admissible

STATS_INTERVAL_S = 0.2  # the longest the server's copy of the engine's stats lags while rows run
STARTUP_TIMEOUT_S = 600  # loading the 27B takes minutes; the tiny base about 5 s (mostly imports)


@dataclass
class EngineSpec:
    """What the child needs to build the engine: the base, the adapters, the engine's options."""

    base: str
    adapters: list[tuple[str, str]]
    device: str | None = None
    kernel: str = "auto"
    runtime_adapters: bool = False  # wrap the model in serve.adapters.LockedModel
    options: dict[str, Any] = field(default_factory=dict)  # Engine keyword arguments
    lm_head: str = "auto"


class EngineGone(RuntimeError):
    """The engine's process exited; requests in flight get this as their error."""


class EngineClient:
    """The server's handle on an Engine in a child process (see the module docstring)."""

    def __init__(self, spec: EngineSpec) -> None:
        # A fresh interpreter on one end of a socket pair (`python -m toolkit.serve.engine_process FD`), not
        # multiprocessing's spawn, which re-runs the caller's main script in the child (a script without a
        # __main__ guard would start a server there) and not fork (it would copy the server's threads mid-state).
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "toolkit.serve.engine_process", str(theirs.fileno())]
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        _put(self._conn, spec)
        if not self._conn.poll(STARTUP_TIMEOUT_S):
            self._process.kill()
            raise EngineGone(f"the engine process did not start within {STARTUP_TIMEOUT_S} s")
        try:
            kind, info = _take(self._conn)
        except EOFError:
            code = self._process.wait()
            raise EngineGone(f"the engine process exited while starting (exit code {code})") from None
        if kind == "failed":
            self._process.wait(timeout=10)
            raise info
        import torch

        self.device, self.dtype, self.kernel = info["device"], getattr(torch, info["dtype"]), info["kernel"]
        self.head, self.head_kernel, self.step_kind = info["head"], info["head_kernel"], info["step"]
        self.stop_ids: set[int] = set(info["stop_ids"])
        self.layout, self.kv_budget = info["layout"], info["kv_budget"]
        self.max_batch, self.max_queue = info["max_batch"], spec.options.get("max_queue", DEFAULT_MAX_QUEUE)
        self.stats: dict[str, Any] = dict(info["stats"])  # updated in place: readers may hold this dict
        self._requests: dict[int, Request] = {}
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._gone: EngineGone | None = None
        self._reader = threading.Thread(target=self._read, name="engine-client", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------------------------------------ Engine's API
    def submit(self, request: Request) -> Request:
        """As Engine.submit: raises at once for a request that cannot be queued (the same checks, here)."""
        if self._gone is not None:
            raise self._gone
        with self._lock:
            check_admissible(request, self.layout, self.kv_budget, self.waiting, self.max_queue)
            self._requests[request.id] = request
        request.cancelled = _RemoteCancel(self, request.id)
        message = ("submit", request.id, request.input_ids, request.token_type_ids, request.pixel_values)
        self._send((*message, request.adapter, request.params))
        return request

    @property
    def waiting(self) -> int:
        """Requests sent and not yet running. The engine's own counts arrive a round late, so while its last report
        held nothing back every request is taken as admitted up to max_batch (as the engine admits them at its
        next round); when it held some back (the KV budget), its count of running rows stands."""
        outstanding = len(self._requests)
        held_back = int(self.stats.get("waiting", 0)) > 0
        running = int(self.stats.get("running", 0)) if held_back else min(outstanding, self.max_batch)
        return max(0, outstanding - running)

    @property
    def alive(self) -> bool:
        return self._gone is None and self._process.poll() is None

    @property
    def pid(self) -> int:
        return self._process.pid

    def run(self, fn: Any, *args: Any) -> Any:
        """`fn(model, *args)` in the engine's process (fn must be a module-level function); its result or error."""
        future: Future = Future()
        call = next(self._call_ids)
        self._calls[call] = future
        self._send(("call", call, fn, args))
        if threading.current_thread() is self._reader:
            # Called back from an event this thread delivers (a finished request releasing a retired adapter):
            # waiting would block the only thread that can read the answer. The call runs in order all the same.
            return None
        return future.result()

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._send(("close",))
                self._process.wait(timeout=10)
            except (OSError, EngineGone, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait(timeout=5)
        self._conn.close()

    # ------------------------------------------------------------------------------------------------ plumbing
    def _send(self, message: tuple) -> None:
        if self._gone is not None:
            raise self._gone
        with self._send_lock:
            _put(self._conn, message)

    def _read(self) -> None:
        try:
            while True:
                message = _take(self._conn)
                if message[0] == "events":
                    _, events, stats = message
                    self.stats.update(stats)
                    for rid, kind, value in events:
                        self._deliver(rid, kind, value)
                elif message[0] == "result":
                    _, call, ok, value = message
                    future = self._calls.pop(call)
                    future.set_result(value) if ok else future.set_exception(value)
        except (EOFError, OSError):
            try:
                code = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = "unknown: it closed its end"
            self._gone = EngineGone(f"the engine process exited (exit code {code})")
            for rid in list(self._requests):
                self._deliver(rid, "error", self._gone)
            for future in self._calls.values():
                future.set_exception(self._gone)

    def _deliver(self, rid: int, kind: str, value: Any) -> None:
        with self._lock:
            request = self._requests.get(rid)
            if request is not None and kind in ("done", "error"):
                del self._requests[rid]
        if request is not None:
            request.on_event(kind, value)


class _RemoteCancel(threading.Event):
    """Request.cancelled for a request in the engine's process: setting it also tells the engine."""

    def __init__(self, client: EngineClient, rid: int) -> None:
        super().__init__()
        self.client, self.rid = client, rid

    def set(self) -> None:
        if not self.is_set():
            super().set()
            try:
                self.client._send(("cancel", self.rid))
            except (OSError, EngineGone):
                pass  # the engine is gone: the request already got its error


# ---------------------------------------------------------------------------------------------------- the child
def _child_main(conn: Any, spec: EngineSpec) -> None:
    """The engine's process: build the engine, then serve the server's messages until told to close."""
    try:
        engine, base = _build(spec)
    except BaseException as exc:  # noqa: BLE001  (every failure must reach the server as its startup error)
        _put(conn, ("failed", _portable(exc)))
        conn.close()
        return
    outbox: list[tuple[int, str, Any]] = []
    send_lock = threading.Lock()
    requests: dict[int, Request] = {}

    def send(message: tuple) -> None:
        with send_lock:
            try:
                _put(conn, message)
            except (pickle.PicklingError, TypeError, AttributeError):  # an event value that does not pickle: its text
                events = [(rid, kind, _portable(value)) for rid, kind, value in message[1]]
                _put(conn, (message[0], events, *message[2:]))

    sent_stats: dict = {}
    sent_at = [0.0]

    def flush() -> None:  # the engine's thread (Engine.on_events): the events so far in one message
        stats = dict(engine.stats)
        # While rows run, stats alone wait for the next events (or STATS_INTERVAL_S): each message wakes the server's
        # reader thread and event loop, and a decoding round would send two (its tokens, then its end's stats), the
        # second competing for the cores with the next step. An engine going idle sends its last stats at once.
        fresh = time.monotonic() - sent_at[0] < STATS_INTERVAL_S
        if not outbox and (stats == sent_stats or (engine.running and fresh)):
            return
        events = outbox[:]
        outbox.clear()
        for rid, kind, _ in events:
            if kind in ("done", "error"):
                requests.pop(rid, None)
        send(("events", events, stats))
        sent_stats.clear()
        sent_stats.update(stats)
        sent_at[0] = time.monotonic()

    engine.on_events = flush

    def read() -> None:  # the server's messages, until it closes or is gone; then the engine's loop ends
        try:
            _serve_messages(conn, engine, requests, outbox, send)
        finally:
            engine.close()

    engine.compile_step()  # where it pays, before the first request (a few seconds; cached by inductor after)
    _put(conn, ("ready", _info(engine, base)))
    # Where it pays, the engine's loop on this process's main thread and the messages on a thread beside it: OpenMP
    # wakes its team cheaply only for the main thread, so there the decoding step's int4 matmuls use every core
    # (threads.py); else the engine on its own thread, the messages here
    if engine.prefers_main_thread:
        threading.Thread(target=read, name="engine-messages", daemon=True).start()
        engine.run_here()
    else:
        engine.start()
        read()
    conn.close()


def _serve_messages(conn: Any, engine: Any, requests: dict, outbox: list, send: Any) -> None:
    """The child's side of the protocol: submissions, cancellations and `run` calls, until "close" or EOF."""
    while True:
        try:
            message = _take(conn)
        except (EOFError, OSError):
            break  # the server is gone
        kind = message[0]
        if kind == "submit":
            _, rid, ids, types, pixels, adapter, params = message

            def on_event(kind: str, value: Any, rid: int = rid) -> None:
                outbox.append((rid, kind, value))

            request = Request(ids, types, pixels, adapter, params, on_event)
            requests[rid] = request
            try:
                engine.submit(request)
            except Exception as exc:  # the server checked first; a race on the queue bound ends here
                requests.pop(rid, None)
                send(("events", [(rid, "error", exc)], dict(engine.stats)))
        elif kind == "cancel":
            request = requests.get(message[1])
            if request is not None:
                request.cancel()
        elif kind == "call":
            _, call, fn, args = message
            try:
                send(("result", call, True, fn(engine.model, *args)))
            except Exception as exc:
                send(("result", call, False, _portable(exc)))
        elif kind == "close":
            break


def _build(spec: EngineSpec) -> tuple[Any, Any]:
    from toolkit.base.loader import load_base
    from toolkit.engine.engine import Engine
    from toolkit.lora.registry import attach
    from toolkit.serve import structured

    loaded = load_base(spec.base, device=spec.device, kernel=spec.kernel, lm_head=spec.lm_head)
    adapters = [(name, Path(folder)) for name, folder in spec.adapters]
    model = attach(loaded, adapters) if adapters else loaded.model
    if spec.runtime_adapters:  # adapters change only between forward passes (serve/adapters.py)
        from toolkit.serve.adapters import LockedModel

        model = LockedModel(model)
    # The queue bound is the server's to enforce (a 429 before anything is sent); the child takes what it is sent
    engine = Engine.for_base(loaded, model, **{**spec.options, "max_queue": sys.maxsize, "start": False})
    structured.use_tokenizer(loaded.tokenizer, sorted(engine.stop_ids))
    return engine, loaded


def _info(engine: Any, base: Any) -> dict:
    return {
        "device": base.device,
        "dtype": str(base.dtype).removeprefix("torch."),
        "kernel": base.kernel,
        "head": base.head,
        "head_kernel": base.head_kernel,
        "step": engine.step_kind,
        "stop_ids": sorted(engine.stop_ids),
        "layout": engine.layout,
        "kv_budget": engine.kv_budget,
        "max_batch": engine.max_batch,
        "stats": dict(engine.stats),
    }


def _put(conn: Connection, message: Any) -> None:
    # Plain pickle, not Connection.send's: with torch loaded that one shares tensors through file descriptors
    # handed over by multiprocessing's resource sharer, which only a process multiprocessing started can reach.
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _take(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":  # the child: python -m toolkit.serve.engine_process FD
    from toolkit.quiet import quiet_third_party

    # before the base's imports, as the CLI does: the child's stderr is the server's terminal, and transformers'
    # processor import pulls in torchao, which logs two torch warnings a user can do nothing about
    quiet_third_party()
    connection = Connection(int(sys.argv[1]))
    _child_main(connection, _take(connection))
