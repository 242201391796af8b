"""Training throughput: `toolkit train` vs a minimal hand-written TRL + peft script, same base, data and steps.

    .venv/bin/python bench/train_throughput.py [--steps 120] [--repeats 2] [--out docs/BENCHMARKS.md]

Both sides train the quickstart recipe's LoRA (r 16 on the 7 projections) on the tiny base for the same number
of optimizer steps with the same batch size, and report non-padding input tokens per second of training
(Trainer's own `num_input_tokens_seen` / `train_runtime`; the toolkit's one-time encoding of the rows is added
to its time). The ratio (toolkit / hand-written) is written to
docs/BENCHMARKS.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from report import cpus, replace_section  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"


def run_toolkit(base: Path, steps: int, out: Path) -> float:
    from toolkit.recipe import load_recipe
    from toolkit.train import train

    recipe = load_recipe(
        RECIPE,
        [
            f"base.path={base}",
            f"output.dir={out}",
            f"training.max_steps={steps}",
            "data.eval=null",
            "data.eval_fraction=0",
        ],
    )
    result = train(recipe, overwrite=True)
    m = result.metrics["train"]
    # the toolkit encodes rows once before training; charge that to it, as the hand-written script pays for
    # its encoding inside the training loop
    return m["tokens_seen"] / (m["runtime_s"] + m["data_encoding_s"])


def run_hand_written(base: Path, steps: int, out: Path) -> float:
    """What a user would write from TRL's docs: conversational rows with images, the processor, a LoraConfig."""
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    from toolkit.base import load_base

    loaded = load_base(base, device="cpu", training=True)  # the same 4-bit model object as the toolkit trains
    rows = []
    data_dir = ROOT / "recipes" / "data" / "quickstart"
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        messages, images = [], []
        for m in json.loads(line)["messages"]:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p["type"] == "image_url":
                        images.append(Image.open(data_dir / p["image_url"]["url"]).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": p["text"]})
                content = parts
            else:
                content = [{"type": "text", "text": content}]
            messages.append({"role": m["role"], "content": content})
        rows.append({"messages": messages, "images": images})
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        include_num_input_tokens_seen="non_padding",
        max_length=None,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=loaded.model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=loaded.processor,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|"
            r"gate_proj|up_proj|down_proj)",
        ),
    )
    output = trainer.train()
    return trainer.state.num_input_tokens_seen / output.metrics["train_runtime"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()

    from toolkit import tiny_base

    results: dict[str, list[float]] = {"toolkit": [], "hand-written": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_base.build(Path(tmp) / "base", seed=0)
        for i in range(args.repeats):  # alternate, so drift on the machine hits both sides alike
            results["toolkit"].append(run_toolkit(base, args.steps, Path(tmp) / f"tk{i}"))
            results["hand-written"].append(run_hand_written(base, args.steps, Path(tmp) / f"hw{i}"))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["toolkit"] / med["hand-written"]
    report = {
        "steps": args.steps,
        "repeats": args.repeats,
        "tokens_per_s": results,
        "median": med,
        "ratio_toolkit_over_hand_written": round(ratio, 3),
    }
    print(json.dumps(report, indent=2))
    section = "\n".join(
        [
            "## Training throughput: `toolkit train` vs a hand-written TRL + peft script",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} CPU ({cpus()} cores), tiny base, "
            f"quickstart training rows, {args.steps} optimizer steps of batch 4, {args.repeats} alternating runs each "
            "(`bench/train_throughput.py`). Non-padding input tokens per second of training (the toolkit's one-time",
            "row encoding counted in its time; the hand-written script encodes in its collator, every step):",
            "",
            "| | median tokens/s | runs |",
            "|---|---|---|",
            *(f"| {k} | {med[k]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |" for k, v in results.items()),
            "",
            f"**Ratio toolkit / hand-written: {ratio:.2f}** (goal >= 1.0).",
            "",
        ]
    )
    replace_section(Path(args.out), "## Training throughput", section)


if __name__ == "__main__":
    main()
