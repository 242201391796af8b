"""The batching engine in-process: rows that join a running batch decode exactly as they would alone."""

from __future__ import annotations

import threading

import pytest

from toolkit.data import template as chat
from toolkit.data.schema import parse_messages
from toolkit.engine.engine import Engine, Request, SamplingParams, _Row, generate_greedy


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


def test_run_here_runs_the_loop_on_the_calling_thread_with_the_same_tokens(base, monkeypatch):
    """`toolkit serve`'s engine process may run the loop on its main thread (Engine.run_here): the same greedy
    tokens as transformers' generate, the lean step told that it is on the main thread (its row gate), and the loop
    ends with `close` called from an event. The tiny base does not prefer it (no projection big enough to split per
    row); with the gate lowered here, every projection splits over threads, with the same tokens."""
    import toolkit.engine.lean_decode as lean_decode

    prompts = [_prompt(base, "Tell me about the sea and the ships on it."), _prompt(base, "Hi")]
    expected = [generate_greedy(base, p.tensors(), max_new_tokens=12) for p in prompts]
    engine = Engine(
        base.model, device="cpu", dtype=base.dtype, pad_id=0, stop_ids=[1, 106], batch_wait_s=0, start=False
    )
    assert not engine.prefers_main_thread  # the tiny base's widest projection is below PARALLEL_MATMUL_MAIN
    monkeypatch.setattr(lean_decode, "PARALLEL_MATMUL_MAIN", 1)
    assert engine.prefers_main_thread and engine._lean.row_gate is None
    got = [Collector(), Collector()]
    left = [2]
    threads = set()

    def on_event(c):
        def on(kind, value):
            threads.add(threading.get_ident())
            c(kind, value)
            if kind in ("done", "error"):
                left[0] -= 1
                if not left[0]:
                    engine.close()  # from the loop itself: it ends after this round

        return on

    for prompt, c in zip(prompts, got, strict=True):
        _submit(engine, prompt, 12, on_event(c))
    engine.run_here()
    assert threads == {threading.get_ident()} and not engine.alive
    assert engine._lean.row_gate == 1  # every projection now splits: the same tokens still
    assert [c.tokens for c in got] == expected


# ------------------------------------------------------------------------------------- long prompts, budget
def _ids(n: int, seed: int) -> list[int]:
    """A prompt of n token ids (bos + random ids of the tiny vocabulary): content does not matter here."""
    import random

    rng = random.Random(seed)
    return [2] + [rng.randrange(200, 1700) for _ in range(n - 1)]


def _reference(base, ids: list[int], max_tokens: int) -> list[int]:
    import torch

    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}
    return generate_greedy(base, inputs, max_new_tokens=max_tokens)


def _submit_ids(engine, ids: list[int], max_tokens: int, **params) -> Collector:
    c = Collector()
    engine.submit(Request(ids, [0] * len(ids), None, None, SamplingParams(max_tokens, temperature=0, **params), c))
    return c


def _wait(*collectors: Collector) -> None:
    for c in collectors:
        assert c.done.wait(180)
        assert not isinstance(c.finish, Exception), c.finish


@pytest.mark.parametrize("chunk", [0, 256])
def test_prompts_past_the_sliding_window_decode_as_generate_does(base, chunk):
    """A 1,500-token prompt (past the 1,024-token window of the sliding layers) beside a short one, prefilled
    whole (chunk 0) or in chunks of 256 that cross the window's edge: HF generate's greedy tokens for both."""
    long, short = _ids(1500, 1), _ids(30, 2)
    expected = [_reference(base, p, 12) for p in (long, short)]
    engine = Engine.for_base(base, prefill_chunk=chunk, prefill_step_ratio=None, start=False)  # fixed chunks
    got = [_submit_ids(engine, p, 12) for p in (long, short)]
    engine.start()
    try:
        _wait(*got)
    finally:
        engine.close()
    assert [c.tokens for c in got] == expected
    # chunk 0: one prefill of both; 256: the short prompt first (it fits a chunk), then 6 chunks of the long one
    assert engine.stats["batches"] == (1 if chunk == 0 else 1 + 6)
    assert engine.stats["prompt_tokens"] == 1530 and engine.stats["running"] == 0


class Events:
    """Every event of one request, in order; optional `probe()` called at each token (on the engine thread)."""

    def __init__(self, probe=None) -> None:
        self.events: list[tuple[str, object]] = []
        self.probe, self.seen = probe, []
        self.done = threading.Event()

    def __call__(self, kind, value) -> None:
        self.events.append((kind, value))
        if kind == "token" and self.probe:
            self.seen.append(self.probe())
        if kind in ("done", "error"):
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [v for k, v in self.events if k == "token"]


def _request(ids, on_event, max_tokens, **params) -> Request:
    return Request(ids, [0] * len(ids), None, None, SamplingParams(max_tokens, temperature=0, **params), on_event)


def test_kv_budget_refuses_what_never_fits_and_queues_what_fits_later(base):
    """Budget for one 600-token row, not two: a 1,200-token request is refused at submit (RequestTooLarge, the
    server's 400), two 600-token ones run one after the other (never both held), with generate's tokens."""
    from toolkit.engine.engine import RequestTooLarge
    from toolkit.engine.kv_cache import KVLayout

    a, b = _ids(600, 3), _ids(600, 4)
    one = KVLayout.of(base.model, base.dtype).reserve_bytes(600 + 8)
    engine = Engine.for_base(base, kv_cache_gb=1.5 * one / 2**30, start=False)
    with pytest.raises(RequestTooLarge, match=r"needs .* GB of KV cache .* budget is .*--kv-cache-gb"):
        engine.submit(_request(_ids(1200, 5), print, 8))
    probe = lambda: (engine.stats["running"], engine.stats["kv_bytes_used"])  # noqa: E731
    ea, eb = Events(probe), Events(probe)
    engine.submit(_request(a, ea, 8, ignore_eos=True))
    engine.submit(_request(b, eb, 8, ignore_eos=True))
    engine.start()
    try:
        assert ea.done.wait(120) and eb.done.wait(120)
    finally:
        engine.close()
    assert max(running for running, _ in ea.seen + eb.seen) == 1  # b waited for a's storage to be freed
    assert 0 < max(used for _, used in ea.seen + eb.seen) <= engine.stats["kv_bytes_budget"]
    assert len(ea.tokens) == len(eb.tokens) == 8 and engine.stats["requests"] == 2


def test_prompt_logprobs_come_from_the_chunked_prefill(base):
    """max_tokens 0 + prompt_logprobs (an echo-only completion): one prompt_logprobs event, then done "length"
    and no token. The prefill runs in chunks of 128 positions; each entry equals the log-softmax of transformers'
    own forward over the same chunks with its DynamicCache, and a single whole forward's within 0.05 (the 4-bit
    kernel sums a 128-row chunk differently from a 300-row one; a bfloat16 model, as on AVX512-BF16 CPUs, rounds
    logits near -11 to steps of 0.0625, so there within two such steps)."""
    import torch
    from transformers import DynamicCache

    ids = _ids(300, 6)
    with torch.no_grad():
        whole = torch.log_softmax(base.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        cache, chunks = DynamicCache(config=base.model.config.get_text_config()), []
        for start in range(0, 300, 128):
            out = base.model(input_ids=torch.tensor([ids[start : start + 128]]), past_key_values=cache, use_cache=True)
            chunks.append(out.logits[0].float())
        ref = torch.log_softmax(torch.cat(chunks), dim=-1)
    engine = Engine.for_base(base)
    ev = Events()
    try:
        engine.submit(_request(ids, ev, 0, prompt_logprobs=2))
        assert ev.done.wait(120)
    finally:
        engine.close()
    assert [k for k, _ in ev.events] == ["prompt_logprobs", "done"] and ev.events[1][1] == ("length", None)
    entries = ev.events[0][1]
    assert len(entries) == 300 and entries[0] is None
    for i in range(1, 300):
        e = entries[i]
        assert e.token == ids[i] and e.logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-5)
        assert abs(e.logprob - float(whole[i - 1, ids[i]])) < (0.05 if base.dtype == torch.float32 else 0.13)
        assert torch.equal(ref[i - 1][[t for t, _ in e.top]], ref[i - 1].topk(2).values)  # (ties: in any order)
    assert engine.stats["batches"] == 3  # 128 + 128 + 44 positions


class _TwoTokens:
    """A constraint that allows exactly tokens[0], then tokens[1], then is complete."""

    def __init__(self, tokens: list[int], vocab: int) -> None:
        self.tokens, self.vocab, self.i = tokens, vocab, 0

    def allowed(self):
        import torch

        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[self.tokens[min(self.i, 1)]] = True
        return mask

    def accept(self, token: int) -> None:
        self.i += 1

    def is_done(self) -> bool:
        return self.i >= 2


def test_logprobs_precede_each_token_and_a_complete_constraint_stops_the_row(base):
    vocab = base.model.config.get_text_config().vocab_size
    engine = Engine.for_base(base)
    ev = Events()
    try:
        engine.submit(_request(_ids(20, 7), ev, 10, logprobs=1, constraint=_TwoTokens([500, 600], vocab)))
        assert ev.done.wait(60)
    finally:
        engine.close()
    kinds = [k for k, _ in ev.events]
    assert kinds == ["logprobs", "token", "logprobs", "token", "done"] and ev.tokens == [500, 600]
    assert ev.events[-1][1] == ("stop", None)
    for (_, lp), (_, token) in zip(ev.events[0:4:2], ev.events[1:4:2], strict=True):
        assert lp.token == token and lp.logprob <= 0 and len(lp.top) == 1


def test_a_request_cancelled_while_its_prompt_is_prefilled_leaves_and_frees_its_storage(base):
    engine = Engine.for_base(base, prefill_chunk=64)
    ev = Events()
    try:
        request = engine.submit(_request(_ids(2000, 8), ev, 8))
        request.cancel()
        assert ev.done.wait(60)
        ok = Events()
        engine.submit(_request(_ids(20, 9), ok, 4))
        assert ok.done.wait(60)
    finally:
        engine.close()
    assert ev.events[-1] == ("done", ("cancelled", None)) and not ev.tokens
    assert ok.events[-1][0] == "done" and engine.stats["cancelled"] == 1
    assert engine.stats["running"] == 0 and engine.stats["kv_bytes_used"] == 0


def test_one_long_row_decodes_apart_from_the_short_ones_only_when_it_saves_padding():
    """Decoding pads every row to the longest: a 30k-token row among short ones gets its own forward."""
    from types import SimpleNamespace

    from toolkit.engine.engine import _decode_groups

    def rows(*lengths):
        return [(SimpleNamespace(kv=SimpleNamespace(seen=n)), 7) for n in lengths]

    short = rows(40, 75, 60, 52)
    assert _decode_groups(short) == [short]
    mixed = rows(40, 30000, 75, 60)
    groups = _decode_groups(mixed)
    assert [[r.kv.seen for r, _ in g] for g in groups] == [[40, 60, 75], [30000]]
    assert sorted(id(r) for g in groups for r, _ in g) == sorted(id(r) for r, _ in mixed)
    assert len(_decode_groups(rows(900, 2000))) == 1  # 1,100 padded slots: not worth a second forward


def test_a_round_that_raises_fails_its_requests_and_the_engine_goes_on(base, monkeypatch):
    engine = Engine(base.model, device="cpu", dtype=base.dtype, pad_id=0, stop_ids=[1, 106])
    prompt = _prompt(base, "Hi")
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug in a round")))
    first = Collector()
    _submit(engine, prompt, 4, first)
    assert first.done.wait(30) and isinstance(first.finish, RuntimeError)  # an error, not a wait forever
    monkeypatch.setattr(engine, "_step", step)
    second = Collector()
    _submit(engine, prompt, 4, second)
    assert second.done.wait(30) and second.finish == ("length", None) and len(second.tokens) == 4
    engine.close()


def _paced_engine(base, chunk_n: int) -> Engine:
    engine = Engine.for_base(base, start=False)
    engine._step_s, engine._chunk_n = 0.01, chunk_n  # as measured while rows decode
    return engine


def _waiting_row(length: int, fed: int = 0) -> _Row:
    request = Request(list(range(length)), None, None, None, SamplingParams(8), lambda kind, value: None)
    return _Row(request, None, None, 0, fed=fed)


def test_paced_pieces_take_short_prompts_whole_and_long_ones_by_the_chunk(base):
    """While rows decode, a fresh 26-token prompt against a 16-token chunk goes whole, ahead of a long prompt in
    progress (split, its last 10 tokens would idle its slot for a pass); a second waits for the next pass, as
    whole it would take the pass past two chunks; the prompt in progress gets what is left of the chunk."""
    engine = _paced_engine(base, 16)
    a, b, long = _waiting_row(26), _waiting_row(26), _waiting_row(1000, fed=100)
    pieces, paced = engine._plan_pieces([long, a, b], paced=True)
    assert paced and [(row, n) for row, n in pieces] == [(a, 26)]
    engine._chunk_n = 64
    pieces, _ = engine._plan_pieces([long, a, b], paced=True)
    assert pieces == [(a, 26), (b, 26), (long, 12)]
    pieces, _ = engine._plan_pieces([long, _waiting_row(70)], paced=True)  # within two chunks: whole
    assert [n for _, n in pieces] == [70]
    pieces, _ = engine._plan_pieces([_waiting_row(200)], paced=True)  # a long fresh prompt: one chunk
    assert [n for _, n in pieces] == [64]
    pieces, paced = engine._plan_pieces([_waiting_row(600)], paced=False)  # nothing decodes: unpaced
    assert not paced and [n for _, n in pieces] == [512]


def test_pacing_shrinks_the_chunk_only_for_pieces_that_cost_too_much(base):
    """A pass whose pieces were smaller than the chunk (nothing left to fill it) and cheap keeps the chunk; a
    full chunk that was cheap may double; one that cost more than `prefill_step_ratio` steps shrinks it."""
    engine = _paced_engine(base, 64)
    engine._pace(10, 0.001)  # 10 tokens for a tenth of a step
    assert engine._chunk_n == 64
    engine._pace(64, 0.001)
    assert engine._chunk_n == 128
    engine._pace(128, 0.02)  # two steps for 128 tokens: a quarter of them fit half a step
    assert engine._chunk_n == 32
