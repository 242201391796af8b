"""The import rules in pyproject.toml hold, and `lint-imports` really fails when one is broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy shadows the installed package
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "toolkit", tree / "toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_contracts_hold(tmp_path):
    r = _lint(_copy(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "0 broken" in r.stdout


def test_an_engine_importing_the_server_fails_with_the_contract_name(tmp_path):
    tree = _copy(tmp_path)
    engine = tree / "toolkit" / "engine" / "engine.py"
    engine.write_text(engine.read_text() + "\n\ndef _bad():\n    from toolkit.serve import app  # noqa: F401\n")
    r = _lint(tree)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "the engine never imports the server" in r.stdout and "BROKEN" in r.stdout
    assert "toolkit.engine.engine -> toolkit.serve.app" in r.stdout


def test_the_schema_importing_torch_fails(tmp_path):
    tree = _copy(tmp_path)
    schema = tree / "toolkit" / "data" / "schema.py"
    schema.write_text(schema.read_text() + "\n\ndef _bad():\n    import torch  # noqa: F401\n")
    r = _lint(tree)
    assert r.returncode == 1 and "the message schema imports no model code" in r.stdout, r.stdout[-3000:]


def test_nothing_in_the_library_imports_the_cli():
    offenders = [
        p.relative_to(ROOT)
        for p in (ROOT / "toolkit").rglob("*.py")
        if any(line.strip().startswith(("import cli", "from cli ")) for line in p.read_text().splitlines())
    ]
    assert offenders == []
