"""GRPO, online RL over the shared run (trainer.py): TRL's GRPOTrainer, with the rollouts from the toolkit's engine
on the live adapter (rollouts.py) and the recipe's rewards (eval/rewards.py).

TRL keeps what it does well: the repeat sampler (each prompt num_generations times), the rollout buffer
(steps_per_generation, num_iterations), the clipped policy losses (dapo, grpo, dr_grpo, bnpo, cispo, sapo), the KL
term against the reference (beta > 0: the adapter disabled, or the init_adapter's frozen copy), its fused LM head for
the log-probabilities and its metric names. What it would do with the prompts is replaced: one method,
`_generate_and_score_completions`, where a batch's prompts are ours (encoded once by data/template.py, images
included), the completions come from the engine, and the rewards from the recipe.

Why that method and not TRL's `rollout_func`: a rollout_func returns token ids only, and TRL then renders the
prompts a second time with the processor's chat template to get the image inputs for the training forward; two
templates that must agree token for token, where the toolkit has one (data/template.py). Overriding the method
keeps one encoding for the rollout and the loss, and lets reward errors name the dataset row.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import deque
from pathlib import Path
from typing import Any

from toolkit.recipe import Recipe

SAMPLES_PER_LOG = 4  # completions written to completions.jsonl per logging step (with their rewards)


def group_advantages(rewards: Any, num_generations: int, scale: str) -> tuple[Any, Any]:
    """(advantages, whether each group's rewards had zero std): each reward minus its group's mean, divided by the
    group's std (scale "group"), the batch's ("batch") or nothing ("none"), NaN rewards left out of the statistics
    and given advantage 0. TRL's formula (GRPOTrainer computes it inline, so it is written here once more)."""
    import torch
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), zero_std


def _trainer_class() -> type:
    import torch
    from trl import GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import nanstd, pad, use_adapter

    from toolkit.eval.rewards import completion_text, reward_completion, reward_prompt, score_rewards, weighted_total
    from toolkit.train.hf_trainer import ToolkitTrainerMixin

    class ToolkitGRPOTrainer(ToolkitTrainerMixin, GRPOTrainer):
        """build_trainer sets: items (encoded prompt rows, train then eval), rewards, rollouts (RolloutEngine),
        run_dir (completions.jsonl)."""

        def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
            device = self.accelerator.device
            mode = "train" if self.model.training else "eval"
            rows = [self.items[x["row"]] for x in inputs]
            # seeds from torch's generator, which the Trainer seeds and restores on --resume: the same rollouts
            seeds = torch.randint(0, 2**62, (len(rows),), generator=None).tolist()
            rollouts = self.rollouts.generate([r.encoded for r in rows], seeds)
            n = self.num_generations
            tokenizer = self._tokenizer

            prompt_ids = pad(
                [torch.tensor(r.encoded.input_ids) for r in rows], padding_value=tokenizer.pad_token_id,
                padding_side="left",
            ).to(device)  # fmt: skip
            prompt_mask = pad(
                [torch.ones(len(r.encoded.input_ids), dtype=torch.long) for r in rows], padding_value=0,
                padding_side="left",
            ).to(device)  # fmt: skip
            completion_ids = pad(
                [torch.tensor(o.completion_ids, dtype=torch.long) for o in rollouts],
                padding_value=tokenizer.pad_token_id,
                padding_side="right",
            ).to(device)
            completion_mask = pad(
                [torch.ones(len(o.completion_ids), dtype=torch.long) for o in rollouts], padding_value=0
            ).to(device)
            truncated = torch.tensor([o.finish == "length" for o in rollouts], device=device)
            if self.mask_truncated_completions:
                completion_mask = completion_mask * (~truncated).unsqueeze(1).long()
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            keep = completion_ids.size(1)
            forward = self._image_inputs(rows, prompt_ids.size(1), keep, device)
            batch_size = self.args.per_device_train_batch_size

            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                old = None
                if self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations):
                    old, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, input_ids, attention_mask, keep, batch_size=batch_size, **forward
                    )
                ref = None
                if self.beta != 0.0:
                    model = self.accelerator.unwrap_model(self.model)
                    with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                        ref, _, _ = self._get_per_token_logps_and_entropies(
                            self.model, input_ids, attention_mask, keep, batch_size=batch_size, **forward
                        )

            # rewards: every process's, so a group split across processes is normalised whole (TRL's way)
            texts = [tokenizer.decode(o.completion_ids, skip_special_tokens=True) for o in rollouts]
            prompts = [reward_prompt(r.row) for r in rows]
            completions = [reward_completion(r.row, t) for r, t in zip(rows, texts, strict=True)]
            per_reward = score_rewards(
                self.rewards,
                prompts,
                completions,
                [o.completion_ids for o in rollouts],
                [r.row.columns for r in rows],
                [r.row.where for r in rows],
                trainer_state=self.state,
            )
            local = torch.tensor(per_reward, dtype=torch.float32, device=device).T.contiguous()  # [completions, R]
            every = self.accelerator.gather(local)
            total = torch.tensor(weighted_total(self.rewards, every.T.tolist()), device=device)
            advantages, zero_std = group_advantages(total, n, self.scale_rewards)
            index = self.accelerator.process_index
            advantages = advantages[index * len(rows) : (index + 1) * len(rows)]

            # metrics, under TRL's names
            m = self._metrics[mode]
            lengths = self.accelerator.gather(completion_mask.new_tensor([len(o.completion_ids) for o in rollouts]))
            cut = self.accelerator.gather(truncated)
            prompt_tokens = self.accelerator.gather(prompt_mask.sum()).sum()
            if mode == "train":
                self.state.num_input_tokens_seen += int(prompt_tokens + lengths.sum())
            m["num_tokens"] = [self.state.num_input_tokens_seen]
            m["completions/mean_length"].append(lengths.float().mean().item())
            m["completions/min_length"].append(lengths.float().min().item())
            m["completions/max_length"].append(lengths.float().max().item())
            m["completions/clipped_ratio"].append(cut.float().mean().item())
            ended = lengths[~cut].float() if (~cut).any() else lengths.new_zeros(1).float()
            m["completions/mean_terminated_length"].append(ended.mean().item())
            for i, reward in enumerate(self.rewards):
                m[f"rewards/{reward.name}/mean"].append(torch.nanmean(every[:, i]).item())
                m[f"rewards/{reward.name}/std"].append(nanstd(every[:, i]).item())
            m["reward"].append(torch.nanmean(total).item())
            m["reward_std"].append(nanstd(total).item())
            m["frac_reward_zero_std"].append(zero_std.float().mean().item())
            stats = self.rollouts.stats
            m["rollout/tokens_per_s"].append(stats["last_tokens"] / max(stats["last_seconds"], 1e-9))
            if old is not None:  # the engine's log-probabilities against the training forward's, same weights
                sampled = pad([torch.tensor(o.logprobs) for o in rollouts], padding_value=0.0).to(device)
                gap = ((sampled - old).abs() * completion_mask)[completion_mask.bool()]
                if gap.numel():
                    m["sampling/sampling_logp_difference/mean"].append(gap.mean().item())
                    m["sampling/sampling_logp_difference/max"].append(gap.max().item())
            for k in range(0, len(rows), max(1, len(rows) // SAMPLES_PER_LOG)):  # spread over the batch's groups
                self.samples.append(
                    {
                        "row": rows[k].row.where,
                        "prompt": completion_text(prompts[k]) if not rows[k].row.text_prompt else prompts[k],
                        "completion": texts[k],
                        "finish": rollouts[k].finish,
                        "rewards": {r.name: _number(local[k, i].item()) for i, r in enumerate(self.rewards)},
                        "advantage": round(advantages[k].item(), 4),
                    }
                )

            output = {
                "prompt_ids": prompt_ids,
                "prompt_mask": prompt_mask,
                "completion_ids": completion_ids,
                "completion_mask": completion_mask,
                "advantages": advantages,
                "num_items_in_batch": self.accelerator.gather(completion_mask.sum()).sum(),
                **forward,
            }
            if old is not None:
                output["old_per_token_logps"] = old
            if ref is not None:
                output["ref_per_token_logps"] = ref
            return output

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
            # TRL slices a batch's images per chunk of rows, and a chunk of text-only rows would hand the vision
            # tower an empty tensor (SigLIP fails on it): each chunk goes on its own, with images only if it has some
            pixel_values, num_images = kw.pop("pixel_values", None), kw.pop("num_images", None)
            types = kw.pop("token_type_ids", None)
            if pixel_values is None:
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, token_type_ids=types, **kw
                )
            size, total = kw.pop("batch_size", None) or input_ids.size(0), input_ids.size(0)
            first = [0, *itertools.accumulate(num_images)]
            logps, entropies = [], []
            for a in range(0, total, size):
                b = min(a + size, total)
                images = pixel_values[first[a] : first[b]]
                extra = {"pixel_values": images, "num_images": num_images[a:b], "token_type_ids": types[a:b]}
                lp, ent, _ = super()._get_per_token_logps_and_entropies(
                    model, input_ids[a:b], attention_mask[a:b], logits_to_keep, **(extra if len(images) else {}), **kw
                )
                logps.append(lp)
                entropies.append(ent)
            return torch.cat(logps), (None if entropies[0] is None else torch.cat(entropies)), None

        def _image_inputs(self, rows: list, prompt_width: int, completion_width: int, device: Any) -> dict:
            """pixel_values (every image of the batch, in row order), images per row, and token_type_ids marking the
            image tokens over the left-padded prompts and the completions; {} for a text-only batch."""
            with_images = [r for r in rows if r.encoded.num_images]
            if not with_images:
                return {}
            types = [
                [0] * (prompt_width - len(r.encoded.token_type_ids)) + r.encoded.token_type_ids + [0] * completion_width
                for r in rows
            ]
            dtype = self.accelerator.unwrap_model(self.model).get_input_embeddings().weight.dtype
            return {
                "pixel_values": torch.cat([r.encoded.pixel_values for r in with_images]).to(device, dtype),
                "num_images": [r.encoded.num_images for r in rows],
                "token_type_ids": torch.tensor(types, device=device),
            }

        def log(self, logs: dict, start_time: float | None = None) -> None:
            # a few sampled completions with their rewards per logging step, beside metrics.jsonl
            if self.samples and self.accelerator.is_main_process and self.model.training:
                with open(Path(self.run_dir) / "completions.jsonl", "a") as f:
                    for sample in self.samples:
                        f.write(json.dumps({"step": self.state.global_step, **sample}) + "\n")
            self.samples.clear()
            super().log(logs, start_time)

    return ToolkitGRPOTrainer


def _number(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def build_trainer(recipe: Recipe, model: Any, data: Any, args: dict, tokenizer: Any, callbacks: list) -> Any:
    """TRL's GRPOTrainer over the encoded prompts, its rollouts from the engine on `model` (the live adapter)."""
    from trl import GRPOConfig

    from toolkit.eval.rewards import build_rewards
    from toolkit.train.hf_trainer import index_dataset
    from toolkit.train.rollouts import RolloutEngine, RolloutSettings

    t = recipe.training
    rewards = build_rewards(t.rewards, Path(recipe.source).parent)
    config = GRPOConfig(
        **{**args, "include_num_input_tokens_seen": False},  # counted by the trainer itself (prompt + completion)
        beta=t.preference_beta,
        loss_type=t.losses[0],
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=t.top_k,
        epsilon=t.epsilon,
        epsilon_high=t.epsilon_high,
        steps_per_generation=t.steps_per_generation,
        num_iterations=t.num_iterations,
        scale_rewards=t.scale_rewards,
        mask_truncated_completions=t.mask_truncated_completions,
        reward_weights=[r.weight for r in rewards],
        log_completions=False,  # ours: completions.jsonl (TRL's prints a rich table into the progress bar)
    )
    trainer = _trainer_class()(
        model=model,
        reward_funcs=[r.fn for r in rewards],
        args=config,
        train_dataset=index_dataset(0, len(data.train)),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.reward_func_names = [r.name for r in rewards]
    trainer.items, trainer.rewards, trainer.run_dir = data.train + data.eval, rewards, args["output_dir"]
    trainer.samples = deque(maxlen=SAMPLES_PER_LOG * 8)
    settings = RolloutSettings(t.max_completion_length, t.temperature, t.top_p, t.top_k)
    trainer.rollouts = RolloutEngine(model, tokenizer, settings, max_batch=config.generation_batch_size)
    if t.init_adapter is None and "ref" in model.peft_config:
        # TRL copies the starting adapter as the frozen reference ("ref") when beta > 0; a new adapter starts as the
        # base (B = 0), where the adapter disabled gives the same log-probabilities without the copy's matmuls
        model.delete_adapter("ref")
        model.set_adapter("default")
    trainer.toolkit_summary = {
        "beta": t.preference_beta,
        "loss_type": t.losses[0],
        "num_generations": t.num_generations,
        "rewards": [r.name for r in rewards],
    }
    return trainer


def score_held_out(base: Any, model: Any, data: Any, recipe: Recipe, reference: str | None) -> dict:
    """Held-out prompts: the recipe's rewards of the greedy answer, base vs adapter (and the starting adapter)."""
    import dataclasses

    from toolkit.eval.evaluate import score_rewards_in_process
    from toolkit.eval.rewards import build_rewards

    rewards = build_rewards(recipe.training.rewards, Path(recipe.source).parent)
    if reference not in model.peft_config:
        reference = None  # beta 0: no frozen copy of the init adapter was made (nothing to score it as)
    models = {"base": None, **({"reference": reference} if reference else {}), "adapter": "default"}
    outcome = score_rewards_in_process(
        dataclasses.replace(base, model=model), model, data.eval, models, rewards, recipe.eval
    )
    return outcome.metrics
