"""`toolkit export`: the vLLM target end to end, the checks every target shares (`--check`, `toolkit info ADAPTER`),
and the output rules (never replaced without --overwrite, nothing half-written, one-line errors). The GGUF and merged
files themselves: test_export_gguf.py, test_export_merged.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from toolkit.errors import ToolkitError


def _adapter_copy(trained, tmp_path: Path, name: str = "copy", **config) -> Path:
    folder = tmp_path / name
    shutil.copytree(trained.adapter_dir, folder)
    if config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return folder


def test_vllm_export_copies_the_checked_adapter_and_writes_the_command(trained, tiny_ct, tmp_path):
    out = tmp_path / "qs-vllm"
    r = run_cli("export", f"quickstart={trained.adapter_dir}", "--to", "vllm", "--out", out)
    assert r.returncode == 0, r.stderr
    for f in ("adapter_config.json", "adapter_model.safetensors", "toolkit.json"):
        assert (out / f).read_bytes() == (trained.adapter_dir / f).read_bytes(), f
    script = (out / "vllm-serve.sh").read_text().splitlines()
    assert script[1] == "# checked by toolkit export: 28 LoRA modules"
    assert script[2] == (
        f"vllm serve {Path(tiny_ct).resolve()} --enable-lora --max-lora-rank 16 "
        f"--lora-modules quickstart={out.resolve()}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["qs-vllm"]  # no staging folder left

    again = run_cli("export", f"quickstart={trained.adapter_dir}", "--to", "vllm", "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    wider = run_cli(
        "export", f"quickstart={trained.adapter_dir}", "--to", "vllm", "--out", out, "--overwrite",
        "--max-lora-rank", "64",
    )  # fmt: skip
    assert wider.returncode == 0, wider.stderr
    assert "--max-lora-rank 64" in (out / "vllm-serve.sh").read_text()
    narrow = run_cli(
        "export", f"quickstart={trained.adapter_dir}", "--to", "vllm", "--out", out, "--overwrite",
        "--max-lora-rank", "8",
    )  # fmt: skip
    assert narrow.returncode == 2 and "cannot serve rank 16" in narrow.stderr
    assert "--max-lora-rank 64" in (out / "vllm-serve.sh").read_text()  # the refused export changed nothing


@pytest.mark.parametrize(
    "config, reason",
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"r": 1024}, "rank 1024")],
)
def test_vllm_export_refuses_what_vllm_would_ignore_or_refuse(trained, tmp_path, config, reason):
    from toolkit.lora.export import export

    folder = _adapter_copy(trained, tmp_path, **config)
    with pytest.raises(ToolkitError, match=f"cannot go to vllm: .*{reason}"):
        export(f"copy={folder}", "vllm", out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_an_interrupted_export_leaves_nothing_and_keeps_the_old_output(trained, tmp_path, monkeypatch):
    from toolkit.lora import export as exporting

    out = tmp_path / "out"
    exporting.export(f"quickstart={trained.adapter_dir}", "vllm", out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    copies = []

    def copy_then_fail(src, dst):
        copies.append(dst)
        if len(copies) == 2:
            raise OSError("disk full")
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(exporting.shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        exporting.export(f"quickstart={trained.adapter_dir}", "vllm", out=out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unknown_adapters_and_targets_are_one_line_errors(trained, tmp_path):
    missing = run_cli("export", "no-such-adapter", "--to", "gguf")
    assert missing.returncode == 2 and "no adapter at" in missing.stderr and len(missing.stderr.splitlines()) == 1
    target = run_cli("export", f"quickstart={trained.adapter_dir}", "--to", "onnx")
    assert target.returncode == 2 and "unknown export target 'onnx'" in target.stderr
    none = run_cli("export", f"quickstart={trained.adapter_dir}")
    assert none.returncode == 2 and "--to gguf, --to merged or --to vllm" in none.stderr
    gptq = run_cli("export", f"quickstart={trained.adapter_dir}", "--to", "vllm", "--quantize", "gptq")
    assert gptq.returncode == 2 and "use --to merged --quantize gptq" in gptq.stderr


def test_check_and_info_say_which_targets_an_adapter_can_go_to(trained, tmp_path):
    ok = run_cli("export", f"quickstart={trained.adapter_dir}", "--check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["gguf: ok", "merged: ok", "vllm: ok"]
    dora = _adapter_copy(trained, tmp_path, "dora", use_dora=True)
    info = run_cli("info", dora, "--json")
    assert info.returncode == 0, info.stderr
    found = json.loads(info.stdout)
    assert set(found) == {"gguf", "merged", "vllm"}
    assert all(any("DoRA" in why for why in found[t]) for t in found), found
