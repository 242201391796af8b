"""The batching engine in-process: rows that join a running batch decode exactly as they would alone."""

from __future__ import annotations

import threading

import pytest

from toolkit import chat
from toolkit.engine import Engine, Request, SamplingParams, generate_greedy
from toolkit.schema import parse_messages


def _prompt(base, text: str):
    return chat.encode_prompt(
        base.processor, parse_messages([{"role": "user", "content": text}], purpose="request", where="test"), []
    )


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish = None
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, kind, value) -> None:
        if kind == "token":
            self.tokens.append(value)
            if len(self.tokens) == 3:
                self.first.set()
        elif kind == "error":
            self.finish = value
            self.done.set()
        else:
            self.finish = value
            self.done.set()


def _submit(engine, prompt, max_tokens, on_event):
    return engine.submit(
        Request(
            prompt.input_ids, prompt.token_type_ids, None, None, SamplingParams(max_tokens, temperature=0), on_event
        )
    )


@pytest.mark.parametrize("window", [None, 8])
def test_a_request_joining_mid_generation_decodes_as_if_alone(base, window):
    """B arrives while A is decoding: it is prefilled, merged into A's KV cache (left-padded) and both keep
    producing HF generate's greedy tokens. window=8 makes the sliding-window layers truncate their cache."""
    old = base.model.config.get_text_config().sliding_window
    if window:
        base.model.config.get_text_config().sliding_window = window
    try:
        long, short = _prompt(base, "Tell me about the sea and the ships on it."), _prompt(base, "Hi")
        expected = [
            generate_greedy(base, p.tensors(), max_new_tokens=24) for p in (long, short)
        ]  # the reference: transformers' own generate, one prompt at a time
        engine = Engine(base.model, device="cpu", dtype=base.dtype, pad_id=0, stop_ids=[1, 106], batch_wait_s=0)
        a, b = Collector(), Collector()
        _submit(engine, long, 24, a)
        assert a.first.wait(60)  # A is decoding
        _submit(engine, short, 24, b)
        assert a.done.wait(60) and b.done.wait(60)
        engine.close()
    finally:
        base.model.config.get_text_config().sliding_window = old
    assert not isinstance(a.finish, Exception) and not isinstance(b.finish, Exception), (a.finish, b.finish)
    assert a.tokens == expected[0] and b.tokens == expected[1]
    assert engine.stats["batches"] == 2 and engine.stats["max_batch_seen"] == 2  # two prefills, one shared decode
