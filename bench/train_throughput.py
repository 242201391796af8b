"""Training throughput: `toolkit train` vs the script a user writes from the transformers, peft and TRL docs.

    .venv/bin/python bench/train_throughput.py [--steps 120] [--repeats 2] [--sizes tiny,small] [--out FILE]

Both sides train the quickstart recipe's LoRA (r 16 on the 7 projections) on the same GPTQ-layout base
(`toolkit tiny-base DIR --format gptq`, at each `--sizes` shape: kernels behave differently on bigger layers) for
the same number of optimizer steps with the same batch size, and report non-padding input tokens per second of
training (Trainer's own `num_input_tokens_seen` / `train_runtime`; the toolkit's one-time encoding of the rows is
added to its time). The baseline loads the folder with `AutoModelForImageTextToText.from_pretrained`, whatever
kernel and dtype transformers and GPTQModel pick. The ratio (toolkit / baseline; goal >= 1.2) is written to
docs/BENCHMARKS.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from report import cpu_label, cpus, replace_section  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"


def run_toolkit(base: Path, steps: int, out: Path, recipe_file: Path = RECIPE) -> float:
    from toolkit.recipe import load_recipe
    from toolkit.train.trainer import train

    recipe = load_recipe(
        recipe_file,
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
    _KERNELS["toolkit"] = m["kernel"]  # what auto picked (timed on this base and machine) or the recipe named
    # the toolkit encodes rows once before training; charge that to it, as the hand-written script pays for
    # its encoding inside the training loop
    return m["tokens_seen"] / (m["runtime_s"] + m["data_encoding_s"])


def _kernel_names(model) -> str:
    """The 4-bit linear classes in `model` (GPTQModel's kernels keep their packed `qweight`)."""
    return ", ".join(sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}))


def run_hand_written(base: Path, steps: int, out: Path) -> float:
    """What a user writes from the transformers, peft and TRL docs: the GPTQ folder loaded with `from_pretrained`
    (transformers and GPTQModel pick the kernel and dtype), conversational rows with images, the processor, a
    LoraConfig of the same shape; SFTTrainer does the rest. Nothing from the toolkit."""
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForImageTextToText.from_pretrained(str(base))
    fallback = ""
    if any(getattr(m, "SUPPORTS_TRAINING", True) is False for m in model.modules()):
        # On an AVX512-BF16 CPU GPTQModel picks TorchCpuAvx512Linear, which is inference-only: SFTTrainer's
        # model.train() raises NotImplementedError. A user then asks transformers for a trainable kernel, with the
        # `backend` its GPTQConfig documents ("auto_trainable"), which is what the baseline does too.
        from transformers import GPTQConfig

        fallback = f" (the default pick, {_kernel_names(model)}, cannot train: reloaded with backend auto_trainable)"
        model = AutoModelForImageTextToText.from_pretrained(
            str(base), quantization_config=GPTQConfig(bits=4, backend="auto_trainable")
        )
    processor = AutoProcessor.from_pretrained(str(base))
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
        gradient_checkpointing=False,  # as the quickstart recipe: same work on both sides
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
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        ),
    )
    _KERNELS["hand-written"] = f"{_kernel_names(model)} {str(model.dtype).replace('torch.', '')}{fallback}"
    output = trainer.train()
    return trainer.state.num_input_tokens_seen / output.metrics["train_runtime"]


_KERNELS: dict[str, str] = {}  # side -> the 4-bit kernel class and model dtype it trained with


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--sizes",
        default="tiny,small",
        help="bases to measure, comma-separated: builder sizes (tiny, small) or real-270m (the real Gemma 3 270M base, "
        "from the per-machine cache; trained with recipes/quickstart-270m.yaml)",
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()

    from toolkit.base import builder as tiny_base

    report: dict[str, dict] = {}
    for size in args.sizes.split(","):
        results: dict[str, list[float]] = {"toolkit": [], "hand-written": []}
        with tempfile.TemporaryDirectory() as tmp:
            # the GPTQ layout, which `from_pretrained` reads; the toolkit trains the same folder
            if size == "real-270m":
                from toolkit.base import real_weights

                base = real_weights.build(Path(tmp) / "base", fmt="gptq", progress=print)
                recipe = ROOT / "recipes" / "quickstart-270m.yaml"
            else:
                base = tiny_base.build(Path(tmp) / "base", seed=0, size=size, fmt="gptq")
                recipe = RECIPE
            for i in range(args.repeats):  # alternate, so drift on the machine hits both sides alike
                results["toolkit"].append(run_toolkit(base, args.steps, Path(tmp) / f"tk{i}", recipe))
                results["hand-written"].append(run_hand_written(base, args.steps, Path(tmp) / f"hw{i}"))
        med = {k: statistics.median(v) for k, v in results.items()}
        report[size] = {
            "tokens_per_s": results,
            "median": med,
            "kernels": dict(_KERNELS),
            "ratio_toolkit_over_hand_written": round(med["toolkit"] / med["hand-written"], 3),
        }
    print(json.dumps({"steps": args.steps, "repeats": args.repeats, **report}, indent=2))
    lines = [
        "## Training throughput: `toolkit train` vs a plain transformers + peft + TRL script",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_label()} ({cpus()} cores), quickstart training rows, "
        f"{args.steps} optimizer steps of batch 4, LoRA r 16 on the 7 projections, "
        f"no gradient checkpointing, {args.repeats} alternating runs each (`bench/train_throughput.py`). The baseline "
        "loads the GPTQ-layout folder with `AutoModelForImageTextToText.from_pretrained` (the kernel transformers "
        "and GPTQModel pick), wraps it with peft through SFTTrainer's `peft_config` and trains on conversational rows "
        "with the processor; the toolkit trains the same folder. Non-padding input tokens per second of training (the "
        "toolkit's one-time row encoding counted in its time; neither side's model loading, nor the toolkit's "
        "one-time timing of its training kernels on a new machine, kernel_probe.py):",
        "",
        "| base | side | kernel, dtype | median tokens/s | runs |",
        "|---|---|---|---|---|",
    ]
    for size, r in report.items():
        for side, runs in r["tokens_per_s"].items():
            lines.append(
                f"| {size} | {side} | {r['kernels'].get(side, '?')} | {r['median'][side]:.0f} | "
                f"{', '.join(f'{x:.0f}' for x in runs)} |"
            )
    lines += [
        "",
        "Ratio toolkit / baseline: "
        + "; ".join(f"**{size} {r['ratio_toolkit_over_hand_written']:.2f}**" for size, r in report.items())
        + " (goal >= 1.2).",
        "",
    ]
    replace_section(Path(args.out), "## Training throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
