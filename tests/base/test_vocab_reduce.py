"""vocab_reduce's block-maxima argmax and top-k give torch.argmax's index and torch.topk's values, on vocabulary-sized
rows of both dtypes, with the short last block, ties, -inf rows and NaN."""

from __future__ import annotations

import pytest
import torch

from toolkit.base.vocab_reduce import BLOCK, first_argmax, top_indices

SIZES = [262208, 262144, 70001, 4 * BLOCK, 300]  # the 270M's logits, whole blocks, a short last block, the plain path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_first_argmax_is_torch_argmax(dtype: torch.dtype, n: int) -> None:
    x = (torch.randn(5, n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    x[1, n // 3] = x[1, n - 1] = 40  # a tie: the first index wins, as in torch.argmax
    x[2, n - 1] = 50  # the max in the last (maybe short) block
    x[3] = float("-inf")
    x[4, n // 2] = float("nan")  # NaN counts as the max, as in torch.argmax
    got = first_argmax(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[1] == n // 3 and got[2] == n - 1 and got[3] == 0 and got[4] == n // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_top_indices_hold_the_k_largest_values_once_each(dtype: torch.dtype, n: int) -> None:
    k = 64
    x = (torch.randn(4, n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)  # bfloat16: many ties
    x[1, n - 3 :] = 60  # the last (maybe short) block among the top blocks
    x[2, :] = 1.0  # every entry tied
    got = top_indices(x, k)
    assert got.shape == (4, k)
    assert all(len(set(row.tolist())) == k for row in got)  # no index twice (the short block's padding never picked)
    assert bool((got >= 0).all() and (got < n).all())
    values = x.gather(1, got).sort(dim=1).values
    assert torch.equal(values, x.topk(k, dim=1).values.sort(dim=1).values)
    assert {n - 3, n - 2, n - 1} <= set(got[1].tolist())


def test_float64_rows_are_not_rounded_to_float32() -> None:
    """Two values that float32 would make equal: the larger one wins, as in torch.argmax and torch.topk."""
    x = torch.zeros(1, 262208, dtype=torch.float64)
    x[0, 10], x[0, 200000] = 1.0, 1.0 + 1e-12
    assert first_argmax(x).item() == 200000
    assert {10, 200000} <= set(top_indices(x, 64)[0].tolist())
