"""vocab_reduce's block reductions give torch.argmax's index, torch.topk's values and the inverse CDF of
searchsorted over a cumsum, on vocabulary-sized rows of several dtypes, with the short last block, ties, -inf rows,
NaN and zero weights."""

from __future__ import annotations

import pytest
import torch

from toolkit.base.vocab_reduce import BLOCK, first_argmax, inverse_cdf, top_indices, top_sorted

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES)
def test_top_sorted_is_torch_topk(dtype: torch.dtype, n: int) -> None:
    x = (torch.randn(3, n, generator=torch.Generator().manual_seed(n + 1)) * 3).to(dtype)
    x[1, n - 2 :] = 70  # in the (maybe short) last block
    x[2, 5:25] = 80  # twenty tied values, ahead of the rest
    values, idx = top_sorted(x, 20)
    want = x.topk(20, dim=1).values
    assert torch.equal(values, want) and values.dtype == x.dtype
    assert torch.equal(x.gather(1, idx), values)  # each index holds its value
    assert all(len(set(row.tolist())) == 20 for row in idx)
    assert idx[2].tolist() == list(range(5, 25))  # equal values: ascending index

    for v, i in zip(values.tolist(), idx.tolist(), strict=True):  # (bfloat16 rows hold ties anywhere)
        assert all(i[j] < i[j + 1] for j in range(19) if v[j] == v[j + 1])


def reference_inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> list[int]:
    """searchsorted over the running sum, in float64 (the rounding the blocks could differ by: none at these sizes)."""
    cdf = weights.double().cumsum(dim=-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).tolist()


@pytest.mark.parametrize("n", SIZES)
def test_inverse_cdf_is_searchsorted_over_the_running_sum(n: int) -> None:
    gen = torch.Generator().manual_seed(n + 2)
    weights = torch.rand(6, n, generator=gen) ** 8  # uneven: a few tokens carry most of the mass
    weights[1, : n // 2] = 0  # zero weight over a long stretch (masked tokens)
    weights[2] = 0
    weights[2, n - 1] = 1.0  # all the weight in the (maybe short) last block
    weights[3, torch.randperm(n, generator=gen)[: n - 5]] = 0  # five tokens left, anywhere
    u = torch.rand(6, generator=gen, dtype=torch.float64)
    got = inverse_cdf(weights, u)
    assert got.tolist() == reference_inverse_cdf(weights, u)
    assert bool((weights.gather(1, got.unsqueeze(1)) > 0).all())  # never a token without weight
    assert got[2] == n - 1


@pytest.mark.parametrize("n", SIZES)
def test_inverse_cdf_at_both_ends_picks_the_first_and_last_token_with_weight(n: int) -> None:
    weights = torch.zeros(2, n)
    weights[:, [3, n // 2, n - 7]] = torch.tensor([0.25, 0.5, 0.25])
    assert inverse_cdf(weights, torch.tensor([0.0, 0.0], dtype=torch.float64)).tolist() == [3, 3]
    almost_one = torch.tensor([1 - 1e-12, 1.0], dtype=torch.float64)  # 1.0: the target at the total (rounding)
    assert inverse_cdf(weights, almost_one).tolist() == [n - 7, n - 7]


def test_inverse_cdf_follows_the_weights() -> None:
    """Many draws over a row of many blocks land on each token as often as its weight says."""
    n, gen = 20001, torch.Generator().manual_seed(5)  # 156 blocks and a short one
    weights = torch.zeros(1500, n)
    tokens = torch.tensor([0, 127, 128, 15000, n - 1])  # block edges and the short last block
    weights[:, tokens] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    got = inverse_cdf(weights, torch.rand(1500, generator=gen, dtype=torch.float64))
    freq = torch.bincount(got, minlength=n)[tokens] / 1500  # standard error <= 0.012
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25]), atol=0.04, rtol=0)


def test_a_row_with_fewer_than_k_values_above_minus_inf_gets_no_index_past_its_end() -> None:
    """A grammar's mask leaves six tokens, in the short last block: its places past the row tie with the masked
    tokens' -inf, and the k largest must still be entries of the row (torch.topk's values)."""
    n, k = 262208, 200  # the last block holds 64 entries; 64 more places pad it
    x = torch.full((2, n), float("-inf"))
    x[:, n - 64 : n - 58] = torch.arange(6.0)
    idx = top_indices(x, k)
    assert bool((idx < n).all()) and all(len(set(row.tolist())) == k for row in idx)
    values, idx = top_sorted(x, k)
    assert torch.equal(values, x.topk(k, dim=1).values) and idx[0, :6].tolist() == list(range(n - 59, n - 65, -1))
