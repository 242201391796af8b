"""What every method's TRL trainer shares here: the model stays where the loader put it, FLOPs are counted once,
the dataset is row indices, and text-only batches carry no token_type_ids.

A mixin rather than a base class: each method subclasses its own TRL trainer (SFTTrainer, DPOTrainer, KTOTrainer),
and this goes first in the bases so its two methods win.
"""

from __future__ import annotations


class ToolkitTrainerMixin:
    def _move_model_to_device(self, model, device) -> None:
        # The loader put the model on its device (cuda:LOCAL_RANK under DDP), and GPTQModel's `hf_device_map`
        # makes Trainer skip the move anyway, logging "The model is already on multiple devices" on every run.
        # Only a model that is elsewhere goes on to Trainer (and its warning, which then means something).
        if all(t.device == device for t in (*model.parameters(), *model.buffers())):
            return
        super()._move_model_to_device(model, device)

    def floating_point_ops(self, inputs: dict) -> int:
        # Trainer's FLOPs log counts the model's parameters (a walk over every module) on every step: 5 ms of a
        # ~100 ms step on the tiny base; the count does not change while training, so it is taken once
        if not isinstance(inputs, dict):
            return 0  # GRPO's batches are prompt rows; its tokens exist only after the rollouts
        model = self.model
        if getattr(self, "_counted", (None,))[0] is not model:
            count = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else None
            self._counted = (model, count)
        ids = inputs.get(getattr(model, "main_input_name", "input_ids"))
        count = self._counted[1]
        return 0 if ids is None or count is None else 6 * ids.numel() * count


def index_dataset(start: int, n: int):
    """Row indices as the datasets.Dataset TRL's trainers want (collators look the encoded rows up, so pixel
    tensors never go through Arrow)."""
    from datasets import Dataset

    return Dataset.from_dict({"row": list(range(start, start + n))})


def text_only(padded: dict) -> dict:
    """Drop all-zero token_type_ids: they mark image tokens only, and all-zero ones give the same attention as none
    (tests/train/test_chunked_loss.py). Without them transformers can hand SDPA `is_causal` instead of building
    [tokens x tokens] masks for the full-attention layers (CPU SDPA turns a boolean mask into a float one: 3.6 GB
    at 30k tokens)."""
    if not padded["token_type_ids"].any():
        del padded["token_type_ids"]
    return padded
