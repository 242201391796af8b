"""Processes that start together on one base (a DDP launch's ranks): one builds or repacks it, the others wait.

Threads stand in for the processes: the lock is an OS file lock held per open file, so threads of one process
exclude each other as processes do. Without it each caller would write the folder and replace it while another
was loading from it.
"""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

from helpers import all_at_once

from toolkit.base import builder, quant_format
from toolkit.base.loader import prepare_recipe_base


def _slow(monkeypatch, module, name: str) -> list:
    """Patch module.name to record each call and take a second (every other caller finds it under way)."""
    real, calls = getattr(module, name), []

    def slow(*args, **kwargs):
        calls.append(args)
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)
    return calls


def test_processes_loading_one_checkpoint_together_repack_it_once(tiny_ct, tmp_path, monkeypatch, capfd):
    src = tmp_path / "src"
    shutil.copytree(tiny_ct, src, ignore=shutil.ignore_patterns(".toolkit-gptq*"))
    calls = _slow(monkeypatch, quant_format, "repack_to_gptq")
    folders = all_at_once(lambda _: quant_format.ensure_gptq(src), range(3))
    assert len(calls) == 1 and folders == [folders[0]] * 3
    assert (folders[0] / "toolkit_repack.json").is_file()
    assert capfd.readouterr().err.count("waiting for another process's repack") == 2


def test_processes_starting_one_recipe_together_build_its_tiny_base_once(tmp_path, monkeypatch, capfd):
    section = SimpleNamespace(path=str(tmp_path / "build" / "tiny-base"), tiny_seed=0)
    calls = _slow(monkeypatch, builder, "build")
    folders = all_at_once(lambda _: prepare_recipe_base(section), range(3))
    assert len(calls) == 1 and folders == [folders[0]] * 3
    assert (folders[0] / "config.json").is_file()
    assert capfd.readouterr().err.count("waiting for another process's build of the tiny base") == 2
