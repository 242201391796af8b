"""Scores of a model on encoded held-out rows: assistant-token loss and greedy answers. No files, no HTTP."""

from __future__ import annotations

import math
from typing import Any

from toolkit import chat
from toolkit.collate import pad_batch
from toolkit.engine import generate_greedy


def assistant_loss(model: Any, rows: list, pad_id: int, device: str, dtype: Any, batch_size: int = 8) -> dict:
    """Mean cross-entropy over assistant answer tokens (teacher-forced) and its perplexity."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = pad_batch([features(r.encoded) for r in chunk], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            # shift: position t predicts token t + 1; sum so rows weigh by their answer length
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=chat.IGNORE,
                reduction="sum",
            )
            total += loss.item()
            count += int((labels[:, 1:] != chat.IGNORE).sum())
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "answer_tokens": count}


def features(encoded: Any) -> dict:
    return {
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "token_type_ids": encoded.token_type_ids,
        "pixel_values": encoded.pixel_values,
    }


def greedy_answers(runner: Any, processor: Any, rows: list, max_new_tokens: int) -> list[str]:
    """Greedy answer to each row's prompt (its messages without the final answer)."""
    out = []
    for r in rows:
        messages = r.row.messages[:-1]
        images = chat.load_images(messages, base_dir=r.row.base_dir, policy=None, where=r.row.where)
        prompt = chat.encode_prompt(processor, messages, images).tensors()
        ids = generate_greedy(runner, prompt, max_new_tokens=max_new_tokens)
        out.append(processor.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def reference_answer(row: Any) -> str:
    content = row.messages[-1].content
    return (content if isinstance(content, str) else "".join(p.text for p in content)).strip()


def exact_match_by_task(rows: list, answers: list[str]) -> dict:
    """Exact-match rate of greedy answers, overall and split into text-only and image rows."""
    groups: dict[str, list[bool]] = {"all": [], "text": [], "image": []}
    for r, answer in zip(rows, answers, strict=True):
        ok = answer == reference_answer(r.row)
        groups["all"].append(ok)
        groups["image" if r.encoded.num_images else "text"].append(ok)
    return {k: (sum(v) / len(v) if v else None) for k, v in groups.items()}
