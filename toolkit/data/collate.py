"""Batches of encoded conversations -> padded tensors (training and teacher-forced evaluation)."""

from __future__ import annotations

from typing import Any

from toolkit.data.template import IGNORE


def pad_batch(features: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad input_ids (pad), labels (-100), token_type_ids (0) together; concatenate pixel_values.

    Gemma 3 needs token_type_ids in every training batch, text-only ones included.
    """
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    n = len(features)
    batch = {
        "input_ids": torch.full((n, longest), pad_id, dtype=torch.long),
        "labels": torch.full((n, longest), IGNORE, dtype=torch.long),
        "token_type_ids": torch.zeros((n, longest), dtype=torch.long),
        "attention_mask": torch.zeros((n, longest), dtype=torch.long),
    }
    pixels = []
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        batch["input_ids"][i, :k] = torch.as_tensor(f["input_ids"])
        batch["labels"][i, :k] = torch.as_tensor(f["labels"])
        batch["token_type_ids"][i, :k] = torch.as_tensor(f["token_type_ids"])
        batch["attention_mask"][i, :k] = 1
        if f.get("pixel_values") is not None:
            pixels.append(f["pixel_values"])
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


class Collator:
    """Picklable collator for the Trainer's DataLoader."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        return pad_batch(features, self.pad_id)
