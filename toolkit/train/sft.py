"""SFT, one method over the shared run (trainer.py): TRL's SFTTrainer over conversations the template encoded."""

from __future__ import annotations

from typing import Any

from toolkit.recipe import Recipe


class RowCollator:
    """TRL's trainers want a datasets.Dataset; ours holds only row indices and this collator looks the encoded rows
    up, so pixel tensors never go through Arrow. Train and eval rows share one index space."""

    def __init__(self, rows: list, pad_id: int) -> None:
        self.rows, self.pad_id = rows, pad_id

    def __call__(self, batch: list[dict]) -> dict:
        from toolkit.data.collate import pad_batch
        from toolkit.eval.scoring import features
        from toolkit.train.hf_trainer import text_only

        return text_only(pad_batch([features(self.rows[item["row"]].encoded) for item in batch], self.pad_id))


def build_trainer(recipe: Recipe, model: Any, data: Any, args: dict, tokenizer: Any, callbacks: list) -> Any:
    """TRL's SFTTrainer (loss.py picks the chunked or the full-logits loss) over the encoded rows."""
    from trl import SFTConfig

    from toolkit.train.hf_trainer import index_dataset
    from toolkit.train.loss import sft_trainer_class, use_chunked_loss

    chunked = use_chunked_loss(recipe.training.chunked_loss, recipe.data.max_seq_len)
    config = SFTConfig(
        **args,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are already encoded by the template
        packing=False,
        max_length=None,
    )
    trainer = sft_trainer_class(chunked)(
        model=model,
        args=config,
        train_dataset=index_dataset(0, len(data.train)),
        eval_dataset=index_dataset(len(data.train), len(data.eval)) if data.eval else None,
        data_collator=RowCollator(data.train + data.eval, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.toolkit_summary = {"chunked_loss": chunked}
    return trainer


def score_held_out(base: Any, model: Any, data: Any, recipe: Recipe, reference: str | None) -> dict:
    """Base vs adapter on the held-out rows: the same scoring as `toolkit eval`, on the model in memory."""
    import dataclasses

    from toolkit.eval.evaluate import score_in_process

    del reference  # SFT's table compares with the base
    outcome = score_in_process(
        dataclasses.replace(base, model=model), model, data.eval, {"base": None, "adapter": "default"}, recipe.eval
    )
    return outcome.metrics
