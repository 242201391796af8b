"""Teacher-forced assistant-token loss of a model on encoded rows. No files, no HTTP, no generation."""

from __future__ import annotations

import math
from typing import Any

from toolkit.data import template as chat
from toolkit.data.collate import pad_batch


def row_losses(model: Any, rows: list, pad_id: int, device: str, dtype: Any, batch_size: int = 8) -> list[tuple]:
    """(summed cross-entropy, answer tokens) of each row: position t predicts token t + 1, assistant tokens only."""
    import torch

    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = pad_batch([features(r.encoded) for r in chunk], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=chat.IGNORE, reduction="none"
            ).view(labels.shape)
            sums, counts = loss.sum(dim=1), (labels != chat.IGNORE).sum(dim=1)
            out += [(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]
    model.train(was_training)
    return out


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
