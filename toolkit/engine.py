"""Generation on a loaded base: token ids in, token ids out. No HTTP and no chat template here.

`generate_greedy` runs one prompt through transformers' `generate` (the reference). `Engine` serves many:
a background thread takes the requests waiting in a bounded queue (up to `max_batch` at a time), left-pads
them into one batch, runs one prefill and then a shared decode loop in which every row keeps its own adapter
(peft mixed-adapter batches), temperature, top-p, presence/frequency penalties, seed, token budget and stop
tokens. Rows that finish or are cancelled leave the batch at once (their KV cache rows are dropped); requests
that arrive meanwhile are prefilled and join the running batch between two decoding steps (step-level
continuous batching).
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toolkit import constants as C

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


def generate_greedy(base: Any, inputs: dict, *, max_new_tokens: int = 32) -> list[int]:
    """Greedy continuation of one encoded prompt (a dict of tensors, batch of one).

    Stops on the base's stop tokens (<end_of_turn>, <eos>); returns the new token ids without the stop token.
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


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)


@dataclass
class Request:
    """One sequence to generate. `on_event(kind, value)` is called from the engine thread:
    ("token", id) for each new token, then ("done", (finish_reason, stop_token_or_None))."""

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
        max_queue: int = 64,
        batch_wait_s: float = 0.01,
        start: bool = True,
    ) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        if hasattr(model, "peft_config"):  # rows carry their adapter: the 4-bit LoRA layers must accept that
            from toolkit.adapters import enable_mixed_adapter_batches

            enable_mixed_adapter_batches()
        self.pad_id, self.stop_ids = pad_id, set(stop_ids)
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self._queue: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self.stats = {"batches": 0, "requests": 0, "cancelled": 0, "max_batch_seen": 0, "active": 0}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
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
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting")
        self._queue.put(request)
        return request

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------------ thread
    def _run(self) -> None:
        running: _Batch | None = None
        while not self._stop.is_set():
            if running is None:  # idle: block for work, then gather what arrives together
                try:
                    first = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                new = self._gather(first)
            else:  # between decoding steps: whoever waits joins the running batch while there is room
                new = self._take(self.max_batch - len(running.requests))
            new = self._drop_cancelled(new)
            if new:
                try:
                    joined = self._prefill(new)
                    running = joined if running is None else running.merge(joined)
                except Exception as exc:  # a failing prefill must not kill the engine; its requests get the error
                    for r in new:
                        r.on_event("error", exc)
            if running is not None:
                try:
                    running = self._step(running)
                except Exception as exc:
                    for r in running.requests:
                        r.on_event("error", exc)
                    running = None
            self.stats["active"] = 0 if running is None else len(running.requests)

    def _take(self, room: int) -> list[Request]:
        taken: list[Request] = []
        while len(taken) < room:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

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

    def _finish_if_cancelled(self, r: Request) -> bool:
        cancelled = r.cancelled.is_set()  # read once: it may be set from another thread at any moment
        if cancelled:
            self.stats["cancelled"] += 1
            r.on_event("done", ("cancelled", None))
        return cancelled

    def _drop_cancelled(self, requests: list[Request]) -> list[Request]:
        return [r for r in requests if not self._finish_if_cancelled(r)]

    def _prefill(self, batch: list[Request]) -> _Batch:
        """One forward pass over the new prompts, left-padded so every row's last prompt token is last."""
        import torch

        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        n, longest = len(batch), max(len(r.input_ids) for r in batch)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        types = torch.zeros((n, longest), dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(batch):
            k = len(r.input_ids)
            ids[i, longest - k :] = torch.tensor(r.input_ids)
            types[i, longest - k :] = torch.tensor(r.token_type_ids)
            mask[i, longest - k :] = 1
        pixels = [r.pixel_values for r in batch if r.pixel_values is not None]
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.dtype)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        gens = []
        for r in batch:
            g = torch.Generator(device="cpu")
            g.manual_seed(r.params.seed if r.params.seed is not None else secrets.randbits(63))
            gens.append(g)
        with torch.no_grad():
            out = self.model(**inputs, use_cache=True, **self._adapter_kwargs(batch))
        return _Batch(
            requests=list(batch),
            cache=out.past_key_values,
            logits=out.logits[:, -1, :],
            attn=inputs["attention_mask"],
            positions=inputs["position_ids"][:, -1],
            gens=gens,
            counts=[{} for _ in batch],
            produced=[0] * n,
        )

    def _step(self, b: _Batch) -> _Batch | None:
        """Sample one token for every row, report it, drop finished rows, run one decoding forward pass."""
        import torch

        next_tokens, keep = [], []
        for j, r in enumerate(b.requests):
            if self._finish_if_cancelled(r):
                continue
            token = self._sample(b.logits[j], r.params, b.counts[j], b.gens[j])
            b.produced[j] += 1
            b.counts[j][token] = b.counts[j].get(token, 0) + 1
            if token in self.stop_ids and not r.params.ignore_eos:
                r.on_event("done", ("stop", token))
                continue
            r.on_event("token", token)
            if b.produced[j] >= r.params.max_tokens:
                r.on_event("done", ("length", None))
                continue
            next_tokens.append(token)
            keep.append(j)
        if not keep:
            return None
        if len(keep) < len(b.requests):
            b.select(keep)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(b.requests))
        b.attn = torch.cat([b.attn, torch.ones((len(keep), 1), dtype=b.attn.dtype, device=b.attn.device)], dim=1)
        b.positions = b.positions + 1
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor(next_tokens, device=b.attn.device).unsqueeze(1),
                attention_mask=b.attn,
                position_ids=b.positions.unsqueeze(1),
                past_key_values=b.cache,
                use_cache=True,
                **self._adapter_kwargs(b.requests),
            )
        b.cache, b.logits = out.past_key_values, out.logits[:, -1, :]
        return b

    def _adapter_kwargs(self, requests: list[Request]) -> dict:
        if not hasattr(self.model, "peft_config"):
            return {}
        return {"adapter_names": [r.adapter or BASE_ADAPTER for r in requests]}

    @staticmethod
    def _sample(logits: Any, p: SamplingParams, counts: dict, gen: Any) -> int:
        import torch

        logits = logits.float().cpu()
        if counts and (p.presence_penalty or p.frequency_penalty):  # OpenAI's definition of both penalties
            idx = torch.tensor(list(counts))
            freq = torch.tensor([counts[t] for t in counts], dtype=logits.dtype)
            logits[idx] -= p.presence_penalty + p.frequency_penalty * freq
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > p.top_p  # keep the smallest set reaching top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=gen))


@dataclass
class _Batch:
    """The rows being decoded together: tensors and per-row state, index-aligned with `requests`."""

    requests: list[Request]
    cache: Any  # transformers DynamicCache
    logits: Any  # [rows, vocab]: the next token's
    attn: Any  # [rows, columns]: 0 on left padding
    positions: Any  # [rows]: the position of each row's last token
    gens: list
    counts: list[dict]
    produced: list[int]

    def select(self, keep: list[int]) -> None:
        import torch

        index = torch.tensor(keep, device=self.attn.device)
        self.cache.batch_select_indices(index)
        self.attn, self.positions = self.attn[index], self.positions[index]
        for name in ("requests", "gens", "counts", "produced"):
            setattr(self, name, [getattr(self, name)[j] for j in keep])

    def merge(self, other: _Batch) -> _Batch:
        """Append `other`'s rows (fresh from prefill) to this batch.

        Written by hand because transformers has no batch-join for a DynamicCache: both caches are left-padded
        to a common width, so every row's newest token stays in the last column and the attention mask hides
        the padding. Sliding-window layers keep at most window-1 columns and count what they have seen.
        """
        import torch
        import torch.nn.functional as F

        width = max(self.attn.shape[1], other.attn.shape[1])

        def pad(t: Any, to: int) -> Any:
            return F.pad(t, (0, 0, to - t.shape[-2], 0))

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if getattr(mine, "is_sliding", False):
                seen = max(mine.cumulative_length, theirs.cumulative_length)
                to = min(seen, mine.sliding_window - 1)
                mine.cumulative_length = seen
            else:
                to = width
            mine.keys = torch.cat([pad(mine.keys, to), pad(theirs.keys, to)])
            mine.values = torch.cat([pad(mine.values, to), pad(theirs.values, to)])
        self.attn = torch.cat([F.pad(a, (width - a.shape[1], 0)) for a in (self.attn, other.attn)])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])
        for name in ("requests", "gens", "counts", "produced"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self
