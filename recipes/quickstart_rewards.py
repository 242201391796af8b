"""Reward functions of recipes/quickstart-grpo.yaml, with TRL's signature: (prompts, completions, **columns).

`completions` are TRL's conversational completions ([{"role": "assistant", "content": ...}]) for message prompts,
strings for plain-text prompts; every other column of the prompt rows (here `answer`) comes as a keyword list.
"""


def one_word(prompts, completions, **kwargs):
    """1.0 when the answer is a single word, as the system prompt asks."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if len(t.split()) == 1 else 0.0 for t in texts]
