"""`toolkit export --to gguf`: the quickstart adapter written as llama.cpp's GGUF LoRA and read back with gguf's own
reader (metadata, every tensor's name and shape, and llama.cpp's alpha / rank * B @ A equal to peft's update for
every module, rsLoRA and per-module rank / alpha included); what llama.cpp cannot represent is refused by name."""

from __future__ import annotations

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from toolkit.errors import ToolkitError
from toolkit.lora.export_gguf import gguf_problems, write_gguf
from toolkit.lora.weights import load_lora

PROJ = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


@pytest.fixture(scope="module")
def base_config(tiny_ct):
    return json.loads((tiny_ct / "config.json").read_text())


def _copy(trained, tmp_path, name="copy"):
    folder = tmp_path / name
    shutil.copytree(trained.adapter_dir, folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _export(folder, tmp_path, base_config, **kw):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    files = write_gguf(load_lora(folder), out, name="mine", base_config=base_config, **kw)
    return out, files


def _llama_deltas(path):
    """What llama.cpp adds to each base tensor at user scale 1: alpha / rank * B @ A (rank = lora_b's ne[0])."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in reader.tensors}
    out = {}
    for name in t:
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            a, b = t[name], t[base + ".lora_b"]
            out[base] = (alpha / b.shape[1]) * (b @ a)
    return out


def _tensor(reader, name):
    return next(t.data for t in reader.tensors if t.name == name)


def _gguf_name(module):
    return f"blk.{module.layer}.{PROJ[module.projection]}.weight"


def test_the_quickstart_adapter_reads_back_as_llama_cpp_loads_it(trained, tmp_path, base_config):
    adapter = load_lora(trained.adapter_dir)
    assert gguf_problems(adapter) == []
    out, files = _export(trained.adapter_dir, tmp_path, base_config)
    assert files == ["mine.gguf", "Modelfile", "README.md"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)

    reader = gguf.GGUFReader(out / "mine.gguf")
    f = reader.fields
    assert f["general.architecture"].contents() == "gemma3"
    assert f["general.type"].contents() == "adapter"
    assert f["adapter.type"].contents() == "lora"
    assert f["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert f["adapter.lora.alpha"].contents() == 32.0

    text = base_config["text_config"]
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    q, kv = text["num_attention_heads"] * text["head_dim"], text["num_key_value_heads"] * text["head_dim"]
    out_in = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
    out_in |= {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    tensors = {t.name: t for t in reader.tensors}
    expected = {}
    for m in adapter.modules:
        o, i = out_in[m.projection]
        expected[_gguf_name(m) + ".lora_a"] = (i, 16)  # GGUF ne order, what llama-adapter.cpp checks
        expected[_gguf_name(m) + ".lora_b"] = (16, o)
    assert len(adapter.modules) == text["num_hidden_layers"] * 7
    assert {n: tuple(int(d) for d in t.shape) for n, t in tensors.items()} == expected
    for m in adapter.modules:
        a, b = tensors[_gguf_name(m) + ".lora_a"], tensors[_gguf_name(m) + ".lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(a.data, m.a.float().numpy())  # plain LoRA: written as trained
        assert np.array_equal(b.data, m.b.float().numpy())

    deltas = _llama_deltas(out / "mine.gguf")
    for m in adapter.modules:
        np.testing.assert_allclose(deltas[_gguf_name(m)], m.delta().double().numpy(), rtol=1e-5, atol=1e-7)

    modelfile = (out / "Modelfile").read_text()
    assert "ADAPTER ./mine.gguf" in modelfile.splitlines()
    assert "FROM ./BASE.gguf" in modelfile.splitlines() and "# Put the path of the base model's GGUF" in modelfile
    readme = (out / "README.md").read_text()
    assert "llama-server -m BASE.gguf --lora mine.gguf" in readme
    assert 'Llama(model_path="BASE.gguf", lora_path="mine.gguf")' in readme
    assert "ollama create mine -f Modelfile" in readme


def test_rslora_rank_and_alpha_patterns_are_folded_into_the_one_alpha(trained, tmp_path, base_config):
    folder = _copy(trained, tmp_path)

    def lower_q_rank(t):  # q_proj really trained at rank 4, as rank_pattern says
        for key in list(t):
            if ".q_proj.lora_A" in key:
                t[key] = t[key][:4].contiguous()
            elif ".q_proj.lora_B" in key:
                t[key] = t[key][:, :4].contiguous()

    _edit_tensors(folder, lower_q_rank)
    _edit_config(folder, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 8})
    out, _ = _export(folder, tmp_path, base_config)

    raw = load_file(str(folder / "adapter_model.safetensors"))
    deltas = _llama_deltas(out / "mine.gguf")
    adapter = load_lora(folder)
    scales = {"q_proj": 32 / math.sqrt(4), "down_proj": 8 / math.sqrt(16)}  # peft's rsLoRA: alpha / sqrt(r)
    assert len(deltas) == len(adapter.modules)
    for m in adapter.modules:
        key = "base_model.model." + m.name
        a, b = raw[key + ".lora_A.weight"].double(), raw[key + ".lora_B.weight"].double()
        peft = scales.get(m.projection, 32 / math.sqrt(16)) * (b @ a)
        np.testing.assert_allclose(deltas[_gguf_name(m)], peft.numpy(), rtol=1e-5, atol=1e-7)
    reader = gguf.GGUFReader(out / "mine.gguf")
    assert reader.fields["adapter.lora.alpha"].contents() == 32.0
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"][1] == 4 and shapes["blk.0.attn_q.weight.lora_b"][0] == 4
    # down_proj's 8 / sqrt(16) happens to equal llama.cpp's 32 / 16: written as trained; every other module folded
    assert f"For {len(adapter.modules) - 4} of the {len(adapter.modules)} modules" in (out / "README.md").read_text()
    down = next(m for m in adapter.modules if m.projection == "down_proj")
    assert np.array_equal(_tensor(reader, _gguf_name(down) + ".lora_b"), down.b.numpy())


def _refused(folder, tmp_path, base_config, *words):
    adapter = load_lora(folder)
    problems = "; ".join(gguf_problems(adapter))
    out = tmp_path / "refused"
    out.mkdir()
    with pytest.raises(ToolkitError) as err:
        write_gguf(adapter, out, name="mine", base_config=base_config)
    for w in words:
        assert w in problems and w in str(err.value)
    assert err.value.where == str(folder) and "lora.include_vision: false" in err.value.fix
    assert list(out.iterdir()) == []  # nothing written


def test_dora_is_refused_by_name(trained, tmp_path, base_config):
    folder = _copy(trained, tmp_path)
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.ones(256)))
    _edit_config(folder, use_dora=True)
    _refused(folder, tmp_path, base_config, "DoRA", "lora_magnitude_vector")


def test_modules_to_save_is_refused_by_name(trained, tmp_path, base_config):
    folder = _copy(trained, tmp_path)
    key = "base_model.model.lm_head.modules_to_save.default.weight"
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(8, 256)))
    _edit_config(folder, modules_to_save=["lm_head"])
    _refused(folder, tmp_path, base_config, "modules_to_save", "lm_head")


def test_lora_biases_are_refused_by_name(trained, tmp_path, base_config):
    folder = _copy(trained, tmp_path)
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.bias"
    _edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(256)))
    _edit_config(folder, lora_bias=True)
    _refused(folder, tmp_path, base_config, "LoRA biases", "lora_B.bias")


def test_a_vision_tower_module_is_refused_by_name(trained, tmp_path, base_config):
    folder = _copy(trained, tmp_path)
    name = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"

    def add(t):
        t[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(16, 32)
        t[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(32, 16)

    _edit_tensors(folder, add)
    _refused(folder, tmp_path, base_config, "vision-tower", name, "text decoder only")


def test_an_adapter_for_another_base_is_refused(trained, tmp_path, base_config):
    other = json.loads(json.dumps(base_config))
    other["text_config"]["intermediate_size"] += 1
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ToolkitError, match=r"mlp\.(down|gate|up)_proj \(out x in .*\) does not fit the base") as err:
        write_gguf(load_lora(trained.adapter_dir), out, name="mine", base_config=other)
    assert "--base" in err.value.fix and list(out.iterdir()) == []


def _fake_base(path, modules, arch="gemma3"):
    """A GGUF holding the adapted base tensors at their shapes, as a base model does (zeros, float32 here)."""
    w = gguf.GGUFWriter(path, arch=arch)
    for m in modules:
        w.add_tensor(_gguf_name(m), np.zeros(tuple(m.delta().shape), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_named_gguf_base_is_checked_and_written_into_the_modelfile(trained, tmp_path, base_config):
    adapter = load_lora(trained.adapter_dir)
    fake = _fake_base(tmp_path / "base.gguf", adapter.modules)
    out, _ = _export(trained.adapter_dir, tmp_path, base_config, gguf_base=str(fake))
    assert f"FROM {fake.resolve()}" in (out / "Modelfile").read_text().splitlines()
    assert f"llama-server -m {fake.resolve()} --lora mine.gguf" in (out / "README.md").read_text()

    with pytest.raises(ToolkitError, match="is not a file") as err:
        _export(trained.adapter_dir, tmp_path / "x", base_config, gguf_base=str(tmp_path / "absent.gguf"))
    assert err.value.where == "--gguf-base"


def test_a_gguf_base_without_the_adapted_tensors_or_of_another_arch_is_refused(trained, tmp_path, base_config):
    adapter = load_lora(trained.adapter_dir)
    missing = _fake_base(tmp_path / "missing.gguf", adapter.modules[1:])
    with pytest.raises(ToolkitError, match=f"has {_gguf_name(adapter.modules[0])} as None") as err:
        _export(trained.adapter_dir, tmp_path / "a", base_config, gguf_base=str(missing))
    assert err.value.where == "--gguf-base"
    llama = _fake_base(tmp_path / "llama.gguf", adapter.modules, arch="llama")
    with pytest.raises(ToolkitError, match="is a 'llama' model, not gemma3"):
        _export(trained.adapter_dir, tmp_path / "b", base_config, gguf_base=str(llama))
