"""The training loss over Gemma 3's 262k vocabulary: chunked (fused LM head) or the model's own full logits.

The model's own loss builds the logits of every position, [tokens, 262,208], and cross-entropy keeps fp32 copies
and their gradient: about 1 MB per token each, some 31 GB for one 30k-token row before its gradient. The chunked
loss never holds them: TRL's SFTTrainer (1.16) ships a fused LM head (`trl.trainer.utils.add_fused_lm_head`, kernel
`trl.kernels.chunked_logprob.ChunkedLogProbFunction`) that runs the backbone, then projects the hidden states
through the LM head in tiles of 4,096 tokens x 32,768 vocabulary rows, folds each tile into online log-sum-exp
statistics (a Triton kernel on CUDA; torch ops on CPU) and recomputes the tiles in backward, accumulating the
gradients in fp32. It applies the text config's `final_logit_softcapping` when set (Gemma 3's checkpoints set
none). We use it rather than write our own (it is maintained and tested upstream, and SFTTrainer already wires it)
or add Liger's fused linear cross-entropy (TRL refuses Liger's FLCE: both patch the model's forward).
tests/train/test_chunked_loss.py holds the loss and gradients equal to the full-logits path.

This module decides, per run, which of the two `SFTTrainer.compute_loss` uses (`training.chunked_loss`), and says
why a run cannot use the chunked one. It knows nothing about data or adapters.
"""

from __future__ import annotations

from typing import Any


def use_chunked_loss(setting: str, max_seq_len: int) -> bool:
    """`training.chunked_loss` (auto | on | off) -> whether this run computes the loss in chunks.

    auto is on at every length: it is what SFTTrainer does by default, the loss is the same, and long rows need
    it. The full-logits path was about 10% faster per step on short CPU rows in one noisy measurement (batch 4 x
    64 tokens, tiny base, 2 shared cores): too little evidence to switch paths by length. `max_seq_len` is kept
    in the signature so that a measured threshold can go here.
    """
    del max_seq_len
    return setting != "off"


def sft_trainer_class(chunked: bool) -> Any:
    """TRL's SFTTrainer (its FLOPs count taking the parameter count once, no device move of a model the loader
    placed), or further a subclass whose loss is the model's own over the full logits (`chunked=False`).

    SFTTrainer always installs the fused LM head; with it off, `compute_loss` calls the model with its labels, as
    transformers' Trainer does (the model's forward without `fused_lm_head=True` is the original one). The entropy
    and token-accuracy metrics SFTTrainer logs from the fused outputs are then not logged.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    from toolkit.train.hf_trainer import ToolkitTrainerMixin

    class ToolkitSFTTrainer(ToolkitTrainerMixin, SFTTrainer):
        pass

    if chunked:
        return ToolkitSFTTrainer

    class FullLogitsSFTTrainer(ToolkitSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False  # as SFTTrainer does: no KV cache while training
            return Trainer.compute_loss(
                self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return FullLogitsSFTTrainer
