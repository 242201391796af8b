"""Generation on a loaded base: token ids in, token ids out. No HTTP, no chat template here.

For now one conversation at a time through transformers' `generate`; the batching engine of the server
(issue 4/7) grows here.
"""

from __future__ import annotations

from typing import Any


def generate_greedy(base: Any, inputs: dict, *, max_new_tokens: int = 32) -> list[int]:
    """Greedy continuation of one encoded prompt (a dict of tensors, batch of one).

    Stops on the base's stop tokens (<end_of_turn>, <eos>); returns the new token ids without the stop token.
    """
    import torch

    inputs = {k: v.to(base.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(base.dtype)
    with torch.no_grad():
        out = base.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            eos_token_id=base.model.generation_config.eos_token_id,
            pad_token_id=base.tokenizer.pad_token_id,
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = set(base.model.generation_config.eos_token_id or [])
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
