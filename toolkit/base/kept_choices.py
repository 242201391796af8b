"""What the toolkit measured once per machine and keeps: the kernel choices (kernel_probe.py's training kernel,
lm_head.py's int8 kernel) in one JSON file in the toolkit's cache (`$TOOLKIT_CACHE`, default
~/.cache/gemma3-lora-toolkit/kernel-choice.json), each under a key naming the CPU and what the timing depends on.
Delete an entry (or the file) to time again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from toolkit.atomic_file import write_atomic


def cache_file() -> Path:
    from toolkit.base.real_weights import cache_root

    return cache_root() / "kernel-choice.json"


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo gives them: VMs name CPUs that
    differ as much as 3x in one kernel the same ("AMD EPYC": a Zen 4 of family 25 model 17 and another EPYC)."""
    import platform

    try:
        return describe_cpu(Path("/proc/cpuinfo").read_text())
    except (OSError, ValueError):
        return platform.processor() or platform.machine()


def describe_cpu(cpuinfo: str) -> str:
    """`cpu_name` from the text of /proc/cpuinfo (its first processor); ValueError without a model name."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block ends
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        raise ValueError("no model name")
    family, model = fields.get("cpu family"), fields.get("model")
    numbers = f" (family {family} model {model})" if family and model else ""
    return fields["model name"] + numbers


def read_all() -> dict:
    try:
        known = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}  # a file that is not ours: written over at the next keep


def kept(key: str) -> dict | None:
    """The entry kept under `key` in the machine's kernel-choice cache, or None."""
    return read_all().get(key)


def keep(key: str, entry: dict, progress: Callable[[str], None] = print) -> None:
    """Keep `entry` under `key`; a cache that cannot be written is reported and measured again next time."""
    from toolkit.base.file_lock import exclusive

    path = cache_file()
    try:
        # read, add and write under the file's lock: two processes keeping at once (two servers starting, a server
        # and a training run) would otherwise each write the file without the other's new entry
        with exclusive(path, "update of the kept kernel timings"):
            known = read_all()
            known[key] = entry
            write_atomic(path, json.dumps(known, indent=1).encode())  # a reader never sees half a file
    except OSError as exc:  # a read-only home still runs, it just measures again next time
        progress(f"could not keep the kernel timing ({exc}); it will be measured again")
