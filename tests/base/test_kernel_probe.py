"""auto's CPU training kernel: timed on the base at its first training load, kept per machine and shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from toolkit.base import gptq_backend, kept_choices, kernel_probe, kernels, quant_format
from toolkit.base.loader import check_base, load_base


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernel-choice.json"


def _config(hidden: int = 256) -> dict:
    return {"text_config": {"hidden_size": hidden, "intermediate_size": 768, "num_hidden_layers": 4}}


def test_pick_takes_the_fastest_unless_an_earlier_kernel_is_within_the_margin():
    assert kernel_probe.pick({"torch": 1.0, "torch_fused": 0.9, "torch_aten": 0.5}) == "torch_aten"
    assert kernel_probe.pick({"torch": 1.0, "torch_fused": 0.9}) == "torch"  # 1.0 <= 0.9 x 1.15
    assert kernel_probe.pick({"torch": 1.2, "torch_fused": 1.0, "torch_aten": 0.95}) == "torch_fused"
    assert kernel_probe.pick({"torch_aten": 2.0, "torch_fused": 1.0}) == "torch_fused"


def test_the_cpu_name_carries_its_family_and_model_where_cpuinfo_gives_them():
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    other = zen4.replace("17", "1")
    assert kept_choices.describe_cpu(zen4 + "\nprocessor\t: 1\nmodel name\t: ignored\n") == (
        "AMD EPYC (family 25 model 17)"
    )
    assert kept_choices.describe_cpu(zen4) != kept_choices.describe_cpu(other)  # two CPUs under one name
    assert kept_choices.describe_cpu("processor\t: 0\nmodel name\t: Some ARM\n") == "Some ARM"
    with pytest.raises(ValueError):
        kept_choices.describe_cpu("processor\t: 0\n")


def test_the_first_training_load_times_each_kernel_once_and_keeps_the_answer(tmp_path, cache):
    timed, lines = [], []
    seconds = {"torch": 1.0, "torch_fused": 0.8, "torch_aten": 0.4}

    def timer(folder, kernel):
        timed.append(kernel.name)
        return seconds[kernel.name]

    def choose(config):
        return kernel_probe.fastest_training_kernel(tmp_path, config, lambda k: None, lines.append, timer)

    name, reason = choose(_config())
    assert (name, sorted(timed)) == ("torch_aten", sorted(kernel_probe.CANDIDATES))
    assert "measured now" in reason and "torch_aten 1280 tokens/s" in reason and lines
    assert choose(_config()) == ("torch_aten", reason.replace("measured now", "measured on this machine"))
    assert len(timed) == 3  # kept: not timed again
    [(key, entry)] = json.loads(cache.read_text()).items()
    assert "probe" in key and "256x768x4" in key and entry["kernel"] == "torch_aten"
    seconds["torch"] = 0.3
    assert choose(_config(hidden=512))[0] == "torch"  # another shape is timed on its own
    assert len(timed) == 6 and len(json.loads(cache.read_text())) == 2


def test_only_available_kernels_are_timed_and_an_unwritable_cache_still_trains(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TOOLKIT_CACHE", str(blocker / "below-a-file"))
    lines = []
    name, _ = kernel_probe.fastest_training_kernel(
        tmp_path,
        _config(),
        lambda k: None if k.name != "torch_aten" else "no int4pack",
        lines.append,
        lambda folder, kernel: {"torch": 1.0, "torch_fused": 0.5}[kernel.name],
    )
    assert name == "torch_fused" and "could not keep the kernel timing" in lines[-1]
    only = kernel_probe.fastest_training_kernel(tmp_path, _config(), lambda k: k.name != "torch" and "no", print)
    assert only == ("torch", "auto (one trainable kernel here)")


def _keep_many(first: int, cache: str, start: float) -> None:
    import time

    os.environ["TOOLKIT_CACHE"] = cache
    time.sleep(max(0.0, start - time.time()))  # all at once, past each process's start-up
    for i in range(first, first + 30):
        kept_choices.keep(f"key {i}", {"kernel": "torch", "summary": str(i)})


def test_processes_keeping_at_once_lose_no_entry(tmp_path):
    import multiprocessing
    import time

    context = multiprocessing.get_context("spawn")
    start = time.time() + 5
    workers = [context.Process(target=_keep_many, args=(first, str(tmp_path), start)) for first in (0, 100, 200)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    known = json.loads((tmp_path / "kernel-choice.json").read_text())
    assert sorted(known) == sorted(f"key {i}" for first in (0, 100, 200) for i in range(first, first + 30))


def _rank(rank: int, tmp: str) -> None:
    """One rank of a 2-process gloo group on a cold cache of its own, its timings disagreeing with rank 0's."""
    import os

    import torch.distributed as dist

    os.environ["TOOLKIT_CACHE"] = f"{tmp}/cache-{rank}"
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    timed = []
    seconds = {"torch": 1.0, "torch_fused": 0.5 if rank == 0 else 2.0, "torch_aten": 2.0 if rank == 0 else 0.2}

    def timer(folder, kernel):
        timed.append(kernel.name)
        return seconds[kernel.name]

    name, reason = kernel_probe.fastest_training_kernel(Path(tmp), _config(), lambda k: None, lambda line: None, timer)
    Path(tmp, f"rank-{rank}.json").write_text(json.dumps({"name": name, "reason": reason, "timed": timed}))
    dist.destroy_process_group()


def test_the_ranks_of_a_multi_process_launch_all_take_rank_0s_kernel(tmp_path):
    """DDP broadcasts rank 0's parameters and buffers at its first step, and they differ between kernels: ranks
    that timed apart and picked differently abort there. Rank 0 times; the others take its answer untimed."""
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path),), nprocs=2)
    zero, one = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert zero["name"] == one["name"] == "torch_fused" and zero["reason"] == one["reason"]
    assert sorted(zero["timed"]) == sorted(kernel_probe.CANDIDATES) and one["timed"] == []


def test_a_cpu_training_load_times_the_real_kernels_then_uses_the_kept_choice(tiny_ct, cache):
    config, _ = check_base(tiny_ct)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    name, reason = kernel_probe.fastest_training_kernel(
        quant_format.ensure_gptq(tiny_ct), config, gptq_backend.unavailable, print
    )
    # the timing leaves the global generator where it was: a training run's seeded LoRA init does not depend on it
    assert torch.equal(torch.rand(3), expected)
    usable = [n for n in kernel_probe.CANDIDATES if gptq_backend.unavailable(kernels.get(n, "cpu")) is None]
    assert name in usable and all(f"{n} " in reason for n in usable)
    # whatever was timed, the loader and `toolkit info` follow the kept entry: make it name a bfloat16 kernel
    known = json.loads(cache.read_text())
    known[kernel_probe.cache_key(config)]["kernel"] = "torch_aten"
    cache.write_text(json.dumps(known))
    loaded = load_base(tiny_ct, device="cpu", training=True)
    assert (loaded.kernel, loaded.dtype) == ("torch_aten", torch.bfloat16)
    assert gptq_backend.layer_kernels(loaded.model) == ["TorchAtenLinear"]
    info = run_cli("info", tiny_ct, "--device", "cpu")
    assert info.returncode == 0 and "training on cpu: torch_aten (TorchAtenLinear), bfloat16, auto (measured" in (
        info.stdout
    )
    # after a multi-process launch the only timing kept is its rank 0's, with fewer threads (torchrun gives one)
    entry = known.pop(kernel_probe.cache_key(config))
    cache.write_text(json.dumps({kernel_probe.cache_key(config, threads=1): entry}))
    kept = ("torch_aten", f"auto (measured on this machine: {entry['summary']})")
    assert kernel_probe.cached_by_threads(config) == {1: kept}
    info = run_cli("info", tiny_ct, "--device", "cpu", env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    assert "training on cpu: torch_aten (TorchAtenLinear), bfloat16, auto (measured on this machine" in info
    assert "timed with 1 thread per process; a run with 2 times again" in info
    cache.unlink()
    assert "timed at the first training run" in run_cli("info", tiny_ct, "--device", "cpu").stdout
