"""One sampling step for a whole batch: logits in, one token per row out (and log probabilities on request).

`sample(logits, rows, stop_ids)` turns the next-token logits of every running row into tokens with one set of
tensor operations for the batch, in vLLM's order: logit_bias, structured-output mask, min_tokens (stop ids
masked), repetition / frequency / presence penalties, temperature (0 = argmax), top-k, top-p, min-p, then one
draw per row. A Python loop over rows only builds small per-row parameter tensors and draws one uniform number
per row from the row's own `torch.Generator`, so a seeded row gives the same tokens alone or in any batch.
Log probabilities are those of the raw model distribution (vLLM's default "raw_logprobs"; OpenAI's shape):
log_softmax of the logits before penalties, temperature and masks.

This module knows token ids only: no tokenizer, no chat template, no HTTP. The engine owns the rows (prefill,
KV cache, finishing on stop tokens); the server turns HTTP fields into `SamplingParams`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature this small samples greedily
TOP_P_FLOOR = 2.0**-14  # top-p sorts first the tokens at least this fraction as likely as the row's most likely
PROMPT_LOGPROB_CHUNK = 512  # prompt positions per log_softmax: 512 x 262k fp32 = 0.5 GB at most at a time


@runtime_checkable
class TokenConstraint(Protocol):
    """Structured output for one request row (a grammar matcher); stateful, fed every sampled token."""

    def allowed(self) -> torch.Tensor | None:
        """Bool [n], True = allowed next; None = no limit. n may be shorter than the logits' vocabulary
        (262144 tokenizer entries vs 262208 logits): the missing tail counts as not allowed."""
        ...

    def accept(self, token: int) -> None:
        """Advance the grammar by the token just sampled."""
        ...

    def is_done(self) -> bool:
        """The grammar is complete: the engine ends the row ("stop", None)."""
        ...


@dataclass
class SamplingParams:
    """How one row samples (vLLM's and OpenAI's fields; the server maps the request onto these)."""

    max_tokens: int  # 0 allowed only with prompt_logprobs set (echo-only completions)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI's definitions: subtracted once per seen output token ...
    frequency_penalty: float = 0.0  # ... and once per occurrence
    repetition_penalty: float = 1.0  # vLLM/HF: tokens seen in prompt or output; logit>0 divided, <0 multiplied
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)
    min_tokens: int = 0  # stop ids (incl. stop_token_ids) masked until this many tokens exist
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens (finish "stop")
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to logits (-100..100)
    logprobs: int | None = None  # None: off; k >= 0: sampled token's logprob + top-k alternatives
    # logprobs of the logits divided by the temperature (vLLM's processed logprobs, without penalties or top-k/p):
    # what GRPO trains on, so its rollouts' log-probabilities compare with the training forward's
    logprobs_at_temperature: bool = False
    prompt_logprobs: int | None = None  # None: off; k >= 0: every prompt token's logprob (+ top-k)
    constraint: TokenConstraint | None = None  # structured output, stateful, one per request row

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # top-k (token, logprob), descending; [] when k == 0


@dataclass
class RowState:
    """Sampling state of one running row: its parameters, its random generator and what it has produced."""

    params: SamplingParams
    generator: Any  # torch.Generator on the CPU, seeded from params.seed (else at random)
    prompt_ids: list[int] | None  # the prompt's distinct token ids (repetition_penalty); None when unused
    counts: dict[int, int] = field(default_factory=dict)  # output token -> occurrences
    produced: int = 0  # tokens sampled so far (stop tokens included)

    @classmethod
    def new(cls, params: SamplingParams, prompt_ids: list[int]) -> RowState:
        import torch

        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        seen = sorted(set(prompt_ids)) if params.repetition_penalty != 1.0 else None
        return cls(params=params, generator=generator, prompt_ids=seen)

    def stop_ids(self, stop_ids: set[int]) -> set[int]:
        """The tokens that end this row: the model's stop tokens (unless ignore_eos) and its stop_token_ids."""
        return (set() if self.params.ignore_eos else set(stop_ids)) | set(self.params.stop_token_ids)

    def record(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1
        self.produced += 1
        if self.params.constraint is not None:
            self.params.constraint.accept(token)


def sample(
    logits: torch.Tensor, rows: list[RowState], stop_ids: set[int]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row from `logits` [rows, vocab]; updates every row's counts, produced and constraint.

    Returns the tokens and, per row, the sampled token's raw log probability with its top-k alternatives
    (None for rows without `logprobs`).
    """
    import torch

    with torch.no_grad():
        raw = logits
        logits, survivors = _process(logits, rows, stop_ids)
        tokens = _draw(logits, rows, survivors)
        token_list = tokens.tolist()
        logprobs = _sampled_logprobs(raw, rows, tokens)
    for row, token in zip(rows, token_list, strict=True):
        row.record(token)
    return token_list, logprobs


def process(logits: torch.Tensor, rows: list[RowState], stop_ids: set[int]) -> torch.Tensor:
    """The logits each row samples from, as float32 [rows, vocab] (-inf = excluded): every step before the draw.

    Greedy rows stop after the penalties (argmax ignores temperature, top-k, top-p and min-p).
    """
    return _process(logits, rows, stop_ids)[0]


def _process(logits: torch.Tensor, rows: list[RowState], stop_ids: set[int]) -> tuple[torch.Tensor, dict]:
    """`process`, and the survivors: for a sampled row whose top-k or top-p found them, the ids of the only tokens
    it may draw (every other one is -inf), so what follows reads those and not the whole vocabulary row."""
    import torch

    params = [r.params for r in rows]
    edits = any(
        p.logit_bias
        or p.constraint is not None
        or r.produced < p.min_tokens
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
        or not p.greedy
        for r, p in zip(rows, params, strict=True)
    )
    logits = logits.to(torch.float32, copy=edits)  # plain greedy rows only read the logits: no copy
    vocab = logits.shape[1]
    device = logits.device
    _logit_bias(logits, params, vocab)
    constrained = _constraint_mask(logits, params)
    _min_tokens(logits, rows, stop_ids, vocab, constrained)
    _penalties(logits, rows, vocab)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    survivors: dict[int, torch.Tensor] = {}
    if not sampled:
        return logits, survivors
    if any(p.temperature != 1.0 for p in params if not p.greedy):  # (dividing by 1 changes nothing)
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
        logits.div_(temps.unsqueeze(1))
    _top_k(logits, params, vocab, survivors)
    _top_p(logits, params, survivors)
    _min_p(logits, params, survivors)
    return logits, survivors


# --------------------------------------------------------------------------------------------- logit steps
def _sparse(pairs: list[tuple[int, list[int]]], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token index) tensors for per-row token lists, for one gather / index_put_ over the batch."""
    import torch

    rows = [i for i, tokens in pairs for _ in tokens]
    tokens = [t for _, tokens in pairs for t in tokens]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(tokens, dtype=torch.long, device=device)


def _logit_bias(logits: torch.Tensor, params: list[SamplingParams], vocab: int) -> None:
    import torch

    # ids past the logits are dropped here: the server validates logit_bias keys against the tokenizer
    biased = [(i, {t: b for t, b in p.logit_bias.items() if 0 <= t < vocab}) for i, p in enumerate(params)]
    biased = [(i, b) for i, b in biased if b]
    if not biased:
        return
    r, t = _sparse([(i, list(b)) for i, b in biased], logits.device)
    values = torch.tensor([v for _, b in biased for v in b.values()], dtype=logits.dtype, device=logits.device)
    logits.index_put_((r, t), values, accumulate=True)


def _constraint_mask(logits: torch.Tensor, params: list[SamplingParams]) -> set[int]:
    """-inf where a row's grammar forbids the token; returns the rows that are constrained this step."""
    import torch

    masks = []
    for i, p in enumerate(params):
        allowed = p.constraint.allowed() if p.constraint is not None else None
        if allowed is not None:
            masks.append((i, allowed))
    if not masks:
        return set()
    vocab = logits.shape[1]
    allow = torch.zeros((len(masks), vocab), dtype=torch.bool, device=logits.device)
    for j, (_, allowed) in enumerate(masks):
        k = min(allowed.shape[0], vocab)
        allow[j, :k] = allowed[:k].to(logits.device)  # the tail past the grammar's vocabulary stays forbidden
    index = torch.tensor([i for i, _ in masks], device=logits.device)
    logits[index] = logits[index].masked_fill(~allow, float("-inf"))
    return {i for i, _ in masks}


def _min_tokens(
    logits: torch.Tensor, rows: list[RowState], stop_ids: set[int], vocab: int, constrained: set[int]
) -> None:
    import torch

    masked = []
    for i, r in enumerate(rows):
        if r.produced < r.params.min_tokens:
            stops = sorted(t for t in r.stop_ids(stop_ids) if 0 <= t < vocab)
            if stops:
                masked.append((i, stops))
    if not masked:
        return
    r, t = _sparse(masked, logits.device)
    saved = logits[r, t]
    logits[r, t] = float("-inf")
    # a grammar that allows nothing but a stop token wins over min_tokens (else the row has no token left)
    stuck = [i for i, _ in masked if i in constrained and not bool(torch.isfinite(logits[i]).any())]
    for i in stuck:
        sel = r == i
        logits[i, t[sel]] = saved[sel]


def _penalties(logits: torch.Tensor, rows: list[RowState], vocab: int) -> None:
    """vLLM's apply_penalties: repetition (prompt + output tokens), then OpenAI's frequency and presence."""
    import torch

    device = logits.device
    rep = [(i, r) for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        pairs = []
        for i, r in rep:
            seen = list(r.counts) + (r.prompt_ids or [])
            pairs.append((i, [t for t in seen if t < vocab]))
        ri, ti = _sparse(pairs, device)
        if ti.numel():
            penalty = torch.tensor(
                [r.params.repetition_penalty for (_, r), (_, seen) in zip(rep, pairs, strict=True) for _ in seen],
                device=device,
            )
            x = logits[ri, ti]
            # a token in both prompt and output is written twice with the same value: harmless
            logits[ri, ti] = torch.where(x > 0, x / penalty, x * penalty)
    pen = [(i, r) for i, r in enumerate(rows) if (r.params.presence_penalty or r.params.frequency_penalty) and r.counts]
    if pen:
        pairs = [(i, [t for t in r.counts if t < vocab]) for i, r in pen]
        ri, ti = _sparse(pairs, device)
        sub = [
            r.params.frequency_penalty * r.counts[t] + r.params.presence_penalty
            for (_, r), (_, tokens) in zip(pen, pairs, strict=True)
            for t in tokens
        ]
        logits.index_put_((ri, ti), -torch.tensor(sub, dtype=logits.dtype, device=device), accumulate=True)


def _rows(logits: torch.Tensor, chosen: list[int]) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    """The chosen rows and a function that writes them back; all rows: the tensor itself (no copies)."""
    import torch

    if len(chosen) == logits.shape[0]:
        return logits, lambda sub: None if sub is logits else logits.copy_(sub)
    index = torch.tensor(chosen, device=logits.device)
    return logits[index], lambda sub: logits.index_copy_(0, index, sub)


def _top_k(logits: torch.Tensor, params: list[SamplingParams], vocab: int, survivors: dict) -> None:
    """HF's TopKLogitsWarper: below the k-th largest logit -> -inf (ties with the k-th are kept). A row left with
    exactly its k tokens has them as its survivors (with ties at the k-th past them, or fewer than k finite, none)."""
    import torch

    chosen = [i for i, p in enumerate(params) if 0 < p.top_k < vocab and not p.greedy]
    if not chosen:
        return
    from toolkit.base.vocab_reduce import top_sorted

    sub, put = _rows(logits, chosen)
    k_rows = torch.tensor([params[i].top_k for i in chosen], device=logits.device)
    top, ids = top_sorted(sub, int(k_rows.max()))
    below = sub < top.gather(1, (k_rows - 1).unsqueeze(1))
    sub.masked_fill_(below, float("-inf"))
    put(sub)
    left = (vocab - below.sum(dim=1)).tolist()
    for j, i in enumerate(chosen):
        if left[j] == params[i].top_k:
            survivors[i] = ids[j, : left[j]]


def _top_p(logits: torch.Tensor, params: list[SamplingParams], survivors: dict) -> None:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (the engine's definition:
    a token goes when the mass of the tokens before it already exceeds top_p). The kept tokens are the row's
    survivors.

    Sorting 262k probabilities per row is the dearest step of all. A row with survivors (top-k's) sorts only those.
    Any other row first sorts its tokens of at least TOP_P_FLOOR times its most likely one's probability: where
    they already hold more than top_p, the answer is among them (every other token has more than top_p before it);
    only the rest sort in full.
    """
    import torch

    chosen = [i for i, p in enumerate(params) if p.top_p < 1.0 and not p.greedy]
    for i in [i for i in chosen if i in survivors]:  # (the row's other tokens are -inf: no mass)
        ids = survivors[i]
        p, order = torch.sort(logits[i, ids].softmax(dim=0), descending=True)
        inside = p.cumsum(dim=0) - p <= params[i].top_p
        logits[i, ids[order[~inside]]] = float("-inf")
        survivors[i] = ids[order[inside]]
    chosen = [i for i in chosen if i not in survivors]
    if not chosen:
        return
    sub, put = _rows(logits, chosen)
    probs = sub.softmax(dim=-1)
    floor = probs.amax(dim=-1) * TOP_P_FLOOR
    keep = torch.zeros_like(sub, dtype=torch.bool)
    for j, i in enumerate(chosen):
        top_p = params[i].top_p
        ids = (probs[j] >= floor[j]).nonzero().squeeze(1)
        for candidates in (ids, None):  # (None: the whole row)
            p = probs[j] if candidates is None else probs[j, candidates]
            p, order = torch.sort(p, descending=True)
            cum = p.cumsum(dim=0)
            if candidates is None or (len(cum) and bool(cum[-1] > top_p)):
                inside = order[cum - p <= top_p]
                survivors[i] = inside if candidates is None else candidates[inside]
                keep[j, survivors[i]] = True
                break
    sub.masked_fill_(~keep, float("-inf"))
    put(sub)


def _min_p(logits: torch.Tensor, params: list[SamplingParams], survivors: dict) -> None:
    """vLLM/HF min-p: drop tokens whose probability is below min_p times the most likely token's, compared
    as logits (p < min_p * p_max  <=>  logit < max_logit + log(min_p)): no softmax over the vocabulary."""
    import torch

    chosen = [i for i, p in enumerate(params) if p.min_p > 0.0 and not p.greedy]
    if not chosen:
        return
    sub, put = _rows(logits, chosen)
    log_min_p = torch.tensor([math.log(params[i].min_p) for i in chosen], device=logits.device).unsqueeze(1)
    sub.masked_fill_(sub < sub.max(dim=-1, keepdim=True).values + log_min_p, float("-inf"))
    put(sub)
    for i in [i for i in chosen if i in survivors]:
        survivors[i] = survivors[i][torch.isfinite(logits[i, survivors[i]])]


# --------------------------------------------------------------------------------------------- the draw
def _draw(logits: torch.Tensor, rows: list[RowState], survivors: dict) -> torch.Tensor:
    """Greedy rows: argmax. Sampled rows: inverse-CDF sampling with one uniform number from the row's own
    generator (one small draw per row keeps seeded rows reproducible in any batch, where a batched
    torch.multinomial would share one generator). A row with survivors walks only those, in token order: the
    same cumulative distribution without the whole row's zeros."""
    import torch

    from toolkit.base.vocab_reduce import first_argmax, inverse_cdf

    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(sampled) < len(rows):
        tokens = first_argmax(logits)
    else:  # (no greedy row: no argmax to take)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if not sampled:
        return tokens
    u = torch.cat([torch.rand(1, generator=rows[i].generator, dtype=torch.float64) for i in sampled])
    u = u.to(logits.device)
    whole = []
    for j, i in enumerate(sampled):
        ids = survivors.get(i)
        if ids is None or not ids.numel():
            whole.append(j)
            continue
        ids = ids.sort().values
        tokens[i] = ids[inverse_cdf(logits[i, ids].softmax(dim=0).unsqueeze(0), u[j : j + 1])[0]]
    if whole:
        index = [sampled[j] for j in whole]
        sub, _ = _rows(logits, index)
        picked = inverse_cdf(sub.softmax(dim=-1), u[whole])
        tokens[torch.tensor(index, device=logits.device)] = picked
    return tokens


# --------------------------------------------------------------------------------------------- logprobs
def _sampled_logprobs(raw: torch.Tensor, rows: list[RowState], tokens: torch.Tensor) -> list[TokenLogprob | None]:
    import torch

    chosen = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not chosen:
        return out
    index = torch.tensor(chosen, device=raw.device)
    ks = [rows[i].params.logprobs or 0 for i in chosen]
    picked = raw[index]
    scaled = [j for j, i in enumerate(chosen) if rows[i].params.logprobs_at_temperature and not rows[i].params.greedy]
    if scaled:
        temps = torch.tensor([rows[chosen[j]].params.temperature for j in scaled], device=raw.device)
        picked = picked.float()
        picked[scaled] = picked[scaled] / temps.unsqueeze(1)
    entries = _logprob_entries(picked, tokens[index], ks)
    for i, entry in zip(chosen, entries, strict=True):
        out[i] = entry
    return out


def _logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """Raw log probabilities of `tokens` (one per row of `logits`) with each row's top-k alternatives."""
    import torch

    from toolkit.base.vocab_reduce import top_sorted

    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k = min(max(ks), lp.shape[1])
    top_v, top_i = top_sorted(lp, k) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [
        TokenLogprob(token=t, logprob=c, top=list(zip(ti[:kr], tv[:kr], strict=True)))
        for t, c, tv, ti, kr in zip(tokens.tolist(), chosen, top_v, top_i, ks, strict=True)
    ]


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Log probability of every prompt token given the ones before it (+ top-k), from the prompt's logits
    [T, vocab]: entry i comes from logits[i - 1]; entry 0 is None (nothing predicts the first token).

    Computed in chunks of positions: full fp32 log-softmax of a long prompt would take 1 MB per token.
    """
    import torch

    out: list[TokenLogprob | None] = [None]
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
    with torch.no_grad():
        for start in range(0, len(ids) - 1, PROMPT_LOGPROB_CHUNK):
            stop = min(start + PROMPT_LOGPROB_CHUNK, len(ids) - 1)
            out += _logprob_entries(logits[start:stop], targets[start:stop], [k] * (stop - start))
    return out
