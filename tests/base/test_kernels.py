"""The kernel choice (kernels.py): auto per device and phase, the override, and every CPU kernel's correctness.

Correctness is checked against the reference: the torch kernel in float32, which dequantises each weight exactly.
"""

from __future__ import annotations

import json
import typing

import pytest
import torch
from helpers import run_cli

from toolkit.base import gptq_backend, kernels
from toolkit.base.loader import load_base
from toolkit.errors import ToolkitError
from toolkit.lora.config import apply_lora
from toolkit.recipe import BaseSection, LoraSection

CPU_KERNELS = [k.name for k in kernels.KERNELS if k.device == "cpu" and gptq_backend.unavailable(k) is None]
LEAN_KERNELS = [name for name in ("torch_fused", "cpu_avx512") if name in CPU_KERNELS]  # torch_fused runs anywhere


def _avail(*ok):
    return lambda k: None if k.name in ok else "not here"


def test_auto_takes_the_first_available_kernel_of_the_measured_preference():
    assert kernels.choose("cpu", "inference", available=_avail("torch_fused", "torch")).kernel.name == "torch_fused"
    avx = kernels.choose("cpu", "inference", available=_avail("cpu_avx512", "torch_fused", "torch"))
    assert (avx.kernel.name, avx.dtype) == ("cpu_avx512", "bfloat16")
    only_torch = kernels.choose("cpu", "inference", available=_avail("torch"))
    assert only_torch.kernel.name == "torch" and "torch_fused: not here" in only_torch.reason
    assert kernels.choose("cpu", "training", available=_avail("torch_fused", "torch")).dtype == "float32"
    assert kernels.choose("cuda:0", "inference", available=lambda k: None).kernel.name == "exllama_v2"
    assert kernels.choose("cuda", "training", available=lambda k: None).kernel.name == "triton"
    for (device, _), order in kernels.AUTO.items():  # every preferred name exists on its device
        assert all(kernels.get(name, device).device == device for name in order)


def test_no_kernel_is_loaded_in_float16():
    assert {k.dtype for k in kernels.KERNELS} <= {"float32", "bfloat16"}  # Gemma 3 overflows float16


@pytest.mark.parametrize(
    ("device", "phase", "name", "message"),
    [
        ("cpu", "inference", "nope", "unknown kernel 'nope' for cpu"),
        ("cpu", "inference", "marlin", "unknown kernel 'marlin' for cpu"),
        ("cpu", "training", "cpu_avx512", "cpu_avx512 cannot train"),
        ("cuda", "training", "marlin", "marlin cannot train"),
    ],
)
def test_a_wrong_kernel_is_a_clear_error(device, phase, name, message):
    with pytest.raises(ToolkitError, match=message) as err:
        kernels.choose(device, phase, name, available=lambda k: None)
    assert "fix: use auto" in str(err.value)


def test_an_unavailable_kernel_asked_for_says_why():
    with pytest.raises(ToolkitError, match="torch_aten is not available here: no int4pack"):
        kernels.choose("cpu", "inference", "torch_aten", available=lambda k: "no int4pack")


def test_recipe_kernel_names_are_the_kernels_names():
    allowed = set(typing.get_args(BaseSection.model_fields["kernel"].annotation))
    assert allowed == {"auto", *kernels.names()}


def test_the_shared_base_runs_on_the_auto_inference_kernel(base):
    choice = kernels.choose("cpu", "inference")
    assert base.kernel == choice.kernel.name
    assert gptq_backend.layer_kernels(base.model) == [choice.kernel.layer]
    assert base.dtype == getattr(torch, choice.dtype)


@pytest.fixture(scope="module")
def reference(tiny_ct):
    """The torch kernel in float32 (exact dequantisation): logits and LoRA gradients on fixed inputs."""
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (2, 24))
    ref = load_base(tiny_ct, device="cpu", kernel="torch")
    with torch.no_grad():
        logits = ref.model(input_ids=ids).logits.float()
    grads, input_grad = _lora_grads(load_base(tiny_ct, device="cpu", kernel="torch", training=True), ids)
    return ids, logits, grads, input_grad


def _lora_grads(base, ids, eval_first=False):
    model = apply_lora(base.model, LoraSection(dropout=0.0, r=4))
    gen = torch.Generator().manual_seed(0)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:  # B is zero at init; a seeded non-zero B gives every LoRA weight a gradient
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
    if eval_first:  # an eval pass before training must not switch the layers to their inference-only path
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    inputs = model.get_input_embeddings()(ids).detach().to(base.dtype).requires_grad_(True)
    model(inputs_embeds=inputs, labels=ids, token_type_ids=torch.zeros_like(ids)).loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return grads, inputs.grad.float()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_each_cpu_kernel_matches_the_reference_logits(tiny_ct, reference, name):
    ids, ref_logits, _, _ = reference
    loaded = load_base(tiny_ct, device="cpu", kernel=name)
    assert loaded.kernel == name and gptq_backend.layer_kernels(loaded.model) == [kernels.get(name, "cpu").layer]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits.float()
    assert _rel(logits, ref_logits) < (1e-5 if name == "torch" else 0.05)  # bfloat16 activations: ~1e-2
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("name", [n for n in CPU_KERNELS if kernels.get(n, "cpu").trains])
def test_each_trainable_cpu_kernel_is_wrapped_by_lora_and_back_propagates_like_the_reference(tiny_ct, reference, name):
    ids, _, ref_grads, ref_input_grad = reference
    loaded = load_base(tiny_ct, device="cpu", kernel=name, training=True)
    grads, input_grad = _lora_grads(loaded, ids, eval_first=True)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 28  # A and B on all 28 4-bit layers
    tol = 1e-4 if name == "torch" else 0.1  # bfloat16 activations in the 4-bit matmul
    assert max(_rel(grads[n], ref_grads[n]) for n in grads) < tol
    assert _rel(input_grad, ref_input_grad) < tol  # the gradient reaches the layer input through the 4-bit path


def test_info_prints_the_kernel_and_dtype_and_takes_an_override(tiny_ct):
    r = run_cli("info", tiny_ct, "--json", "--device", "cpu", "--kernel", "torch", cwd=None)
    assert r.returncode == 0, r.stderr
    k = json.loads(r.stdout)["kernel"]
    assert k["inference"] == {"kernel": "torch", "layer": "TorchLinear", "dtype": "float32", "reason": "asked for"}
    human = run_cli("info", tiny_ct, "--device", "cpu", cwd=None)
    auto = kernels.choose("cpu", "inference")
    assert f"kernel         inference on cpu: {auto.kernel.name} ({auto.kernel.layer}), {auto.dtype}" in human.stdout
    assert "kernel         training on cpu: " in human.stdout
    bad = run_cli("info", tiny_ct, "--kernel", "marlin", "--device", "cpu", cwd=None)
    assert bad.returncode == 2 and "unknown kernel 'marlin' for cpu" in bad.stderr


def test_the_token_matrix_is_held_in_bfloat16_and_gives_the_float32_logits(tiny_ct):
    """CPU inference keeps the tied embedding / LM head in bfloat16 (as on disk) and upcasts it tile by tile:
    the logits and embeddings equal the plain float32 computation, for one row and for a batch."""
    loaded = load_base(tiny_ct, device="cpu", kernel="torch_fused")  # a float32 inference load (auto may be bf16)
    embed, head = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
    assert head.weight is embed.weight and embed.weight.dtype == torch.bfloat16
    w = embed.weight.float()
    torch.manual_seed(0)
    with torch.no_grad():
        for rows in (1, 16):
            hidden = torch.randn(rows, 3, w.shape[1])
            assert (head(hidden) - torch.nn.functional.linear(hidden, w)).abs().max() < 1e-5
        ids = torch.randint(0, w.shape[0], (2, 5))
        assert torch.equal(embed(ids), torch.nn.functional.embedding(ids, w) * embed.embed_scale.float())
    # a float32 training load keeps the float32 matrix autograd uses
    training = load_base(tiny_ct, device="cpu", kernel="torch", training=True)
    assert training.model.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("kernel", LEAN_KERNELS)
def test_the_lean_int4_forward_gives_the_same_logits_as_gptqmodels_own(tiny_ct, monkeypatch, kernel):
    """After the first forward (GPTQModel's repack), the CPU int4 layers call their kernel's op directly
    (gptq_backend._lean_inference_forward): the logits equal GPTQModel's own forward's, call after call."""
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (2, 24))
    lean = load_base(tiny_ct, device="cpu", kernel=kernel)
    monkeypatch.setattr(gptq_backend, "_lean_inference_forward", lambda module: None)
    plain = load_base(tiny_ct, device="cpu", kernel=kernel)
    with torch.no_grad():
        for _ in range(2):  # the first call repacks, the second takes the lean path
            assert torch.equal(lean.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
    layers = [m for m in lean.model.modules() if gptq_backend.is_quantized_linear(m)]
    assert layers and all(m.lean_op is not None for m in layers)


@pytest.mark.parametrize("kernel", [k for k in CPU_KERNELS if kernels.get(k, "cpu").trains])
def test_training_dequantisation_equals_gptqmodels_own_bit_for_bit(tiny_ct, kernel):
    """A CPU training load dequantises with broadcast group scales (gptq_backend._fast_training_dequant), straight
    into the dtype the layer's training matmul uses: the same bits as GPTQModel's result converted to it."""
    model = load_base(tiny_ct, device="cpu", kernel=kernel, training=True).model
    model.train()  # as the trainer does: TorchAtenLinear converts its zero points here
    layers = [m for m in model.modules() if gptq_backend.is_quantized_linear(m)]
    assert layers and all("dequantize_weight" in vars(m) for m in layers)
    matmul_dtype = torch.bfloat16 if kernel in ("torch_fused", "torch_aten") else torch.float32
    for m in layers:
        ours = m.dequantize_weight()
        assert ours.dtype == matmul_dtype
        assert torch.equal(ours, type(m).dequantize_weight(m).to(matmul_dtype))
