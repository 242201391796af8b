"""The CLI verbs of issue 1/7 as a user runs them: tiny-base, info (--json), chat with text and an image."""

from __future__ import annotations

import json

import torch
from helpers import run_cli


def toolkit(*args, cwd=None):
    return run_cli(*args, cwd=cwd)


def test_help_lists_the_verbs():
    r = toolkit("--help")
    assert r.returncode == 0
    for verb in ("tiny-base", "info", "chat", "make-image"):
        assert verb in r.stdout


def test_info_json_reports_format_bits_and_group_size(tiny_ct, base):
    r = toolkit("info", tiny_ct, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["quantization"] == {
        "format": "compressed-tensors",
        "bits": 4,
        "group_size": 128,
        "symmetric": True,
        "quantized_layers": 28,
    }
    assert info["architecture"] == "Gemma3ForConditionalGeneration"
    assert info["vision"] is True and info["context_length"] == 4096
    assert info["special_tokens"]["<end_of_turn>"] == 106 and info["special_tokens"]["<eos>"] == 1
    assert info["fingerprint"] == base.fingerprint
    # the logical parameter count equals that of the same model built dense (tied embeddings counted once)
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config.from_pretrained(tiny_ct)
    del config.quantization_config
    with torch.device("meta"):
        dense = Gemma3ForConditionalGeneration(config)
    assert info["parameters"] == sum(p.numel() for p in dense.parameters())
    human = toolkit("info", tiny_ct)
    assert "compressed-tensors, 4-bit, group size 128" in human.stdout


def test_info_on_gptq_format(tiny_gptq):
    info = json.loads(toolkit("info", tiny_gptq, "--json").stdout)
    assert (info["quantization"]["format"], info["quantization"]["quantized_layers"]) == ("gptq", 28)


def test_tiny_base_then_chat_with_text_and_image(tmp_path):
    r = toolkit("tiny-base", tmp_path / "base", "--seed", 3)
    assert r.returncode == 0 and "built tiny Gemma 3 base" in r.stdout, r.stderr
    assert toolkit("make-image", tmp_path / "red.png").returncode == 0
    text = toolkit("chat", tmp_path / "base", "Name a colour.", "--max-tokens", 8)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == "user: Name a colour."
    assert text.stdout.splitlines()[1].startswith("model: ")
    image = toolkit("chat", "base", "What colour is it?", "--image", "red.png", "--max-tokens", 8, cwd=tmp_path)
    assert image.returncode == 0, image.stderr
    assert "[+1 image(s)]" in image.stdout and "model: " in image.stdout
    assert toolkit("tiny-base", tmp_path / "base").returncode == 2  # refuses to overwrite
    missing = toolkit("chat", tmp_path / "base", "hi", "--image", "nope.png")
    assert missing.returncode == 2 and "not found" in missing.stderr
