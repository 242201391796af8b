"""`toolkit serve --engine vllm`: the exact vLLM command, and adapter folders that vLLM's LoRA loader applies
(vLLM itself is not installed here; its name mapping for Gemma 3 is replayed from its source)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli
from safetensors.torch import load_file, save_file

from toolkit.errors import ToolkitError
from toolkit.serve import vllm_handoff as vh


def _config(layers: int = 4) -> dict:
    return {"text_config": {"num_hidden_layers": layers, "max_position_embeddings": 4096, "hidden_size": 64}}


def _copy(adapter: Path, dest: Path, *, rank: int | None = None, extra: dict | None = None, drop: str = "") -> Path:
    """A copy of `adapter`, optionally with another rank in its config, extra tensors, or tensors dropped."""
    shutil.copytree(adapter, dest)
    if rank is not None:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        cfg["r"] = rank
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    if extra or drop:
        tensors = load_file(dest / "adapter_model.safetensors")
        tensors = {k: v for k, v in tensors.items() if not (drop and drop in k)}
        save_file({**tensors, **(extra or {})}, dest / "adapter_model.safetensors")
    return dest


def test_tensor_names_map_onto_vllms_gemma3_modules():
    assert vh.vllm_module_name("base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight") == (
        "language_model.model.layers.3.self_attn.q_proj",
        "lora_A",
    )
    assert vh.vllm_module_name("base_model.model.model.vision_tower.vision_model.x.lora_B.weight") == (
        "vision_tower.vision_model.x",
        "lora_B",
    )
    assert vh.vllm_module_name("base_model.model.model.language_model.layers.0.mlp.up_proj.weight") is None
    assert [vh.max_lora_rank(r) for r in ([8], [16], [17], [16, 40], [300])] == [8, 16, 32, 64, 320]


def test_the_quickstart_adapter_is_what_vllm_loads(trained):
    check = vh.check_adapter("quickstart", trained.adapter_dir, num_layers=4)
    assert check.problems == [] and check.rank == 16
    assert check.modules == 4 * 7  # every language-model projection of every layer, A and B


def test_exact_command_for_a_set_of_adapters(trained, tmp_path):
    big = _copy(trained.adapter_dir, tmp_path / "big", rank=40)
    cmd = vh.build_command(
        "/models/gemma",
        [("quickstart", trained.adapter_dir), ("big", big)],
        config=_config(),
        served_name="gemma",
        port=8001,
        api_key="sk-secret",
        max_model_len=32768,
        max_images=4,
        max_batch=32,
    )
    assert cmd.argv == [
        "vllm",
        "serve",
        "/models/gemma",
        "--served-model-name",
        "gemma",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--max-model-len",
        "32768",
        "--limit-mm-per-prompt",
        '{"image":4}',
        "--max-num-seqs",
        "32",
        "--enable-lora",
        "--max-lora-rank",
        "64",
        "--max-loras",
        "2",
        "--lora-modules",
        f"quickstart={trained.adapter_dir.resolve()}",
        f"big={big.resolve()}",
    ]
    assert cmd.env == {"VLLM_API_KEY": "sk-secret"}  # in the environment, not on the command line (ps shows argv)
    assert "sk-secret" not in cmd.shell() and cmd.shell().startswith("VLLM_API_KEY=*** vllm serve /models/gemma ")
    no_adapters = vh.build_command("/m", [], config=_config(), served_name="m", max_model_len=4096)
    assert "--enable-lora" not in no_adapters.argv and no_adapters.env == {}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"extra": "vision"}, "vision tower / projector"),
        ({"extra": "text-only-model"}, "not a language-model projection"),
        ({"extra": "layer-99"}, "layer 99 does not exist"),
        ({"drop": "q_proj.lora_B"}, "has ['lora_A'] only"),
        ({"config": {"use_dora": True}}, "DoRA"),
        ({"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
        ({"config": {"r": 1024}}, "rank 1024"),
    ],
)
def test_adapters_vllm_would_silently_ignore_are_refused(trained, tmp_path, change, message):
    import torch

    a, b = torch.zeros(16, 32), torch.zeros(32, 16)
    extras = {
        "vision": {
            "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a
        },
        "text-only-model": {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a},
        "layer-99": {
            "base_model.model.model.language_model.layers.99.self_attn.q_proj.lora_A.weight": a,
            "base_model.model.model.language_model.layers.99.self_attn.q_proj.lora_B.weight": b,
        },
    }
    folder = _copy(
        trained.adapter_dir, tmp_path / "a", extra=extras.get(change.get("extra")), drop=change.get("drop", "")
    )
    if "config" in change:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **change["config"]}))
    check = vh.check_adapter("a", folder, num_layers=4)
    assert any(message in p for p in check.problems), check.problems
    with pytest.raises(ToolkitError, match="vLLM would not apply these adapters"):
        vh.build_command("/m", [("a", folder)], config=_config(), served_name="m", max_model_len=4096)


_cli = run_cli


def test_dry_run_prints_the_command_for_the_quickstart_adapter(trained, tiny_ct):
    r = _cli("serve", "--engine", "vllm", "--dry-run", "--adapter", f"quickstart={trained.adapter_dir}")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line == (
        f"vllm serve {Path(tiny_ct).resolve()} --served-model-name {Path(tiny_ct).name} --host 127.0.0.1 "
        "--port 8000 --max-model-len 4096 --limit-mm-per-prompt '{\"image\":8}' --max-num-seqs 16 --enable-lora "
        f"--max-lora-rank 16 --max-loras 1 --lora-modules quickstart={trained.adapter_dir.resolve()}"
    )
    assert "adapter quickstart: rank 16, 28 modules, loadable by vLLM" in r.stderr


def test_without_vllm_or_with_a_foreign_adapter_the_cli_says_why(trained, tiny_ct, tmp_path):
    r = _cli("serve", "--engine", "vllm", "--adapter", f"quickstart={trained.adapter_dir}")
    assert r.returncode == 2 and "vLLM is not installed" in r.stderr and "--dry-run" in r.stderr
    other = _copy(trained.adapter_dir, tmp_path / "other")
    manifest = json.loads((other / "toolkit.json").read_text())
    manifest["base"]["fingerprint"] = "0" * 16
    (other / "toolkit.json").write_text(json.dumps(manifest))
    r = _cli("serve", "--engine", "vllm", "--dry-run", "--base", tiny_ct, "--adapter", f"other={other}")
    assert r.returncode == 2 and "was trained on base 0000000000000000" in r.stderr
    r = _cli("serve", "--dry-run", "--adapter", f"quickstart={trained.adapter_dir}")
    assert r.returncode == 2 and "--engine vllm" in r.stderr
