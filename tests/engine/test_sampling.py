"""The batched sampling step against a straightforward per-row reference, each extra on its own, raw log
probabilities, prompt log probabilities and seeded reproducibility alone vs batched."""

import math

import pytest
import torch

from toolkit.engine import sampling
from toolkit.engine.sampling import RowState, SamplingParams, TokenLogprob, process, prompt_logprobs, sample

STOPS = {1, 106}
NEG = float("-inf")


# ------------------------------------------------------------------------------------------- the reference
def ref_process(logits: torch.Tensor, row: RowState, stop_ids: set[int]) -> torch.Tensor:
    """One row, written the obvious way: the engine's former `_sample` plus HF's/vLLM's definitions of the extras."""
    p = row.params
    x = logits.float().clone()
    vocab = x.shape[0]
    for t, b in p.logit_bias.items():
        x[t] += b
    if p.constraint is not None and (allowed := p.constraint.allowed()) is not None:
        for t in range(vocab):
            if t >= allowed.shape[0] or not allowed[t]:
                x[t] = NEG
    if row.produced < p.min_tokens:
        for t in (set() if p.ignore_eos else stop_ids) | set(p.stop_token_ids):
            x[t] = NEG
    if p.repetition_penalty != 1.0:  # HF RepetitionPenaltyLogitsProcessor over prompt + output
        seen = set(row.counts) | set(row.prompt_ids or [])
        for t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in row.counts.items():  # OpenAI: presence once, frequency per occurrence
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    if p.temperature == 0:
        return x
    x = x / p.temperature
    if p.top_k > 0:
        kth = torch.sort(x, descending=True).values[min(p.top_k, vocab) - 1]
        x[x < kth] = NEG
    if p.top_p < 1.0:  # the smallest set reaching top_p (a token goes when the mass before it exceeds top_p)
        probs = torch.softmax(x, -1)
        order = torch.argsort(probs, descending=True)
        before = 0.0
        for t in order.tolist():
            if before > p.top_p:
                x[t] = NEG
            before += float(probs[t])
    if p.min_p > 0:
        probs = torch.softmax(x, -1)
        x[probs < p.min_p * probs.max()] = NEG
    return x


def ref_draw(x: torch.Tensor, row: RowState) -> int:
    if row.params.temperature == 0:
        return int(torch.argmax(x))
    u = float(torch.rand(1, generator=row.generator, dtype=torch.float64))
    cdf = torch.softmax(x, -1).cumsum(-1)
    return min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])]), right=True)), x.shape[0] - 1)


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-5, atol=1e-5)


def rows_for(params: list[SamplingParams], prompts: list[list[int]] | None = None) -> list[RowState]:
    return [RowState.new(p, prompts[i] if prompts else [5, 6, 7]) for i, p in enumerate(params)]


MIXED = [
    SamplingParams(8, temperature=0),
    SamplingParams(8, temperature=0.7, seed=1),
    SamplingParams(8, temperature=1.3, top_p=0.8, seed=2, presence_penalty=0.5, frequency_penalty=0.4),
    SamplingParams(8, temperature=0.9, top_k=20, seed=3),
    SamplingParams(8, temperature=1.0, min_p=0.1, seed=4),
    SamplingParams(8, temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=5),
    SamplingParams(8, temperature=0, repetition_penalty=0.7, frequency_penalty=-0.5, logit_bias={9: 3.0}),
    SamplingParams(8, temperature=1.1, min_tokens=3, stop_token_ids=[42], logit_bias={1: 50.0, 42: 50.0}, seed=6),
]


# ------------------------------------------------------------------------------------------- against the reference
# 30000: past the sizes where the draw, top-k and logprobs go through vocab_reduce's blocks (a 262k row's paths)
@pytest.mark.parametrize("vocab", [300, 30000])
def test_batched_step_matches_the_per_row_reference_over_several_steps(vocab):
    gen = torch.Generator().manual_seed(0)
    ours = rows_for(MIXED, [[5, 6, 7, 5], [8], [9, 10], [11], [12], [2, 3, 4, 5, 6], [9, 9], [1]])
    ref = rows_for(MIXED, [[5, 6, 7, 5], [8], [9, 10], [11], [12], [2, 3, 4, 5, 6], [9, 9], [1]])
    for step in range(8):
        logits = torch.randn(len(MIXED), vocab, generator=gen) * 3
        expected = [ref_process(logits[i], r, STOPS) for i, r in enumerate(ref)]
        got = process(logits, ours, STOPS)
        for i in range(len(MIXED)):
            assert_same_logits(got[i], expected[i])
        tokens, logprobs = sample(logits, ours, STOPS)
        expected_tokens = [ref_draw(expected[i], r) for i, r in enumerate(ref)]
        assert tokens == expected_tokens, step
        assert logprobs == [None] * len(MIXED)
        for r, t in zip(ref, expected_tokens, strict=True):
            r.counts[t] = r.counts.get(t, 0) + 1
            r.produced += 1
    assert [r.counts for r in ours] == [r.counts for r in ref] and all(r.produced == 8 for r in ours)
    # min_tokens=3 held the biased stop tokens back for three steps, then they win
    assert sum(ours[-1].counts.get(t, 0) for t in (1, 42)) == 5  # steps 3..7


def test_greedy_is_argmax_of_the_penalised_logits():
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0]])
    row = RowState.new(SamplingParams(4, temperature=0, presence_penalty=0.2), [0])
    row.counts = {1: 1}
    assert sample(logits, [row], STOPS)[0] == [2]  # 3.0 - 0.2 < 2.9
    assert row.counts == {1: 1, 2: 1} and row.produced == 1


# ------------------------------------------------------------------------------------------- each extra
def processed(logits: list[float], params: SamplingParams, counts=None, prompt=(), produced=0, stops=STOPS):
    row = RowState.new(params, list(prompt))
    row.counts, row.produced = dict(counts or {}), produced
    return process(torch.tensor([logits]), [row], stops)[0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    kept = lambda p: torch.isfinite(processed(logits, SamplingParams(1, top_p=p))).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.45) == [0]
    assert kept(0.79) == [0, 1]
    assert kept(0.81) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]


def test_top_k_and_min_p():
    logits = [0.0, 4.0, 3.0, 2.0, 1.0, 4.0]
    x = processed(logits, SamplingParams(1, top_k=3))
    assert torch.isfinite(x).nonzero().flatten().tolist() == [1, 2, 5]  # 4, 4, 3
    x = processed(logits, SamplingParams(1, top_k=2))
    assert torch.isfinite(x).nonzero().flatten().tolist() == [1, 5]
    assert torch.isfinite(processed(logits, SamplingParams(1, top_k=-1))).all()
    # min_p: keep p >= min_p * p_max; exp(3-4) = 0.37, exp(2-4) = 0.135
    x = processed(logits, SamplingParams(1, min_p=0.2))
    assert torch.isfinite(x).nonzero().flatten().tolist() == [1, 2, 5]
    x = processed(
        logits, SamplingParams(1, min_p=0.2, temperature=2.0)
    )  # after temperature: e^-1.5 = 0.22, e^-2 = 0.14
    assert torch.isfinite(x).nonzero().flatten().tolist() == [1, 2, 3, 4, 5]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    x = processed([2.0, -2.0, 1.0, 0.5, -1.0], SamplingParams(1, temperature=0, repetition_penalty=2.0), {1: 3}, [0])
    assert x.tolist() == [1.0, -4.0, 1.0, 0.5, -1.0]  # prompt token 0 and output token 1 only


def test_presence_and_frequency_penalties_follow_openai():
    p = SamplingParams(1, temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    x = processed([1.0, 1.0, 1.0], p, {0: 1, 2: 3})
    assert x.tolist() == [1.0 - 0.75, 1.0, 1.0 - 0.5 - 0.75]


def test_min_tokens_masks_stop_ids_and_stop_token_ids_until_reached():
    logits = [0.0] * 110
    p = SamplingParams(4, temperature=0, min_tokens=2, stop_token_ids=[7])
    masked = lambda x: torch.isinf(x).nonzero().flatten().tolist()  # noqa: E731
    assert masked(processed(logits, p, produced=1)) == [1, 7, 106]
    assert masked(processed(logits, p, produced=2)) == []
    p_ignore = SamplingParams(4, temperature=0, min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    assert masked(processed(logits, p_ignore, produced=0)) == [7]


def test_logit_bias_is_added_before_everything():
    x = processed([0.0, 1.0, 2.0], SamplingParams(1, temperature=0, logit_bias={0: 5.0, 2: -100.0}))
    assert x.tolist() == [5.0, 1.0, -98.0]
    row = RowState.new(SamplingParams(1, temperature=1.0, logit_bias={0: 100.0}, seed=0), [])
    assert sample(torch.tensor([[0.0, 9.0, 9.0]]), [row], STOPS)[0] == [0]


class Only:
    """A constraint allowing a fixed set over a vocabulary shorter than the logits; records what it is fed."""

    def __init__(self, allowed: set[int], n: int) -> None:
        self.mask = torch.zeros(n, dtype=torch.bool)
        self.mask[list(allowed)] = True
        self.fed: list[int] = []

    def allowed(self) -> torch.Tensor:
        return self.mask

    def accept(self, token: int) -> None:
        self.fed.append(token)

    def is_done(self) -> bool:
        return False


def test_constraint_mask_pads_a_shorter_vocabulary_as_forbidden_and_is_fed_every_token():
    logits = torch.zeros(2, 12)
    logits[:, 11] = 50.0  # the best token lies past the grammar's 10-token vocabulary
    logits[:, 3] = 2.0
    c_greedy, c_sampled = Only({2, 3, 9}, 10), Only({2, 9}, 10)
    rows = rows_for([SamplingParams(3, temperature=0, constraint=c_greedy), SamplingParams(3, constraint=c_sampled)])
    assert isinstance(c_greedy, sampling.TokenConstraint)
    x = process(logits, rows, STOPS)
    assert torch.isfinite(x[0]).nonzero().flatten().tolist() == [2, 3, 9]
    assert torch.isfinite(x[1]).nonzero().flatten().tolist() == [2, 9]
    for _ in range(5):
        tokens, _ = sample(logits, rows, STOPS)
        assert tokens[0] == 3 and tokens[1] in (2, 9)
    assert c_greedy.fed == [3] * 5 and len(c_sampled.fed) == 5


def test_a_grammar_that_allows_only_a_stop_token_wins_over_min_tokens():
    c = Only({106}, 200)
    row = RowState.new(SamplingParams(4, temperature=0, min_tokens=3, constraint=c), [])
    assert sample(torch.zeros(1, 262), [row], STOPS)[0] == [106]


# ------------------------------------------------------------------------------------------- the draw
def test_draws_follow_the_processed_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    logits = torch.log(probs).expand(16, 5).contiguous()
    rows = rows_for([SamplingParams(1, seed=s) for s in range(16)])
    seen = torch.zeros(5)
    for _ in range(150):
        for r in rows:
            r.produced = 0
        tokens, _ = sample(logits, rows, STOPS)
        seen += torch.bincount(torch.tensor(tokens), minlength=5)
    freq = seen / seen.sum()  # 2400 draws: standard error <= 0.01
    assert seen[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.035, rtol=0)


def test_seeded_row_gives_the_same_tokens_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(6, 2000, generator=gen) for _ in range(12)]
    params = SamplingParams(12, temperature=1.2, top_p=0.95, top_k=400, seed=1234, presence_penalty=0.3)

    def run(position: int, others: list[SamplingParams]) -> list[int]:
        batch = list(others)
        batch.insert(position, params)
        rows = rows_for(batch)
        out = []
        for logits in steps:
            mixed = logits[: len(batch)].clone()
            mixed[position] = logits[5]  # our row always sees the same logits
            out.append(sample(mixed, rows, STOPS)[0][position])
        return out

    alone = run(0, [])
    assert len(set(alone)) > 3
    assert run(2, [SamplingParams(12, temperature=0), SamplingParams(12, seed=9), SamplingParams(12, top_k=5)]) == alone
    assert run(4, [SamplingParams(12, temperature=0.5)] * 4 + [SamplingParams(12, seed=1234, top_p=0.5)]) == alone
    other_seed = SamplingParams(12, temperature=1.2, top_p=0.95, top_k=400, seed=4321, presence_penalty=0.3)
    rows = rows_for([other_seed])
    assert [sample(s[5:6], rows, STOPS)[0][0] for s in steps] != alone


# ------------------------------------------------------------------------------------------- log probabilities
def test_logprobs_are_the_raw_distribution_with_top_k():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 500, generator=gen) * 2).to(torch.bfloat16)
    params = [
        SamplingParams(1, temperature=0.3, logit_bias={7: 80.0}, logprobs=5, seed=0),  # bias moves the token only
        SamplingParams(1, temperature=0, logprobs=0),
        SamplingParams(1, temperature=0),
        SamplingParams(1, top_p=0.5, repetition_penalty=1.5, logprobs=20, seed=3),
    ]
    rows = rows_for(params)
    tokens, lps = sample(logits, rows, STOPS)
    raw = torch.log_softmax(logits.float(), -1)
    assert tokens[0] == 7 and lps[2] is None
    for i, k in ((0, 5), (1, 0), (3, 20)):
        lp = lps[i]
        assert isinstance(lp, TokenLogprob) and lp.token == tokens[i]
        assert math.isclose(lp.logprob, float(raw[i, tokens[i]]), abs_tol=1e-5)
        values = torch.topk(raw[i], k).values
        ids = [t for t, _ in lp.top]
        assert torch.equal(raw[i][ids], values)  # the k most likely (bfloat16 ties: which are in, as topk's)
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
        # descending, equal values in ascending token order
        assert all(a[1] > b[1] or (a[1] == b[1] and a[0] < b[0]) for a, b in zip(lp.top, lp.top[1:], strict=False))
    assert lps[1].top == [] and lps[1].token == int(raw[1].argmax())


def test_logprobs_top_k_over_a_vocabulary_sized_row_is_torch_topk():
    logits = torch.randn(2, 262208, generator=torch.Generator().manual_seed(6)) * 3  # (float32: no ties)
    rows = rows_for([SamplingParams(1, temperature=0, logprobs=20), SamplingParams(1, logprobs=3, seed=1)])
    tokens, lps = sample(logits, rows, STOPS)
    raw = torch.log_softmax(logits, -1)
    for i, k in ((0, 20), (1, 3)):
        values, ids = torch.topk(raw[i], k)
        assert [t for t, _ in lps[i].top] == ids.tolist()
        assert [v for _, v in lps[i].top] == pytest.approx(values.tolist(), abs=1e-5)
        assert math.isclose(lps[i].logprob, float(raw[i, tokens[i]]), abs_tol=1e-5)
    assert tokens[0] == int(raw[0].argmax())


@pytest.mark.parametrize("chunk", [2, 512])
def test_prompt_logprobs_entry_i_comes_from_the_previous_position(monkeypatch, chunk):
    monkeypatch.setattr(sampling, "PROMPT_LOGPROB_CHUNK", chunk)
    gen = torch.Generator().manual_seed(3)
    ids = [2, 40, 17, 17, 99, 3]
    logits = torch.randn(len(ids), 120, generator=gen)
    out = prompt_logprobs(logits, ids, 3)
    raw = torch.log_softmax(logits, -1)
    assert len(out) == len(ids) and out[0] is None
    for i in range(1, len(ids)):
        assert out[i].token == ids[i]
        assert math.isclose(out[i].logprob, float(raw[i - 1, ids[i]]), abs_tol=1e-6)
        values, top_ids = torch.topk(raw[i - 1], 3)
        assert [t for t, _ in out[i].top] == top_ids.tolist()
        assert [v for _, v in out[i].top] == pytest.approx(values.tolist(), abs=1e-6)
    assert [e.top for e in prompt_logprobs(logits, ids, 0)[1:]] == [[]] * 5
    assert prompt_logprobs(logits[:1], ids[:1], 2) == [None]


def test_a_row_draws_from_its_survivors_what_it_draws_from_the_whole_row():
    """Top-k's and top-p's survivors are exactly the row's finite tokens, and the draw over them (in token order)
    picks the token the whole row's inverse CDF picks."""
    logits = torch.randn(3, 262208, generator=torch.Generator().manual_seed(7)) * 3
    for seed in range(20):
        params = [
            SamplingParams(1, top_k=64, seed=seed),
            SamplingParams(1, temperature=0.8, top_p=0.9, seed=seed),
            SamplingParams(1, temperature=1.2, top_k=100, top_p=0.95, min_p=0.05, seed=seed),
        ]
        processed, survivors = sampling._process(logits, rows_for(params), STOPS)
        assert sorted(survivors) == [0, 1, 2]
        for i, ids in survivors.items():
            assert sorted(ids.tolist()) == torch.isfinite(processed[i]).nonzero().flatten().tolist()
        assert len(survivors[0]) == 64
        fast = sampling._draw(processed, rows_for(params), survivors)
        assert torch.equal(fast, sampling._draw(processed, rows_for(params), {}))


@pytest.mark.parametrize("floor", [0.5, 2.0**-14])
def test_top_p_candidates_shortcut_and_full_sort_agree_with_the_reference(monkeypatch, floor):
    monkeypatch.setattr(sampling, "TOP_P_FLOOR", floor)  # 0.5: few candidates, most rows sort in full
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3000, generator=gen) * torch.tensor([[6.0], [6.0], [1.0], [0.3]])
    rows = rows_for([SamplingParams(1, top_p=p, temperature=0.9) for p in (0.3, 0.97, 0.5, 0.9)])
    got = process(logits, rows, STOPS)
    for i, r in enumerate(rows):
        assert_same_logits(got[i], ref_process(logits[i], r, STOPS))
