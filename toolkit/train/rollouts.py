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

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from toolkit import constants as C

# Share of the free memory (RAM on a CPU, the GPU's on CUDA) the 4-bit layers' dense weights may take during a
# rollout (_dense_weights): the 270M's take ~0.4 GB in float32, the 27B's 54 GB in bfloat16 (then the kernel's own
# per-call dequantisation stays)
DENSE_SHARE = 0.25


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

        out = [Rollout() for _ in prompts]
        was_training = self.model.training
        self.model.eval()  # no dropout in the rollouts (peft's per-row adapters also need eval mode)
        t0 = time.perf_counter()
        try:
            with _dense_weights(self.model):
                self._sample(prompts, seeds, out, adapter)
        finally:
            self.model.train(was_training)
            # the engine's thread works on one intra-op thread; it gives the rest back once idle, and the backward
            # pass must not start before that (torch's thread count is process-wide)
            torch.set_num_threads(self.threads)
        seconds, tokens = time.perf_counter() - t0, sum(len(r.completion_ids) for r in out)
        self.stats.update(last_seconds=seconds, last_tokens=tokens)
        self.stats["seconds"] += seconds
        self.stats["tokens"] += tokens
        return out

    def _sample(self, prompts: list[Any], seeds: list[int], out: list[Rollout], adapter: str | None) -> None:
        """Submit every prompt, wait for every row to finish and free its KV storage."""
        from toolkit.engine.engine import Request, SamplingParams

        s = self.settings
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
        if errors:
            raise errors[0]

    def close(self) -> None:
        self.engine.close()


@contextlib.contextmanager
def _dense_weights(model: Any) -> Iterator[bool]:
    """During one rollout batch, each 4-bit layer's weight dequantised once and its base op a plain matmul.

    Why: the trainable 4-bit kernel (the base is loaded for training) dequantises its whole weight on every call, and
    a rollout calls every layer once per decoding step: on the tiny base that was most of a step (cProfile: 1.4 s of
    3.8 s in dequantize_weight for 8 rows x 64 tokens). The engine's lean step calls a layer's `lean_op` when it has
    one (gptq_backend gives the inference kernels one); here each layer gets `x @ W (+ bias)` over its weight as the
    training forward dequantises it, the very matmul that forward runs, in the dtype it runs it in (a float32 model
    on the torch_fused kernel multiplies in bfloat16: gptq_backend.training_matmul_dtype). The dense copies exist
    only during the rollout, and only when they fit DENSE_SHARE of the free memory (else nothing changes)."""
    import torch

    from toolkit.base.gptq_backend import training_matmul_dtype

    layers = [m for m in model.modules() if hasattr(m, "dequantize_weight") and hasattr(m, "qweight")]
    if not layers or getattr(layers[0], "lean_op", None) is not None:
        yield False  # not 4-bit, or an inference kernel that has its own op
        return
    dtype = model.get_input_embeddings().weight.dtype  # the activations' (the kernel casts its weight to it too)
    need = sum(m.in_features * m.out_features for m in layers) * torch.finfo(dtype).bits // 8
    if need > DENSE_SHARE * _free_bytes(layers[0].qweight.device):
        yield False
        return
    with torch.no_grad():
        for m in layers:
            compute = training_matmul_dtype(m, dtype)
            m.lean_op = _matmul_op(m.dequantize_weight().to(compute), m.bias)
    try:
        yield True
    finally:
        for m in layers:
            del m.lean_op


def _matmul_op(weight: Any, bias: Any) -> Any:
    """`x @ weight (+ bias)` in the weight's dtype, the result in x's (the layer's own forward's order)."""
    import torch

    def op(x: Any) -> Any:
        out = torch.matmul(x.to(weight.dtype), weight)
        if bias is not None:
            out.add_(bias)
        return out.to(x.dtype)

    return op


def _free_bytes(device: Any) -> int:
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
