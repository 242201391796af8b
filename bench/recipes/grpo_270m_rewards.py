"""The shaping reward of bench/recipes/grpo-270m.yaml (the task: bench/grpo_task.py)."""

from __future__ import annotations

import os

PREFIX = "Answer: "


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return (completion[-1].get("content") or "") if completion else ""  # [{"role": "assistant", "content": ...}]


def _prefix_share(line: str, target: str) -> float:
    """The share of `target` the line starts with (case-insensitive): 1.0 when the line starts with all of it."""
    n = len(os.path.commonprefix([line.lower(), target.lower()]))
    return n / len(target)


def on_the_way(prompts, completions, completion_ids, answer=None, **kwargs) -> list[float | None]:
    """How much of `Answer: <answer>` the reply starts with (case-insensitive, leading spaces dropped), or half the
    share of the bare answer it starts with, whichever is more: "A..." earns 1/13 of "Answer: apple", "Answer: "
    8/13, a reply that starts with "apple" 0.5. Monotone on the way to the target line, so it cannot be gamed by
    text that merely resembles it, and denser than the 0/1 rewards, which the base's samples almost never earn."""
    answers = answer or [None] * len(completions)
    out: list[float | None] = []
    for completion, ref in zip(completions, answers, strict=True):
        if ref is None:
            out.append(None)
            continue
        line = _text(completion).lstrip()
        out.append(round(max(_prefix_share(line, f"{PREFIX}{ref}"), 0.5 * _prefix_share(line, str(ref))), 4))
    return out
