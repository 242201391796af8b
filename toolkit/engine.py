"""Generation on a loaded base: token ids in, token ids out. No HTTP and no chat template here.

`generate_greedy` runs one prompt through transformers' `generate` (the reference). `Engine` serves many:
a background thread takes the requests waiting in a bounded queue (up to `max_batch` at a time), left-pads
them into one batch, runs one prefill and then a shared decode loop in which every row keeps its own adapter
(peft mixed-adapter batches), temperature, top-p, presence/frequency penalties, seed, token budget and stop
tokens. Rows that finish or are cancelled leave the batch at once (their KV cache rows are dropped); requests
that arrive meanwhile wait for the next batch (dynamic batching; step-level continuous batching is future work).
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    ) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.pad_id, self.stop_ids = pad_id, set(stop_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self._queue: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self.stats = {"batches": 0, "requests": 0, "cancelled": 0, "max_batch_seen": 0, "active": 0}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
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
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            live = [r for r in batch if not r.cancelled.is_set()]
            for r in batch:
                if r.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    r.on_event("done", ("cancelled", None))
            if live:
                try:
                    self._generate(live)
                except Exception as exc:  # a failing batch must not kill the engine; its requests get the error
                    for r in live:
                        r.on_event("error", exc)

    def _generate(self, batch: list[Request]) -> None:
        import torch

        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        self.stats["active"] = len(batch)
        n, longest = len(batch), max(len(r.input_ids) for r in batch)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        types = torch.zeros((n, longest), dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's last prompt token is in the last column
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
        adapters = [r.adapter or BASE_ADAPTER for r in batch]
        extra = {"adapter_names": adapters} if self._is_peft() else {}
        gens = []
        for r in batch:
            g = torch.Generator(device="cpu")
            g.manual_seed(r.params.seed if r.params.seed is not None else secrets.randbits(63))
            gens.append(g)
        counts = [dict() for _ in batch]
        produced = [0] * n
        rows = list(range(n))  # positions in `batch` of the rows still in the tensors
        with torch.no_grad():
            out = self.model(**inputs, use_cache=True, **extra)
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            positions = inputs["position_ids"][:, -1]
            attn = inputs["attention_mask"]
            while rows:
                next_tokens, keep = [], []
                for j, b in enumerate(rows):
                    r = batch[b]
                    if r.cancelled.is_set():
                        self.stats["cancelled"] += 1
                        r.on_event("done", ("cancelled", None))
                        continue
                    token = self._sample(logits[j], r.params, counts[b], gens[b])
                    produced[b] += 1
                    counts[b][token] = counts[b].get(token, 0) + 1
                    if token in self.stop_ids:
                        r.on_event("done", ("stop", token))
                        continue
                    r.on_event("token", token)
                    if produced[b] >= r.params.max_tokens:
                        r.on_event("done", ("length", None))
                        continue
                    next_tokens.append(token)
                    keep.append(j)
                if not keep:
                    break
                if len(keep) < len(rows):  # drop finished rows from every tensor and the KV cache
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    attn, positions = attn[index], positions[index]
                    rows = [rows[j] for j in keep]
                    adapters = [adapters[j] for j in keep]
                    if extra:
                        extra = {"adapter_names": adapters}
                self.stats["active"] = len(rows)
                attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=attn.dtype, device=self.device)], dim=1)
                positions = positions + 1
                step = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
                out = self.model(
                    input_ids=step,
                    attention_mask=attn,
                    position_ids=positions.unsqueeze(1),
                    past_key_values=cache,
                    use_cache=True,
                    **extra,
                )
                cache, logits = out.past_key_values, out.logits[:, -1, :]
        self.stats["active"] = 0

    def _is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

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
