"""Shared by the benchmark scripts: rewrite one `## ...` section of docs/BENCHMARKS.md, keeping the others and its
hand-written `### ` subsections."""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.quiet import quiet_third_party

quiet_third_party()  # a benchmark prints its own lines and tables, as the CLI does (every script imports this first)

HEADER = (
    "# Benchmarks\n\nMeasured ratios, re-run with the scripts named. A script rewrites its section down to the "
    "section's first `###`\nheading and keeps what follows (earlier runs and readings, written by hand).\n"
)


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def cpu_label() -> str:
    """The CPU's model name and whether it has AVX512-BF16 (which decides the CPU kernel: docs/DEPENDENCIES.md)."""
    from toolkit.base.kept_choices import cpu_name  # the name the kernel timing's cache is keyed by

    try:
        bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return cpu_name()
    name, flag = cpu_name(), "AVX512-BF16" if bf16 else "no AVX512-BF16"
    return f"{name[:-1]}, {flag})" if name.endswith(")") else f"{name} ({flag})"  # "AMD EPYC (family 25 model 17, ..."


def replace_section(path: Path, heading: str, section: str, header: str = HEADER) -> None:
    """Put `section` where the section titled `heading` stands (its readers' links and order stay), else at the end.
    The old section's `### ` subsections follow the new text: they hold what was written by hand (earlier runs,
    readings), which a re-run must not erase; the scripts write none."""
    text = path.read_text() if path.exists() else header
    parts = text.split("\n## ")
    sections = ["## " + p.rstrip() + "\n" for p in parts[1:]]
    at = next((i for i, s in enumerate(sections) if s.startswith(heading)), len(sections))
    kept = [s[s.index("\n### ") + 1 :] for s in sections if s.startswith(heading) and "\n### " in s]
    sections = [s for s in sections if not s.startswith(heading)]
    sections.insert(at, "\n".join([section.rstrip() + "\n", *kept]))
    path.write_text("\n".join([parts[0].rstrip() + "\n", *sections]))
