"""DPO, KTO, ORPO and SimPO, methods over the shared run (trainer.py), on pairs the template encoded.

DPO and KTO are TRL's trainers (DPOTrainer with its loss types, KTOTrainer) fed by collators of our own: every
side of a pair is already a conversation encoded by data/template.py (the prompt exactly as the server feeds it,
labels on the answer), so TRL's own tokenisation is skipped and image rows keep the processor's pixel values and
token_type_ids (TRL #3982, #4284). Both compute log-probabilities through TRL's fused LM head, in chunks, so a
long pair never holds its [tokens x 262k] logits. With a peft model TRL keeps a frozen copy of the starting
adapter as the reference ("ref"): a new adapter starts as the base, so the reference is the base; with
`training.init_adapter` it is that adapter (not the bare base: LLaMA-Factory #913). No second copy of the base.

ORPO and SimPO need no reference. TRL ships them under `trl.experimental` (ORPOTrainer, CPOTrainer with
loss_type simpo), but those build the full logits of every row; here they are DPOTrainer with the loss replaced
by theirs (the same formulas, over the same fused per-token log-probabilities).
"""

from __future__ import annotations

import random
from typing import Any

from toolkit.data.template import IGNORE
from toolkit.recipe import Recipe


def _padded(features: list[dict], pad_id: int) -> dict:
    """pad_batch, with TRL's `completion_mask` (the labelled answer tokens) in place of labels."""
    from toolkit.data.collate import pad_batch
    from toolkit.train.hf_trainer import text_only

    batch = text_only(pad_batch(features, pad_id))
    batch["completion_mask"] = (batch.pop("labels") != IGNORE).long()
    return batch


class PairCollator:
    """A batch of pairs as DPOTrainer reads it: the chosen sides, then the rejected sides (pixel values in the
    same order), padded together."""

    def __init__(self, items: list, pad_id: int) -> None:
        self.items, self.pad_id = items, pad_id

    def __call__(self, batch: list[dict]) -> dict:
        from toolkit.eval.scoring import features

        pairs = [self.items[b["row"]] for b in batch]
        sides = [p.chosen.encoded for p in pairs] + [p.rejected.encoded for p in pairs]
        return _padded([features(e) for e in sides], self.pad_id)


class UnpairedCollator:
    """A batch of labelled answers as KTOTrainer reads it, with its KL rows: each prompt with the batch's previous
    answer (TRL's rotation by one, so the mismatched answers are the batch's own)."""

    def __init__(self, items: list, pad_id: int) -> None:
        self.items, self.pad_id = items, pad_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        from toolkit.data.preference import prompt_length
        from toolkit.eval.scoring import features

        items = [self.items[b["row"]] for b in batch]
        sides = [(i.chosen or i.rejected).encoded for i in items]
        out = _padded([features(e) for e in sides], self.pad_id)
        out["label"] = torch.tensor([i.chosen is not None for i in items])
        kl = []
        for k, enc in enumerate(sides):
            other = sides[k - 1]
            p, q = prompt_length(enc), prompt_length(other)
            kl.append(
                {
                    "input_ids": enc.input_ids[:p] + other.input_ids[q:],
                    "labels": [IGNORE] * p + other.labels[q:],
                    "token_type_ids": enc.token_type_ids[:p] + other.token_type_ids[q:],
                    "pixel_values": None,  # the KL rows reuse the batch's pixel values: the same prompts, in order
                }
            )
        kl_batch = _padded(kl, self.pad_id)
        for key, value in kl_batch.items():
            out[f"KL_{key}"] = value
        if "token_type_ids" in out and "KL_token_type_ids" not in out:
            out["KL_token_type_ids"] = torch.zeros_like(out["KL_input_ids"])
        return out


def _trainer_classes() -> dict[str, type]:
    import torch
    import torch.nn.functional as F
    from trl import DPOTrainer, KTOTrainer

    from toolkit.train.hf_trainer import ToolkitTrainerMixin

    class ToolkitDPOTrainer(ToolkitTrainerMixin, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # rows are encoded by the template; the collator looks them up

    class ToolkitKTOTrainer(ToolkitTrainerMixin, KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class ReferenceFreeTrainer(ToolkitDPOTrainer):
        """ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024) as TRL's ORPOTrainer / CPOTrainer compute them,
        over the fused head's per-token log-probabilities; metrics under TRL's names. build_trainer sets `method`
        ("orpo" or "simpo") and `gamma` (SimPO's margin) on the instance."""

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            mask = inputs["completion_mask"]
            kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
            labels = inputs["input_ids"].masked_fill(mask == 0, IGNORE)
            out = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True)
            shift = mask[..., 1:]
            per_token = out.log_probs[:, -shift.size(1) :]
            counts = shift.sum(dim=1).clamp(min=1)
            mean = per_token.sum(dim=1) / counts  # both methods use length-normalised log-probabilities
            chosen, rejected = mean.chunk(2, dim=0)
            metrics = self._metrics[mode]
            if self.method == "simpo":
                margin = chosen - rejected - self.gamma / self.beta
                loss = -F.logsigmoid(self.beta * margin).mean()
            else:  # orpo: NLL of the chosen answers minus beta x log-sigmoid of the log odds ratio
                chosen_mask = shift.chunk(2, dim=0)[0]
                nll = -(per_token.chunk(2, dim=0)[0] * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
                log_odds = (chosen - rejected) - (
                    torch.log1p(-torch.exp(chosen).clamp(max=1 - 1e-6))
                    - torch.log1p(-torch.exp(rejected).clamp(max=1 - 1e-6))
                )
                ratio = F.logsigmoid(log_odds)
                loss = nll - self.beta * ratio.mean()
                metrics["nll_loss"].append(self.accelerator.gather(nll.detach()).mean().item())
                metrics["log_odds_ratio"].append(self.accelerator.gather(ratio.detach()).mean().item())
                metrics["log_odds_chosen"].append(self.accelerator.gather(log_odds.detach()).mean().item())
            chosen_rewards, rejected_rewards = self.beta * chosen.detach(), self.beta * rejected.detach()
            gather = self.accelerator.gather
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
            metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
            return (loss, out) if return_outputs else loss

    return {
        "dpo": ToolkitDPOTrainer,
        "kto": ToolkitKTOTrainer,
        "orpo": ReferenceFreeTrainer,
        "simpo": ReferenceFreeTrainer,
    }


def _order(n: int, seed: int) -> list[int]:
    """KTO reads its rows in order (its KL rows pair each prompt with the batch's previous answer, TRL's rule), so
    the shuffle is done once here, seeded: the same recipe gives the same batches, and a resumed run continues them."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def build_trainer(recipe: Recipe, model: Any, data: Any, args: dict, tokenizer: Any, callbacks: list) -> Any:
    """The method's TRL trainer over the encoded pairs (or, for KTO, labelled answers)."""
    from datasets import Dataset
    from trl import DPOConfig, KTOConfig

    from toolkit.train.hf_trainer import index_dataset

    t = recipe.training
    method, items = t.method, data.train + data.eval
    common = dict(args, max_length=None, beta=t.preference_beta)  # lengths are the data section's (max_seq_len)
    if method == "kto":
        config = KTOConfig(
            **common,
            desirable_weight=t.desirable_weight,
            undesirable_weight=t.undesirable_weight,
            train_sampling_strategy="sequential",
        )
        collator = UnpairedCollator(items, tokenizer.pad_token_id)
        train_rows = Dataset.from_dict({"row": _order(len(data.train), t.seed)})
    else:
        losses, weights = t.losses, None
        if method == "dpo" and t.rpo_alpha is not None:  # RPO: DPO + the chosen answers' NLL (TRL's `sft` loss)
            losses, weights = [*losses, "sft"], [1.0] * len(losses) + [t.rpo_alpha]
        config = DPOConfig(**common, loss_type=losses if method == "dpo" else ["sigmoid"], loss_weights=weights)
        collator = PairCollator(items, tokenizer.pad_token_id)
        train_rows = index_dataset(0, len(data.train))
    trainer = _trainer_classes()[method](
        model=model,
        args=config,
        train_dataset=train_rows,
        eval_dataset=index_dataset(len(data.train), len(data.eval)) if data.eval else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if method in ("orpo", "simpo"):
        trainer.method, trainer.gamma = method, t.gamma
    fresh = t.init_adapter is None
    if (method in ("orpo", "simpo") or fresh) and "ref" in model.peft_config:
        # TRL copies the starting adapter as the frozen reference ("ref") whenever it is handed a peft model. ORPO
        # and SimPO have no reference; a new adapter starts as the base (B = 0), where TRL's own reference is the
        # adapter disabled (what it does when it wraps the model itself): the same log-probabilities, without the
        # copy's LoRA matmuls in every reference pass.
        model.delete_adapter("ref")
        model.set_adapter("default")
    trainer.toolkit_summary = {"beta": t.preference_beta, "chunked_loss": True}
    return trainer


def score_held_out(base: Any, model: Any, data: Any, recipe: Recipe, reference: str | None) -> dict:
    """Held-out pairs: preference accuracy and margin of the base and the adapter (and of the starting adapter,
    the reference, when there is one); the DPO reward accuracy against the reference (or the base)."""
    import dataclasses

    from toolkit.data.preference import rejoin
    from toolkit.eval.preference import score_preferences_in_process

    pairs = rejoin(data.eval)  # KTO's held-out answers that came from pairs are scored as the pairs they were
    if not pairs:
        return {}
    models = {"base": None, **({"reference": reference} if reference else {}), "adapter": "default"}
    outcome = score_preferences_in_process(
        dataclasses.replace(base, model=model),
        model,
        pairs,
        models,
        "reference" if reference else "base",
        recipe.eval.batch_size,
    )
    return outcome.metrics
