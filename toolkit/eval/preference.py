"""Preference pairs scored per model: the summed log-probability of each pair's chosen and rejected answer.

Each side of a pair (data/preference.py's `Preference`) is a whole conversation, the shared prompt then that
answer, its labels on the answer only (the answer and its <end_of_turn>, as training sees it). A side's score is
the sum of log p(token | everything before it) over those labelled tokens, teacher-forced, in nats: in-process
through scoring.py (chunked LM head, the served head), over HTTP through /v1/completions with the locally encoded
token ids as the prompt, `echo` and `logprobs` and `max_tokens: 0`, so the server scores exactly those tokens (ours
and vLLM's both answer that). From the scores, metrics.py's pair metrics: preference_accuracy and _margin per
model, and against a reference model DPO's implicit-reward accuracy and margin (reward_*). Items with one side
only (KTO rows) are scored and listed per row but count in no pair metric.
"""

from __future__ import annotations

from typing import Any

from toolkit.data import template as chat
from toolkit.errors import ToolkitError
from toolkit.eval import metrics, scoring
from toolkit.eval.evaluate import Outcome, _auth, _groups, active, num_images

Side = tuple[float, int] | None  # (summed log-probability, labelled tokens) of one answer; None: no such side
PAIR_METRIC_NAMES = metrics.PREFERENCE_METRICS + metrics.REWARD_METRICS


def is_preference(items: list) -> bool:
    """Whether evaluation items are preference items (data/preference.py) rather than conversation rows."""
    from toolkit.data.preference import Preference

    return bool(items) and all(isinstance(item, Preference) for item in items)


def _sides(items: list) -> list[Any]:
    """Every side present, in order: chosen then rejected of each item."""
    return [side for item in items for side in (item.chosen, item.rejected) if side is not None]


def _regroup(items: list, scored: list[tuple[float, int]]) -> list[tuple[Side, Side]]:
    """Scores of `_sides(items)` back into (chosen, rejected) per item."""
    it = iter(scored)
    out = [
        (next(it) if item.chosen is not None else None, next(it) if item.rejected is not None else None)
        for item in items
    ]
    if next(it, None) is not None:
        raise RuntimeError("more scores than sides")
    return out


# -------------------------------------------------------------------------------------------------- metrics


def preference_outcome(
    items: list, scores: dict[str, list[tuple[Side, Side]]], reference_label: str | None = None
) -> Outcome:
    """Pair metrics of each model label (over all pairs and, when both kinds are present, .text / .image) and per
    item its scores; reward_* against `reference_label`'s scores (the reference's own: 0.0, every pair a tie)."""
    if reference_label is not None and reference_label not in scores:
        raise ValueError(f"reference {reference_label!r} is not among the scored models {list(scores)}")
    groups = {suffix: [i for i in idx if items[i].paired] for suffix, idx in _groups(items).items()}
    ref = scores[reference_label] if reference_label is not None else None
    out = Outcome()
    for label, sides in scores.items():
        per_group = {suffix: _pair_metrics(sides, ref, idx) for suffix, idx in groups.items()}
        names = [n for n in PAIR_METRIC_NAMES if n in per_group[""]]
        out.metrics[label] = {f"{n}{suffix}": per_group[suffix][n] for n in names for suffix in per_group}
        out.rows[label] = [_item_scores(sides[i], ref[i] if ref else None) for i in range(len(items))]
    return out


def _pair_metrics(sides: list, ref: list | None, idx: list[int]) -> dict[str, float | None]:
    chosen, rejected = [sides[i][0][0] for i in idx], [sides[i][1][0] for i in idx]
    values = metrics.preference_metrics(chosen, rejected)
    if ref is not None:
        values.update(
            metrics.reward_metrics(chosen, rejected, [ref[i][0][0] for i in idx], [ref[i][1][0] for i in idx])
        )
    return values


def _item_scores(sides: tuple[Side, Side], ref: tuple[Side, Side] | None) -> dict:
    """One item's line in answers.jsonl (besides model and row): each side's log p and tokens, the margins."""
    chosen, rejected = sides
    line: dict[str, Any] = {
        "chosen_logp": chosen[0] if chosen else None,
        "chosen_tokens": chosen[1] if chosen else None,
        "rejected_logp": rejected[0] if rejected else None,
        "rejected_tokens": rejected[1] if rejected else None,
        "margin": chosen[0] - rejected[0] if chosen and rejected else None,
    }
    if ref is not None:
        ref_chosen, ref_rejected = ref
        line["reward_margin"] = (
            (chosen[0] - ref_chosen[0]) - (rejected[0] - ref_rejected[0]) if chosen and rejected else None
        )
    return line


# ------------------------------------------------------------------------------------------------ in-process


def score_preferences_in_process(
    base: Any,
    model: Any,
    pairs: list,
    models: dict[str, str | None],
    reference_label: str | None = None,
    batch_size: int = 8,
) -> Outcome:
    """Pair metrics of each model label -> adapter name (None: the base, adapters disabled) on preference items,
    on the model in memory (`toolkit eval`, and the trainer's held-out table at the end of training).

    `reference_label`: the label (a key of `models`) whose scores DPO's implicit rewards are measured against, or
    None for no reward_* metrics.
    """
    sides = _sides(pairs)
    pad = base.tokenizer.pad_token_id
    was_training = model.training
    model.eval()  # dropout off
    scores = {}
    try:
        for label, adapter in models.items():
            with active(model, adapter):
                scored = scoring.answer_logprobs(model, sides, pad, base.device, base.dtype, batch_size)
            scores[label] = _regroup(pairs, scored)
    finally:
        model.train(was_training)
    return preference_outcome(pairs, scores, reference_label)


# ---------------------------------------------------------------------------------------------------- HTTP


def check_http(pairs: list) -> None:
    """Refuse, before any request, items /v1/completions cannot score: token ids carry no pixels."""
    for item in pairs:
        if num_images(item):
            raise ToolkitError(
                "a preference pair with images cannot be scored over HTTP: /v1/completions takes the prompt as "
                "token ids, which carry no pixels, so the server would score the image tokens without the image",
                where=item.where,
                fix="evaluate in-process (without --url), or leave the image pairs out of --data",
            )


def answer_logprob_sum(token_logprobs: list[float | None], labels: list[int], where: str) -> tuple[float, int]:
    """(sum, count) over the labelled positions of an echoed prompt's token_logprobs (entry i: log p(token i | the
    tokens before it); entry 0 is null)."""
    if len(token_logprobs) < len(labels):
        raise ToolkitError(
            f"the server echoed {len(token_logprobs)} token logprobs for a {len(labels)}-token prompt",
            where=where,
            fix="use a server that echoes the prompt's logprobs (echo with logprobs, as vLLM and `toolkit serve` do)",
        )
    picked = [token_logprobs[i] for i, label in enumerate(labels) if label != chat.IGNORE]
    if any(v is None for v in picked):
        raise ToolkitError("the server gave no logprob for an answer token", where=where)
    return float(sum(picked)), len(picked)  # type: ignore[arg-type]


def score_preferences_http(
    url: str,
    api_key: str | None,
    pairs: list,
    models: dict[str, str],
    reference_label: str | None = None,
    clients: int = 8,
) -> Outcome:
    """Pair metrics of each label -> served model name, every side scored by the server, `clients` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from tqdm.auto import tqdm

    check_http(pairs)
    session = requests.Session()
    endpoint = url.rstrip("/") + "/completions"
    sides = [(item.where, side) for item in pairs for side in (item.chosen, item.rejected) if side is not None]

    def score(job: tuple[str, int]) -> tuple[float, int]:
        model, k = job
        where, side = sides[k]
        body = {
            "model": model,
            "prompt": side.encoded.input_ids,  # token ids: the server scores exactly the tokens scored in-process
            "echo": True,
            "logprobs": 0,
            "max_tokens": 0,
            "temperature": 0,
        }
        try:
            r = session.post(endpoint, json=body, headers=_auth(api_key), timeout=600)
        except requests.RequestException as exc:
            raise ToolkitError(f"request failed ({type(exc).__name__}: {exc})", where=where) from None
        if r.status_code != 200:
            raise ToolkitError(f"{model} answered {r.status_code}: {r.text[:300]}", where=where)
        token_logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        return answer_logprob_sum(token_logprobs, side.encoded.labels, where)

    jobs = [(name, k) for name in models.values() for k in range(len(sides))]
    with ThreadPoolExecutor(clients) as pool:
        results = list(tqdm(pool.map(score, jobs), total=len(jobs), desc="scoring", unit="answer", leave=False))
    n = len(sides)
    scores = {label: _regroup(pairs, results[j * n : (j + 1) * n]) for j, label in enumerate(models)}
    return preference_outcome(pairs, scores, reference_label)
