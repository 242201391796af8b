"""32k context on CPU: a tiny base with 32,768 positions, a ~30,000-token prompt served beside short ones.

The base has two layers (one sliding-window layer of 1,024, one global layer: the two kinds Gemma 3 mixes) to keep
two 30k-token prefills within seconds; the engine code is the same for any depth.
"""

from __future__ import annotations

import random
import threading

import pytest

from toolkit.engine.engine import Engine, Request, SamplingParams


@pytest.fixture(scope="module")
def long_base(tmp_path_factory):
    from toolkit.base import builder
    from toolkit.base.loader import load_base

    path = builder.build(tmp_path_factory.mktemp("bases") / "tiny-32k", seed=0, context=32768, layers=2)
    return load_base(path, device="cpu")


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [2] + [rng.randrange(200, 1700) for _ in range(n - 1)]


class Tokens:
    def __init__(self, probe=None) -> None:
        self.tokens: list[int] = []
        self.finish = None
        self.probe, self.seen = probe, []
        self.done = threading.Event()

    def __call__(self, kind, value) -> None:
        if kind == "token":
            self.tokens.append(value)
            if self.probe:
                self.seen.append(self.probe())
        elif kind in ("done", "error"):
            self.finish = value
            self.done.set()


def _serve(engine: Engine, prompts: list[tuple[list[int], int]], probe=None) -> list[Tokens]:
    out = []
    for ids, max_tokens in prompts:
        t = Tokens(probe)
        engine.submit(Request(ids, [0] * len(ids), None, None, SamplingParams(max_tokens, temperature=0), t))
        out.append(t)
    for t in out:
        assert t.done.wait(600) and not isinstance(t.finish, Exception), t.finish
    return out


def test_a_30k_token_prompt_beside_short_ones_answers_as_each_alone_in_memory_it_needs(long_base):
    """One 30,000-token prompt and three short ones, together: each greedy answer equals the one it gets alone,
    the prefill ran in 4,096-token chunks between the short rows' decoding steps, and the KV bytes held stay
    within 1.25x of the bytes the rows need once the prompt is in, and of what they need at their fullest while it
    is fed (a left-padded batch would hold 4 x 30k slots per global layer)."""
    long, shorts = _ids(30000, 11), [_ids(n, 12 + n) for n in (25, 40, 60)]
    engine = Engine.for_base(long_base, prefill_chunk=4096, prefill_step_ratio=None)  # fixed chunk boundaries
    try:
        alone = [_serve(engine, [(p, m)])[0].tokens for p, m in [(long, 6)] + [(s, 24) for s in shorts]]
        s = engine.stats
        together = _serve(
            engine,
            [(long, 6)] + [(p, 24) for p in shorts],
            probe=lambda: (s["running"], s["kv_bytes_used"], s["kv_bytes_needed"], s["batches"]),
        )
    finally:
        engine.close()
    assert [t.tokens for t in together] == alone
    # the short rows decoded while the long prompt was prefilled chunk by chunk (prefill passes counted as it went)
    assert len({batches for t in together[1:] for *_, batches in t.seen}) > 3
    layout = engine.layout
    loaded = [(used, needed) for t in together for running, used, needed, _ in t.seen if running == 4]
    assert loaded and max(needed for _, needed in loaded) >= layout.needed_bytes(30000)
    # once the long prompt is in, what is held is what is needed; while it is fed, its storage already has room for
    # all of it (kv_cache.RowKV's `prompt`: no re-copy as it grows), never more than the rows need at their fullest
    assert max(used / needed for used, needed in loaded if needed >= layout.needed_bytes(30000)) <= 1.25
    fullest = layout.needed_bytes(30000 + 6) + sum(layout.needed_bytes(len(p) + 24) for p in shorts)
    assert max(used for used, _ in loaded) <= 1.25 * fullest
    padded = 4 * layout.needed_bytes(30000)  # what one left-padded DynamicCache batch would hold
    assert max(used for used, _ in loaded) < padded / 3
