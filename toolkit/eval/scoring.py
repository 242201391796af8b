"""Teacher-forced scoring of a model on encoded rows: the summed log-probability of each row's labelled tokens.

Never the whole [tokens x vocabulary] logits of a row: the model's backbone gives the final hidden states, and the
LM head runs over the labelled positions only, HEAD_CHUNK at a time, each chunk's log-softmax in float32. At
Gemma 3's 262,208-token vocabulary the full float32 logits are ~1 MB per token (a 32k row: 34 GB); a chunk of
1,024 positions is ~1 GB. The head is the one the model serves with (`get_output_embeddings()`: the loader's int8
head on a CPU, lm_head.py), so an evaluation scores exactly what `toolkit serve` answers. Training never comes
here (its loss is train/loss.py's). No files, no HTTP, no generation.
"""

from __future__ import annotations

import math
from typing import Any

from toolkit.data import template as chat
from toolkit.data.collate import pad_batch

HEAD_CHUNK = 1024  # labelled positions per LM head call: 1,024 x 262,208 float32 logits are ~1 GB


def answer_logprobs(
    model: Any, rows: list, pad_id: int, device: str, dtype: Any, batch_size: int = 8, chunk: int = HEAD_CHUNK
) -> list[tuple[float, int]]:
    """(summed log-probability, count) of each row's labelled tokens: position t predicts token t + 1.

    `rows`: anything with `.encoded` (template.Encoded). The model's active adapter applies (callers pick it with
    set_adapter / disable_adapter); dropout is off while scoring.
    """
    import torch

    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        head = output_head(model)
        with torch.no_grad():
            for picked in _batches(rows, batch_size):
                batch = _batch([rows[i] for i in picked], pad_id, device, dtype)
                labels = batch.pop("labels")
                hidden = final_hidden_states(model, batch)
                for i, scored in zip(picked, labelled_logprobs(head, hidden, labels, chunk), strict=True):
                    out[i] = scored
    finally:
        model.train(was_training)
    return out


def _batches(rows: list, batch_size: int) -> list[list[int]]:
    """Row indices per batch: text rows apart from rows with images. Why: an image's attention mask takes the whole
    batch off SDPA's causal path, which moved a text row's bfloat16 score by up to 0.08 nats next to an image row
    (the tiny base, CPU); text rows padded together score as they do alone."""
    text = [i for i, r in enumerate(rows) if not r.encoded.num_images]
    image = [i for i, r in enumerate(rows) if r.encoded.num_images]
    return [group[k : k + batch_size] for group in (text, image) for k in range(0, len(group), batch_size)]


def row_losses(model: Any, rows: list, pad_id: int, device: str, dtype: Any, batch_size: int = 8) -> list[tuple]:
    """(summed cross-entropy, answer tokens) of each row: position t predicts token t + 1, assistant tokens only."""
    return [(-s, c) for s, c in answer_logprobs(model, rows, pad_id, device, dtype, batch_size)]


def mean_loss(pairs: list[tuple[float, int]]) -> dict:
    """Token-weighted mean loss of some rows, and its perplexity."""
    total, count = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def features(encoded: Any) -> dict:
    return {
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "token_type_ids": encoded.token_type_ids,
        "pixel_values": encoded.pixel_values,
    }


def _batch(rows: list, pad_id: int, device: str, dtype: Any) -> dict:
    batch = pad_batch([features(r.encoded) for r in rows], pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


# ------------------------------------------------------------------------------------------ hidden states, head


def _causal_lm(model: Any) -> Any:
    """The transformers model under a peft wrapper (peft's LoRA layers sit inside it, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden_states(model: Any, batch: dict) -> Any:
    """[rows, tokens, hidden] after the final norm, from the backbone: the forward without its LM head.

    Why the inner model and not `model(..., logits_to_keep=...)`: the outer forward returns the hidden states only
    as every layer's (`output_hidden_states`), a copy per layer; Gemma3ForConditionalGeneration's `.model`
    (Gemma3Model: vision tower, projector, language model) returns the last one, and it is exactly what the
    outer forward feeds its head.
    """
    backbone = getattr(_causal_lm(model), "model", None)
    if backbone is None:
        raise TypeError(f"{type(_causal_lm(model)).__name__} has no backbone (.model) to take hidden states from")
    return backbone(**batch, use_cache=False, return_dict=True).last_hidden_state


def output_head(model: Any) -> Any:
    """The LM head the model serves with, as a function of hidden states -> logits (softcapped where the text config
    says so, as the lean decoding step and TRL's chunked loss do; Gemma 3's checkpoints set no softcap)."""
    import torch

    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return head
    return lambda hidden: torch.tanh(head(hidden) / cap) * cap


def labelled_logprobs(head: Any, hidden: Any, labels: Any, chunk: int = HEAD_CHUNK) -> list[tuple[float, int]]:
    """Per row, (sum, count) of log p(labels[t + 1] | ..t) over the labelled positions, `chunk` positions per head
    call: log p = logit[target] - logsumexp(logits) in float32 (the log-softmax, without its full output)."""
    import torch

    targets = labels[:, 1:]
    where = (targets != chat.IGNORE).nonzero()  # [(row, position)], row-major
    rows = hidden.shape[0]
    sums = torch.zeros(rows, dtype=torch.float64, device=hidden.device)
    for start in range(0, where.shape[0], chunk):
        r, t = where[start : start + chunk].unbind(1)
        logits = head(hidden[r, t]).float()  # [chunk, vocab]
        picked = logits.gather(1, targets[r, t].unsqueeze(1)).squeeze(1)
        sums.index_add_(0, r, (picked - torch.logsumexp(logits, dim=-1)).double())
        del logits
    counts = (targets != chat.IGNORE).sum(dim=1)
    return [(float(s), int(c)) for s, c in zip(sums.cpu(), counts.cpu(), strict=True)]
