"""DPO training speed: `toolkit train` (training.method: dpo) vs the DPOTrainer script a user writes from TRL's docs.

    .venv/bin/python bench/dpo_peer.py [--recipe bench/recipes/dpo-270m.yaml] [--base DIR] [--steps N] [--skip K]
                                       [--repeats 1] [--side both|toolkit|peer] [--data-dir build/preference-task]
                                       [--work build/dpo-peer] [--device cpu|cuda] [--timeout 3600] [--out FILE]

Both sides train the recipe's DPO adapter on the same base folder, the same pairs (bench/preference_task.py, written
if absent) and the same settings read from the recipe: LoRA r / alpha / dropout / target projections, learning rate,
scheduler, warmup, batch size, gradient accumulation, max steps (--steps overrides), beta, loss type, gradient
checkpointing, seed. Each side runs in its own fresh subprocess, one after the other (--repeats alternates them):
  toolkit  `python -m cli train RECIPE --overwrite --set ...` (the base, the data files, max_steps, logging every
           step, output.dir under --work)
  peer     this file with --child-peer: nothing from the toolkit. `AutoModelForImageTextToText.from_pretrained` on
           the GPTQ-layout folder (a base in the 27B's compressed-tensors layout is given as the toolkit's lossless
           repack, `quant_format.ensure_gptq`, made by the parent before the child starts, as bench/peer_serve.py
           does for `transformers serve`); where the kernel GPTQModel picks cannot train (TorchCpuAvx512Linear on an
           AVX512-BF16 CPU) it reloads with `GPTQConfig(backend="auto_trainable")`, as bench/train_throughput.py's SFT
           peer does. peft `LoraConfig` through DPOTrainer's `peft_config` and no `ref_model` (TRL's reference is
           then the model with the adapter disabled), `DPOConfig` with the recipe's values, the pairs as a
           `datasets.Dataset` in TRL's conversational form, the processor as processing_class; TRL's other defaults.
           Held-out: `trainer.evaluate()` after training (eval_rewards/accuracies). GPTQMODEL_CPU_WORKERS=2 unless set
           (both sides get the same environment).
Measured per side:
  s/step   steady state: (time at the end of step N - time at the end of step K) / (N - K), K = --skip (default
           min(5, N // 5), at least 1: the first steps carry one-time costs, lazy inits and allocator growth). The
           times are the Trainer's own `train_runtime` in the log record of every step (logging_steps 1, seconds
           since training began; both sides log every step). Model loading, data encoding, TRL's tokenisation,
           the toolkit's one-time kernel timing and the held-out evaluation are outside the window. Fallback when a
           side's log has no `train_runtime`: the toolkit's progress bar (step counts as they appear on its stderr,
           timestamped here) / the peer's on_step_end times.
  peak RSS the whole process's maximum resident set (os.wait4's ru_maxrss: load, training, evaluation)
  accuracy held-out reward accuracy. Peer: `eval_rewards/accuracies`. Toolkit: the first of these found, and
           where it was read is printed: toolkit.json metrics["adapter"]["reward_accuracy" | "rewards/accuracies" |
           any key with "reward" and "acc"], then the last eval record of metrics.jsonl, else none.
Ratios: speed = peer s/step / toolkit s/step (goal >= 1.2); accuracy = toolkit - peer (goal |diff| <= 0.05).
JSON to stdout (last line), a table, and with --out the section of that markdown file. Child logs and adapters stay
under --work. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_RECIPE = ROOT / "bench" / "recipes" / "dpo-270m.yaml"
PEER_MARK = "DPO_PEER_RESULT "
# the toolkit's progress bar on stderr: tqdm's "training:  20%|██        | 12/60 [00:31<..." (other bars ignored)
BAR = re.compile(r"training:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")


# ------------------------------------------------------------------------------------------ running a child


def run_measured(cmd: list[str], *, log: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `cmd` from the repository root; return its exit code, wall time, peak RSS (its own ru_maxrss from
    os.wait4, bytes), stdout, and the progress-bar steps seen on its stderr with the time each first appeared.
    stdout and stderr are also written to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    out_chunks: list[bytes] = []
    bar_steps: dict[int, float] = {}
    bar_total: list[int] = []
    lock = threading.Lock()

    with open(log, "wb") as log_file:

        def pump(stream, sink: list[bytes] | None, parse: bool) -> None:
            tail = b""
            for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
                now = time.monotonic() - t0
                with lock:
                    log_file.write(chunk)
                    log_file.flush()
                if sink is not None:
                    sink.append(chunk)
                if parse:  # tqdm starts each refresh with \r: the last part is usually a whole bar already
                    parts = re.split(rb"[\r\n]", tail + chunk)
                    tail = parts[-1]
                    for part in parts:
                        m = BAR.search(part.decode("utf-8", "replace"))
                        if m:
                            bar_steps.setdefault(int(m.group(1)), now)
                            bar_total[:] = [int(m.group(2))]

        threads = [
            threading.Thread(target=pump, args=(proc.stdout, out_chunks, False), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, None, True), daemon=True),
        ]
        for t in threads:
            t.start()
        timer = None
        if timeout:

            def kill() -> None:  # the child's own process group (started above with a session of its own)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

            timer = threading.Timer(timeout, kill)
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if timer:
            timer.cancel()
        for t in threads:
            t.join(timeout=30)
    return {
        "rc": proc.returncode,
        "wall_s": round(time.monotonic() - t0, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: kilobytes
        "stdout": b"".join(out_chunks).decode("utf-8", "replace"),
        "bar_steps": bar_steps,
        "bar_total": bar_total[0] if bar_total else None,
        "log": str(log),
    }


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def steady_s_per_step(times: dict[int, float], skip: int) -> tuple[float | None, str]:
    """(time at the last step - time at step K) / (steps between); K = the first recorded step >= skip."""
    steps = sorted(s for s in times if s > 0)
    if len(steps) < 2:
        return None, "fewer than two timed steps"
    last = steps[-1]
    start = next((s for s in steps if s >= skip and s < last), steps[0])
    return (times[last] - times[start]) / (last - start), f"steps {start}..{last}"


def log_times(records: list[dict]) -> dict[int, float]:
    """step -> the Trainer's `train_runtime` in that step's training log record (not the end-of-training summary,
    which carries `train_loss`, nor evaluation records)."""
    out: dict[int, float] = {}
    for r in records:
        if "train_runtime" in r and "step" in r and "train_loss" not in r and not any(k.startswith("eval_") for k in r):
            out.setdefault(int(r["step"]), float(r["train_runtime"]))
    return out


# ---------------------------------------------------------------------------------------------- the peer


def peer_child(config_file: str) -> None:
    """The plain TRL script, in this process: what a user writes from the TRL, transformers and peft docs."""
    t_start = time.monotonic()
    cfg = json.loads(Path(config_file).read_text())
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = cfg["device"] == "cuda"
    load_kwargs = {"device_map": "cuda"} if cuda else {}
    model = AutoModelForImageTextToText.from_pretrained(cfg["base"], **load_kwargs)
    fallback = ""
    if any(getattr(m, "SUPPORTS_TRAINING", True) is False for m in model.modules()):
        # the default pick (TorchCpuAvx512Linear on an AVX512-BF16 CPU) is inference-only: DPOTrainer's
        # model.train() would raise. The user asks transformers for a trainable kernel (GPTQConfig's `backend`).
        from transformers import GPTQConfig

        fallback = f" (the default pick, {_kernel_names(model)}, cannot train: reloaded with backend auto_trainable)"
        del model
        model = AutoModelForImageTextToText.from_pretrained(
            cfg["base"], quantization_config=GPTQConfig(bits=4, backend="auto_trainable"), **load_kwargs
        )
    processor = AutoProcessor.from_pretrained(cfg["base"])

    def pairs(path: str) -> Dataset:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    class StepClock(TrainerCallback):  # fallback timing only: the log records' train_runtime is the measure
        def __init__(self) -> None:
            self.t0, self.times, self.began = 0.0, {}, None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()
            self.began = self.t0 - t_start

        def on_step_end(self, args, state, control, **kw):
            self.times[state.global_step] = time.monotonic() - self.t0

    t = cfg["training"]
    ckpt = t["gradient_checkpointing"]
    args = DPOConfig(
        output_dir=cfg["output_dir"],
        max_steps=t["max_steps"],
        per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=cfg["eval_batch_size"],
        gradient_accumulation_steps=t["grad_accum"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler"],
        warmup_steps=t["warmup_ratio"],  # a float below 1 is a ratio of the total steps (as the toolkit passes it)
        beta=t["beta"],
        loss_type=t["loss_type"],
        loss_weights=t["loss_weights"],
        max_length=cfg["max_length"],
        activation_checkpointing=ckpt,  # transformers 5.23's name (gradient_checkpointing is its deprecated alias)
        activation_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        seed=t["seed"],
        data_seed=t["seed"],
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",  # makes every log record carry train_runtime
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    lora = cfg["lora"]
    clock = StepClock()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs(cfg["train"]),
        eval_dataset=pairs(cfg["eval"]),
        processing_class=processor,
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            use_rslora=lora["rslora"],
            target_modules=lora["target_regex"],
            task_type="CAUSAL_LM",
        ),
        callbacks=[clock],
    )
    kernel = f"{_kernel_names(trainer.model)} {str(trainer.model.dtype).replace('torch.', '')}{fallback}"
    out = trainer.train()
    t_eval = time.monotonic()
    ev = trainer.evaluate()
    eval_s = time.monotonic() - t_eval
    train_acc = [r["rewards/accuracies"] for r in trainer.state.log_history if "rewards/accuracies" in r]
    result = {
        "kernel": kernel,
        "bf16": args.bf16,
        "steps": trainer.state.global_step,
        "train_runtime_s": out.metrics.get("train_runtime"),
        "startup_s": round(clock.began, 2) if clock.began is not None else None,
        "eval_s": round(eval_s, 2),
        "log_times": {str(k): v for k, v in log_times(trainer.state.log_history).items()},
        "callback_times": {str(k): round(v, 4) for k, v in clock.times.items()},
        "eval_reward_accuracy": ev.get("eval_rewards/accuracies"),
        "eval_reward_margin": ev.get("eval_rewards/margins"),
        "eval_loss": ev.get("eval_loss"),
        "last_train_reward_accuracy": train_acc[-1] if train_acc else None,
        "train_loss": out.training_loss,
        "torch_threads": torch.get_num_threads(),
    }
    print(PEER_MARK + json.dumps(result), flush=True)


def _kernel_names(model) -> str:
    """The 4-bit linear classes in `model` (GPTQModel's kernels keep their packed `qweight`)."""
    return ", ".join(sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}))


# --------------------------------------------------------------------------------------------- the sides


def run_peer(plan: dict, i: int, work: Path, timeout: float) -> dict:
    out_dir = work / f"peer-{i}"
    config = out_dir / "config.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({**plan["peer"], "output_dir": str(out_dir / "trainer")}, indent=2))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-peer", str(config)]
    run = run_measured(cmd, log=out_dir / "log.txt", env=child_env(), timeout=timeout)
    lines = [line for line in run["stdout"].splitlines() if line.startswith(PEER_MARK)]
    side = {"side": "peer", "rc": run["rc"], "wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"]}
    side["log"] = run["log"]
    if run["rc"] != 0 or not lines:
        side["error"] = f"exit {run['rc']}; see {run['log']}"
        return side
    r = json.loads(lines[-1][len(PEER_MARK) :])
    times = {int(k): v for k, v in r.pop("log_times").items()}
    source = "train_runtime in the step's log record"
    if len(times) < 2:
        times, source = {int(k): v for k, v in r["callback_times"].items()}, "on_step_end times (callback)"
    r.pop("callback_times")
    s, window = steady_s_per_step(times, plan["skip"])
    side.update(r)
    side.update(s_per_step=s, window=window, timing=source, accuracy=r["eval_reward_accuracy"])
    side["accuracy_source"] = "trainer.evaluate(): eval_rewards/accuracies"
    return side


def _find_reward_accuracy(metrics: dict) -> tuple[float | None, str]:
    for group in ("adapter", "eval", None):
        scope = metrics.get(group, {}) if group else metrics
        if not isinstance(scope, dict):
            continue
        for key in ("reward_accuracy", "rewards/accuracies", "eval_rewards/accuracies"):
            if isinstance(scope.get(key), (int, float)):
                return float(scope[key]), f"toolkit.json metrics{'[' + repr(group) + ']' if group else ''}[{key!r}]"
        for key, value in scope.items():
            if "reward" in key and "acc" in key and "." not in key and isinstance(value, (int, float)):
                return float(value), f"toolkit.json metrics{'[' + repr(group) + ']' if group else ''}[{key!r}]"
    return None, ""


def read_toolkit_accuracy(adapter: Path) -> tuple[float | None, str, dict]:
    """The held-out reward accuracy the toolkit recorded, where it was read, and the held-out metrics seen."""
    manifest = adapter / "toolkit.json"
    metrics = {}
    if manifest.exists():
        metrics = json.loads(manifest.read_text()).get("metrics", {})
        value, where = _find_reward_accuracy(metrics)
        if value is not None:
            return value, where, metrics
    records = _metrics_records(adapter / "metrics.jsonl")
    evals = [r for r in records if isinstance(r.get("eval_rewards/accuracies"), (int, float))]
    if evals:
        return float(evals[-1]["eval_rewards/accuracies"]), "metrics.jsonl: last eval_rewards/accuracies", metrics
    return None, "not found (toolkit.json metrics groups: " + ", ".join(sorted(metrics)) + ")", metrics


def _metrics_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def run_toolkit(plan: dict, i: int, work: Path, timeout: float) -> dict:
    out_dir = work / f"toolkit-{i}"
    adapters = out_dir / "adapters"
    cmd = [sys.executable, "-m", "cli", "train", str(plan["recipe"]), "--overwrite"]
    for item in [*plan["toolkit_sets"], f"output.dir={adapters}"]:
        cmd += ["--set", item]
    run = run_measured(cmd, log=out_dir / "log.txt", env=child_env(), timeout=timeout)
    side = {"side": "toolkit", "rc": run["rc"], "wall_s": run["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"]}
    side["log"] = run["log"]
    if run["rc"] != 0:
        side["error"] = f"exit {run['rc']}; see {run['log']}"
        return side
    adapter = adapters / plan["adapter_name"]
    records = _metrics_records(adapter / "metrics.jsonl")
    times, source = log_times(records), "train_runtime in the step's metrics.jsonl record"
    if len(times) < 2:
        times, source = run["bar_steps"], "progress bar on stderr (timestamped by the parent)"
    s, window = steady_s_per_step(times, plan["skip"])
    manifest = json.loads((adapter / "toolkit.json").read_text()) if (adapter / "toolkit.json").exists() else {}
    train = manifest.get("metrics", {}).get("train", {})
    acc, where, metrics = read_toolkit_accuracy(adapter)
    side.update(
        kernel=train.get("kernel"),
        steps=train.get("steps"),
        train_runtime_s=train.get("runtime_s"),
        s_per_step=s,
        window=window,
        timing=source,
        accuracy=acc,
        accuracy_source=where,
        held_out={g: metrics[g] for g in ("base", "reference", "adapter") if isinstance(metrics.get(g), dict)},
    )
    return side


def make_plan(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    from preference_task import ensure

    from toolkit.base.quant_format import ensure_gptq
    from toolkit.recipe import load_recipe

    data_dir = ensure(Path(args.data_dir).resolve())
    train_file, eval_file = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    sets = [f"data.train={train_file}", f"data.eval={eval_file}", "training.logging_every=1"]
    sets += ["training.eval_every=0", "training.save_every=0", f"base.device={args.device}"]
    if args.base:
        sets.append(f"base.path={Path(args.base).resolve()}")
    if args.steps:
        sets.append(f"training.max_steps={args.steps}")
    recipe = load_recipe(args.recipe, sets)
    t = recipe.training
    if t.method != "dpo":
        raise SystemExit(f"{args.recipe}: training.method is {t.method}; this benchmark compares DPO")
    if t.init_adapter:
        raise SystemExit(f"{args.recipe}: init_adapter is set; the peer script starts from a new adapter")
    if t.max_steps <= 0:
        raise SystemExit("the recipe trains by epochs: give training.max_steps in it, or --steps")
    base = Path(recipe.base.path)
    if not base.is_absolute():
        base = ROOT / base
    if not (base / "config.json").exists():
        raise SystemExit(f"no base at {base} (README: toolkit tiny-base DIR [--weights gemma-3-270m])")
    gptq = ensure_gptq(base)  # the folder the peer's from_pretrained reads (the base itself if already GPTQ layout)
    lora = recipe.lora
    scope = r".*language_model.*" if not lora.include_vision else r".*"
    skip = args.skip if args.skip is not None else max(1, min(5, t.max_steps // 5))
    skip = max(1, min(skip, t.max_steps - 1))
    return {
        "recipe": str(Path(args.recipe).resolve()),
        "adapter_name": recipe.adapter_name,
        "toolkit_sets": sets,
        "skip": skip,
        "base": str(base),
        "peer_base": str(gptq),
        "steps": t.max_steps,
        "settings": {
            "lr": t.learning_rate,
            "batch": t.batch_size,
            "grad_accum": t.grad_accum,
            "beta": t.preference_beta,
            "loss_type": list(t.loss_type),
            "lora": f"r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, {len(lora.target_modules)} targets",
            "gradient_checkpointing": t.gradient_checkpointing,
        },
        "peer": {
            "base": str(gptq),
            "device": args.device,
            "train": str(train_file),
            "eval": str(eval_file),
            "max_length": recipe.data.max_seq_len,
            "eval_batch_size": recipe.eval.batch_size,
            "training": {
                "max_steps": t.max_steps,
                "batch_size": t.batch_size,
                "grad_accum": t.grad_accum,
                "learning_rate": t.learning_rate,
                "lr_scheduler": t.lr_scheduler,
                "warmup_ratio": t.warmup_ratio,
                "beta": t.preference_beta,
                # RPO (rpo_alpha) as the toolkit passes it: TRL's `sft` loss added with that weight
                "loss_type": list(t.loss_type) + (["sft"] if t.rpo_alpha is not None else []),
                "loss_weights": [1.0] * len(t.loss_type) + [t.rpo_alpha] if t.rpo_alpha is not None else None,
                "gradient_checkpointing": t.gradient_checkpointing,
                "seed": t.seed,
            },
            "lora": {
                "r": lora.r,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "rslora": lora.rslora,
                "target_regex": scope + r"\.(" + "|".join(re.escape(m) for m in lora.target_modules) + ")",
            },
        },
    }


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    ap.add_argument("--base", default=None, help="base folder (default: the recipe's base.path)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's max_steps)")
    ap.add_argument("--skip", type=int, default=None, help="first steps left out of the timing window")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    ap.add_argument("--side", choices=["both", "toolkit", "peer"], default="both")
    ap.add_argument("--data-dir", default=str(ROOT / "build" / "preference-task"))
    ap.add_argument("--work", default=str(ROOT / "build" / "dpo-peer"), help="child logs, adapters, trainer output")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--out", default=None, help="markdown file whose section to write (e.g. docs/BENCHMARKS.md)")
    ap.add_argument("--child-peer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_peer:
        return peer_child(args.child_peer)

    from report import cpu_label, cpus, replace_section

    plan = make_plan(args)
    work = Path(args.work).resolve()
    sides = ["toolkit", "peer"] if args.side == "both" else [args.side]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):  # alternate, so drift on the machine hits both sides alike
        for s in sides:
            fn = run_toolkit if s == "toolkit" else run_peer
            r = fn(plan, i, work, args.timeout)
            runs[s].append(r)
            status = r.get("error") or (
                f"{_fmt(r.get('s_per_step'), '.3f')} s/step ({r.get('window')}), "
                f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, accuracy {_fmt(r.get('accuracy'), '.3f')}"
            )
            print(f"[{s} {i + 1}/{args.repeats}] {status}", file=sys.stderr, flush=True)

    summary = {}
    for s, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        summary[s] = {
            "s_per_step": _median([r.get("s_per_step") for r in ok]),
            "peak_rss_bytes": _median([r["peak_rss_bytes"] for r in ok]),
            "accuracy": _median([r.get("accuracy") for r in ok]),
            "kernel": next((r.get("kernel") for r in ok), None),
            "timing": next((r.get("timing") for r in ok), None),
            "accuracy_source": next((r.get("accuracy_source") for r in ok), None),
            "errors": [r["error"] for r in rs if "error" in r],
        }
    tk, pe = summary.get("toolkit", {}), summary.get("peer", {})
    speed = pe["s_per_step"] / tk["s_per_step"] if tk.get("s_per_step") and pe.get("s_per_step") else None
    acc_diff = (
        tk["accuracy"] - pe["accuracy"] if tk.get("accuracy") is not None and pe.get("accuracy") is not None else None
    )
    cpu = f"{cpu_label()} ({cpus()} cores)"

    header = f"{'side':<8} {'s/step':>8} {'peak RSS':>10} {'reward acc':>10}  kernel, dtype"
    print(header)
    print("-" * len(header))
    for s, m in summary.items():
        rss = f"{m['peak_rss_bytes'] / 2**20:.0f} MiB" if m["peak_rss_bytes"] else "n/a"
        print(f"{s:<8} {_fmt(m['s_per_step'], '.3f'):>8} {rss:>10} {_fmt(m['accuracy'], '.3f'):>10}  {m['kernel']}")
        for e in m["errors"]:
            print(f"         error: {e}")
    print(f"speed toolkit vs peer: {_fmt(speed, '.2f')} (peer s/step / toolkit s/step; goal >= 1.2)")
    print(f"reward accuracy toolkit - peer: {_fmt(acc_diff, '+.3f')} (goal within 0.05)")
    print(f"{plan['steps']} steps, timing window from step {plan['skip']}; {cpu}")
    for s, m in summary.items():
        print(f"{s}: timing from {m['timing']}; accuracy from {m['accuracy_source']}")

    report = {
        "cpu": cpu,
        "recipe": plan["recipe"],
        "base": plan["base"],
        "peer_base": plan["peer_base"],
        "steps": plan["steps"],
        "skip": plan["skip"],
        "settings": plan["settings"],
        "summary": summary,
        "speed_ratio_peer_over_toolkit_s_per_step": speed,
        "accuracy_diff_toolkit_minus_peer": acc_diff,
        "runs": runs,
    }
    if args.out:
        st = plan["settings"]
        rel = os.path.relpath(plan["recipe"], ROOT)
        lines = [
            "## DPO training: `toolkit train` vs a plain TRL DPOTrainer script (`bench/dpo_peer.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, `{rel}` on `{os.path.relpath(plan['base'], ROOT)}`: "
            f"{plan['steps']} optimizer steps of {st['batch']} pairs (grad accum {st['grad_accum']}), lr {st['lr']:g}, "
            f"beta {st['beta']:g}, loss {'+'.join(st['loss_type'])}, LoRA {st['lora']}, gradient checkpointing "
            f"{'on' if st['gradient_checkpointing'] else 'off'}, {args.repeats} alternating run(s) per side, each "
            "a fresh process. The peer loads the GPTQ-layout folder with `AutoModelForImageTextToText."
            "from_pretrained`, gives DPOTrainer a peft `LoraConfig` and no `ref_model` (the reference is the model "
            "with the adapter disabled) and the pairs in TRL's conversational form. Seconds per step: steady state "
            f"from the end of step {plan['skip']} to the last (the Trainer's `train_runtime` in each step's log "
            "record; loading, tokenisation and evaluation outside it). Peak RSS: the whole process (ru_maxrss). "
            "Reward accuracy: held-out pairs, after training.",
            "",
            "| side | kernel, dtype | s/step (median) | runs | peak RSS | held-out reward accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for s, m in summary.items():
            each = ", ".join(_fmt(r.get("s_per_step"), ".3f") for r in runs[s])
            rss = f"{m['peak_rss_bytes'] / 2**30:.2f} GiB" if m["peak_rss_bytes"] else "n/a"
            lines.append(
                f"| {s} | {m['kernel']} | {_fmt(m['s_per_step'], '.3f')} | {each} | {rss} | "
                f"{_fmt(m['accuracy'], '.3f')} |"
            )
        lines += [
            "",
            f"Speed toolkit / peer (peer s/step over toolkit s/step): **{_fmt(speed, '.2f')}** (goal >= 1.2). "
            f"Reward accuracy toolkit - peer: **{_fmt(acc_diff, '+.3f')}** (goal within 0.05). Toolkit accuracy "
            f"read from {tk.get('accuracy_source') or 'n/a'}.",
            "",
        ]
        replace_section(Path(args.out), "## DPO training", "\n".join(lines))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
