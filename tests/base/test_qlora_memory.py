"""QLoRA keeps the base 4-bit: after a LoRA training step no dense copy of a quantised weight exists.

Measured on the `small` preset (63M quantised parameters) so that the packed linears dominate the total.
"""

from __future__ import annotations

import pytest
import torch

from toolkit.base.memory import dense_bf16_bytes, model_tensor_bytes

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from toolkit.base import builder as tiny_base
    from toolkit.base.loader import load_base

    path = tiny_base.build(tmp_path_factory.mktemp("small") / "small", size="small")
    base = load_base(path, device="cpu", training=True)
    frozen = {k: v.clone() for k, v in base.model.state_dict().items()}
    model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(3, 67).unsqueeze(0)
    losses = []
    for _ in range(2):
        out = model(input_ids=ids, labels=ids, token_type_ids=torch.zeros_like(ids))
        out.loss.backward()
        grads = {n: p.grad is not None and p.grad.abs().sum().item() > 0 for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return {"path": path, "model": model, "frozen": frozen, "grads": grads, "losses": losses}


def test_tensor_bytes_stay_below_035x_dense_bf16_after_a_training_step(trained):
    ratio = model_tensor_bytes(trained["model"]) / dense_bf16_bytes(trained["path"])
    assert ratio < 0.35, ratio


def test_no_quantised_layer_holds_a_dense_weight(trained):
    from toolkit.base.gptq_backend import is_quantized_linear

    layers = [m for m in trained["model"].modules() if is_quantized_linear(m)]
    assert len(layers) == 7 * 4
    for layer in layers:
        dense_numel = layer.in_features * layer.out_features
        held = [t for t in list(layer.buffers()) + list(vars(layer).values()) if isinstance(t, torch.Tensor)]
        assert not any(t.is_floating_point() and t.numel() >= dense_numel for t in held)
        assert layer.qweight.dtype == torch.int32


def test_gradients_reach_only_lora_weights_and_the_base_is_unchanged(trained):
    model = trained["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(trained["grads"][n] for n in trainable if ".lora_B." in n or "layers.3" in n)
    assert trained["losses"][1] < trained["losses"][0]
    after = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()}
    for name, before in trained["frozen"].items():
        assert torch.equal(after[name], before), name
    wrapped = {type(m).__module__ for m in model.modules() if hasattr(m, "base_layer")}
    assert wrapped == {"peft.tuners.lora.gptq"}  # peft's GPTQ LoRA, not its plain Linear wrapper
