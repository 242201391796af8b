"""The compressed-tensors -> GPTQ repack is lossless and cached; both formats load to the same model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open

from toolkit.base import quant_format
from toolkit.errors import ToolkitError


def _dequantize_compressed_tensors(path, prefix):
    """Reference dequantisation straight from the checkpoint with compressed-tensors' own unpacker."""
    with safe_open(path / "model.safetensors", "pt") as f:
        shape = f.get_tensor(prefix + ".weight_shape").tolist()
        q = unpack_from_int32(f.get_tensor(prefix + ".weight_packed"), 4, torch.Size(shape))
        scale = f.get_tensor(prefix + ".weight_scale").float()
    assert q.min() >= -8 and q.max() <= 7
    return (q.float().reshape(shape[0], -1, 128) * scale.unsqueeze(-1)).reshape(shape)


def test_dequantised_weights_are_identical_bit_for_bit(tiny_ct):
    from toolkit.base.gptq_backend import is_quantized_linear
    from toolkit.base.loader import load_base

    base = load_base(tiny_ct, device="cpu", kernel="torch")  # the plain kernel: its dequantisation is exact

    layers = {n: m for n, m in base.model.named_modules() if is_quantized_linear(m)}
    assert len(layers) == 7 * 4
    for name, layer in layers.items():
        prefix = name.replace("model.language_model.", "language_model.model.")
        reference = _dequantize_compressed_tensors(tiny_ct, prefix)
        loaded = layer.dequantize_weight().t().float()  # GPTQ layout is [in, out]
        assert torch.equal(loaded, reference), name


def test_repack_is_cached_and_rebuilt_when_the_source_changes(tiny_ct, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ct, src, ignore=shutil.ignore_patterns(".toolkit-gptq"))
    first = quant_format.ensure_gptq(src)
    stamp = (first / "toolkit_repack.json").stat().st_mtime_ns
    assert quant_format.ensure_gptq(src) == first
    assert (first / "toolkit_repack.json").stat().st_mtime_ns == stamp  # not repacked twice
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["rope_theta"] = 12345.0
    (src / "config.json").write_text(json.dumps(cfg))
    quant_format.ensure_gptq(src)
    assert json.loads((first / "config.json").read_text())["text_config"]["rope_theta"] == 12345.0


def test_gptq_format_and_compressed_tensors_give_the_same_logits(tiny_gptq, base):
    from toolkit.base.loader import load_base

    other = load_base(tiny_gptq, device="cpu")
    assert quant_format.ensure_gptq(tiny_gptq) == tiny_gptq  # GPTQ folders load as they are
    ids = torch.tensor([[2, 105, 400, 401, 402, 106, 105]])
    with torch.no_grad():
        a = base.model(input_ids=ids).logits
        b = other.model(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "qc, match",
    [
        (None, "not quantised"),
        ({"quant_method": "awq", "bits": 4}, "method 'awq' is not supported"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8 bits, not 4"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}}, "not supported"),
    ],
)
def test_quant_spec_refuses_what_is_not_4bit_gptq(qc, match):
    config = {"quantization_config": qc} if qc else {}
    with pytest.raises(ToolkitError, match=match):
        quant_format.read_quant_spec(config, where="config.json")
