"""Generation metrics on one answer and its reference: pure functions on strings, no models.

exact_match: the answer equals the reference after stripping surrounding whitespace.
contains:    the reference occurs in the answer (case-insensitive), for answers that say more than asked.
regex:       the row's own pattern (`"regex"` in the eval row) matches the answer (re.search); rows without
             a pattern are not counted.
rouge_l:     ROUGE-L F1 (longest common subsequence of words) from Google's `rouge-score`, with a Unicode
             word tokenizer (its default drops every non-ASCII character, which would score any non-English
             answer 0).
"""

from __future__ import annotations

import re
from functools import lru_cache

GENERATION_METRICS = ("exact_match", "contains", "regex", "rouge_l")
LOSS_METRICS = ("loss", "perplexity")  # lower is better
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
    return metric.split(".")[0] not in LOSS_METRICS
