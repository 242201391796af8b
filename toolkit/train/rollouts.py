"""GRPO's rollouts: completions sampled by the serving engine (engine/engine.py) on the adapter being trained.

The engine runs the live peft model: the same LoRA modules the optimizer updates, read at every step (no merge, no
copy, no weight sync: lean_decode adds each LoRA as it stands). A rollout batch goes in as one continuous batch
(every completion of every prompt of the batch at once, each row with its own seed), in eval mode (no dropout)
and without gradients; each row's KV storage is freed as it finishes, so none is held during the backward pass.
The image soft token is never sampled (an image's tokens come from the vision tower, never from the LM head), and
rows stop at Gemma 3's stop ids, which end the completion as TRL's own generation leaves them (stop token kept).
Each sampled token comes with its log-probability at the rollout temperature: what the training forward computes
for the same token (tests/train/test_grpo.py checks the two agree).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from toolkit import constants as C


@dataclass
class Rollout:
    """One completion: its tokens (the stop token last when it stopped), their log-probabilities, why it ended."""

    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = ""  # "stop" or "length"


@dataclass
class RolloutSettings:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class RolloutEngine:
    """The serving engine on the model being trained, started once and reused for every rollout batch."""

    def __init__(self, model: Any, tokenizer: Any, settings: RolloutSettings, max_batch: int) -> None:
        import torch

        from toolkit.engine.engine import Engine

        self.model, self.settings = model, settings
        dtype = model.get_input_embeddings().weight.dtype
        device = str(next(model.parameters()).device)
        stops = model.generation_config.eos_token_id or list(C.STOP_TOKEN_IDS)
        self.stop_ids = [stops] if isinstance(stops, int) else list(stops)
        image_token = tokenizer.convert_tokens_to_ids(C.IMAGE_SOFT_TOKEN)
        self.banned = {image_token: float("-inf")} if isinstance(image_token, int) and image_token >= 0 else {}
        self.threads = torch.get_num_threads()
        self.engine = Engine(
            model,
            device=device,
            dtype=dtype,
            pad_id=tokenizer.pad_token_id,
            stop_ids=self.stop_ids,
            max_batch=max_batch,
            max_queue=max_batch + 1,
            prefill_step_ratio=None,  # nothing streams to a client: whole prompts, fixed passes
        )
        self.stats = {"seconds": 0.0, "tokens": 0, "last_seconds": 0.0, "last_tokens": 0}

    def generate(self, prompts: list[Any], seeds: list[int], adapter: str | None = "default") -> list[Rollout]:
        """One completion per encoded prompt (template.Encoded), sampled with its seed, all in one batch."""
        import torch

        from toolkit.engine.engine import Request, SamplingParams

        s = self.settings
        out = [Rollout() for _ in prompts]
        errors: list[Exception] = []
        left = threading.Semaphore(0)

        def collector(r: Rollout):
            def on_event(kind: str, value: Any) -> None:
                if kind == "logprobs":
                    r.logprobs.append(value.logprob)
                elif kind == "token":
                    r.completion_ids.append(value)
                elif kind == "done":
                    reason, stop_token = value
                    if stop_token is not None:
                        r.completion_ids.append(stop_token)
                    r.finish = reason
                    left.release()
                elif kind == "error":
                    errors.append(value)
                    left.release()

            return on_event

        was_training = self.model.training
        self.model.eval()  # no dropout in the rollouts (peft's per-row adapters also need eval mode)
        t0 = time.perf_counter()
        try:
            for prompt, seed, r in zip(prompts, seeds, out, strict=True):
                params = SamplingParams(
                    max_tokens=s.max_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    seed=seed,
                    logprobs=0,
                    logprobs_at_temperature=True,
                    logit_bias=dict(self.banned),
                )
                request = Request(prompt.input_ids, prompt.token_type_ids, prompt.pixel_values, adapter, params, None)
                request.on_event = collector(r)
                self.engine.submit(request)
            for _ in prompts:
                left.acquire()
            while self.engine.running and not errors:  # the last rows' storage is released right after "done"
                time.sleep(0.0002)
        finally:
            self.model.train(was_training)
            # the engine's thread works on one intra-op thread; it gives the rest back once idle, and the
            # backward pass must not start before that (torch's thread count is process-wide)
            torch.set_num_threads(self.threads)
        if errors:
            raise errors[0]
        seconds, tokens = time.perf_counter() - t0, sum(len(r.completion_ids) for r in out)
        self.stats.update(last_seconds=seconds, last_tokens=tokens)
        self.stats["seconds"] += seconds
        self.stats["tokens"] += tokens
        return out

    def close(self) -> None:
        self.engine.close()
