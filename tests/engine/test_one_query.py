"""The compiled step's one-query attention kernel (engine/one_query.py) against RowKV.append and SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from toolkit.engine.kv_cache import KVLayout, RowKV
from toolkit.engine.one_query import MAX_GROUP, MAX_KEYS, OneQuery, fits


def _reference(q, k, v, row: RowKV, layer: int, scale: float):
    """The eager lean step's way: RowKV.append, the window it then attends to, SDPA with each KV head's group of
    query heads (query head i reads KV head i // group, as transformers' repeat_kv)."""
    kv_heads, heads, d = k.shape[1], q.shape[1], q.shape[3]
    held = row.held(layer)
    row.append(layer, k[0], v[0])
    keys, values = row.last(layer, held + 1)
    o = F.scaled_dot_product_attention(q, keys[None], values[None], scale=scale, enable_gqa=heads != kv_heads)
    return o.reshape(1, heads * d)


def _token(heads: int, kv_heads: int, d: int) -> tuple:
    q = torch.randn(1, heads, 1, d, dtype=torch.bfloat16)
    return (q, *(torch.randn(1, kv_heads, 1, d, dtype=torch.bfloat16) for _ in range(2)))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d"),
    [(4, 2, 64), (4, 1, 256), (MAX_GROUP * 2, 2, 32)],  # two KV heads; the 270M's shape; the largest group
)
@pytest.mark.parametrize("window", [None, 8])
def test_each_step_stores_what_append_stores_and_attends_as_sdpa(heads, kv_heads, d, window):
    """A row from empty through 40 steps (a sliding layer's buffer compacted, a global one's grown on the way): each
    step the kernel's row holds the same keys and values as the eager row, and its output is SDPA's within a
    bfloat16 step or two."""
    torch.manual_seed(0)
    layout = KVLayout((window, None), kv_heads, d, 2)
    one = OneQuery(heads, kv_heads, d, layout.windows, [d**-0.5, 0.3])
    ours, theirs = RowKV(layout), RowKV(layout)
    for _ in range(40):
        q, k, v = _token(heads, kv_heads, d)
        for layer, scale in enumerate(one.scales):
            got = one(q, k, v, ours, layer)
            torch.testing.assert_close(got.float(), _reference(q, k, v, theirs, layer, scale).float(), rtol=0.01,
                                       atol=0.01)  # fmt: skip
            assert ours.length[layer] == theirs.length[layer]
            for x, y in zip(ours.view(layer), theirs.view(layer), strict=True):
                assert torch.equal(x, y)
    assert ours.held(0) == (40 if window is None else window - 1) and ours.held(1) == 40


def test_a_row_at_max_keys_or_inputs_not_contiguous_are_left_to_the_eager_path():
    """A layer that holds MAX_KEYS tokens, or a query laid out otherwise than the kernel reads, gets None and the
    row untouched (the caller's SDPA path stores and attends); one token fewer, the kernel serves, as SDPA."""
    layout = KVLayout((None,), 1, 64, 2)
    one = OneQuery(4, 1, 64, layout.windows, [0.125])
    row = RowKV(layout)
    row.append(0, *(torch.randn(1, MAX_KEYS, 64, dtype=torch.bfloat16) for _ in range(2)))
    before = copy.deepcopy(row)
    q, k, v = _token(4, 1, 64)
    assert one(q, k, v, row, 0) is None
    strided = torch.randn(1, 4, 1, 128, dtype=torch.bfloat16)[..., :64]  # [1, heads, 1, d], heads 128 apart
    row.length[0] = MAX_KEYS - 1
    assert one(strided, k, v, row, 0) is None
    row.length[0] = MAX_KEYS
    assert row.length == before.length
    assert all(torch.equal(x, y) for x, y in zip(row.view(0), before.view(0), strict=True))
    row.length[0] = before.length[0] = MAX_KEYS - 1
    got = one(q, k, v, row, 0)
    torch.testing.assert_close(got.float(), _reference(q, k, v, before, 0, 0.125).float(), rtol=0.01, atol=0.01)


def test_shapes_it_serves():
    assert fits(4, 1, 256, (512, None)) and fits(32, 16, 128, (1024, None)) and fits(2, 1, 128, (None,))
    assert not fits(16, 1, 128, (None,))  # a group of 16 query heads per KV head
    assert not fits(4, 1, 80, (None,))  # not whole steps of 32
    assert not fits(4, 1, 256, (2, None))  # a window of 2 keeps no past token
    with pytest.raises(ValueError, match="does not serve"):
        OneQuery(16, 1, 128, (None,), [0.1])
