"""vocab_native's C++ passes give the torch path's numbers: the int8 head's input (`prepare`), its finish (the cast,
the top candidates, their exact logits) and greedy sampling's first argmax; rows with a NaN are left to the torch
path; the head and the sampler go through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit.base import vocab_native
from toolkit.base.lm_head import RESCORE, Int8Head, dynamic_unavailable
from toolkit.base.vocab_reduce import BLOCK, first_argmax

# (vocab, hidden): the 270M's head; a short last block and a hidden size off the vector width (scalar tails)
SHAPES = [(262208, 640), (5000 + BLOCK // 2, 72)]
MATMULS = ["weight_only"] + (["dynamic"] if dynamic_unavailable() is None else [])  # as test_lm_head.py


def test_the_kernels_build_here():
    assert vocab_native.unavailable() is None  # the compiled step needs the same toolchain


def _case(vocab: int, cols: int, rows: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, cols, generator=g).to(torch.bfloat16)
    hidden = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    exact = F.linear(hidden, weight)
    product = exact.float() + torch.randn(rows, vocab, generator=g) * 0.3  # an int8 product: exact, off a bit
    return weight, hidden, exact, product


@pytest.mark.parametrize("vocab, cols", SHAPES)
@pytest.mark.parametrize("kind", ["float32", "float32 scaled", "bfloat16"])
def test_finish_rounds_the_product_and_rescores_its_top_candidates_exactly(vocab, cols, kind):
    weight, hidden, exact, product = _case(vocab, cols, rows=3)
    scale = None
    if kind == "float32 scaled":  # the int8 x int8 kernel's output over each row's activation scale
        scale = torch.tensor([0.5, 2.0, 3.0])
        product = product / scale.unsqueeze(1)
    elif kind == "bfloat16":
        product = product.to(torch.bfloat16)
    got, left = vocab_native.finish(product.contiguous(), hidden, weight, RESCORE, BLOCK, scale)
    assert left == [] and got.dtype == torch.bfloat16 and got.shape == (3, vocab)
    rounded = (product * scale.unsqueeze(1) if scale is not None else product).to(torch.bfloat16)
    changed = got != rounded
    # every rescored entry is among the row's RESCORE largest, at most RESCORE of them, and holds the exact logit
    kth = rounded.float().topk(RESCORE, dim=1).values[:, -1:]
    assert bool((rounded.float()[changed].view(-1) >= kth.expand_as(rounded)[changed]).all())
    assert int(changed.sum(1).max()) <= RESCORE
    torch.testing.assert_close(got[changed].float(), exact[changed].float(), rtol=2**-8, atol=0)
    # well inside the top RESCORE: always rescored; the rest is the product rounded, bit for bit
    inside = rounded.float().topk(RESCORE // 2, dim=1).indices
    torch.testing.assert_close(got.gather(1, inside).float(), exact.gather(1, inside).float(), rtol=2**-8, atol=0)
    assert torch.equal(got[~changed], rounded[~changed])
    assert torch.equal(got.argmax(1), exact.argmax(1))


def test_a_row_with_a_nan_is_left_to_the_caller_and_the_others_are_finished():
    weight, hidden, exact, product = _case(4096, 64, rows=3)
    product[1, 100] = float("nan")
    got, left = vocab_native.finish(product, hidden, weight, RESCORE, BLOCK)
    assert left == [1]
    alone, _ = vocab_native.finish(product[[0, 2]].contiguous(), hidden[[0, 2]].contiguous(), weight, RESCORE, BLOCK)
    assert torch.equal(got[[0, 2]], alone)


def test_prepare_gives_the_int8_kernels_input_as_the_torch_ops_do():
    hidden = torch.randn(4, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 7
    hidden[2, 5] = float("inf")
    inp, peak, bad = vocab_native.prepare(hidden)
    assert bad == [2]
    pin = torch.zeros(96)
    pin[:2] = torch.tensor([1.0, -1.0])
    assert torch.equal(inp[0], pin)
    x = hidden.float()
    want_peak = x.abs().amax(1)
    ok = [0, 1, 3]
    assert torch.equal(peak[ok], want_peak[ok])
    assert torch.equal(inp[1:][ok], x[ok] / want_peak[ok].unsqueeze(1))
    assert torch.equal(inp[3], torch.zeros(96))  # the inf row goes in as zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_is_torch_argmax_and_leaves_nan_rows(dtype):
    x = (torch.randn(4, 70001, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    x[0, 7], x[0, 70000] = 40, 40  # a tie: the first index
    x[1] = float("-inf")
    x[3, 123] = float("nan")
    got, left = vocab_native.first_argmax(x, BLOCK)
    assert left == [3]
    assert torch.equal(got[:3], x[:3].argmax(1))
    assert got[0] == 7 and got[1] == 0


@pytest.mark.parametrize("matmul", MATMULS)
def test_the_int8_head_and_greedy_sampling_go_through_the_kernels(monkeypatch, matmul):
    calls = {"finish": 0, "argmax": 0}
    finish, argmax = vocab_native.finish, vocab_native.first_argmax

    def counted_finish(*args, **kwargs):
        calls["finish"] += 1
        return finish(*args, **kwargs)

    def counted_argmax(*args, **kwargs):
        calls["argmax"] += 1
        return argmax(*args, **kwargs)

    monkeypatch.setattr(vocab_native, "finish", counted_finish)
    monkeypatch.setattr(vocab_native, "first_argmax", counted_argmax)
    weight, hidden, exact, _ = _case(8192, 64, rows=2)
    linear = torch.nn.Linear(64, 8192, bias=False)
    linear.weight.data = weight
    head = Int8Head(linear, matmul)
    logits = head(hidden)
    assert calls["finish"] == 1
    assert torch.equal(first_argmax(logits), exact.argmax(1)) and calls["argmax"] == 1
    monkeypatch.setattr(vocab_native, "serves", lambda *a: False)  # the torch path: the same top logits
    torch_path = head(hidden)
    inside = exact.float().topk(RESCORE // 2, dim=1).indices
    assert torch.equal(torch_path.gather(1, inside), logits.gather(1, inside))
    assert torch.equal(torch_path.argmax(1), logits.argmax(1))
