"""Generation metrics on one answer and its reference: pure functions on strings, no models.

exact_match: the answer equals the reference after stripping surrounding whitespace.
contains:    the reference occurs in the answer (case-insensitive), for answers that say more than asked.
regex:       the row's own pattern (`"regex"` in the eval row) matches the answer (re.search); rows without
             a pattern are not counted.
rouge_l:     ROUGE-L F1 (longest common subsequence of words) from Google's `rouge-score`, with a Unicode
             word tokenizer (its default drops every non-ASCII character, which would score any non-English
             answer 0).

On preference pairs (a prompt with a chosen and a rejected answer; preference.py), from the summed log-probability
of each answer's labelled tokens, teacher-forced (log p(chosen), log p(rejected), in nats):
preference_accuracy: share of pairs where log p(chosen) > log p(rejected), strictly (a tie counts as a miss).
preference_margin:   mean of log p(chosen) - log p(rejected).
reward_accuracy:     DPO's implicit reward accuracy against a reference model (TRL's rewards/accuracies): share of
                     pairs where log p(chosen) - ref log p(chosen) > log p(rejected) - ref log p(rejected),
                     strictly, as TRL counts it (`chosen_rewards > rejected_rewards`): the reference itself scores
                     0.0, every pair a tie.
reward_margin:       mean of that reward difference, in nats (TRL's rewards/margins divided by its beta).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

GENERATION_METRICS = ("exact_match", "contains", "regex", "rouge_l")
LOSS_METRICS = ("loss", "perplexity")  # lower is better
PREFERENCE_METRICS = ("preference_accuracy", "preference_margin")  # higher is better
REWARD_METRICS = ("reward_accuracy", "reward_margin")  # against a reference model; higher is better
MARGIN_METRICS = ("preference_margin", "reward_margin")  # in nats, unbounded (the rest of the higher ones: 0..1)
_WORD = re.compile(r"\w+", re.UNICODE)


class _UnicodeWords:
    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def contains(answer: str, reference: str) -> float:
    return float(reference.strip().casefold() in answer.casefold())


def regex(answer: str, pattern: str | None) -> float | None:
    return None if pattern is None else float(re.search(pattern, answer) is not None)


def rouge_l(answer: str, reference: str) -> float:
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


def score_answer(metrics: list[str], answer: str, reference: str, pattern: str | None) -> dict[str, float | None]:
    """The selected generation metrics of one answer (None: the metric does not apply to this row)."""
    fns = {
        "exact_match": lambda: exact_match(answer, reference),
        "contains": lambda: contains(answer, reference),
        "regex": lambda: regex(answer, pattern),
        "rouge_l": lambda: rouge_l(answer, reference),
    }
    return {m: fns[m]() for m in metrics if m in fns}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` (optionally `.text` / `.image`) is better: all but the loss metrics."""
    return metric.split(".")[0] not in LOSS_METRICS


def is_margin(metric: str) -> bool:
    """A metric in nats rather than a share of 0..1 (the chart draws them apart)."""
    return metric.split(".")[0] in MARGIN_METRICS


def preference_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float | None]:
    """preference_accuracy and preference_margin of pairs' summed log-probabilities (None: no pairs)."""
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "preference_accuracy": _share(d > 0 for d in diffs),  # strict: a tie is not a preference
        "preference_margin": _average(diffs),
    }


def reward_metrics(
    chosen: list[float], rejected: list[float], ref_chosen: list[float], ref_rejected: list[float]
) -> dict[str, float | None]:
    """reward_accuracy and reward_margin: DPO's implicit rewards (log-ratio to the reference) of each side."""
    diffs = [(c - rc) - (r - rr) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected, strict=True)]
    return {"reward_accuracy": _share(d > 0 for d in diffs), "reward_margin": _average(diffs)}


def _share(flags: Iterable[bool]) -> float | None:
    values = [float(f) for f in flags]
    return sum(values) / len(values) if values else None


def _average(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
