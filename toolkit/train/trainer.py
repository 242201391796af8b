"""`toolkit train`: the one run every method shares (a QLoRA adapter on the frozen 4-bit base).

The method (`training.method`) brings its TRL trainer and its held-out scoring: sft.py (SFTTrainer over encoded
conversations), preference.py (DPO, KTO, ORPO, SimPO over encoded pairs), grpo.py (GRPOTrainer over prompts, rollouts
from the engine on the live adapter); everything else is here, once.

Order: arguments, setup, data, model, loop, save. The run folder `<output.dir>/.<name>.run/` holds checkpoints,
metrics.jsonl and TensorBoard logs while training (so `--resume` continues from the latest checkpoint with its
optimizer, scheduler, RNG and data position); the adapter is assembled in a temporary folder and renamed to
`<output.dir>/<name>/` at the end, so a crash never leaves half an adapter under that name. Ctrl-C saves a
checkpoint and stops. Distribution is accelerate's (`accelerate launch ... toolkit train`); no code here knows it,
except that only the main process scores and writes the adapter. The loss over the 262k vocabulary is computed in
chunks for long rows (`training.chunked_loss`, loss.py). Never imports the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError
from toolkit.recipe import Recipe


@dataclass
class TrainResult:
    adapter_dir: Path | None
    metrics: dict
    interrupted: bool = False
    step: int = 0
    model: Any = None  # the trained PeftModel (in-process callers and tests)


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: without a readable one, the save was cut short (SIGKILL)."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def _latest_checkpoint(run_dir: Path) -> Path | None:
    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _complete(p)]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


# the log keys the bar shows, and their short names (the preference methods log TRL's reward metrics)
PROGRESS_KEYS = {
    "loss": "loss",
    "eval_loss": "eval_loss",
    "rewards/accuracies": "reward_acc",
    "rewards/margins": "margin",
    "reward": "reward",
    "reward_std": "reward_std",
    "completions/mean_length": "len",
    "learning_rate": "lr",
}


def _callbacks(run_dir: Path, stop_flag: dict) -> list:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One bar: step, loss, learning rate, tokens/s and ETA; metrics.jsonl gets every log line."""

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                disable=not state.is_world_process_zero,
                dynamic_ncols=True,
            )
            self.t0, self.tokens0 = time.monotonic(), state.num_input_tokens_seen or 0

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)
            if stop_flag.get("stop"):  # Ctrl-C: checkpoint now, then stop
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = max(time.monotonic() - self.t0, 1e-9)
            tokens = (state.num_input_tokens_seen or 0) - self.tokens0
            record = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0, 4),
                **logs,
                "tokens_seen": state.num_input_tokens_seen,
                "tokens_per_s": round(tokens / elapsed, 1),
            }
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            post = {PROGRESS_KEYS[k]: f"{logs[k]:.4g}" for k in PROGRESS_KEYS if k in logs}
            self.bar.set_postfix(**post, tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return [Progress()]


def training_args(recipe: Recipe, run_dir: Path, device: str, has_eval: bool) -> dict:
    """The TrainingArguments every method's TRL config takes from the recipe (the method adds its own)."""
    t = recipe.training
    return dict(
        output_dir=str(run_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        # transformers 5.23's names: `gradient_checkpointing*` are deprecated aliases that warn (FutureWarning) when
        # set, and TRL's own `gradient_checkpointing=True` default stays silent once the new name is given
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="steps" if (t.eval_every and has_eval) else "no",
        eval_steps=t.eval_every or None,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        logging_steps=t.logging_every,
        logging_first_step=True,
        report_to=["tensorboard"],
        disable_tqdm=True,  # our Progress callback draws the one bar
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        bf16=device != "cpu",  # CUDA: bfloat16; CPU: float32 (never float16: Gemma 3 overflows it)
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        save_only_model=False,
    )


def _prepare_run_dir(run_dir: Path, final: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check what exists; return the checkpoint to resume from (or None)."""
    if final.exists() and not overwrite:
        raise ToolkitError(
            f"adapter {str(final)!r} already exists",
            where="output",
            fix="pass --overwrite to replace it, or --output NAME for a new name",
        )
    checkpoint = _latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume:
        if checkpoint is None:
            raise ToolkitError(
                f"nothing to resume: no checkpoint in {run_dir}",
                where="--resume",
                fix="start without --resume (set training.save_every to checkpoint during training)",
            )
        return checkpoint
    if run_dir.exists():
        if checkpoint is not None and not overwrite:
            raise ToolkitError(
                f"an unfinished run with checkpoints is in {run_dir}",
                where="output",
                fix="pass --resume to continue it, or --overwrite to start over",
            )
        shutil.rmtree(run_dir)
    return None


def _method(name: str) -> Any:
    """The module of a training method: build_trainer(...) and score_held_out(...)."""
    if name == "sft":
        from toolkit.train import sft

        return sft
    if name == "grpo":
        from toolkit.train import grpo

        return grpo
    from toolkit.train import preference

    return preference


def _start_adapter(recipe: Recipe, base: Any) -> tuple[Any, dict | None]:
    """The model to train: a new LoRA from the recipe's lora section, or `training.init_adapter` loaded trainable
    (its own shape: a lora section that asks for another one is refused rather than ignored)."""
    from toolkit.lora.config import apply_lora

    spec = recipe.training.init_adapter
    if spec is None:
        return apply_lora(base.model, recipe.lora), None
    from peft import PeftModel

    from toolkit.lora.folder import read_manifest, weights_fingerprint
    from toolkit.lora.registry import check_base_matches, resolve_adapter

    try:
        name, folder = resolve_adapter(spec, recipe.output.dir)
    except ToolkitError as err:
        raise ToolkitError(err.what, where="training.init_adapter", fix=err.fix) from None
    check_base_matches(folder, base)  # an adapter of another base would load and compute nonsense
    manifest = read_manifest(folder)
    trained = manifest["recipe"]["lora"]
    asked = recipe.lora.model_dump(include=recipe.lora.model_fields_set)
    differ = {k: (v, trained.get(k)) for k, v in asked.items() if trained.get(k) != v}
    if differ:
        key, (want, has) = next(iter(differ.items()))
        raise ToolkitError(
            f"lora.{key} is {want!r} but init_adapter {name!r} has {has!r}: a continued adapter keeps its shape",
            where="lora",
            fix="remove the lora section (or make it match the adapter's), or train a new adapter",
        )
    recipe.lora = recipe.lora.model_validate(trained)  # the manifest records the shape that was trained
    model = PeftModel.from_pretrained(base.model, str(folder), adapter_name="default", is_trainable=True)
    started = {
        "name": name,
        "path": str(folder),
        "fingerprint": weights_fingerprint(folder),
        "method": _method_of(manifest),
    }
    return model, started


def _method_of(manifest: dict) -> str:
    return manifest.get("recipe", {}).get("training", {}).get("method", "sft")


def train(
    recipe: Recipe, *, resume: bool = False, overwrite: bool = False, output_name: str | None = None
) -> TrainResult:
    """Train the recipe's adapter; return where it was written and the final metrics (main process)."""
    from transformers import set_seed

    from toolkit.base.loader import load_base, load_processor, prepare_recipe_base
    from toolkit.data.datasets import load_data
    from toolkit.train import image_masks

    # arguments
    name = output_name or recipe.adapter_name
    if not name or "/" in name or name.startswith("."):
        raise ToolkitError(f"bad adapter name {name!r}", where="--output", fix="use a plain folder name")
    if recipe.training.packing:
        raise ToolkitError(
            "packing is not supported for Gemma 3 here: TRL's padding-free packing needs flash-attention varlen "
            "kernels (none on CPU) and would let one row's image tokens attend bidirectionally across rows",
            where="training.packing",
            fix="set training.packing: false (batches are padded to their longest row)",
        )
    method = _method(recipe.training.method)
    out_root = Path(recipe.output.dir)
    final, run_dir = out_root / name, out_root / f".{name}.run"
    checkpoint = _prepare_run_dir(run_dir, final, resume, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)

    # setup
    set_seed(recipe.training.seed)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")

    # data
    base_path = prepare_recipe_base(recipe.base)
    processor = load_processor(base_path)
    t_data = time.monotonic()
    data = load_data(recipe.data, processor, recipe.training.method)
    data_s = time.monotonic() - t_data

    # model
    device = None if recipe.base.device == "auto" else recipe.base.device
    base = load_base(base_path, device=device, training=True, kernel=recipe.base.kernel)
    model, started_from = _start_adapter(recipe, base)
    image_masks.install(model)  # batches with images: their attention masks without transformers' vmap
    if recipe.training.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad

    # loop
    stop = {"stop": False}
    args = training_args(recipe, run_dir, base.device, has_eval=bool(data.eval))
    trainer = method.build_trainer(recipe, model, data, args, processor.tokenizer, _callbacks(run_dir, stop))

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our bar and metrics.jsonl carry them

    def on_sigint(signum, frame):
        stop["stop"] = True
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        signal.signal(signal.SIGINT, previous)
        if getattr(trainer, "rollouts", None) is not None:  # grpo's engine thread
            trainer.rollouts.close()
        # Several processes: end the process group while Python is whole. A rank that exits with it alive can abort
        # (SIGABRT) in interpreter teardown when gloo's threads still hold tensors, failing a finished run.
        trainer.accelerator.end_training()
    step = trainer.state.global_step
    if stop["stop"]:
        return TrainResult(None, {"checkpoint": str(_latest_checkpoint(run_dir))}, interrupted=True, step=step)
    if not trainer.accelerator.is_main_process:
        return TrainResult(None, {}, step=step)

    # save: score base and adapter on the held-out rows, then write the adapter folder atomically
    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics = {
        "train": {
            "method": recipe.training.method,
            "steps": step,
            "train_loss": output.training_loss,
            "runtime_s": output.metrics.get("train_runtime"),
            "data_encoding_s": round(data_s, 3),
            "tokens_seen": trainer.state.num_input_tokens_seen,
            **getattr(trainer, "toolkit_summary", {}),
            "kernel": f"{base.kernel} {str(base.dtype).removeprefix('torch.')}",
        }
    }
    if started_from:
        metrics["train"]["init_adapter"] = started_from
    columns = ["base", "adapter"]
    if data.eval:  # the same scoring as `toolkit eval`, on the model in memory
        metrics.update(method.score_held_out(base, model, data, recipe, "ref" if started_from else None))
        columns = [c for c in ("base", "reference", "adapter") if c in metrics]
    for extra in [a for a in model.peft_config if a != "default"]:
        model.delete_adapter(extra)  # a trainer's frozen reference copy is not part of the new adapter
    from toolkit.eval.report import markdown_table
    from toolkit.lora import folder as adapter_files

    table = markdown_table({c: metrics[c] for c in columns}, columns) if data.eval else None
    contents = adapter_files.AdapterContents(
        model, recipe, name, base, data, metrics, run_dir, metrics_table=table, started_from=started_from
    )
    adapter_files.write_adapter(final, contents, overwrite=overwrite)
    shutil.rmtree(run_dir, ignore_errors=True)
    return TrainResult(final, metrics, step=step, model=model)
