"""GRPO speed: the toolkit's rollouts (its serving engine on the live adapter) vs TRL's own generation path.

    .venv/bin/python bench/grpo_rollouts.py [--base DIR[=STEPS] ...] [--prompts-per-step 1 [4]] [--steps 8]
                                            [--skip 2] [--max-tokens 64] [--repeats 1] [--side both|toolkit|peer]
                                            [--work build/grpo-rollouts] [--quiet-wait 600] [--max-others 0.15]
                                            [--retries 2] [--timeout 1500]
                                            [--out FILE] [--report-only]

Both sides train a new GRPO adapter on the same base folder, the same prompts and the same settings: num_generations
8, max_completion_length --max-tokens (default 64), temperature 1.0, top_p 1, top_k 0, beta 0 (no reference pass),
loss dapo, epsilon 0.2, rewards scaled by the group's std, one optimisation pass per rollout (num_iterations 1),
LoRA r 16 / alpha 32 / dropout 0 on the 7 default projections of the language model, learning rate 1e-5 constant,
no warmup, no gradient checkpointing, seed 0, logging every step, and one reward: the completion's length near 32
tokens (its value does not matter here; it only has to be cheap and the same on both sides). A step is P prompts x
8 completions (--prompts-per-step P: batch_size 8P, grad_accum 1, so every optimizer step is one rollout batch of
8P completions; TRL's per_device_train_batch_size counts completions). Each side runs in its own fresh subprocess,
one after the other (--repeats alternates them), with GPTQMODEL_CPU_WORKERS=2 unless set:
  toolkit  `python -m cli train RECIPE --overwrite`, the recipe written under --work from the settings above
           (training.method grpo). Its rollouts: toolkit/train/rollouts.py (the serving engine, every completion of
           the rollout batch in one continuous batch).
  peer     this file with --child-peer: nothing from the toolkit. The script a user writes from TRL's GRPO docs:
           `AutoModelForImageTextToText.from_pretrained` on the GPTQ-layout folder (a compressed-tensors base is
           given as the toolkit's lossless repack, `quant_format.ensure_gptq`, made by the parent before the child
           starts, as bench/dpo_peer.py does); where GPTQModel's default kernel cannot train (TorchCpuAvx512Linear on
           an AVX512-BF16 CPU) it reloads with `GPTQConfig(backend="auto_trainable")`. A peft `LoraConfig` through
           `peft_config`, `GRPOConfig` with the values above (use_vllm False, TRL's default: its generation is
           transformers' `model.generate` on the peft model, all 8P completions of the batch left-padded into one
           `generate` call), TRL's other defaults (bf16), the prompts as a `datasets.Dataset` in TRL's
           conversational form, the reward as a Python function, the processor as processing_class.
Prompts: the tiny and small bases take the text rows of recipes/data/quickstart/grpo_train.jsonl (32 rows; the 48
image rows are left out, the peer script would need an image pipeline of its own); the real 270M (262k vocabulary)
takes 40 short questions written here (build/grpo-rollouts/data/questions.jsonl). --prompts quickstart|questions
overrides.
Measured per side, over the steps after --skip (default 2: the first steps carry one-time costs, lazy inits and
allocator growth, and the toolkit's first rollout starts its engine), each as the median over those steps (the
machine may be shared: a step slowed by another process moves a median little; the totals are in the JSON too):
  rollout tok/s  completion tokens (each completion's ids including its stop token, as TRL keeps them) / seconds of
                 the step's rollout. Toolkit: its own `rollout/tokens_per_s` (rollouts.py times
                 RolloutEngine.generate). Peer: TRL's `GRPOTrainer._generate_single_turn` wrapped on the instance (the
                 padding, the `generate` call and TRL's cut after the first EOS; the prompts' chat-template
                 tokenisation before it is outside, as the toolkit's prompts are encoded once before training).
  s/step         time between the logs of consecutive steps; each side's time since on_train_begin at its on_log
                 (the toolkit's progress callback: tokens_seen / its tokens_per_s, which is that time; the peer: a
                 callback taking the same two instants). Model loading and data encoding are outside it.
  step_time      TRL's own `step_time` metric (Trainer.training_step: the rollout, rewards, the loss forward and
                 backward; not the optimizer step).
  rollout share  the step's rollout seconds / its duration.
  mean length    `completions/mean_length` (TRL's metric on both sides), the mean. The two sides sample different
                 text, so their lengths differ: tok/s normalises the rollout; s/step does not.
  others' CPU    what other processes took while the side ran: (busy CPU seconds of all cores, /proc/stat) - (the
                 child's own, its rusage), over wall x cores. Before each child the parent waits (--quiet-wait, at
                 most) for the machine to be under 20% busy, and a run during which the others took more than
                 --max-others (15%) is run again (--retries 2 at most; the discarded runs stay in the JSON).
Ratios: rollout = toolkit tok/s / peer tok/s (goal >= 3); step = peer s/step / toolkit s/step. JSON to stdout (last
line), a table, and with --out that markdown file's section (bench/report.py). Child logs, recipes, adapters under
--work. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PEER_MARK = "GRPO_PEER_RESULT "
NUM_GENERATIONS = 8
LENGTH_TARGET = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {
    "learning_rate": 1.0e-5,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "beta": 0.0,
    "loss_type": "dapo",
    "epsilon": 0.2,
    "scale_rewards": "group",
    "num_iterations": 1,
    "mask_truncated_completions": False,
    "gradient_checkpointing": False,
    "seed": 0,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
}

# the real 270M's prompts: short questions a pretrained 270M answers in a few words or a sentence
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("How many legs does a spider have?", "eight"),
    ("How many days are in a week?", "seven"),
    ("How many continents are there?", "seven"),
    ("What is 7 plus 5?", "12"),
    ("What is 9 times 3?", "27"),
    ("What is 100 minus 42?", "58"),
    ("What is half of 18?", "9"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color are ripe bananas?", "yellow"),
    ("What color is fresh grass?", "green"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of early?", "late"),
    ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"),
    ("What is a young cat called?", "kitten"),
    ("What is a young dog called?", "puppy"),
    ("What is a young cow called?", "calf"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("What is water made of?", "hydrogen"),
    ("At what temperature in Celsius does water freeze?", "0"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the largest mammal?", "whale"),
    ("What do bees make?", "honey"),
    ("What is the tallest animal?", "giraffe"),
    ("Which month comes after March?", "April"),
    ("What comes next: 2, 4, 6, 8?", "10"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("Name a primary color.", "red"),
]


# ------------------------------------------------------------------------------------------------- the prompts


def ensure_prompts(work: Path) -> dict[str, Path]:
    """The two prompt files (prompt-only rows {"prompt": messages, "answer": ...}), written once under work/data."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    quick = data / "quickstart-text.jsonl"
    rows = [json.loads(x) for x in (ROOT / "recipes/data/quickstart/grpo_train.jsonl").read_text().splitlines() if x]
    text = [r for r in rows if not r.get("images")]
    quick.write_text("".join(json.dumps(r) + "\n" for r in text))
    questions = data / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"prompt": [{"role": "user", "content": q}], "answer": a}) + "\n" for q, a in QUESTIONS)
    )
    return {"quickstart": quick, "questions": questions}


# ------------------------------------------------------------------------------------------ running a child


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ---------------------------------------------------------------------------------------------- the peer


def peer_child(config_file: str) -> None:
    """The plain TRL GRPO script, in this process: what a user writes from the TRL, transformers and peft docs."""
    t_start = time.monotonic()
    cfg = json.loads(Path(config_file).read_text())
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForImageTextToText.from_pretrained(cfg["base"])
    fallback = ""
    if any(getattr(m, "SUPPORTS_TRAINING", True) is False for m in model.modules()):
        # the default pick (TorchCpuAvx512Linear on an AVX512-BF16 CPU) is inference-only: model.train() would
        # raise. The user asks transformers for a trainable kernel (GPTQConfig's `backend`).
        from transformers import GPTQConfig

        fallback = f" (the default pick, {_kernel_names(model)}, cannot train: reloaded with backend auto_trainable)"
        del model
        model = AutoModelForImageTextToText.from_pretrained(
            cfg["base"], quantization_config=GPTQConfig(bits=4, backend="auto_trainable")
        )
    processor = AutoProcessor.from_pretrained(cfg["base"])
    rows = [json.loads(line) for line in Path(cfg["train"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    target = cfg["length_target"]
    stops = set(cfg["stop_ids"])

    def near_length(completions, completion_ids, **kwargs):
        """1 - |n - target| / target, at least 0; n without the trailing stop token (the toolkit's `length`)."""
        out = []
        for ids in completion_ids:
            n = len(ids) - 1 if ids and int(ids[-1]) in stops else len(ids)
            out.append(max(0.0, 1.0 - abs(n - target) / target))
        return out

    class Clock(TrainerCallback):  # the instants the toolkit's progress callback takes: train begin, each log
        def __init__(self) -> None:
            self.t0, self.times, self.began = 0.0, {}, None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()
            self.began = self.t0 - t_start

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "train_loss" not in logs:
                self.times.setdefault(state.global_step, time.monotonic() - self.t0)

    s = cfg["settings"]
    ckpt = s["gradient_checkpointing"]
    args = GRPOConfig(
        output_dir=cfg["output_dir"],
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=s["learning_rate"],
        lr_scheduler_type=s["lr_scheduler"],
        warmup_steps=s["warmup_ratio"],
        num_generations=cfg["num_generations"],
        max_completion_length=cfg["max_tokens"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        top_k=s["top_k"],
        beta=s["beta"],
        loss_type=s["loss_type"],
        epsilon=s["epsilon"],
        scale_rewards=s["scale_rewards"],
        num_iterations=s["num_iterations"],
        mask_truncated_completions=s["mask_truncated_completions"],
        use_vllm=False,
        activation_checkpointing=ckpt,  # transformers 5.23's name (gradient_checkpointing is its deprecated alias)
        activation_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        seed=s["seed"],
        data_seed=s["seed"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    lora = s["lora"]
    clock = Clock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=near_length,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=cfg["target_regex"],
            task_type="CAUSAL_LM",
        ),
        callbacks=[clock],
    )

    # TRL's generation, timed: the method its _generate calls for the completions of a batch (no vLLM: generate)
    rollouts: list[dict] = []
    generate = trainer._generate_single_turn

    def timed_generation(*a, **kw):
        t0 = time.perf_counter()
        completion_ids, logprobs = generate(*a, **kw)
        rollouts.append(
            {
                "step": trainer.state.global_step + 1,
                "seconds": time.perf_counter() - t0,
                "tokens": sum(len(c) for c in completion_ids),
                "rows": len(completion_ids),
            }
        )
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generation
    kernel = f"{_kernel_names(trainer.model)} {str(trainer.model.dtype).replace('torch.', '')}{fallback}"
    out = trainer.train()
    records = [r for r in trainer.state.log_history if "train_loss" not in r]
    gen = trainer.generation_config
    result = {
        "kernel": kernel,
        "bf16": args.bf16,
        "steps": trainer.state.global_step,
        "train_runtime_s": out.metrics.get("train_runtime"),
        "startup_s": round(clock.began, 2) if clock.began is not None else None,
        "log_times": {str(k): v for k, v in clock.times.items()},
        "rollouts": rollouts,
        "records": [
            {k: r.get(k) for k in ("step", "step_time", "completions/mean_length", "completions/clipped_ratio")}
            for r in records
        ],
        "generation": {
            k: getattr(gen, k, None) for k in ("do_sample", "temperature", "top_p", "top_k", "eos_token_id")
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(PEER_MARK + json.dumps(result), flush=True)


def _kernel_names(model) -> str:
    """The 4-bit linear classes in `model` (GPTQModel's kernels keep their packed `qweight`)."""
    return ", ".join(sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}))


# ------------------------------------------------------------------------------------------ the measures


def window(per_step: dict[int, dict], times: dict[int, float], skip: int) -> dict:
    """Over the steps after `skip`: each step's rollout tok/s, its duration (log to log) and TRL's step_time, as
    medians (the headline: a step slowed by another process on the shared machine moves a median little) and as
    totals (tokens / seconds summed, (last log - log of step `skip`) / steps); the mean completion length."""
    steps = sorted(s for s in per_step if s > skip)
    rated = [s for s in steps if per_step[s].get("tokens") is not None and per_step[s].get("rollout_s")]
    tokens = sum(per_step[s]["tokens"] for s in rated)
    seconds = sum(per_step[s]["rollout_s"] for s in rated)
    durations = {s: times[s] - times[s - 1] for s in steps if s in times and s - 1 in times}
    for s in durations:
        per_step[s]["duration_s"] = round(durations[s], 4)
    timed = sorted(s for s in times if s >= skip)
    s_per_step_total, span = None, None
    if len(timed) >= 2:
        first, last = timed[0], timed[-1]
        s_per_step_total, span = (times[last] - times[first]) / (last - first), f"steps {first}..{last}"
    step_times = [per_step[s]["step_time"] for s in steps if per_step[s].get("step_time") is not None]
    lengths = [per_step[s]["mean_length"] for s in steps if per_step[s].get("mean_length") is not None]
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    rates = [per_step[s]["tokens"] / per_step[s]["rollout_s"] for s in rated]
    shares = [per_step[s]["rollout_s"] / durations[s] for s in rated if durations.get(s)]
    return {
        "window_steps": steps,
        "rollout_tokens_per_s": med(rates),
        "s_per_step": med(list(durations.values())),
        "step_time": med(step_times),
        "rollout_share": med(shares),
        "mean_length": statistics.mean(lengths) if lengths else None,
        "rollout_tokens": tokens,
        "rollout_s": round(seconds, 4),
        "rollout_tokens_per_s_total": tokens / seconds if seconds else None,
        "s_per_step_total": s_per_step_total,
        "s_per_step_window": span,
        "slowest_over_fastest_step": max(durations.values()) / min(durations.values()) if durations else None,
    }


def _records(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# --------------------------------------------------------------------------------------------- the sides


def run_measured(cmd: list[str], log: Path, timeout: float) -> dict:
    """dpo_peer.run_measured (stdout, stderr to `log`, peak RSS, the progress bar's steps timestamped)."""
    from dpo_peer import run_measured as measured

    waited, busy = wait_quiet(QUIET_WAIT[0])
    before, busy0, own0 = os.getloadavg()[0], _busy_seconds(), _children_cpu()
    run = measured(cmd, log=log, env=child_env(), timeout=timeout)
    # the machine is shared: what the other processes took while the child ran (all busy CPU time less the child's
    # own, from its rusage), the 1-minute load before and after, and the wait for a quiet machine before it
    others = (_busy_seconds() - busy0) - (_children_cpu() - own0)
    run["load_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    run["others_cpu_share"] = round(max(0.0, others) / (run["wall_s"] * (os.cpu_count() or 1)), 3)
    run["quiet_wait"] = {"waited_s": round(waited, 1), "busy_before": round(busy, 3)}
    return run


QUIET_WAIT = [0.0]  # --quiet-wait: seconds to wait, at most, for the machine to be idle before each child


def _busy_seconds() -> float:
    """CPU seconds spent busy on every core since boot (/proc/stat: all but idle and iowait)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def wait_quiet(limit: float, threshold: float = 0.2, sample: float = 3.0) -> tuple[float, float]:
    """Wait (at most `limit` seconds) until the machine's cores are less than `threshold` busy over `sample`
    seconds (other people's jobs); return the wait and the last busy fraction."""
    t0 = time.monotonic()
    while True:
        b0 = _busy_seconds()
        time.sleep(sample)
        busy = (_busy_seconds() - b0) / (sample * (os.cpu_count() or 1))
        if busy < threshold or time.monotonic() - t0 >= limit:
            return time.monotonic() - t0, busy


def write_recipe(cfg: dict, path: Path) -> None:
    import yaml

    s = cfg["settings"]
    recipe = {
        "base": {"path": cfg["base"]},
        "data": {"train": cfg["train"], "eval_fraction": 0.0, "max_seq_len": 512},
        "lora": {**s["lora"], "target_modules": LORA_TARGETS},
        "training": {
            "method": "grpo",
            "rewards": [{"type": "length", "target": cfg["length_target"]}],
            "num_generations": cfg["num_generations"],
            "max_completion_length": cfg["max_tokens"],
            "temperature": s["temperature"],
            "top_p": s["top_p"],
            "top_k": s["top_k"],
            "beta": s["beta"],
            "loss_type": [s["loss_type"]],
            "epsilon": s["epsilon"],
            "scale_rewards": s["scale_rewards"],
            "num_iterations": s["num_iterations"],
            "mask_truncated_completions": s["mask_truncated_completions"],
            "max_steps": cfg["steps"],
            "learning_rate": s["learning_rate"],
            "lr_scheduler": s["lr_scheduler"],
            "warmup_ratio": s["warmup_ratio"],
            "batch_size": cfg["batch_size"],
            "grad_accum": 1,
            "gradient_checkpointing": s["gradient_checkpointing"],
            "seed": s["seed"],
            "logging_every": 1,
        },
        "output": {"name": "grpo-bench"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by bench/grpo_rollouts.py\n" + yaml.safe_dump(recipe, sort_keys=False))


def run_toolkit(cfg: dict, i: int, work: Path, timeout: float) -> dict:
    out_dir = work / f"toolkit-{i}"
    recipe = work / "recipe.yaml"
    write_recipe(cfg, recipe)
    adapters = out_dir / "adapters"
    cmd = [sys.executable, "-m", "cli", "train", str(recipe), "--overwrite", "--set", f"output.dir={adapters}"]
    run = run_measured(cmd, out_dir / "log.txt", timeout)
    side = {"side": "toolkit", "rc": run["rc"], "wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"]}
    side.update(log=run["log"], load_1min=run["load_1min"], others_cpu_share=run["others_cpu_share"])
    side["quiet_wait"] = run["quiet_wait"]
    if run["rc"] != 0:
        side["error"] = f"exit {run['rc']}; see {run['log']}"
        return side
    adapter = adapters / "grpo-bench"
    rows = cfg["batch_size"]
    per_step: dict[int, dict] = {}
    times: dict[int, float] = {}
    for r in _records(adapter / "metrics.jsonl"):
        if "train_loss" in r or "step" not in r:
            continue
        step = int(r["step"])
        tps, length = r.get("rollout/tokens_per_s"), r.get("completions/mean_length")
        tokens = round(length * rows) if length is not None else None
        per_step[step] = {
            "tokens": tokens,
            "rollout_s": tokens / tps if tokens is not None and tps else None,
            "step_time": r.get("step_time"),
            "mean_length": length,
        }
        if r.get("tokens_seen") and r.get("tokens_per_s"):  # the progress callback's elapsed, exactly
            times.setdefault(step, r["tokens_seen"] / r["tokens_per_s"])
    timing = "metrics.jsonl: tokens_seen / tokens_per_s (time since train begin at each log)"
    if len(times) < 2:
        times, timing = dict(run["bar_steps"]), "progress bar on stderr (timestamped by the parent)"
    manifest = json.loads((adapter / "toolkit.json").read_text()) if (adapter / "toolkit.json").exists() else {}
    train = manifest.get("metrics", {}).get("train", {})
    side.update(
        kernel=train.get("kernel"),
        steps=train.get("steps"),
        train_runtime_s=train.get("runtime_s"),
        timing=timing,
        per_step={str(k): v for k, v in sorted(per_step.items())},
        times={str(k): round(v, 4) for k, v in sorted(times.items())},
        **window(per_step, times, cfg["skip"]),
    )
    return side


def run_peer(cfg: dict, i: int, work: Path, timeout: float) -> dict:
    out_dir = work / f"peer-{i}"
    config = out_dir / "config.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({**cfg, "base": cfg["peer_base"], "output_dir": str(out_dir / "trainer")}, indent=2))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-peer", str(config)]
    run = run_measured(cmd, out_dir / "log.txt", timeout)
    lines = [line for line in run["stdout"].splitlines() if line.startswith(PEER_MARK)]
    side = {"side": "peer", "rc": run["rc"], "wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"]}
    side.update(log=run["log"], load_1min=run["load_1min"], others_cpu_share=run["others_cpu_share"])
    side["quiet_wait"] = run["quiet_wait"]
    if run["rc"] != 0 or not lines:
        side["error"] = f"exit {run['rc']}; see {run['log']}"
        return side
    r = json.loads(lines[-1][len(PEER_MARK) :])
    per_step: dict[int, dict] = {}
    for g in r.pop("rollouts"):
        per_step.setdefault(g["step"], {"tokens": 0, "rollout_s": 0.0})
        per_step[g["step"]]["tokens"] += g["tokens"]
        per_step[g["step"]]["rollout_s"] += g["seconds"]
    for rec in r.pop("records"):
        if rec.get("step") is None:
            continue
        d = per_step.setdefault(int(rec["step"]), {"tokens": None, "rollout_s": None})
        d.update(step_time=rec.get("step_time"), mean_length=rec.get("completions/mean_length"))
    times = {int(k): v for k, v in r.pop("log_times").items()}
    side.update(r)
    side.update(
        timing="time since on_train_begin at each on_log (callback)",
        per_step={str(k): v for k, v in sorted(per_step.items())},
        times={str(k): round(v, 4) for k, v in sorted(times.items())},
        **window(per_step, times, cfg["skip"]),
    )
    return side


# ---------------------------------------------------------------------------------------------- planning


def make_config(base_arg: str, p: int, args: argparse.Namespace, prompts: dict[str, Path]) -> dict:
    from toolkit.base.quant_format import ensure_gptq
    from toolkit.constants import STOP_TOKEN_IDS

    base_s, _, steps_s = base_arg.partition("=")
    base = Path(base_s)
    base = base if base.is_absolute() else ROOT / base
    if not (base / "config.json").exists():
        raise SystemExit(f"no base at {base} (README: toolkit tiny-base DIR [--weights gemma-3-270m])")
    steps = int(steps_s) if steps_s else args.steps
    skip = max(1, min(args.skip, steps - 2))
    config = json.loads((base / "config.json").read_text())
    vocab = (config.get("text_config") or config).get("vocab_size")
    kind = args.prompts or ("questions" if vocab and vocab > 100_000 else "quickstart")
    gptq = ensure_gptq(base)  # the folder the peer's from_pretrained reads (the base itself if already GPTQ layout)
    label = f"{base.name}-p{p}-t{args.max_tokens}"
    return {
        "label": label,
        "base": str(base),
        "peer_base": str(gptq),
        "vocab": vocab,
        "prompts": kind,
        "train": str(prompts[kind]),
        "steps": steps,
        "skip": skip,
        "prompts_per_step": p,
        "batch_size": NUM_GENERATIONS * p,
        "num_generations": NUM_GENERATIONS,
        "max_tokens": args.max_tokens,
        "length_target": LENGTH_TARGET,
        "stop_ids": sorted(int(x) for x in STOP_TOKEN_IDS),
        "settings": SETTINGS,
        # the language model's 7 projections (the toolkit's default scope: not the vision tower's)
        "target_regex": r".*language_model.*\.(" + "|".join(re.escape(m) for m in LORA_TARGETS) + ")",
    }


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def summarise(runs: dict[str, list[dict]], max_others: float) -> dict:
    """Medians over each side's runs; only those the other processes left alone (<= max_others) where any are."""
    out = {}
    for s, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        quiet = [r for r in ok if r.get("others_cpu_share", 0) <= max_others]
        ok = quiet or ok
        out[s] = {
            k: _median([r.get(k) for r in ok])
            for k in (
                "rollout_tokens_per_s",
                "s_per_step",
                "step_time",
                "mean_length",
                "rollout_share",
                "rollout_tokens_per_s_total",
                "s_per_step_total",
            )
        }
        out[s]["peak_rss_bytes"] = _median([r["peak_rss_bytes"] for r in ok])
        out[s]["others_cpu_share"] = [r.get("others_cpu_share") for r in ok]
        out[s]["runs_used"] = f"{len(ok)} of {len(rs)}" + ("" if quiet else " (none quiet)")
        out[s]["kernel"] = next((r.get("kernel") for r in ok), None)
        out[s]["each_tokens_per_s"] = [r.get("rollout_tokens_per_s") for r in rs]
        out[s]["each_s_per_step"] = [r.get("s_per_step") for r in rs]
        out[s]["errors"] = [r["error"] for r in rs if "error" in r]
    tk, pe = out.get("toolkit", {}), out.get("peer", {})
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    out["ratios"] = {
        "rollout_tokens_per_s_toolkit_over_peer": ratio(tk.get("rollout_tokens_per_s"), pe.get("rollout_tokens_per_s")),
        "s_per_step_peer_over_toolkit": ratio(pe.get("s_per_step"), tk.get("s_per_step")),
        "step_time_peer_over_toolkit": ratio(pe.get("step_time"), tk.get("step_time")),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", default=["build/tiny-base"], help="base folders, each DIR or DIR=STEPS")
    ap.add_argument("--prompts-per-step", nargs="+", type=int, default=[1], help="prompts per rollout batch / step")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (a base's =STEPS overrides)")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the measures (warm-up)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_completion_length")
    ap.add_argument("--prompts", choices=["quickstart", "questions"], default=None)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    ap.add_argument("--side", choices=["both", "toolkit", "peer"], default="both")
    ap.add_argument("--work", default=str(ROOT / "build" / "grpo-rollouts"), help="child logs, recipes, adapters")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=600,
        help="seconds to wait at most before each child for the shared machine to be idle (< 20%% busy)",
    )
    ap.add_argument(
        "--max-others",
        type=float,
        default=0.15,
        help="a side's run during which other processes "
        "took more than this share of the CPU is run again (--retries times at most)",
    )
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per child process")
    ap.add_argument("--out", default=None, help="markdown file whose section to write (e.g. docs/BENCHMARKS.md)")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="no runs: the table from the configurations' result.json under --work (written by earlier runs)",
    )
    ap.add_argument("--child-peer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_peer:
        return peer_child(args.child_peer)

    sys.path.insert(0, str(ROOT))
    from report import cpu_label, cpus, replace_section

    QUIET_WAIT[0] = args.quiet_wait
    work = Path(args.work).resolve()
    prompts = ensure_prompts(work)
    configs = [make_config(b, p, args, prompts) for b in args.base for p in args.prompts_per_step]
    sides = ["toolkit", "peer"] if args.side == "both" else [args.side]
    cpu = f"{cpu_label()} ({cpus()} cores)"
    results = []
    for cfg in configs:
        cwork = work / cfg["label"]
        if args.report_only:  # the table from earlier runs' results (one invocation per base and P, one table)
            if not (cwork / "result.json").exists():
                raise SystemExit(f"no result at {cwork / 'result.json'}: run that configuration first")
            result = json.loads((cwork / "result.json").read_text())
            result["summary"] = summarise(result["runs"], args.max_others)
            results.append(result)
            continue
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        discarded: list[dict] = []
        for i in range(args.repeats):  # alternate, so drift on the machine hits both sides alike
            for s in sides:
                for attempt in range(args.retries + 1):
                    r = (run_toolkit if s == "toolkit" else run_peer)(cfg, i, cwork, args.timeout)
                    if "error" in r or r["others_cpu_share"] <= args.max_others or attempt == args.retries:
                        break
                    # another job took the machine during the run: keep it in the JSON, run the side again
                    discarded.append(r)
                    print(
                        f"[{cfg['label']} {s} {i + 1}/{args.repeats}] other processes took "
                        f"{100 * r['others_cpu_share']:.0f}% of the CPU: run again",
                        file=sys.stderr,
                        flush=True,
                    )
                runs[s].append(r)
                status = r.get("error") or (
                    f"rollout {_fmt(r.get('rollout_tokens_per_s'), '.1f')} tok/s, "
                    f"{_fmt(r.get('s_per_step'), '.3f')} s/step ({r.get('s_per_step_window')}), "
                    f"mean length {_fmt(r.get('mean_length'), '.1f')}, wall {r['wall_s']:.0f} s, "
                    f"others' CPU {100 * r['others_cpu_share']:.0f}%, slowest/fastest step "
                    f"{_fmt(r.get('slowest_over_fastest_step'), '.1f')}"
                )
                print(f"[{cfg['label']} {s} {i + 1}/{args.repeats}] {status}", file=sys.stderr, flush=True)
        result = {
            "config": cfg,
            "summary": summarise(runs, args.max_others),
            "runs": runs,
            "cpu": cpu,
            "repeats": args.repeats,
        }
        result["discarded_busy_runs"] = discarded
        result.update(command=_command(), date=time.strftime("%Y-%m-%d"))
        (cwork / "result.json").write_text(json.dumps(result, indent=2, default=str))
        results.append(result)

    header = (
        f"{'base':<16} {'P x G':>6} {'side':<8} {'rollout tok/s':>13} {'s/step':>8} {'step_time':>9} "
        f"{'mean len':>8} {'rollout %':>9}  kernel"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        cfg, summ = res["config"], res["summary"]
        for s in sides:
            m = summ[s]
            print(
                f"{Path(cfg['base']).name:<16} {str(cfg['prompts_per_step']) + ' x 8':>6} {s:<8} "
                f"{_fmt(m['rollout_tokens_per_s'], '.1f'):>13} {_fmt(m['s_per_step'], '.3f'):>8} "
                f"{_fmt(m['step_time'], '.3f'):>9} {_fmt(m['mean_length'], '.1f'):>8} "
                f"{_fmt(m['rollout_share'] and 100 * m['rollout_share'], '.0f'):>9}  {m['kernel']}"
            )
            for e in m["errors"]:
                print(f"{'':<16} error: {e}")
        ra = summ["ratios"]
        print(
            f"{'':<16} ratios: rollout tok/s toolkit / peer {_fmt(ra['rollout_tokens_per_s_toolkit_over_peer'], '.2f')}"
            f" (goal >= 3); s/step peer / toolkit {_fmt(ra['s_per_step_peer_over_toolkit'], '.2f')}; step_time "
            f"peer / toolkit {_fmt(ra['step_time_peer_over_toolkit'], '.2f')}"
        )
    print(f"{cpu}; measures over the steps after --skip {args.skip} (warm-up); max_completion_length {args.max_tokens}")

    report = {"cpu": cpu, "results": results}
    if args.out:
        replace_section(Path(args.out), "## GRPO rollouts", markdown(results, args, cpu))
    print(json.dumps(report, default=str))


def _command() -> str:
    return ".venv/bin/python bench/grpo_rollouts.py " + " ".join(sys.argv[1:])


def markdown(results: list[dict], args: argparse.Namespace, cpu: str) -> str:
    dates = sorted({r.get("date", "?") for r in results})
    tokens = sorted({r["config"]["max_tokens"] for r in results})
    lines = [
        "## GRPO rollouts: the toolkit's engine vs TRL's generation (`bench/grpo_rollouts.py`)",
        "",
        f"Measured {', '.join(dates)} on {cpu}, one benchmark at a time (the machine is shared: a side's run during "
        "which other processes took over 15% of the CPU was run again, and only the quiet runs are used). "
        "Both sides train a new GRPO adapter (LoRA r 16, alpha 32, dropout 0, the 7 "
        "projections) on the same base folder and prompts: num_generations 8, max_completion_length "
        f"{'/'.join(map(str, tokens))}, temperature 1, top_p 1, top_k 0, beta 0, loss dapo, lr 1e-5 constant, no "
        "gradient checkpointing, a length reward; batch_size 8 x P completions, grad_accum 1 (one rollout batch of P "
        "prompts x 8 completions per optimizer step); each side a fresh process, the two alternating. Toolkit: "
        "`toolkit train` (rollouts from its serving engine on the live adapter, one continuous batch). Peer: a plain "
        "TRL `GRPOTrainer` script (no vLLM: transformers' `generate` on the peft model, TRL's default path; "
        '`AutoModelForImageTextToText.from_pretrained` of the GPTQ-layout folder, `backend="auto_trainable"` '
        "where the default kernel cannot train, TRL's other defaults: bf16). Rollout tok/s: completion tokens (stop "
        "token included) / seconds in the rollout (toolkit: its `rollout/tokens_per_s`; peer: TRL's "
        "`_generate_single_turn` timed). s/step: time between two steps' logs (loading outside). step_time: TRL's "
        "metric (`training_step`: rollout, rewards, loss forward and backward). Each the median over the window's "
        "steps (totals in the JSON). Others' CPU: what other processes on the shared machine took while the side ran "
        "(share of all cores). Window: the steps after the first one or two (warm-up: the toolkit's first "
        "rollout starts its engine), as the steps column says. Prompts: the 32 text rows of the quickstart GRPO data "
        "on the tiny and small bases (builder shapes, 1,773-token vocabulary), 40 short questions on the real 270M. "
        "The sides sample different text: mean lengths "
        "differ; tok/s normalises the rollout, s/step does not.",
        "",
        "| base | prompts x completions / step | steps (window) | runs used toolkit / peer | rollout tok/s toolkit "
        "| peer | **toolkit / peer** | s/step toolkit | peer | **peer / toolkit** | step_time toolkit / peer "
        "| mean length toolkit / peer | rollout share of the step toolkit / peer | peak RSS toolkit / peer "
        "| others' CPU toolkit / peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        cfg, summ = res["config"], res["summary"]
        tk, pe, ra = summ.get("toolkit", {}), summ.get("peer", {}), summ["ratios"]
        rss = lambda m: _fmt(m.get("peak_rss_bytes") and m["peak_rss_bytes"] / 2**30, ".2f")  # noqa: E731
        share = lambda m: _fmt(m.get("rollout_share") and 100 * m["rollout_share"], ".0f") + "%"  # noqa: E731
        others = lambda m: ", ".join(_fmt(x and 100 * x, ".0f") + "%" for x in m.get("others_cpu_share", []))  # noqa: E731
        window = f"{cfg['skip'] + 1}..{cfg['steps']}"
        lines.append(
            f"| {Path(cfg['base']).name} | {cfg['prompts_per_step']} x 8 | {cfg['steps']} ({window}) | "
            f"{tk.get('runs_used', '-')} / {pe.get('runs_used', '-')} | "
            f"{_fmt(tk.get('rollout_tokens_per_s'), '.1f')} | "
            f"{_fmt(pe.get('rollout_tokens_per_s'), '.1f')} | "
            f"**{_fmt(ra['rollout_tokens_per_s_toolkit_over_peer'], '.1f')}x** | "
            f"{_fmt(tk.get('s_per_step'), '.2f')} | {_fmt(pe.get('s_per_step'), '.2f')} | "
            f"**{_fmt(ra['s_per_step_peer_over_toolkit'], '.1f')}x** | "
            f"{_fmt(tk.get('step_time'), '.2f')} / {_fmt(pe.get('step_time'), '.2f')} | "
            f"{_fmt(tk.get('mean_length'), '.1f')} / {_fmt(pe.get('mean_length'), '.1f')} | "
            f"{share(tk)} / {share(pe)} | {rss(tk)} / {rss(pe)} GiB | {others(tk)} / {others(pe)} |"
        )
    kernels: dict[str, str] = {}
    for r in results:
        for s in ("toolkit", "peer"):
            k = r["summary"].get(s, {}).get("kernel")
            if k:
                kernels.setdefault(f"{Path(r['config']['base']).name} {s}", k)
    lines += ["", "Kernels: " + "; ".join(f"{b}: {k}" for b, k in kernels.items()) + ".", "", "Commands:", ""]
    lines += [f"- `{r.get('command', '?')}`" for r in {r.get("command"): r for r in results}.values()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
