"""bench/report.replace_section: a benchmark's re-run rewrites its own section and keeps what was written by hand."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from report import replace_section  # noqa: E402

DOC = """# Benchmarks

Intro.

## Alpha (`bench/alpha.py`)

old alpha table

### Other runs and readings

a run written by hand

### Why

a reading

## Beta

beta text
"""


def test_a_rewrite_keeps_the_hand_written_subsections_and_the_other_sections(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC)
    replace_section(doc, "## Alpha", "## Alpha (`bench/alpha.py`)\n\nnew alpha table\n")
    text = doc.read_text()
    assert "old alpha table" not in text
    assert text == DOC.replace("old alpha table", "new alpha table")


def test_a_section_without_subsections_is_replaced_whole_and_a_new_one_goes_last(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC)
    replace_section(doc, "## Beta", "## Beta\n\nnew beta\n")
    replace_section(doc, "## Gamma", "## Gamma\n\ngamma\n")
    text = doc.read_text()
    assert "beta text" not in text
    assert text.endswith("## Beta\n\nnew beta\n\n## Gamma\n\ngamma\n")
    assert text.index("## Alpha") < text.index("## Beta")
