"""`auto`'s training kernel on a CPU: timed on the base being trained, once per machine and base shape.

Why measure here rather than keep a fixed preference: the fastest trainable CPU kernel differs between CPUs that
report the same features. bench/kernels.py on the `small` base, LoRA forward + backward (docs/BENCHMARKS.md,
"Kernels"): on an Intel Xeon with AVX512-BF16 the float32 reference (torch) trained at 376 tokens/s, torch_aten
(bfloat16) at 301; on an AMD EPYC with AVX512-BF16, 362 against 735. No CPU flag tells the two apart, so the first
training load of a base on a machine times one LoRA step per trainable kernel and keeps the answer in the
toolkit's cache (`$TOOLKIT_CACHE`, default ~/.cache/gemma3-lora-toolkit/kernel-choice.json), keyed by the CPU,
the torch and GPTQModel versions and the base's shape. The int8 LM head's kernel choice is kept in the same file
(kept_choices.py, lm_head.choice_key). Every candidate trains correctly (tests/base/test_kernels.py
compares its gradients with the reference); this only decides which is fastest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from toolkit.base.kept_choices import cache_file, cpu_name, keep, read_all

CANDIDATES = ("torch", "torch_fused", "torch_aten")  # on a near tie the earlier wins: float32 first
MARGIN = 1.15  # a later candidate must be this much faster: a close call keeps the more exact kernel
BATCH, TOKENS, STEPS = 4, 128, 3
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
REVISION = 2  # part of the cache key: bump when the toolkit's own kernel shims (gptq_backend.py) change speeds


def cache_key(config: dict, threads: int | None = None) -> str:
    """What the timing depends on: the CPU, the thread count (this process's unless given), the libraries and the
    base's shapes (not its weights)."""
    import torch

    return _keys(config)(torch.get_num_threads() if threads is None else threads)


def _keys(config: dict) -> Callable[[int], str]:
    """cache_key for each thread count, the CPU's name and the versions looked up once."""
    from importlib.metadata import version

    import torch

    text = config.get("text_config", config)
    shape = "x".join(str(text.get(k)) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    libraries = f"torch {torch.__version__} | gptqmodel {version('gptqmodel')} | probe {REVISION}"
    cpu = cpu_name()
    return lambda threads: f"{cpu} | {threads} threads | {libraries} | {shape}"


def pick(seconds: dict[str, float]) -> str:
    """The earliest candidate within MARGIN of the fastest."""
    fastest = min(seconds.values())
    return next(name for name in CANDIDATES if name in seconds and seconds[name] <= fastest * MARGIN)


def step_seconds(folder: Path, kernel) -> float:
    """Median seconds of one LoRA forward + backward of BATCH x TOKENS tokens with `kernel` (after a warm-up)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from toolkit.base import gptq_backend

    model = gptq_backend.load_gptq(folder, device="cpu", kernel=kernel, training=True)
    model.requires_grad_(False)
    # the recipes' default LoRA shape (toolkit.lora sits above this layer, so peft is called directly)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    model.train()
    ids = torch.randint(10, 200, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(STEPS + 1):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids, token_type_ids=torch.zeros_like(ids))
        out.loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _kept(known: dict, key: str) -> tuple[str, str] | None:
    entry = known.get(key)
    if entry and entry.get("kernel") in CANDIDATES:
        return entry["kernel"], f"auto (measured on this machine: {entry['summary']})"
    return None


def cached_by_threads(config: dict) -> dict[int, tuple[str, str]]:
    """Every kept measurement for this base's shape on this machine, by the thread count it was timed with (this
    process's count among them): a multi-process launch's ranks run with fewer threads than a plain run (torchrun
    gives each one), and its rank 0 times for all of them."""
    import os

    import torch

    known, key = read_all(), _keys(config)
    counts = sorted({*range(1, (os.cpu_count() or 1) + 1), torch.get_num_threads()})
    return {n: hit for n in counts if (hit := _kept(known, key(n)))}


def fastest_training_kernel(
    folder: Path,
    config: dict,
    available: Callable[[object], str | None],
    progress: Callable[[str], None] = print,
    timer: Callable[[Path, object], float] = step_seconds,
) -> tuple[str, str]:
    """The trainable CPU kernel auto uses for this base on this machine, and why (cached after the first call).

    Under a multi-process launch every rank takes rank 0's answer: DDP's first step broadcasts rank 0's parameters
    and buffers, which differ between kernels, so ranks that timed apart and picked differently abort there (seen
    on a cold cache: two ranks on one CPU timed at once near a tie and gloo's broadcast was killed by SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [_timed_or_kept(folder, config, available, progress, timer) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return _timed_or_kept(folder, config, available, progress, timer)


def _timed_or_kept(
    folder: Path,
    config: dict,
    available: Callable[[object], str | None],
    progress: Callable[[str], None],
    timer: Callable[[Path, object], float],
) -> tuple[str, str]:
    import torch

    from toolkit.base import kernels

    key, path = cache_key(config), cache_file()
    hit = _kept(read_all(), key)
    if hit:
        return hit
    usable = [kernels.get(n, "cpu") for n in CANDIDATES if available(kernels.get(n, "cpu")) is None]
    if len(usable) < 2:
        return (usable[0].name if usable else "torch"), "auto (one trainable kernel here)"
    progress(f"timing {len(usable)} training kernels on this base (once per machine; kept in {path})")
    # the timed models draw their LoRA initialisation from the global generator: without this, a run that times
    # would start its own adapter from other random weights than the same run once the answer is kept
    with torch.random.fork_rng(devices=[]):
        seconds = {k.name: timer(folder, k) for k in usable}
    name = pick(seconds)
    summary = ", ".join(f"{n} {BATCH * TOKENS / s:.0f}" for n, s in seconds.items()) + " tokens/s"
    keep(key, {"kernel": name, "summary": summary, "seconds": seconds}, progress)
    return name, f"auto (measured now: {summary})"
