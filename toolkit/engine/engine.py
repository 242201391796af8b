"""Generation on a loaded base: token ids in, token ids out. No HTTP and no chat template here.

`generate_greedy` runs one prompt through transformers' `generate` (the reference). `Engine` serves many:
a background thread admits the requests waiting in a bounded queue (up to `max_batch` running rows, and
within the KV budget `kv_cache_gb`), prefills their prompts in chunks of `prefill_chunk` tokens between
decoding steps of the rows already running (so a long prompt never stalls the streams), and decodes every
running row in one shared forward per step (two when one long row would pad the short ones). Each row keeps
its own adapter (peft mixed-adapter batches), its own sampling state (sampling.py: penalties, temperature,
top-k/p, min-p, seed, logprobs, constraint), token budget and stop tokens, and its own KV storage at its own
length (kv_cache.py), so rows never pad each other in memory. Rows that finish or are cancelled leave at once
and free their storage; requests that arrive meanwhile join between two decoding steps (step-level continuous
batching).

Prefill asks the model for the logits it uses only: the last position of each prompt (`logits_to_keep=1`),
and every prompt position only for a request that wants `prompt_logprobs`, then in chunks.

Decoding steps and text-only prompt chunks run through lean_decode.py (the model's modules without
transformers' generic forward, attention per row over its own storage); prompts with images or prompt logprobs,
and fresh prompts prefilled together, go through the model's own forward over a kv_cache.RaggedCache.

Events, from the engine thread (`Request.on_event(kind, value)`): ("prompt_logprobs", list) once after the
prefill when asked; ("logprobs", TokenLogprob) right before each ("token", id) when asked, and before a
("done", ("stop", stop_token)) for the stop token; then ("done", (finish_reason, stop_token_or_None)) with
"stop" | "length" | "cancelled", or ("error", exc).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toolkit import constants as C
from toolkit.engine.sampling import RowState, SamplingParams, TokenLogprob  # noqa: F401  (re-exported)
from toolkit.errors import ToolkitError, brief

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
DEFAULT_MAX_QUEUE = 64  # requests waiting beyond the running rows; more: QueueFull (the server's 429)
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill forward: a decoding step of the running rows in between
PROMPT_LOGPROBS_CHUNK = 128  # a prompt_logprobs prefill keeps every position's logits: 128 x vocab at a time
PREFILL_STEP_RATIO = 0.5  # while rows decode, a prefill chunk takes at most this many decoding steps' time
# The paced chunk's floor. Late in a 32k prompt even a small piece attends to every key before it. Measured on the
# tiny base with the mask-free chunk attention (lean_decode._past_then_chunk), 30k prompt beside 15 decoding rows:
# with a floor of 8 the passes that carry a piece took a median of 1.57 decoding steps (16: 1.95; 4: 1.48, no
# steadier), and the prompt joined in 52 s (16: 49 s; 4: 48 s); before that attention, 8 took 73-80 s to join.
MIN_CHUNK = 8
# While prompt chunks ride on every pass, one pass in this many carries none, to re-measure the decoding step alone:
# the running rows grow while a long prompt joins (a 30k prompt takes tens of seconds on CPU), and a step time
# measured before it arrived would size its chunks against a step that no longer exists.
STEP_REMEASURE_PASSES = 16
# While rows decode, fresh prompts go whole as long as the pass's prompt tokens stay within this many paced chunks
# (about one decoding step at PREFILL_STEP_RATIO 0.5). Each pass a prompt waits is a decoding slot left idle: with
# 16 clients whose requests arrive a few ms apart (HTTP), splitting 26-token prompts against a half-step chunk left
# 14.6 rows per step where 16 fit (docs/BENCHMARKS.md, "Serving load").
FRESH_PROMPT_CHUNKS = 2
# ... of at least this many tokens each: the paced chunk's floor (MIN_CHUNK) is sized for a long prompt's last
# pieces, not for the room a short fresh prompt needs to go whole
FRESH_CHUNK_FLOOR = 16
# An idle engine waits this long for more requests to share the first prefill. Requests that arrive while rows
# run join between steps anyway (all that waits is admitted together), so a wait only saves one prefill pass at
# the start of a burst, and a lone request pays it in time to first token (measured on the tiny base: 15 ms to
# the first token with a 10 ms wait, 6.3 ms with 2 ms, 4.5 ms with none). So none by default.
BATCH_WAIT_S = 0.0
DECODE_SPLIT_SLOTS = 16384  # padded KV slots a second decoding forward must save to be worth its fixed cost

__all__ = [
    "BASE_ADAPTER",
    "Engine",
    "QueueFull",
    "Request",
    "RequestTooLarge",
    "SamplingParams",
    "check_admissible",
    "generate_greedy",
]


def generate_greedy(base: Any, inputs: dict, *, max_new_tokens: int = 32) -> list[int]:
    """Greedy continuation of one encoded prompt (a dict of tensors, batch of one).

    Stops on the base's stop tokens (<end_of_turn>, <eos>); returns the new token ids without the stop token.
    transformers' `generate` computes only the last position's logits in its prefill (it passes
    `logits_to_keep=1` to models that accept it, as Gemma 3 does).
    """
    import torch

    inputs = {k: v.to(base.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(base.dtype)
    with torch.no_grad():
        out = base.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            eos_token_id=base.model.generation_config.eos_token_id,
            pad_token_id=base.tokenizer.pad_token_id,
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = set(base.model.generation_config.eos_token_id or [])
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]


class QueueFull(Exception):
    """More requests are waiting than the engine's queue holds."""


class RequestTooLarge(ToolkitError):
    """The request's prompt + max_tokens can never fit the engine's KV budget (the server answers 400)."""


@dataclass(eq=False)  # an entity: compared by identity (its fields hold tensors and callbacks)
class Request:
    """One sequence to generate. `on_event(kind, value)` is called from the engine thread (see the module
    docstring for the events)."""

    input_ids: list[int]
    token_type_ids: list[int]
    pixel_values: Any
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def token_limit(self) -> int:
        """The most tokens its row can ever hold: the prompt and max_tokens (what the KV budget reserves)."""
        return len(self.input_ids) + max(self.params.max_tokens, 0)


@dataclass(eq=False)  # an entity: `row in rows` and `rows.remove(row)` by identity, never comparing tensors
class _Row:
    """A running request: its sampling state, its KV storage and how far its prompt is prefilled."""

    request: Request
    state: Any  # sampling.RowState
    kv: Any  # kv_cache.RowKV
    reserved: int  # bytes of KV budget set aside for it at admission
    fed: int = 0  # prompt tokens already through the model
    logits: Any = None  # the next token's logits [vocab], once the prompt is done
    prompt_lp: list = field(default_factory=list)  # prompt_logprobs entries so far
    last_logits: Any = None  # the previous chunk's last position (prompt_logprobs across chunks)

    @property
    def prompt_left(self) -> int:
        return len(self.request.input_ids) - self.fed


class Engine:
    """Batches concurrent requests into shared forward passes on one model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        device: str,
        dtype: Any,
        pad_id: int,
        stop_ids: list[int],
        max_batch: int = 16,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_wait_s: float = BATCH_WAIT_S,
        kv_cache_gb: float | None = None,
        prefill_chunk: int | None = None,
        prefill_step_ratio: float | None = PREFILL_STEP_RATIO,
        lean_decode: bool = True,
        compiled_step: bool = True,
        on_events: Callable[[], None] | None = None,
        start: bool = True,
    ) -> None:
        from toolkit.engine.kv_cache import KVLayout
        from toolkit.engine.lean_decode import LeanDecoder

        self.model, self.device, self.dtype = model, device, dtype
        if hasattr(model, "peft_config"):  # rows carry their adapter: the 4-bit LoRA layers must accept that
            from toolkit.lora.registry import enable_mixed_adapter_batches

            enable_mixed_adapter_batches()
        self.pad_id, self.stop_ids = pad_id, set(stop_ids)
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        if kv_cache_gb is not None and kv_cache_gb <= 0:
            raise ToolkitError(f"KV budget {kv_cache_gb} GB is not positive", where="--kv-cache-gb")
        if prefill_chunk is not None and prefill_chunk < 0:
            raise ToolkitError(f"prefill chunk {prefill_chunk} is negative", where="--prefill-chunk")
        if prefill_step_ratio is not None and prefill_step_ratio <= 0:
            raise ToolkitError(
                f"prefill pacing {prefill_step_ratio} is not positive",
                where="--prefill-pacing",
                fix="use 0 for fixed chunks",
            )
        self.kv_budget = None if kv_cache_gb is None else int(kv_cache_gb * 2**30)
        # None: the default chunk; 0: whole prompts in one forward
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        # Attention makes a chunk's cost grow with the prompt already cached (n x past): a fixed chunk that is cheap
        # at the start of a 30k prompt stalls the streams near its end. While rows decode, the chunk is resized
        # after each pass so that it takes about `prefill_step_ratio` decoding steps (measured, smoothed): each
        # stream's gap stays within (1 + ratio) steps and the prompt still gets ratio / (1 + ratio) of the time.
        # None: fixed chunks of `prefill_chunk` (the same pass boundaries in every run, for exact comparisons).
        self.prefill_step_ratio = prefill_step_ratio
        self._step_s: float | None = None  # smoothed seconds of one decoding step
        self._paced_passes = 0  # paced passes since the last one without prompt chunks (STEP_REMEASURE_PASSES)
        self._chunk_n = min(self.prefill_chunk, 64)  # the first paced chunk; resized (x2 a pass at most) once measured
        self.layout = KVLayout.of(model, dtype)
        import torch

        self._threads = torch.get_num_threads()  # the engine's thread runs on one, these for big ops (threads.py)
        # Decoding steps skip transformers' generic forward where the model's shape allows (lean_decode.py); False
        # keeps every step on the generic forward (the reference the lean step is tested against).
        self._lean = LeanDecoder(model, self._threads) if lean_decode and LeanDecoder.supports(model) else None
        self.compiled_step = compiled_step  # whether compile_step may compile (False: --no-compiled-step)
        self.step_kind = "eager (an engine on a thread of its own)"  # what one row's step runs as (compile_step)
        # Called on the engine's thread once a batch of events is out: after sampling (before the forward pass, so
        # tokens and finished requests leave a pass earlier) and at the end of every round (engine_process.py sends
        # the events it collected there, in one message)
        self.on_events = on_events
        self._queue: queue.Queue[Request] = queue.Queue()
        self._pending: deque[Request] = deque()  # taken from the queue, waiting for room or KV budget
        self._rows: list[_Row] = []
        self._reserved = 0
        self._stop = threading.Event()
        self.stats: dict[str, Any] = {
            "batches": 0,  # prefill forward passes
            "steps": 0,  # decoding passes (completion_tokens / steps: the rows a step decoded on average)
            "requests": 0,
            "cancelled": 0,
            "max_batch_seen": 0,
            "active": 0,
            "waiting": 0,
            "running": 0,
            "kv_bytes_used": 0,
            "kv_bytes_needed": 0,
            "kv_bytes_budget": self.kv_budget,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._here = False  # run_here's loop runs
        if start:
            self._thread.start()

    @classmethod
    def for_base(cls, base: Any, model: Any = None, **options: Any) -> Engine:
        """An engine on a loaded base (or `model`, the base with adapters attached), with its stop tokens."""
        return cls(
            model if model is not None else base.model,
            device=base.device,
            dtype=base.dtype,
            pad_id=base.tokenizer.pad_token_id,
            stop_ids=list(base.model.generation_config.eos_token_id or C.STOP_TOKEN_IDS),
            **options,
        )

    def start(self) -> None:
        """Start an engine built with start=False: requests submitted before run in a fixed order (batches
        do not depend on arrival timing, so evaluation is deterministic)."""
        self._thread.start()

    # ------------------------------------------------------------------------------------------------ public
    def submit(self, request: Request) -> Request:
        """Queue a request. Raises RequestTooLarge if it can never fit the KV budget, QueueFull if the queue is
        full; a request that fits the budget but not right now waits for running rows to finish."""
        check_admissible(request, self.layout, self.kv_budget, self.waiting, self.max_queue)
        self._queue.put(request)
        return request

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(model, *args)` on the engine's model (e.g. loading an adapter at run time; a LockedModel's lock keeps
        it between forward passes). The same call on an engine in another process runs there (engine_process.py)."""
        return fn(self.model, *args)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    @property
    def running(self) -> int:
        """Rows that hold KV storage (a finished row's "done" event comes just before its storage is released)."""
        return len(self._rows)

    @property
    def alive(self) -> bool:
        """Whether the engine's loop runs (False before `start` and after `close`)."""
        return self._thread.is_alive() or self._here

    @property
    def prefers_main_thread(self) -> bool:
        """Whether `run_here` on a process's main thread pays: only where the lean step's projections are big
        enough to split over threads one row at a time (measured: the 270M's one-client decoding 1.11x llama.cpp's
        server from the main thread; the tiny base's `toolkit serve` at 16 clients 7.4-7.6x transformers serve from
        the main thread against 8.5-9.1x from a thread of its own, docs/BENCHMARKS.md)."""
        return self._lean is not None and self._lean.splits_rows

    def run_here(self) -> None:
        """Run the engine's loop on the calling thread, instead of `start`, until `close` (from another thread).
        For a process of its own whose main thread is the engine's (serve/engine_process.py): OpenMP wakes its team
        cheaply there, so smaller ops go to every intra-op thread than from the engine's own thread (threads.py)."""
        from toolkit.engine.lean_decode import PARALLEL_MATMUL_MAIN

        self._here = True
        if self._lean is not None:
            self._lean.row_gate = PARALLEL_MATMUL_MAIN
        try:
            self._run()
        finally:
            self._here = False
            if self._lean is not None:
                self._lean.close()

    def compile_step(self) -> str:
        """Before `run_here` on a process's main thread: compile one base row's decoding layers where that pays (a
        CPU engine that prefers the main thread: engine/compiled_step.py). What the step runs as, also kept in
        `step_kind`: "compiled (N s)" or "eager" with the reason. A failed compile (e.g. no C++ compiler for
        inductor) is reported, not raised: the eager lean step serves."""
        if not self.compiled_step:
            why = "turned off"
        elif self.device != "cpu" or not self.prefers_main_thread:
            why = "only a CPU engine on its process's main thread compiles it"
        else:
            from toolkit.engine.lean_decode import PARALLEL_MATMUL_MAIN

            gate, self._lean.row_gate = self._lean.row_gate, PARALLEL_MATMUL_MAIN  # as run_here will run it
            try:
                seconds = self._lean.compile_step(self.layout)
                off = self._lean.compiled.chunks_off
                chunks = f"; prompt chunks eager: {off}" if off else ""
                self.step_kind = f"compiled ({seconds:.1f} s; {self._lean.attention_kind}{chunks})"
                return self.step_kind
            except Exception as exc:  # noqa: BLE001  (the toolchain's own errors: any of them leaves eager)
                why = brief(exc)
            finally:
                self._lean.row_gate = gate  # (run_here sets it again)
        self.step_kind = f"eager ({why})"
        return self.step_kind

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._lean is not None and not self._thread.is_alive() and not self._here:  # (a running pass keeps it)
            self._lean.close()

    # ------------------------------------------------------------------------------------------------ thread
    def _run(self) -> None:
        import torch

        try:
            while not self._stop.is_set():
                if not self._rows and not self._pending:  # idle: block for work, then gather what arrives together
                    torch.set_num_threads(self._threads)
                    try:
                        first = self._queue.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    self._pending.extend(self._gather(first))
                    # torch's thread count is process-wide: one thread while the engine works, all of them for big
                    # ops only (threads.py; on a process's main thread smaller ops count as big: run_here)
                    torch.set_num_threads(1)
                try:
                    self._work()
                except Exception as exc:  # a bug in a round must not leave every client waiting forever
                    self._fail(list(self._rows), exc)
                    for request in self._pending:
                        request.on_event("error", exc)
                    self._pending.clear()
                    if self.on_events is not None:
                        self.on_events()
        finally:
            torch.set_num_threads(self._threads)

    def _work(self) -> None:
        """One round: admit, then one pass. With the lean pass, text prompts ride on the decoding step: the
        running rows' sampled tokens and prompt chunks (up to the round's token budget) go through one forward.
        Prompts with images or prompt logprobs get a prefill pass of the model's own forward first."""
        self._admit()
        lean, generic = [], []
        for row in list(self._rows):
            if row.prompt_left <= 0:
                continue
            if self._finish_if_cancelled(row.request):  # cancelled while its prompt waited
                self._release(row)
            else:
                (lean if self._lean_prefills(row) else generic).append(row)
        if generic:
            self._prefill_some(generic)
        decoding = [r for r in self._rows if r.logits is not None]
        pieces, paced = self._plan_pieces(lean, paced=bool(decoding)) if lean else ([], False)
        if paced:
            self._paced_passes += 1
            if self._paced_passes > STEP_REMEASURE_PASSES:  # this pass decodes alone: the step is re-measured
                pieces, self._paced_passes = [], 0
        if decoding or pieces:
            self._step(decoding, pieces, paced)
        self._update_stats()
        if self.on_events is not None:
            self.on_events()

    def _gather(self, first: Request) -> list[Request]:
        """Take what else is waiting, and what keeps arriving within `batch_wait_s` of the last arrival.

        Requests that arrive together share one prefill; the wait is bounded so a lone request starts at once
        and later arrivals join the running batch between decoding steps anyway.
        """
        batch = [first]
        deadline = time.monotonic() + 5 * self.batch_wait_s
        while len(batch) < self.max_batch:
            wait = min(self.batch_wait_s, deadline - time.monotonic())
            try:
                batch.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _admit(self) -> None:
        """Start waiting requests, oldest first, while there is room in the batch and in the KV budget."""
        from toolkit.engine.kv_cache import RowKV

        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if any(r.cancelled.is_set() for r in self._pending):  # waiting requests may be cancelled anywhere in line
            self._pending = deque(r for r in self._pending if not self._finish_if_cancelled(r))
        while self._pending and len(self._rows) < self.max_batch:
            r = self._pending[0]
            need = self.layout.reserve_bytes(r.token_limit)
            if self.kv_budget is not None and self._reserved + need > self.kv_budget:
                break  # the oldest waits for room (first come, first served: no overtaking by smaller ones)
            self._pending.popleft()
            try:
                state = RowState.new(r.params, r.input_ids)
            except Exception as exc:  # bad parameters fail their request, not the engine
                r.on_event("error", exc)
                continue
            self._rows.append(_Row(r, state, RowKV(self.layout, r.token_limit, len(r.input_ids)), need))
            self._reserved += need
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(r.input_ids)

    def _release(self, row: _Row) -> None:
        if row in self._rows:  # idempotent: a failing forward may release rows that already finished
            self._rows.remove(row)
            self._reserved -= row.reserved

    def _finish_if_cancelled(self, r: Request) -> bool:
        cancelled = r.cancelled.is_set()  # read once: it may be set from another thread at any moment
        if cancelled:
            self.stats["cancelled"] += 1
            r.on_event("done", ("cancelled", None))
        return cancelled

    def _fail(self, rows: list[_Row], exc: Exception) -> None:
        """A failing forward must not kill the engine: its rows get the error and leave."""
        for row in rows:
            row.request.on_event("error", exc)
            self._release(row)

    def _update_stats(self) -> None:
        s = self.stats
        s["active"] = s["running"] = len(self._rows)
        s["waiting"] = self.waiting
        s["kv_bytes_used"] = sum(r.kv.held_bytes() for r in self._rows)
        s["kv_bytes_needed"] = sum(r.kv.needed_bytes() for r in self._rows)

    # ------------------------------------------------------------------------------------------------ prefill
    def _plan_pieces(self, rows: list[_Row], paced: bool) -> tuple[list[tuple[_Row, int]], bool]:
        """Which prompt tokens ride on this round's pass (lean pass only): `(row, n)` pieces within one chunk, and
        whether they were paced.

        Fresh prompts that fit the chunk whole go first (a short request does not queue behind a long prompt's
        chunks), then the others in arrival order. While rows decode, the chunk is paced to about
        `prefill_step_ratio` decoding steps (`_chunk_n`, resized after each pass), a piece may end anywhere, and
        fresh prompts go whole while the pass's prompt tokens stay within FRESH_PROMPT_CHUNKS chunks (of at least
        FRESH_CHUNK_FLOOR tokens each);
        unpaced (ratio None), a row's pieces end only at multiples of `prefill_chunk` of its own prompt, so its
        pass boundaries are the same in every run (exact comparisons with serving it alone)."""
        chunk = self.prefill_chunk or 1 << 62
        paced = paced and self.prefill_step_ratio is not None and self._step_s is not None and self.prefill_chunk > 0
        budget = min(chunk, self._chunk_n) if paced else chunk
        # room past the chunk for whole fresh prompts
        whole = FRESH_PROMPT_CHUNKS * max(budget, FRESH_CHUNK_FLOOR) - budget if paced else 0
        short = min(chunk, budget + whole)
        order = sorted(rows, key=lambda r: not (r.fed == 0 and r.prompt_left <= short))  # stable: arrival order
        pieces, left = [], budget
        for row in order:
            if paced:
                n = min(row.prompt_left, left)
                if row.fed == 0 and row.prompt_left <= min(chunk, left + whole):
                    # whole: split, the rest would cost its row another pass (a decoding slot that sits idle, a
                    # step more to its first token) to save at most a chunk's time in this one
                    n = row.prompt_left
            else:
                n = min(row.prompt_left, chunk - row.fed % chunk)
                if n > left:  # its next whole piece waits for a pass with room
                    if pieces:
                        continue
                    n = left
            if n <= 0:
                break
            pieces.append((row, n))
            left -= n
        return pieces, paced

    def _prefill_some(self, prefilling: list[_Row]) -> None:
        """One prefill forward: fresh prompts that fit `prefill_chunk` tokens together go whole (left-padded,
        before a long prompt's next chunk, so short requests do not queue behind it); otherwise the next chunk
        of the oldest prompt. A prompt with images goes whole (an image is not split across passes). `prefilling`:
        rows not cancelled (`_work` released those)."""
        chunk = self.prefill_chunk or 1 << 62
        group, total = [], 0
        for row in prefilling:
            if row.fed or row.request.params.prompt_logprobs is not None or row.prompt_left > chunk:
                continue
            if total + row.prompt_left > chunk:
                break
            group.append(row)
            total += row.prompt_left
        head = prefilling[0]
        if not group and head.request.pixel_values is not None:
            group = [head]
        if group:
            try:
                self._prefill_fresh(group)
            except Exception as exc:
                self._fail(group, exc)
            return
        n = min(head.prompt_left, chunk)
        if head.request.params.prompt_logprobs is not None:
            n = min(n, PROMPT_LOGPROBS_CHUNK)
        paced = self.prefill_step_ratio is not None and self._step_s is not None and self.prefill_chunk > 0
        paced = paced and any(r.logits is not None for r in self._rows)  # only while streams wait on us
        if paced:
            n = min(n, self._chunk_n)
        started = time.perf_counter()
        try:
            self._prefill_chunk(head, n)
        except Exception as exc:
            self._fail([head], exc)
            return
        if paced:  # a pass of its own: it should take about `prefill_step_ratio` decoding steps
            self._pace(n, time.perf_counter() - started)

    def _pace(self, n: int, extra_s: float) -> None:
        """Resize the paced chunk after `n` prompt tokens cost `extra_s` seconds beside the decoding step."""
        scale = min(2.0, self.prefill_step_ratio * self._step_s / max(extra_s, 1e-6))
        size = int(n * scale)
        if scale >= 1:  # cheap enough; pieces smaller than the chunk (no prompt left to fill it) say no more
            size = max(size, self._chunk_n)
        self._chunk_n = max(MIN_CHUNK, min(self.prefill_chunk, size))

    def _prefill_fresh(self, group: list[_Row]) -> None:
        """Whole prompts of rows with nothing cached yet, left-padded so every row's last token is last."""
        import torch

        n, longest = len(group), max(r.prompt_left for r in group)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        types = torch.zeros((n, longest), dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, row in enumerate(group):
            k = len(row.request.input_ids)
            ids[i, longest - k :] = torch.tensor(row.request.input_ids)
            types[i, longest - k :] = torch.tensor(row.request.token_type_ids)
            mask[i, longest - k :] = 1
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        pixels = [r.request.pixel_values for r in group if r.request.pixel_values is not None]
        if pixels:  # token_type_ids give the image tokens their bidirectional block mask
            inputs["pixel_values"] = torch.cat(pixels).to(self.dtype)
            inputs["token_type_ids"] = types
        keep_all = any(r.request.params.prompt_logprobs is not None for r in group)  # (an image prompt asking)
        logits = self._forward(inputs, group, [r.prompt_left for r in group], keep_all)
        self.stats["batches"] += 1
        for i, row in enumerate(group):
            row.fed = len(row.request.input_ids)
            if keep_all and row.request.params.prompt_logprobs is not None:
                k = len(row.request.input_ids)
                self._prompt_logprobs(row, logits[i, longest - k :])
            self._prompt_done(row, logits[i, -1])

    def _prefill_chunk(self, row: _Row, n: int) -> None:
        """The next `n` prompt tokens of one row, on top of what it has cached."""
        import torch

        start = row.fed
        keep_all = row.request.params.prompt_logprobs is not None
        inputs = {
            "input_ids": torch.tensor([row.request.input_ids[start : start + n]]),
            "attention_mask": torch.ones((1, row.kv.seen + n), dtype=torch.long),
            "position_ids": torch.arange(start, start + n).unsqueeze(0),
        }
        logits = self._forward(inputs, [row], [n], keep_all)
        last = logits[0, -1]
        self.stats["batches"] += 1
        row.fed += n
        if keep_all:
            self._prompt_logprobs(row, logits[0])
        if row.prompt_left == 0:
            self._prompt_done(row, last)

    def _lean_prefills(self, row: _Row) -> bool:
        """Whether the lean pass can take this row's prompt: no images (their bidirectional blocks and the vision
        tower are the model's own forward's) and no prompt logprobs (every position's logits)."""
        r = row.request
        return self._lean is not None and r.pixel_values is None and r.params.prompt_logprobs is None

    def _lean_forward(self, tokens: list[list[int]], rows: list[_Row]) -> Any:
        """The lean pass (lean_decode.py) over `rows`, each with its `tokens[i]` new tokens: last positions' logits."""
        names = self._adapter_kwargs([r.request for r in rows]).get("adapter_names")
        with getattr(self.model, "lock", contextlib.nullcontext()):  # serve's LockedModel: adapters swap
            return self._lean.forward(tokens, [r.kv for r in rows], names)

    def _forward(self, inputs: dict, rows: list[_Row], new: list[int], keep_all: bool) -> Any:
        """One model forward over `rows` (their new tokens are the last `new[i]` positions); returns the logits
        kept: every position's if `keep_all`, else the last one's ([rows, 1, vocab])."""
        import torch

        from toolkit.engine.kv_cache import RaggedCache
        from toolkit.engine.threads import parallel

        cache = RaggedCache([r.kv for r in rows], new)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad(), parallel(self._threads):
            out = self.model(
                **inputs,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if keep_all else 1,
                **self._adapter_kwargs([r.request for r in rows]),
            )
        cache.finish()
        return out.logits

    def _prompt_logprobs(self, row: _Row, logits: Any) -> None:
        """Entries for the prompt tokens just prefilled (`logits` [n, vocab] of their positions)."""
        import torch

        from toolkit.engine.sampling import prompt_logprobs

        ids, k = row.request.input_ids, row.request.params.prompt_logprobs or 0
        n = logits.shape[0]
        start = row.fed - n
        if start == 0:
            row.prompt_lp += prompt_logprobs(logits, ids[:n], k)
        else:  # the first new token is predicted by the previous chunk's last position
            both = torch.cat([row.last_logits, logits])
            row.prompt_lp += prompt_logprobs(both, ids[start - 1 : start + n], k)[1:]
        row.last_logits = logits[-1:]

    def _prompt_done(self, row: _Row, last: Any) -> None:
        r = row.request
        row.last_logits = None
        if r.params.prompt_logprobs is not None:
            r.on_event("prompt_logprobs", row.prompt_lp)
            row.prompt_lp = []
        if r.params.max_tokens <= 0:  # echo-only: the prompt's logprobs were the answer
            r.on_event("done", ("length", None))
            self._release(row)
            return
        row.logits = last

    # ------------------------------------------------------------------------------------------------ decode
    def _step(self, rows: list[_Row], pieces: list[tuple[_Row, int]] = (), paced: bool = False) -> None:
        """Sample one token for every decoding row, report it, drop finished rows, then one forward over the rows
        that go on and the prompt `pieces` (lean pass only: `(row, n)`, its next n prompt tokens; `paced`: their
        size follows the pacing, which this pass's time then resizes)."""
        import torch

        from toolkit.engine.sampling import sample

        started = time.perf_counter()
        live = []
        for row in rows:
            if self._finish_if_cancelled(row.request):
                self._release(row)
            else:
                live.append(row)
        from toolkit.engine.threads import PARALLEL_ELEMENTS, parallel

        keep = []
        try:
            if live:
                # one row: its logits as they are (a view; sample copies before it edits), not a copy of the
                # vocabulary's row made when the head's weights just left every cache cold
                logits = live[0].logits.unsqueeze(0) if len(live) == 1 else torch.stack([r.logits for r in live])
                with parallel(self._threads, logits.numel() >= PARALLEL_ELEMENTS):
                    tokens, logprobs = sample(logits, [r.state for r in live], self.stop_ids)
        except Exception as exc:  # e.g. a constraint that fails: its rows get the error, the engine goes on
            self._fail(live, exc)
            live = []
        for row, token, lp in zip(live, tokens, logprobs, strict=True) if live else ():
            r = row.request
            if token in row.state.stop_ids(self.stop_ids):
                if lp is not None:  # the stop token was generated: its log probability too (as vLLM reports it)
                    r.on_event("logprobs", lp)
                r.on_event("done", ("stop", token))
                self._release(row)
                continue
            if lp is not None:
                r.on_event("logprobs", lp)
            r.on_event("token", token)
            self.stats["completion_tokens"] += 1
            if r.params.constraint is not None and r.params.constraint.is_done():
                r.on_event("done", ("stop", None))
                self._release(row)
            elif row.state.produced >= r.params.max_tokens:
                r.on_event("done", ("length", None))
                self._release(row)
            else:
                keep.append((row, token))
        if self.on_events is not None and live:
            self.on_events()
        if not keep and not pieces:
            return
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(keep))
        self.stats["steps"] += bool(keep)
        if self._lean is not None:  # lean rows never pad each other: one pass, prompt pieces included
            self._lean_pass(keep, pieces)
        else:
            for group in _decode_groups(keep):
                self._decode(group)
        took = time.perf_counter() - started
        if not pieces:
            self._step_s = took if self._step_s is None else 0.8 * self._step_s + 0.2 * took
        elif paced and keep:  # the pieces' share of the pass: about `prefill_step_ratio` steps
            self._pace(sum(n for _, n in pieces), took - self._step_s)

    def _lean_pass(self, keep: list[tuple[_Row, int]], pieces: list[tuple[_Row, int]]) -> None:
        """One lean forward: each decoding row's sampled token and each piece's prompt tokens (lean_decode.py)."""
        rows = [row for row, _ in keep] + [row for row, _ in pieces]
        tokens = [[t] for _, t in keep] + [row.request.input_ids[row.fed : row.fed + n] for row, n in pieces]
        try:
            logits = self._lean_forward(tokens, rows)
        except Exception as exc:
            self._fail(rows, exc)
            return
        for i, (row, _) in enumerate(keep):
            row.logits = logits[i]
        if pieces:
            self.stats["batches"] += 1
        for j, (row, n) in enumerate(pieces, start=len(keep)):
            row.fed += n
            if row.prompt_left == 0:
                self._prompt_done(row, logits[j])

    def _decode(self, keep: list[tuple[_Row, int]]) -> None:
        """One decoding forward of the model's own over `keep` (rows and the token each just sampled), rows
        left-padded to the longest; sets each row's next logits. Only without the lean pass."""
        import torch

        batch = [row for row, _ in keep]
        past = max(row.kv.seen for row in batch)
        seen = torch.tensor([row.kv.seen for row in batch])
        inputs = {
            "input_ids": torch.tensor([[t] for _, t in keep]),
            # left padding: row i's tokens are the last seen_i of the `past` columns, then the new one
            "attention_mask": (torch.arange(past + 1).unsqueeze(0) >= (past - seen).unsqueeze(1)).long(),
            "position_ids": seen.unsqueeze(1),
        }
        try:
            logits = self._forward(inputs, batch, [1] * len(batch), False)[:, -1]
        except Exception as exc:
            self._fail(batch, exc)
            return
        for i, row in enumerate(batch):
            row.logits = logits[i]

    def _adapter_kwargs(self, requests: list[Request]) -> dict:
        if not hasattr(self.model, "peft_config"):
            return {}
        return {"adapter_names": [r.adapter or BASE_ADAPTER for r in requests]}


def check_admissible(request: Request, layout: Any, kv_budget: int | None, waiting: int, max_queue: int) -> None:
    """Raise what `Engine.submit` raises for a request that cannot be queued: an empty prompt, RequestTooLarge for
    one the KV budget can never hold, QueueFull. Shared with the server's handle on an engine in another process."""
    if not request.input_ids:
        raise ToolkitError("the prompt has no tokens", where="prompt", fix="send at least one token")
    need = layout.reserve_bytes(request.token_limit)
    if kv_budget is not None and need > kv_budget:
        tokens = len(request.input_ids) + request.params.max_tokens
        raise RequestTooLarge(
            f"the prompt ({len(request.input_ids)} tokens) plus up to {request.params.max_tokens} generated tokens "
            f"needs {need / 2**30:.3f} GB of KV cache ({tokens} tokens); the engine's budget is "
            f"{kv_budget / 2**30:.3f} GB",
            where="prompt/max tokens",
            fix="send a shorter prompt or ask for fewer tokens, or start the server with a larger --kv-cache-gb",
        )
    if waiting >= max_queue:
        raise QueueFull(f"{waiting} requests are already waiting")


def _decode_groups(rows: list[tuple[_Row, int]]) -> list[list[tuple[_Row, int]]]:
    """The decoding rows in one group, or in two by cached length when one long row would pad the others.

    Why by hand: attention in the full-attention layers runs over every row padded to the longest row's length
    (transformers has no variable-length attention for Gemma 3 on CPU), so one 30k-token row among 15 short ones
    made each step ~16x the short rows' work (measured: 326 ms vs 25 ms on the tiny 32k base). Splitting at the
    cut that holds the fewest padded slots costs one more forward, so it is done only when it saves more than
    DECODE_SPLIT_SLOTS slots.
    """
    if len(rows) < 2:
        return [rows]
    order = sorted(rows, key=lambda rt: rt[0].kv.seen)
    seen = [row.kv.seen for row, _ in order]
    whole = len(seen) * seen[-1]
    cost, cut = min((i * seen[i - 1] + (len(seen) - i) * seen[-1], i) for i in range(1, len(seen)))
    if whole - cost < DECODE_SPLIT_SLOTS:
        return [rows]
    return [order[:cut], order[cut:]]
