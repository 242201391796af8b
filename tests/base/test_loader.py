"""base.py loads either format as a frozen 4-bit model, generates deterministically, and refuses bad bases."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import run_cli

from toolkit.base import kernels
from toolkit.base.gptq_backend import is_quantized_linear
from toolkit.base.loader import load_base
from toolkit.data import template as chat
from toolkit.data.schema import parse_messages
from toolkit.engine.engine import generate_greedy
from toolkit.errors import ToolkitError


def test_language_model_linears_are_4bit_and_vision_tower_is_not(base):
    lm = base.model.model.language_model
    for layer in lm.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = getattr(layer.self_attn, proj)
            assert is_quantized_linear(m) and m.bits == 4 and m.group_size == 128
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert is_quantized_linear(getattr(layer.mlp, proj))
    vision_linears = [m for m in base.model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert vision_linears and not any(is_quantized_linear(m) for m in base.model.model.vision_tower.modules())
    assert not is_quantized_linear(base.model.lm_head)
    # tied embeddings survive loading (GPTQModel ties after accelerate warns they are not)
    assert base.model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()


def test_cpu_dtype_is_the_kernels_and_base_is_frozen(base):
    # the measured choice (kernels.py): float32 around the aten int4 matmul unless the CPU has AVX512-BF16
    assert base.device == "cpu" and base.dtype == getattr(torch, kernels.choose("cpu", "inference").dtype)
    assert base.dtype in (torch.float32, torch.bfloat16)  # never float16: Gemma 3 overflows it
    token_matrix = base.model.get_input_embeddings().weight  # tied embedding / LM head: held as stored on CPU
    others = {p.dtype for p in base.model.parameters() if p is not token_matrix}
    assert others == {base.dtype}
    assert token_matrix.dtype == (torch.bfloat16 if base.dtype == torch.float32 else base.dtype)
    assert not any(p.requires_grad for p in base.model.parameters())
    assert base.spec.bits == 4 and base.spec.format == "compressed-tensors"
    assert len(base.fingerprint) == 16 and base.context_length == 4096


def _reply(base, raw, n=12):
    messages = parse_messages(raw, purpose="request", where="test")
    inputs = chat.encode_prompt(base.processor, messages, chat.load_images(messages, base_dir=None, policy=None))
    inputs = inputs.tensors()
    return generate_greedy(base, inputs, max_new_tokens=n), inputs


def test_greedy_generation_is_deterministic_for_text(base, tiny_ct):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first, _ = _reply(base, messages)
    second, _ = _reply(base, messages)
    fresh, _ = _reply(load_base(tiny_ct, device="cpu"), messages)
    assert first == second == fresh
    assert len(first) > 0


def test_greedy_generation_is_deterministic_for_text_and_image(base, images):
    def ask(color):
        msg = [
            {"type": "text", "text": "What color is the square?"},
            {"type": "image_url", "image_url": {"url": str(images[color])}},
        ]
        return _reply(base, [{"role": "user", "content": msg}])

    red, inputs = ask("red")
    assert red == ask("red")[0]
    # the image really goes through the vision tower: soft tokens in the prompt, pixels change the logits
    n_soft = (inputs["input_ids"] == base.model.config.image_token_index).sum().item()
    assert n_soft == base.model.config.mm_tokens_per_image
    assert inputs["pixel_values"].shape[-1] == base.processor.image_processor.size["height"]
    with torch.no_grad():
        logits = {}
        for color in ("red", "blue"):
            _, inp = ask(color)
            logits[color] = base.model(**inp).logits[0, -1]
    assert not torch.allclose(logits["red"], logits["blue"])


def _broken(tiny_ct, tmp_path, how):
    bad = tmp_path / how
    shutil.copytree(tiny_ct, bad, ignore=shutil.ignore_patterns(".toolkit-gptq"))
    cfg = json.loads((bad / "config.json").read_text())
    if how == "not-gemma3":
        cfg["model_type"] = "llama"
    elif how == "not-quantised":
        del cfg["quantization_config"]
    elif how == "eight-bit":
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    elif how == "no-weights":
        (bad / "model.safetensors").unlink()
    elif how == "missing-shard":
        (bad / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
        )
    elif how == "no-config":
        (bad / "config.json").unlink()
    if (bad / "config.json").exists():
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


BAD_BASES = {
    "missing-folder": "does not exist",
    "no-config": "no config.json",
    "not-gemma3": "expected a Gemma 3 model .* found model_type 'llama'",
    "not-quantised": "not quantised",
    "eight-bit": "8 bits, not 4",
    "no-weights": r"no \*.safetensors weight files",
    "missing-shard": "missing: model-00002-of-00002.safetensors",
}


@pytest.mark.parametrize("how", list(BAD_BASES))
def test_bad_base_raises_clear_error(tiny_ct, tmp_path, how):
    path = tmp_path / "nowhere" if how == "missing-folder" else _broken(tiny_ct, tmp_path, how)
    with pytest.raises(ToolkitError, match=BAD_BASES[how]) as err:
        load_base(path, device="cpu")
    assert "fix:" in str(err.value) or how == "no-config"


def test_bad_bases_exit_2_from_cli_with_one_line(tiny_ct, tmp_path):
    for how in ("missing-folder", "not-gemma3", "not-quantised", "no-weights"):
        path = tmp_path / "nowhere" if how == "missing-folder" else _broken(tiny_ct, tmp_path, how)
        for verb in (["info", str(path)], ["chat", str(path), "hi"]):
            r = run_cli(*verb, cwd=None)
            assert r.returncode == 2, (how, verb, r.stderr)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), (how, r.stderr)
            assert "Traceback" not in r.stderr + r.stdout


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ToolkitError, match="not a local folder and could not be fetched") as err:
        load_base("ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g-not-here", device="cpu")
    assert "hf download" in str(err.value)


def test_a_checkpoint_error_without_a_message_still_gives_a_clear_error(tiny_ct, monkeypatch):
    """GPTQModel's errors become one line with their type, even one raised with no message at all."""
    from toolkit.base import gptq_backend

    def broken(*args, **kwargs):
        raise ValueError()

    monkeypatch.setattr(gptq_backend, "load_gptq", broken)
    with pytest.raises(ToolkitError, match="could not load the quantised weights: ValueError") as err:
        load_base(tiny_ct, device="cpu")
    assert "fix:" in str(err.value)
