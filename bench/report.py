"""Shared by the benchmark scripts: rewrite one `## ...` section of docs/BENCHMARKS.md, keeping the others."""

from __future__ import annotations

import os
from pathlib import Path

HEADER = "# Benchmarks\n\nMeasured ratios; each section names the script that wrote it (re-run it to refresh).\n"


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def replace_section(path: Path, heading: str, section: str, header: str = HEADER) -> None:
    text = path.read_text() if path.exists() else header
    parts = text.split("\n## ")
    others = ["## " + p.rstrip() + "\n" for p in parts[1:] if not ("## " + p).startswith(heading)]
    path.write_text("\n".join([parts[0].rstrip() + "\n", *others, section]))
